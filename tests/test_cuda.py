"""The CUDA paths: autocast (bfloat16, and float16 with loss scaling), channels_last, torch.compile, and torchrun with
NCCL. Skipped where no GPU is present (CI runs on the CPU); `python -m pytest tests/test_cuda.py` on a GPU machine.
The tests that run the scripts in subprocesses are marked e2e."""
import json
import subprocess
import sys

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from conftest import ROOT, run_script
from losses import ArcFaceLoss
from model import EmbeddingNet, select_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = ["--backbone=resnet18", "--image_size=48,40", "--batch_size=16"]


def train_steps(model, criterion, images, labels, autocast, scaler, steps=16):
    """train.py's steps: embeddings under autocast, the loss in float32, a (scaled) backward and Adam update.
    Float16 loss scaling starts at 2**16 and skips the steps whose gradients overflow, halving the scale each time."""
    opt = torch.optim.Adam(list(model.parameters()) + list(criterion.parameters()), fused=True)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with autocast:
            embeddings = model(images).float()
        loss, _ = criterion(embeddings, labels)  # (loss, stats)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return embeddings, loss


@pytest.mark.parametrize("bfloat16", [True, False])
def test_a_mixed_precision_step_in_channels_last_trains_in_float32(bfloat16, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bfloat16)
    device, autocast, fp16_scaling = select_device("cuda", amp=True)
    assert autocast.fast_dtype == (torch.bfloat16 if bfloat16 else torch.float16) and fp16_scaling == (not bfloat16)
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18").to(device, memory_format=torch.channels_last)
    criterion = ArcFaceLoss(128, 4).to(device)
    images = torch.randn(8, 3, 64, 56, device=device).contiguous(memory_format=torch.channels_last)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cuda", enabled=fp16_scaling)
    embeddings, loss = train_steps(model, criterion, images, torch.arange(8, device=device) % 4, autocast, scaler)
    assert embeddings.dtype == torch.float32 and torch.allclose(embeddings.norm(dim=1), torch.ones(8, device=device),
                                                                atol=1e-3)
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())  # (master weights)
    assert sum(not torch.equal(a, b) for a, b in zip(before, model.parameters())) > len(before) // 2
    assert scaler.is_enabled() == (not bfloat16)
    if not bfloat16:  # the first steps overflowed float16 at 2**16 and were skipped, as they should
        assert scaler.get_scale() < 2 ** 16


def test_channels_last_computes_what_the_default_layout_does():
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18").cuda().eval()
    images = torch.randn(4, 3, 64, 56, device="cuda")
    with torch.no_grad():
        plain = model(images)
        nhwc = model.to(memory_format=torch.channels_last)(images.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(plain, nhwc, atol=1e-2)  # (TF32 convolutions: not bit-equal)


@pytest.mark.e2e
def test_train_then_test_on_the_gpu_and_the_checkpoint_loads_on_the_cpu(att_subset, tmp_path):
    out = tmp_path / "run"
    run_script("train.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=2", *SMALL)
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cuda" and config["world_size"] == 1
    assert config["channels_last"] is True and config["num_workers"] >= 1  # the defaults' choices on CUDA
    history = json.loads((out / "history.json").read_text())
    assert all(h["valid_identification"] > 0 for h in history)
    run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--out_dir={tmp_path / 'eval'}")
    gpu_top1 = json.loads((tmp_path / "eval" / "results.json").read_text())["identification"]["accuracy"]
    run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--out_dir={tmp_path / 'cpu'}", "--device=cpu")
    cpu_top1 = json.loads((tmp_path / "cpu" / "results.json").read_text())["identification"]["accuracy"]
    assert abs(gpu_top1 - cpu_top1) <= 1 / 12 + 1e-6  # bfloat16 against float32: one probe of 12 may move
    state = load_checkpoint(str(out / "tb_model.pth"))
    assert next(model_from_checkpoint(state, "tb_model.pth").parameters()).device.type == "cpu"


@pytest.mark.e2e
def test_compiled_training_runs_and_saves_the_plain_weights(att_subset, tmp_path):
    out = tmp_path / "run"
    run_script("train.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=1", *SMALL, "--compile=True",
               "--channels_last=True")
    state = load_checkpoint(str(out / "last.pth"))
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])


@pytest.mark.e2e
def test_torchrun_on_one_gpu_takes_the_nccl_path_with_sync_bn(att_subset, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=2", *SMALL, "--sync_bn=True",
               "--loss=triplet", "--mining=batch_hard", "--images_per_identity=4"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    config = json.loads((out / "config.json").read_text())
    assert config["device"] == "cuda:0" and config["world_size"] == 1  # the process's own GPU: the distributed path
    state = load_checkpoint(str(out / "last.pth"))
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["rng"].keys() == {"ranks"}  # the generators of every process, gathered over NCCL
    run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--out_dir={tmp_path / 'eval'}")
