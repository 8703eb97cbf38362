"""Running the repository's scripts in subprocesses, and reading what they leave: their peak memory, JSON outputs
and logs."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: the scripts' folder


def peak_rss_mib(pid):
    """The process's resident-set high-water mark so far (Linux), in MiB; None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def run(args, log_path, watch=None, check=True):
    """Run a repository script (or `-m module`), its output to `log_path`; returns the peak resident memory in MiB.
    `watch(process)` is called twice a second while it runs; with `check`, an exit status other than 0 ends the
    bench."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peak = None
        while proc.poll() is None:
            peak = max(filter(None, [peak, peak_rss_mib(proc.pid)]), default=None)
            if watch:
                watch(proc)
            time.sleep(0.5)
    if check and proc.returncode != 0:
        sys.exit(f"error: {' '.join(args)} failed (exit {proc.returncode}); see {log_path}")
    return peak


def read_json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def read_text(path):
    """The text of the file at `path`; "" when there is none."""
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()
