"""train.py under torchrun: two CPU processes (gloo) with DistributedDataParallel, end to end on AT&T faces.

The batches of the two processes are checked in tests/test_data.py (disjoint identity blocks of one global batch)
and the gathered mining in tests/test_losses.py (the loss and gradient of one process on the global batch).
"""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from benchmarks.sharded import trainers
from checkpoint import load_checkpoint, model_from_checkpoint, read_weights
from conftest import ROOT, run_script

pytestmark = pytest.mark.e2e
SMALL = ["--backbone=smallcnn", "--image_size=32", "--embedding_dim=32"]


def torchrun(*args, stop_rank=None):
    """train.py in two processes on this machine; the CompletedProcess, stdout and stderr apart. With `stop_rank`,
    that process alone gets a SIGTERM once the first trained epoch is reported."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    if stop_rank is None:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        return proc
    launcher = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if line.startswith("epoch 1/"):
            os.kill(worker(launcher.pid, stop_rank), signal.SIGTERM)
            break
    stdout, stderr = launcher.communicate(timeout=600)
    return subprocess.CompletedProcess(command, launcher.returncode, "".join(lines) + stdout, stderr)


def worker(launcher, rank):
    """The pid of the launcher's child process of that rank."""
    pid = trainers(launcher).get(rank)
    assert pid, f"no process of rank {rank} under {launcher}"
    return pid


def test_two_processes_mine_the_global_batch_and_the_run_resumes_in_one(att_subset, tmp_path):
    """The facenet_online recipe (ResNet18, semi-hard triplets mined in P x K batches), one loader worker in each
    process."""
    out = tmp_path / "out"
    # P = 3 identities x K = 2 images in each process: together the six people, 12 of the 48 images per step
    train = torchrun("configs/facenet_online.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=2",
                     "--image_size=32", "--batch_size=6", "--images_per_identity=2", "--num_workers=1")
    assert train.stdout.count("epoch 2/2 |") == 1  # the master process alone prints
    assert "Traceback" not in train.stderr
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 4, 8] and [h["images"] for h in history[1:]] == [48, 48]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    state = load_checkpoint(str(out / "last.pth"))
    assert len(state["rng"]["ranks"]) == 2 and state["world_size"] == 2  # the generators of both processes
    model_from_checkpoint(load_checkpoint(str(out / "tb_model.pth")))  # the plain network's weights, as test.py loads

    run_script("train.py", f"--resume={out / 'last.pth'}", "--epochs=3")
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 4, 8, 16]  # one process: P = 3 on its own, 8 steps of 6 images


def test_a_signal_to_one_process_stops_both_at_one_step_and_the_run_resumes(att_subset, tmp_path):
    out = tmp_path / "out"
    args = [f"--data_dir={att_subset}", f"--out_dir={out}", "--loss=triplet", "--batch_size=8", *SMALL]
    stopped = torchrun(*args, "--epochs=8", stop_rank=1)  # random triplets, shared out between the processes
    assert stopped.returncode != 0  # (torchrun reports a process that stopped with 143 as a failure)
    assert f"resume with: torchrun --nproc_per_node=2 train.py --resume={out / 'last.pth'}" in stopped.stderr
    assert load_checkpoint(str(out / "last.pth"))["epoch"] < 8
    torchrun(f"--resume={out / 'last.pth'}")
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(9))
    # 48 anchors, 24 in each process: 3 steps of 8 triplets (24 images) each, 144 images in all
    assert history[1]["step"] == 3 and history[1]["images"] == 144 and history[-1]["step"] == 24


def test_partial_fc_shards_the_centres_saves_them_whole_and_a_stopped_run_resumes_exactly(att_subset, tmp_path):
    """PartialFC at sample rate 0.5 (one sampled class of each process's three, besides the batch's), 4 steps of
    12 images an epoch (the step schedule: the same learning rates for a run of 3 epochs and one resumed to 3)."""
    args = [f"--data_dir={att_subset}", "--partial_fc=0.5", "--batch_size=6", "--images_per_identity=2",
            "--lr_schedule=step", "--epochs=3", *SMALL]
    whole = torchrun(*args, f"--out_dir={tmp_path / 'whole'}")
    assert "centres: 6 x 32" in whole.stdout and "per process of 2" in whole.stdout
    history = json.loads((tmp_path / "whole" / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 4, 8, 12]
    assert all(math.isnan(h["valid_loss"]) for h in history)  # the master alone holds half the centres
    expected = load_checkpoint(str(tmp_path / "whole" / "last.pth"))
    assert expected["loss_state"]["weight"].shape == (6, 32)  # whole, as an unsharded run's
    best = load_checkpoint(str(tmp_path / "whole" / "tb_model.pth"))
    assert best["loss_state"]["weight"].shape == (6, 32)

    out = tmp_path / "stopped"
    # in epoch 2, where last.pth is saved mid-epoch (or after it, on a slow machine)
    assert torchrun(*args, f"--out_dir={out}", stop_rank=1).returncode != 0
    assert load_checkpoint(str(out / "last.pth"))["epoch"] < 3
    torchrun(f"--resume={out / 'last.pth'}")
    resumed = load_checkpoint(str(out / "last.pth"))
    for key in ("model", "loss_state", "optimizer"):
        assert_same(resumed[key], expected[key], key)


def assert_same(a, b, where):
    """Nested dicts and lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, (dict, list)):
        assert (a.keys() if isinstance(a, dict) else len(a)) == (b.keys() if isinstance(b, dict) else len(b)), where
        for key in (a if isinstance(a, dict) else range(len(a))):
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    else:
        assert a == b, where


def test_sync_bn_on_the_cpu_is_refused_before_training(tmp_path):
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")  # as torchrun sets them
    proc = subprocess.run([sys.executable, "train.py", f"--data_dir={tmp_path}", "--sync_bn=True", "--device=cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "--sync_bn" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_processes_share_the_teachers_photos_and_learn_from_one_cache(att_subset, tmp_path):
    """--teacher under torchrun: each process embeds its share of the training photos (a part file each), both then
    learn from the whole cache; a second run computes nothing."""
    teacher = tmp_path / "teacher"
    run_script("train.py", f"--data_dir={att_subset}", f"--out_dir={teacher}", "--epochs=0", *SMALL)
    cache = tmp_path / "cache"
    flags = [f"--data_dir={att_subset}", "--loss=none", "--epochs=1", "--batch_size=8",
             f"--teacher={teacher / 'tb_model.pth'}", f"--teacher_cache={cache}", *SMALL]
    torchrun(*flags, f"--out_dir={tmp_path / 'first'}")
    parts = {p: p.stat().st_mtime_ns for p in cache.glob("*/part-*.pt")}
    photos = sum(len(read_weights(str(p))["keys"]) for p in parts)
    assert len(parts) == 2 and photos == 48  # the six people's 8 training photos each, half a process
    torchrun(*flags, f"--out_dir={tmp_path / 'second'}")
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/part-*.pt")} == parts
    assert load_checkpoint(str(tmp_path / "second" / "last.pth"))["config"]["teacher"] == str(teacher / "tb_model.pth")
