"""No lost work, no crash on bad data, no code execution from a checkpoint: train.py's --resume, its handling of
SIGINT/SIGTERM, NaN losses, failed saves and unreadable images, run as a user runs them (subprocesses), and the
atomic writes under them. Mining on degenerate batches is tested in test_losses.py, refusing a checkpoint that
would run code in test_model.py (load_checkpoint) and here through --resume."""
import json
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
from PIL import Image

from conftest import ROOT, make_faces, write_image
from data_utils import FaceFolder, atomic_write, make_transform
from model import load_checkpoint

# tiny runs: 4 identities x 8 images of 32x32, P x K = 2 x 2 (8 steps an epoch), a StepLR schedule (a 2-epoch run
# and a 4-epoch run share it, so 2 epochs + 2 resumed ones can equal 4), smallcnn (its dropout draws from the RNG)
SMALL = ["--backbone=smallcnn", "--image_size=32", "--batch_size=4", "--images_per_identity=2",
         "--embedding_dim=16", "--hidden_dim=32", "--seed=3", "--lr_schedule=step", "--step_size=1", "--gamma=0.5"]
PATHS = {"pk_arcface": [], "random_triplets": ["--loss=triplet", "--mining=none"]}
# one torch thread: small machines run the suite, and a contended thread pool is slow; unbuffered, so that a test
# sees each epoch line as it comes
ENV = dict(os.environ, PYTHONWARNINGS="default", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def train(*args, check=True):
    """Run train.py with `args`; the CompletedProcess (stdout and stderr together in .stdout)."""
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}")
    return proc


