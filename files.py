"""Writing result files safely: a file is either the complete new version or the previous one, never half of one
(a crash, Ctrl-C or a full disk part-way through a save leaves the old file in place)."""
import contextlib
import json
import os
import sys
import tempfile


def _file_mode():
    """The mode open() gives a new file under this process's umask (read once: setting it is the only way)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path, write, mode="wb"):
    """Write `path` through `write(file)` into a temporary file beside it, fsync, then rename over it:
    the target is either the complete new file or the old one, never half a file. A failure (an exception of
    `write` too) removes the temporary file and is raised."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.chmod(tmp, FILE_MODE)  # mkstemp's file is private (0600)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # the folder's entry too, so that the rename outlives a power cut (POSIX; some file systems refuse: no matter)
    with contextlib.suppress(OSError, AttributeError):
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)


def save_json(obj, path):
    """`obj` (plain JSON values) as indented JSON at `path`, written atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def reported(path, save):
    """Run `save()`, which writes `path`; a failure (a full disk, no permission, a folder gone) is reported on
    stderr rather than raised, so that training goes on. Returns whether it saved."""
    try:
        save()
        return True
    except OSError as err:
        print(f"warning: could not save {path}: {err}; training goes on", file=sys.stderr)
        return False

