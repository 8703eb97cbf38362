"""Atomic writes: a file is the complete new version or the previous one, never half of one, whatever stops the
writer (an OSError, Ctrl-C); synced to disk with its folder entry, with the mode an ordinary open gives."""
import json
import os
import stat

import pytest
import torch

from files import atomic_write, save_json


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write(target, lambda f: f.write(b"good"))

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["state.bin"]


def test_a_save_interrupted_half_way_keeps_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pth"
    atomic_write(path, lambda f: torch.save(dict(model={"w": torch.ones(3)}, model_config={}), f))
    whole = path.read_bytes()

    def interrupted(f):
        f.write(whole[: len(whole) // 2])
        raise KeyboardInterrupt  # Ctrl-C is not an OSError: the temporary file must go all the same
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pth"]


def test_atomic_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"data"))
    assert (tmp_path / "a.bin").read_bytes() == b"data"
    assert synced == (["file", "folder"] if hasattr(os, "O_DIRECTORY") else ["file"])  # POSIX: its new name too


def test_atomic_write_gives_the_file_the_mode_an_ordinary_open_would(tmp_path):
    atomic_write(tmp_path / "results.json", lambda f: f.write(b"{}"), mode="wb")
    (tmp_path / "plain.json").write_bytes(b"{}")
    mode = stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode) and mode & 0o044  # not mkstemp's 0600


def test_save_json_creates_the_folder_and_replaces_the_file(tmp_path):
    path = tmp_path / "run" / "results.json"
    save_json(dict(accuracy=0.5), path)
    save_json(dict(accuracy=0.75, folds=[1, 2]), path)
    assert json.loads(path.read_text()) == dict(accuracy=0.75, folds=[1, 2])
    assert os.listdir(path.parent) == ["results.json"]