def train_until(signals, *args):
    """Start train.py with `args`; for each (line start, signal) of `signals` in turn, send the signal once a line of
    its output starts so. Returns (exit status, whole output)."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, waiting = [], list(signals)
    try:
        for line in proc.stdout:
            lines.append(line)
            if waiting and line.startswith(waiting[0][0]):
                proc.send_signal(waiting.pop(0)[1])
            if not waiting:
                break
        lines.append(proc.communicate(timeout=600)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_state(a, b):
    """Two last.pth files hold the same model and optimiser state, bit for bit."""
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "model weights differ"
    assert all(torch.equal(a["loss_state"][k], b["loss_state"][k]) for k in a["loss_state"])
    slots_a, slots_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert slots_a.keys() == slots_b.keys()
    assert all(torch.equal(slots_a[i][k], slots_b[i][k]) for i in slots_a for k in slots_a[i]), "optimiser differs"
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"]
    assert [h.keys() for h in a["history"]] == [h.keys() for h in b["history"]]
    timing = ("seconds", "second", "images")  # how long it took, and the images behind each throughput
    without_time = [[{k: v for k, v in h.items() if not k.endswith(timing)} for h in s["history"]] for s in (a, b)]
    assert without_time[0] == without_time[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    make_faces(root / "train", identities=4, images=8)
    make_faces(root / "valid", identities=4, images=2)
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """runs(kind, epochs): the out_dir of a finished run of SMALL on `data`, trained once per module and left as
    it is."""
    done = {}

    def run(kind, epochs):
        if (kind, epochs) not in done:
            out = tmp_path_factory.mktemp(f"{kind}_{epochs}")
            train(f"--data_dir={data}", f"--out_dir={out}", f"--epochs={epochs}", *SMALL, *PATHS[kind])
            done[kind, epochs] = out
        return done[kind, epochs]
    return run


# -----------------------------------------------------------------------------
# resume

@pytest.mark.parametrize("kind", PATHS)
def test_two_epochs_and_two_resumed_equal_four_straight(kind, runs, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(runs(kind, 2), out)  # resumed in another folder: out_dir follows the checkpoint
    proc = train(f"--resume={out / 'last.pth'}", "--epochs=4")
    assert "resuming" in proc.stdout and "epoch 3/4" in proc.stdout and "epoch 1/4" not in proc.stdout
    assert_same_state(out / "last.pth", runs(kind, 4) / "last.pth")
    history = torch.load(out / "last.pth", weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1, 2, 3, 4]


def test_last_pth_holds_the_training_state_as_plain_values(runs):
    path = runs("pk_arcface", 2) / "last.pth"
    state = load_checkpoint(str(path))  # weights_only=True: no class needs allow-listing
    assert {"optimizer", "scheduler", "scaler", "step", "history", "best", "train_seconds", "rng",
            "position"} <= state.keys()
    assert state["epoch"] == 2 and state["position"] is None and state["step"] == 2 * 8
    assert state["best"]["epoch"] in (0, 1, 2) and len(state["history"]) == 3
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda", "loader"}
    assert "optimizer" not in load_checkpoint(str(path.with_name("tb_model.pth")))


def write_evil_checkpoint(path, marker):
    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)
    torch.save(dict(model={}, model_config={}, rng={}, trap=Payload()), path)


@pytest.mark.parametrize("case,message", [
    ("conflict", "--lr=0.1 (the run has 0.002)"),
    ("best_model", "holds no training state"),
    ("finished", "has trained all its 2 epochs"),
    ("missing", "no such checkpoint"),
    ("evil", "refused"),
])
def test_resume_refuses_what_it_cannot_continue(case, message, runs, tmp_path):
    out = runs("pk_arcface", 2)
    args = {"conflict": [f"--resume={out / 'last.pth'}", "--epochs=3", "--lr=0.1"],
            "best_model": [f"--resume={out / 'tb_model.pth'}", "--epochs=3"],
            "finished": ["--resume=last", f"--out_dir={out}"],
            "missing": [f"--resume={tmp_path / 'nothing.pth'}"],
            "evil": [f"--resume={tmp_path / 'evil.pth'}"]}[case]
    if case == "evil":
        write_evil_checkpoint(tmp_path / "evil.pth", tmp_path / "ran")
    before = sorted(os.listdir(out))
    proc = train(*args, check=False)
    assert proc.returncode == 1 and message in proc.stdout and "Traceback" not in proc.stdout
    assert sorted(os.listdir(out)) == before  # refused before writing anything
    assert not (tmp_path / "ran").exists()


# -----------------------------------------------------------------------------
# interrupts

def resume_command(output, out):
    found = re.findall(r"^resume with: (python train\.py .*)$", output, re.M)
    assert found == [f"python train.py --resume={out / 'last.pth'}"], output
    return shlex.split(found[0])[2:]


def test_ctrl_c_saves_and_resuming_ends_where_an_uninterrupted_run_does(data, runs, tmp_path):
    out = tmp_path / "run"
    code, output = train_until([("epoch 1/4", signal.SIGINT)], f"--data_dir={data}", f"--out_dir={out}",
                               "--epochs=4", *SMALL)
    assert code == 130 and "Traceback" not in output, output
    assert re.search(r"SIGINT (in epoch 2 after step \d+ of 8|after epoch [123]): saved ", output), output
    state = load_checkpoint(str(out / "last.pth"))
    assert state["epoch"] >= 1 and state["history"][-1]["epoch"] == state["epoch"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    train(*resume_command(output, out))
    assert_same_state(out / "last.pth", runs("pk_arcface", 4) / "last.pth")


def test_sigterm_saves_and_the_triplet_run_resumes_exactly(data, runs, tmp_path):
    out = tmp_path / "run"
    code, output = train_until([("epoch 0/4", signal.SIGTERM)], f"--data_dir={data}", f"--out_dir={out}",
                               "--epochs=4", *SMALL, *PATHS["random_triplets"])
    assert code == 143 and "Traceback" not in output and "SIGTERM" in output, output
    resume_command(output, out)
    load_checkpoint(str(out / "last.pth"))
    train("--resume=last", f"--out_dir={out}")  # the keyword form of the printed command
    assert_same_state(out / "last.pth", runs("random_triplets", 4) / "last.pth")


def test_a_second_ctrl_c_quits_at_once_leaving_no_partial_file(data, tmp_path):
    out = tmp_path / "run"
    code, output = train_until([("epoch 1/4", signal.SIGINT), ("SIGINT: stopping", signal.SIGINT)],
                               f"--data_dir={data}", f"--out_dir={out}", "--epochs=4", *SMALL)
    assert code == 130 and "Traceback" not in output, output
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert load_checkpoint(str(out / "last.pth"))["epoch"] >= 1  # whichever save the second Ctrl-C left alone


# -----------------------------------------------------------------------------
# NaN, failed saves, determinism

def test_nan_loss_stops_with_advice_and_keeps_the_last_good_checkpoints(data, tmp_path):
    out = tmp_path / "run"
    proc = train(f"--data_dir={data}", f"--out_dir={out}", "--epochs=3", "--lr=1e30", *SMALL, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout
    assert re.search(r"error: the training loss is nan in epoch 1 at step \d+ of 8", proc.stdout), proc.stdout
    assert "--lr" in proc.stdout and "--amp=False" in proc.stdout and "check the data" in proc.stdout
    for name in ("last.pth", "tb_model.pth"):
        state = load_checkpoint(str(out / name))
        assert state["epoch"] == 0
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0]


def test_a_failed_save_is_reported_and_training_goes_on(data, tmp_path):
    out = tmp_path / "run"
    (out / "last.pth").mkdir(parents=True)  # os.replace cannot put a file there, even as root
    (out / "last.pth" / "keep").write_text("x")
    proc = train(f"--data_dir={data}", f"--out_dir={out}", "--epochs=2", *SMALL)
    assert proc.stdout.count(f"warning: could not save {out / 'last.pth'}") == 3  # epochs 0, 1, 2
    assert "epoch 2/2" in proc.stdout and "best valid top-1" in proc.stdout
    assert load_checkpoint(str(out / "tb_model.pth"))["epoch"] in (0, 1, 2)
    assert len(json.loads((out / "history.json").read_text())) == 3
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_deterministic_flag_runs_on_the_cpu_and_changes_nothing_there(data, runs, tmp_path):
    out = tmp_path / "run"
    train(f"--data_dir={data}", f"--out_dir={out}", "--epochs=2", "--deterministic=True", *SMALL)
    reference = weights(runs("pk_arcface", 2) / "last.pth")
    assert all(torch.equal(weights(out / "last.pth")[k], reference[k]) for k in reference)


# -----------------------------------------------------------------------------
# unreadable images

def write_png_declaring(path, width, height):
    """A tiny PNG whose header declares width x height pixels (a decompression bomb to Pillow)."""
    write_image(path, size=(2, 2))
    png = bytearray(path.read_bytes())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts at byte 16, after signature, length, type
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # CRC of the chunk type and its 13 data bytes
    path.write_bytes(bytes(png))


def write_truncated(path, keep=0.6):
    write_image(path, size=(160, 160), mode="RGB")  # large enough that the cut leaves the header whole
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * keep)])


# name: (file name, how to write it, found at the scan or only when loaded)
BAD_IMAGES = {
    "zero_byte_jpg": ("empty.jpg", lambda p: p.write_bytes(b""), "scan"),
    "text_named_jpg": ("notes.jpg", lambda p: p.write_text("not a picture"), "scan"),
    "truncated_png": ("cut.png", write_truncated, "load"),
    "truncated_jpeg": ("cut.jpg", write_truncated, "load"),
    "bomb_above_limit": ("bomb.png", lambda p: write_png_declaring(p, 10_000, 10_000), "scan"),  # > MAX_IMAGE_PIXELS
    "bomb_above_twice_limit": ("huge.png", lambda p: write_png_declaring(p, 20_000, 20_000), "scan"),
}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_each_kind_of_unreadable_image_is_skipped(kind, tmp_path):
    name, write, found = BAD_IMAGES[kind]
    make_faces(tmp_path, identities=2, images=3)
    bad = tmp_path / "p0" / name
    write(bad)
    assert (Image.MAX_IMAGE_PIXELS or 0) < 10_000 * 10_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        faces = FaceFolder(str(tmp_path), make_transform(16, train=False))
        at_scan = list(faces.skipped)
        images = [faces[i][0] for i in range(len(faces))]
    assert faces.skipped == [str(bad)]
    assert at_scan == ([str(bad)] if found == "scan" else [])
    assert all(image.shape == (3, 16, 16) for image in images)  # a file failing at load is replaced


def test_unreadable_images_are_listed_in_skipped_files_and_training_completes(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    expected = set()
    for i, (name, write, _) in enumerate(BAD_IMAGES.values()):
        bad = root / "train" / f"p{i % 4}" / name
        write(bad)
        expected.add(str(bad))
    write_truncated(root / "valid" / "p1" / "cut_valid.jpg")  # a probe: found by the evaluation
    expected.add(str(root / "valid" / "p1" / "cut_valid.jpg"))
    out = tmp_path / "run"
    proc = train(f"--data_dir={root}", f"--out_dir={out}", "--epochs=1", *SMALL)
    assert "epoch 1/1" in proc.stdout and (out / "tb_model.pth").is_file()
    lines = (out / "skipped_files.txt").read_text().splitlines()
    listed = dict(line.split("\t") for line in lines)
    assert set(listed) == expected and len(lines) == len(expected)
    assert all(reason and reason != "readable now" for reason in listed.values())
    bombs = [reason for path, reason in listed.items() if path.endswith(("bomb.png", "huge.png"))]
    assert len(bombs) == 2 and all("DecompressionBomb" in reason for reason in bombs)


def test_a_run_without_unreadable_images_writes_an_empty_list(runs):
    assert (runs("pk_arcface", 2) / "skipped_files.txt").read_text() == ""


# -----------------------------------------------------------------------------
# atomic writes (a writer failing with OSError is tested in test_data.py)

def test_a_save_interrupted_half_way_keeps_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.pth"
    atomic_write(path, lambda f: torch.save(dict(model={"w": torch.ones(3)}, model_config={}), f))
    whole = path.read_bytes()

    def interrupted(f):
        f.write(whole[: len(whole) // 2])
        raise KeyboardInterrupt  # Ctrl-C is not an OSError: the temporary file must go all the same
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert torch.equal(load_checkpoint(str(path))["model"]["w"], torch.ones(3))
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


def test_names_with_spaces_and_non_ascii_characters_and_a_symlinked_identity_work(tmp_path):
    data, elsewhere = tmp_path / "my faces", tmp_path / "elsewhere"
    for split, count in (("train", 3), ("valid", 1)):
        for person in ("José María", "Zoë O'Neil"):
            for j in range(count):
                write_image(data / split / person / f"photo {j} – ñ.png", seed=len(person) + j)
        for j in range(count):  # a third identity whose folder is a symlink to a folder outside the tree
            write_image(elsewhere / split / "linked" / f"{j}.png", seed=50 + j)
        os.symlink(elsewhere / split / "linked", data / split / "linked person")
    out = tmp_path / "run ü"
    train(f"--data_dir={data}", f"--out_dir={out}", "--epochs=1", *SMALL[:4])
    proc = subprocess.run([sys.executable, "test.py", f"--checkpoint={out / 'tb_model.pth'}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    found = json.loads((out / "results.json").read_text(encoding="utf-8"))["identification"]
    assert set(found["per_identity"]) == {"José María", "Zoë O'Neil", "linked person"}
    assert found["probes_scored"] == 3
