"""train.py, test.py and predict.py run as a user runs them (subprocesses) on AT&T faces: what a run writes and
what test.py and predict.py make of it, stopping and resuming, the failures that must lose no work, bad command
lines, and every recipe of configs/ (torchrun: test_distributed.py).

Each subprocess spends seconds on its imports, so each run proves several points, at a small input size for an
epoch or two. The runs that several tests read are module fixtures; those tests share an xdist_group, which
pytest.ini's --dist=loadgroup keeps on one worker. What a function does on its own is tested in-process in the
other files."""
import importlib.util
import json
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint import load_checkpoint, model_from_checkpoint, read_weights
from conftest import ROOT, make_faces, run_script, write_image, write_teacher, write_verification_bin
from data_utils import load_rgb, make_transform
from prepare import align_dataset, split_dataset
from pretrained import load_face_network

pytestmark = pytest.mark.e2e
SIX = {f"s{k}" for k in range(1, 7)}  # the people of att_subset
PAIRS = os.path.join(ROOT, "tests", "data", "att_pairs.txt")  # 40 pairs of s1..s10 in 2 folds, LFW's format
# the att_fast_cpu recipe (ResNet18, ArcFace over P x K batches) shrunk: 6 steps of 4 people x 2 images an epoch
ATT = ["configs/att_fast_cpu.py", "--epochs=1", "--image_size=48,40", "--batch_size=8"]
TINY = ["--backbone=smallcnn", "--image_size=32", "--batch_size=8", "--embedding_dim=32", "--hidden_dim=64"]
# every recipe of configs/ and the test that trains it, shrunk but with its own backbone and loss
RECIPE_RUNS = {
    "att_fast_cpu.py": "att_run (ATT), stopped and resumed in test_ctrl_c_mid_epoch_saves_and_the_printed_command_...",
    "distill_lfw_cpu.py": "test_the_lfw_recipes_train_on_a_few_aligned_people_and_measure_people_never_trained_on",
    "distill_dlib_resnet.py": "test_the_lfw_recipes_train_on_a_few_aligned_people_and_measure_people_never_trained_on",
    "facenet_online.py": "test_distributed.py::test_two_processes_mine_the_global_batch_and_the_run_resumes_in_one",
    "lfw_cpu.py": "test_the_lfw_recipes_train_on_a_few_aligned_people_and_measure_people_never_trained_on",
    "lfw_gpu.py": "test_the_lfw_recipes_train_on_a_few_aligned_people_and_measure_people_never_trained_on",
    "ms1m_iresnet50.py": "test_the_iresnet50_recipe_trains_and_its_checkpoint_evaluates",
    "pair_classifier.py": "test_pair_classifier_recipe_in_channels_last_with_loader_workers_evaluating_every_...",
    "passport_vgg16.py": "test_a_second_ctrl_c_quits_the_passport_recipe_at_once_leaving_no_partial_file",
    "resnet50_distortion.py": "test_unreadable_images_odd_names_and_a_failed_save_leave_training_to_finish",
    "resnet50_triplet.py": "test_sigterm_stops_the_resnet50_triplet_recipe_with_143_and_a_resumable_last_pth",
    "siamese_contrastive.py": "test_compiled_training_of_the_siamese_recipe_loads_in_test_py",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in each subprocess: the suite runs two test processes, often on two cores, where
    contended thread pools are slow."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def train(*args, check=True):
    return run_script("train.py", *args, check=check)


def predict(checkpoint, *args, check=True):
    return run_script("predict.py", f"--checkpoint={checkpoint}", *args, check=check)


def assert_refused(proc, named, status=1):
    """The script stopped with `status` and a one-line error that names `named` (a flag or a path), no
    traceback."""
    assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and named in errors[0], proc.stderr


def assert_no_temporaries(folder):
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def history(out):
    return json.loads((out / "history.json").read_text(encoding="utf-8"))


def assert_loads(path):
    """The checkpoint at `path` rebuilds, as test.py and predict.py rebuild it, into a network that embeds."""
    state = load_checkpoint(str(path))
    model = model_from_checkpoint(state, str(path)).eval()
    with torch.no_grad():
        embeddings = model(torch.zeros(2, 3, *state["image_size"]))
    assert embeddings.shape == (2, state["model_config"]["embedding_dim"]) and torch.isfinite(embeddings).all()
    return state


def cpu_ticks(pid):
    """The CPU time a process has used, in clock ticks (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        return sum(map(int, stat.read().rsplit(")", 1)[1].split()[11:13]))  # utime, stime


def run_until(signals, *args):
    """Start train.py with `args`; for each (line start, signal) of `signals` in turn, send the signal once a line
    of its output (stdout and stderr together) starts so and the process has computed 50 ms more: past the end of
    the epoch that printed the line (it checks for a stop right after the print), into the next one. Returns (exit
    status, the whole output)."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines, waiting = [], list(signals)
    try:
        for line in proc.stdout:
            lines.append(line)
            if waiting and line.startswith(waiting[0][0]):
                ticks = cpu_ticks(proc.pid) + max(1, os.sysconf("SC_CLK_TCK") // 20)
                while proc.poll() is None and cpu_ticks(proc.pid) < ticks:
                    time.sleep(0.002)
                proc.send_signal(waiting.pop(0)[1])
            if not waiting:
                break
        lines.append(proc.communicate(timeout=600)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines)


def resume_command(output, out):
    """The script and arguments of the `resume with: python train.py --resume=PATH` line a stopped run printed."""
    found = re.findall(r"^resume with: (python train\.py .*)$", output, re.M)
    assert found == [f"python train.py --resume={shlex.quote(str(out / 'last.pth'))}"], output
    return shlex.split(found[0])[1:]


def assert_stopped_mid_epoch(out, epoch, steps):
    """last.pth holds the position of a run stopped in `epoch` (of `steps` steps) after a step before the last."""
    position = load_checkpoint(str(out / "last.pth"))["position"]
    assert position["epoch"] == epoch and 0 < position["batches"] < steps, position


def assert_same_state(a, b):
    """Two last.pth files hold the same weights, objective, optimiser, schedule and history (but for timings)."""
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for part in ("model", "loss_state"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), f"{part} differs"
    slots_a, slots_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert slots_a.keys() == slots_b.keys()
    assert all(torch.equal(slots_a[i][k], slots_b[i][k]) for i in slots_a for k in slots_a[i]), "optimiser differs"
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"]
    timing = ("seconds", "second", "images")  # how long it took, and the images behind each throughput
    without_time = [[{k: v for k, v in h.items() if not k.endswith(timing)} for h in s["history"]] for s in (a, b)]
    assert without_time[0] == without_time[1]


# -----------------------------------------------------------------------------
# one run of the att_fast_cpu recipe, then test.py and predict.py on it

@pytest.fixture(scope="module")
def att_data(att_subset, att_faces, tmp_path_factory):
    """att_subset's six people, plus two valid/ images of s7, a person absent from train/ (the gallery)."""
    root = tmp_path_factory.mktemp("att_data")
    for split in ("train", "valid"):
        (root / split).mkdir()
        for person in os.listdir(att_subset / split):
            os.symlink(att_subset / split / person, root / split / person)
    (root / "valid" / "s7").mkdir()
    for name in ("1.pgm", "2.pgm"):
        os.symlink(os.path.join(att_faces, "s7", name), root / "valid" / "s7" / name)
    return root


def valid_photos(data, person):
    return [str(p) for p in sorted((data / "valid" / person).iterdir())]


@pytest.fixture(scope="module")
def att_run(att_data, tmp_path_factory):
    """(out_dir, stdout) of train.py's ATT run."""
    out = tmp_path_factory.mktemp("att_run")
    return out, train(*ATT, f"--data_dir={att_data}", f"--out_dir={out}").stdout


@pytest.fixture(scope="module")
def evaluated(att_run, att_faces, tmp_path_factory):
    """(results.json, stdout) of test.py on the run's tb_model.pth, written beside it, with s11 and s12 as the
    strangers of the open set and the AT&T pairs file scored as LFW's."""
    strangers = tmp_path_factory.mktemp("strangers")
    for person in ("s11", "s12"):
        os.symlink(os.path.join(att_faces, person), strangers / person)
    out = att_run[0]
    proc = run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--unknown_dir={strangers}",
                      f"--pairs={PAIRS}", f"--pairs_root={att_faces}", "--pairs_name_format={index}")
    return json.loads((out / "results.json").read_text()), proc.stdout


@pytest.mark.xdist_group("att")
def test_train_py_writes_checkpoints_history_config_and_figures(att_run):
    out, stdout = att_run
    assert re.search(r"^epoch 1/1 \| train loss", stdout, re.M), stdout
    for name in ("tb_model.pth", "last.pth", "config.json", "history.json", "curves.png", "triplets.png"):
        assert (out / name).is_file(), name
    entries = history(out)
    assert [h["epoch"] for h in entries] == [0, 1] and entries[1]["train_loss"] > 0
    assert entries[1]["images"] == 48 and entries[1]["images_per_second"] > 0  # 6 people x 8 train images
    assert all(0 <= h["valid_identification"] <= 1 for h in entries)
    assert all(h["valid_seconds"] > 0 and h["save_seconds"] > 0 for h in entries)  # what bench.py reads
    config = json.loads((out / "config.json").read_text())
    assert (config["backbone"], config["loss"], config["image_size"]) == ("resnet18", "arcface", [48, 40])
    assert config["epochs"] == 1 and config["device"] == "cpu" and config["world_size"] == 1
    assert (out / "skipped_files.txt").read_text() == ""
    for name in ("curves.png", "triplets.png"):
        assert Image.open(out / name).size[0] > 300, name
    assert load_checkpoint(str(out / "last.pth"))["epoch"] == 1
    assert_no_temporaries(out)


@pytest.mark.xdist_group("att")
def test_test_py_evaluates_identification_verification_open_set_pairs_and_retrieval(att_run, evaluated):
    out = att_run[0]
    results, _ = evaluated
    found = results["identification"]
    best = load_checkpoint(str(out / "tb_model.pth"))["epoch"]
    assert abs(found["accuracy"] - history(out)[best]["valid_identification"]) < 1e-6  # train.py's method
    assert found["probes"] == 14 and found["probes_scored"] == 12 and set(found["per_identity"]) == SIX
    assert list(found["identities_not_in_gallery"]) == ["s7"]  # s7's two probes, left out and named
    assert found["accuracy"] <= found["top5"] <= 1
    verification = results["verification"]
    assert 0 <= verification["auc"] <= 1 and 0 <= verification["eer"] <= 1 and verification["folds"] == 10
    open_set = results["open_set"]  # calibrated on the known probes, checked on all 20 images of s11 and s12
    assert open_set["unknown_probes"] == 20 and open_set["known_probes"] == 12
    assert 0 <= open_set["false_accept_rate"] <= 1 and -1 <= open_set["threshold"] <= 1
    pairs = results["pairs"]
    assert pairs["pairs_scored"] == 40 and pairs["folds"] == 2 and pairs["missing_images"] == []
    assert 0 <= pairs["accuracy_mean"] <= 1
    assert 0 <= results["retrieval"]["map_at_r"] <= results["retrieval"]["r_precision"] <= 1
    for name in ("confusion_matrix.png", "roc.png", "embeddings.png"):
        assert Image.open(out / name).size[0] > 300, name


RESULT_LINE = re.compile(r"^(.+?): (?:(s\d+)|unknown \(nearest (s\d+)) (-?[0-9]+\.[0-9]{4})\)?(?:; next: (.*))?$")


def results(stdout):
    """One dict(photo, identity ('unknown' below the threshold), nearest, similarity, next) per result line."""
    rows = []
    for match in filter(None, map(RESULT_LINE.match, stdout.splitlines())):
        photo, known, nearest, score, rest = match.groups()
        rows.append(dict(photo=photo, identity=known or "unknown", nearest=known or nearest,
                         similarity=float(score), next=rest))
    return rows


def printed_threshold(stdout, source):
    """The threshold predict.py says it decides with, checked to come from `source`."""
    match = re.search(r"^threshold: (-?[0-9.]+) \((.*)\)$", stdout, re.M)
    assert match and source in match.group(2), stdout
    return float(match.group(1))


@pytest.mark.xdist_group("att")
def test_predict_identifies_photos_of_any_mode_against_the_cached_gallery_and_a_bad_one_fails_alone(
        att_run, att_data, evaluated, tmp_path):
    checkpoint = att_run[0] / "tb_model.pth"
    face = Image.open(valid_photos(att_data, "s3")[0])
    for name, image in (("one_bit.png", face.convert("1")), ("rgba.png", face.convert("RGBA")),
                        ("large.jpg", face.convert("RGB").resize((1600, 2000)))):
        image.save(tmp_path / name)
    (tmp_path / "notes.jpg").write_text("not a picture")
    readable = valid_photos(att_data, "s1") + [str(tmp_path / n) for n in ("one_bit.png", "rgba.png", "large.jpg")]
    first = predict(checkpoint, *readable[:3], str(tmp_path / "notes.jpg"), *readable[3:], check=False)
    assert_refused(first, str(tmp_path / "notes.jpg"))  # the default gallery: the run's data_dir/train
    rows = results(first.stdout)
    assert [r["photo"] for r in rows] == readable and all(r["nearest"] in SIX for r in rows)
    threshold = printed_threshold(first.stdout, str(att_run[0] / "results.json"))  # test.py's, for this checkpoint
    assert threshold == pytest.approx(evaluated[0]["open_set"]["threshold"], abs=1e-4)
    assert all((r["identity"] == "unknown") == (r["similarity"] < threshold) for r in rows
               if abs(r["similarity"] - threshold) > 1e-4)
    cache = os.stat(checkpoint.with_suffix(".gallery.pt"))

    again = predict(checkpoint, *readable, "--top_k=2")
    unchanged = os.stat(checkpoint.with_suffix(".gallery.pt"))
    assert (unchanged.st_ino, unchanged.st_mtime_ns) == (cache.st_ino, cache.st_mtime_ns)  # read, not embedded anew
    second = results(again.stdout)
    assert [{k: r[k] for k in ("photo", "identity", "similarity")} for r in second] == \
        [{k: r[k] for k in ("photo", "identity", "similarity")} for r in rows]
    assert all(len(r["next"].split(", ")) == 1 for r in second)  # top 2: the best and one more


@pytest.mark.xdist_group("att")
def test_predict_verify_is_a_bare_flag_before_two_photos(att_run, att_data, evaluated):
    first, second = valid_photos(att_data, "s2")
    proc = predict(att_run[0] / "tb_model.pth", "--verify", first, second)
    threshold = printed_threshold(proc.stdout, str(att_run[0] / "results.json"))
    assert threshold == pytest.approx(evaluated[0]["verification"]["threshold_mean"], abs=1e-4)
    match = re.search(rf"^{re.escape(first)} vs {re.escape(second)}: cosine similarity (-?[0-9.]+): (.+)$",
                      proc.stdout, re.M)
    assert match, proc.stdout
    assert match.group(2) == ("same person" if float(match.group(1)) >= threshold else "different people")


@pytest.mark.xdist_group("att")
def test_onnx_export_gives_the_pytorch_embeddings_or_says_what_to_install(att_run, att_data, tmp_path):
    checkpoint, path = att_run[0] / "tb_model.pth", tmp_path / "model.onnx"
    proc = predict(checkpoint, "--export=onnx", f"--onnx_path={path}", check=False)
    if not (importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript")):
        assert_refused(proc, "--export=onnx")
        assert not path.exists()
        return
    assert proc.returncode == 0 and path.is_file(), proc.stderr
    ort = pytest.importorskip("onnxruntime")
    state = load_checkpoint(str(checkpoint))
    model = model_from_checkpoint(state).eval()
    transform = make_transform(state["image_size"], train=False)
    images = torch.stack([transform(load_rgb(p)) for p in valid_photos(att_data, "s1") + valid_photos(att_data, "s6")])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (images, images[:1]):  # the batch size is dynamic
        with torch.no_grad():
            expected = model(batch).numpy()
        got = session.run(["embeddings"], {"images": batch.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4
    # its side file: test.py and a teacher read the exported model as its checkpoint, trained people included
    exported, side = load_face_network(str(path))
    assert (side["classes"], side["image_size"], side["alignment"]) == (state["classes"], state["image_size"],
                                                                        state["alignment"])
    with torch.no_grad():
        assert np.abs(exported(images).numpy() - model(images).numpy()).max() <= 1e-4


@pytest.mark.xdist_group("att")
def test_test_py_on_one_person_with_a_headerless_pairs_file_says_what_it_cannot_measure(att_run, att_faces, tmp_path):
    """One person alone has no different pairs and no impostors: those metrics are null, with a warning, not a
    crash. A pairs file of one set (no header: one fold) is scored over random folds."""
    lines = open(PAIRS).read().splitlines()[1:]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    one = tmp_path / "one"
    for split, names in (("train", ("1.pgm", "2.pgm", "3.pgm")), ("valid", ("4.pgm", "5.pgm", "6.pgm", "7.pgm"))):
        (one / split / "s7").mkdir(parents=True)
        for name in names:
            os.symlink(os.path.join(att_faces, "s7", name), one / split / "s7" / name)
    proc = run_script("test.py", f"--checkpoint={att_run[0] / 'tb_model.pth'}", f"--data_dir={one}",
                      f"--out_dir={tmp_path / 'eval'}", f"--pairs={tmp_path / 'pairs.txt'}",
                      f"--pairs_root={att_faces}", "--pairs_name_format={index}")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["verification"] is None and results["open_set"] is None and "warning:" in proc.stdout
    assert results["pairs"]["pairs"] == 40 and results["pairs"]["folds"] == 10  # random folds over one set
    assert results["identification"]["accuracy"] == 1.0  # one identity to choose from


@pytest.mark.xdist_group("att")
def test_resume_refuses_a_flag_that_would_change_the_run_and_writes_nothing(att_run):
    out = att_run[0]
    before = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}
    proc = train(f"--resume={out / 'last.pth'}", "--epochs=3", "--lr=0.1", check=False)
    assert_refused(proc, "--lr")
    assert {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)} == before


@pytest.mark.xdist_group("att")
def test_ctrl_c_mid_epoch_saves_and_the_printed_command_resumes_to_the_uninterrupted_state(att_run, att_data,
                                                                                           tmp_path):
    out = tmp_path / "run"
    # --deterministic on the CPU, which already is: it changes nothing, so the states must still be equal
    status, output = run_until([("epoch 0/1", signal.SIGINT)], *ATT, f"--data_dir={att_data}", f"--out_dir={out}",
                               "--deterministic")
    assert status == 130 and "Traceback" not in output, output
    assert_stopped_mid_epoch(out, 1, steps=history(att_run[0])[1]["step"])
    assert_no_temporaries(out)
    run_script(*resume_command(output, out))
    assert_same_state(out / "last.pth", att_run[0] / "last.pth")


# -----------------------------------------------------------------------------
# the other recipes, each proving more on the side

def test_every_recipe_of_configs_is_trained_by_a_test():
    assert sorted(RECIPE_RUNS) == sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


def test_the_lfw_recipes_train_on_a_few_aligned_people_and_measure_people_never_trained_on(lfw_faces, tmp_path):
    raw = tmp_path / "raw"  # 8 LFW people, 4 photos each, linked
    people = [name for name in sorted(os.listdir(lfw_faces)) if len(os.listdir(os.path.join(lfw_faces, name))) >= 4]
    for name in people[:8]:
        (raw / name).mkdir(parents=True)
        for photo in sorted(os.listdir(os.path.join(lfw_faces, name)))[:4]:
            os.symlink(os.path.join(lfw_faces, name, photo), raw / name / photo)
    align_dataset(str(raw), str(tmp_path / "aligned"), log=lambda *_: None)
    data = tmp_path / "lfw"
    split_dataset(str(tmp_path / "aligned"), str(data), valid=0, test=0.25, unseen=0.25, valid_people=0.25,
                  log=lambda *_: None)
    trained, held_out = set(os.listdir(data / "train")), set(os.listdir(data / "valid"))
    assert len(trained) == 4 and len(held_out) == 2 and not trained & held_out
    shrink = [f"--data_dir={data}", "--epochs=1", "--batch_size=8", "--image_size=32"]
    train("configs/lfw_gpu.py", *shrink, f"--out_dir={tmp_path / 'gpu'}", "--device=cpu")
    out = tmp_path / "cpu"
    train("configs/lfw_cpu.py", *shrink, f"--out_dir={out}")
    assert all("valid_pairs_accuracy" in h for h in history(out))  # chosen on the held-out valid people
    assert load_checkpoint(str(out / "tb_model.pth"))["alignment"]["size"] == 112
    photos = {person: sorted(str(p) for p in (data / "unseen").glob(f"*/{person}/*"))
              for person in os.listdir(data / "unseen" / "train")}
    first, second = (photos[person] for person in sorted(photos))
    pairs = [(a, b, True) for a, b in zip(first, first[1:])] + [(a, b, False) for a, b in zip(first, second)]
    write_verification_bin(data / "unseen" / "held.bin", pairs)
    run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--data_dir={data / 'unseen'}", "--flip",
               "--val_bins=held")
    results = json.loads((out / "results.json").read_text())
    assert results["flip"] and results["protocol"]["probe_people_trained_on"] == 0 and results["protocol"]["aligned"]
    assert not results["aligned_here"] and results["verification"]["images"] == "all"
    held = results["bins"]["held"]
    assert held["pairs_scored"] == len(pairs) == held["same_pairs"] + held["different_pairs"]
    assert 0 <= held["accuracy_mean"] <= 1
    # the student of dlib's descriptor: cached once, resumed with its cache, and its metrics name the teacher
    distilled, cache = tmp_path / "distill", tmp_path / "cache"
    train("configs/distill_lfw_cpu.py", *shrink, f"--out_dir={distilled}", f"--teacher_cache={cache}")
    parts = {p: p.stat().st_mtime_ns for p in cache.glob("*/part-*.pt")}
    assert parts and all("train_teacher_cosine" in h for h in history(distilled)[1:])
    train(f"--resume={distilled / 'last.pth'}", "--epochs=2")
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/part-*.pt")} == parts  # nothing computed anew
    state = load_checkpoint(str(distilled / "last.pth"))
    assert state["epoch"] == 2 and state["config"]["teacher"] == "dlib" and "distill_state" in state
    first_line = run_script("test.py", f"--checkpoint={distilled / 'tb_model.pth'}",
                            f"--data_dir={data / 'unseen'}").stdout.splitlines()[0]
    chosen = load_checkpoint(str(distilled / "tb_model.pth"))["epoch"]  # (epoch 0 had learnt nothing from it yet)
    assert "dlib" in first_line and ("distilled from dlib" in first_line) == (chosen > 0)
    # dlib's own network fine-tuned to these crops, at its 150x150, served the same cached descriptors
    tuned = tmp_path / "dlib_resnet"
    train("configs/distill_dlib_resnet.py", *shrink[:3], f"--out_dir={tuned}", f"--teacher_cache={cache}")
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/part-*.pt")} == parts
    state = load_checkpoint(str(tuned / "last.pth"))
    assert state["model_config"]["backbone"] == "dlib_resnet" and state["image_size"] == [150, 150]
    assert state["config"]["init_from"] == "dlib_resnet"


def test_a_student_learns_the_teachers_views_with_the_inherited_classifier(att_subset, tmp_path):
    """--teacher_views=1 with --distill_loss=inherited: the teacher embeds each of the 48 training photos and one
    view of it (96 cached rows), the student trains an epoch on them (a finite loss), and the run records its views."""
    teacher = write_teacher(tmp_path / "teacher", size=(32, 32))
    cache, out = tmp_path / "cache", tmp_path / "student"
    train(f"--data_dir={att_subset}", f"--out_dir={out}", "--loss=none", "--distill_loss=inherited",
          f"--teacher={teacher}", f"--teacher_cache={cache}", "--teacher_views=1", "--epochs=1",
          "--batch_size=8", "--backbone=smallcnn", "--image_size=32", "--embedding_dim=32")
    assert sum(len(read_weights(str(p))["keys"]) for p in cache.glob("*/part-*.pt")) == 96
    assert np.isfinite(history(out)[1]["train_loss"])
    assert load_checkpoint(str(out / "last.pth"))["config"]["teacher_views"] == 1


def test_the_iresnet50_recipe_trains_and_its_checkpoint_evaluates(att_subset, tmp_path):
    out = tmp_path / "run"
    train("configs/ms1m_iresnet50.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=1",
          "--image_size=32", "--batch_size=8", "--images_per_identity=2")
    state = load_checkpoint(str(out / "tb_model.pth"))
    assert state["model_config"]["backbone"] == "iresnet50" and state["model_config"]["head"] == "fc_bn"
    assert history(out)[1]["lr"] == 0.0  # polynomial decay ends at zero
    run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}")
    assert json.loads((out / "results.json").read_text())["identification"]["probes_scored"] == 12


def test_compiled_training_of_the_siamese_recipe_loads_in_test_py(att_subset, tmp_path):
    out = tmp_path / "run"
    proc = train("configs/siamese_contrastive.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=1",
                 "--image_size=32", "--batch_size=16", "--save_every=1", "--compile=True")
    assert "EmbeddingNet(" in proc.stdout and "Adam (" in proc.stdout  # the recipe's verbosity 3: the modules
    assert (out / "epoch_1.pth").is_file() and history(out)[1]["train_loss"] > 0
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in load_checkpoint(str(out / "last.pth"))["model"])
    run_script("test.py", f"--checkpoint={out / 'last.pth'}", "--gallery_pattern=1.pgm")
    found = json.loads((out / "results.json").read_text())
    assert found["identification"]["probes_scored"] == 12
    assert found["seconds"]["images_embedded"] == 6 + 12  # a gallery of the six 1.pgm images, and the probes


def test_pair_classifier_recipe_in_channels_last_with_loader_workers_evaluating_every_other_epoch(att_subset,
                                                                                                 tmp_path):
    out = tmp_path / "run"
    proc = train("configs/pair_classifier.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=2",
                 "--image_size=48,40", "--batch_size=16", "--channels_last=True", "--cache_images=false",
                 "--num_workers=2", "--eval_every=2")
    assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr  # the workers ended quietly
    config = json.loads((out / "config.json").read_text())
    assert config["channels_last"] is True and config["cache_images"] == "false" and config["num_workers"] == 2
    entries = history(out)
    assert ["valid_identification" in h for h in entries] == [True, False, True]  # epochs 0, 1, 2
    assert all(h["train_loss"] > 0 for h in entries[1:]) and 0 <= entries[2]["valid_pair_f1"] <= 1
    run_script("test.py", f"--checkpoint={out / 'last.pth'}")
    decisions = json.loads((out / "results.json").read_text())["verification"]["pair_classifier"]
    assert set(decisions) == {"precision", "recall", "f1"} and 0 <= decisions["f1"] <= 1  # the classifier's own


def test_sigterm_stops_the_resnet50_triplet_recipe_with_143_and_a_resumable_last_pth(att_subset, tmp_path):
    out = tmp_path / "run"
    status, output = run_until([("epoch 1/2", signal.SIGTERM)], "configs/resnet50_triplet.py",
                               f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=2", "--image_size=32",
                               "--batch_size=8")
    assert status == 143 and "Traceback" not in output, output
    resume_command(output, out)
    entries = history(out)
    assert [h["epoch"] for h in entries] == [0, 1] and entries[1]["train_loss"] > 0  # epoch 1 trained whole
    assert_stopped_mid_epoch(out, 2, steps=entries[1]["step"])
    assert_loads(out / "tb_model.pth")


def test_a_second_ctrl_c_quits_the_passport_recipe_at_once_leaving_no_partial_file(att_subset, tmp_path):
    out = tmp_path / "run"
    # AT&T has no ID photos: image 1 of each person stands in; vgg16's 1 GB last.pth makes the second Ctrl-C likely
    # to land in its save
    status, output = run_until([("epoch 1/2", signal.SIGINT), ("SIGINT:", signal.SIGINT)],
                               "configs/passport_vgg16.py", f"--data_dir={att_subset}", f"--out_dir={out}",
                               "--epochs=2", "--image_size=32", "--batch_size=2", "--pretrained=False",
                               "--anchor_pattern=1.pgm")
    assert status == 130 and "Traceback" not in output, output
    assert_no_temporaries(out)
    entries = history(out)
    assert entries[1]["train_loss"] > 0 and entries[1]["images"] == 6 * 3  # six anchors' triplets
    assert assert_loads(out / "last.pth")["epoch"] >= 1  # whichever save the second Ctrl-C left alone
    assert_loads(out / "tb_model.pth")


# -----------------------------------------------------------------------------
# unreadable images, odd names and a failed save, in one run of the resnet50_distortion recipe

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


# file name: how to write it (found unreadable at the scan: the first four; only when decoded: the truncated ones)
BAD_IMAGES = {
    "empty.jpg": lambda p: p.write_bytes(b""),
    "notes.jpg": lambda p: p.write_text("not a picture"),
    "bomb.png": lambda p: write_png_declaring(p, 10_000, 10_000),  # above Image.MAX_IMAGE_PIXELS: a warning
    "huge.png": lambda p: write_png_declaring(p, 20_000, 20_000),  # above twice the limit: an error
    "cut.png": write_truncated,
    "cut.jpg": write_truncated,
}


@pytest.fixture
def odd_data(att_subset, tmp_path):
    """Four people of att_subset (four train images each) under names with spaces and non-ASCII characters, one
    of them a symlinked folder outside the tree; every kind of unreadable image; and a person of one image."""
    data = tmp_path / "my faces"
    people = {"s1": "José María", "s2": "Zoë O'Neil", "s3": "linked person", "s4": "s4"}
    for split, count in (("train", 4), ("valid", 2)):
        (data / split).mkdir(parents=True)
        for source, name in people.items():
            folder = data / split / name
            if name == "linked person":
                folder = tmp_path / "elsewhere" / split
                os.symlink(folder, data / split / name)
            folder.mkdir(parents=True)
            for j, image in enumerate(sorted((att_subset / split / source).iterdir())[:count]):
                os.symlink(image, folder / f"photo {j} – ñ.pgm")
    write_image(data / "train" / "solo" / "only.png", seed=5)
    for name, write in BAD_IMAGES.items():
        write(data / "train" / "s4" / name)
    write_truncated(data / "valid" / "s4" / "cut valid.jpg")  # a probe: found by the evaluation
    return data


def test_unreadable_images_odd_names_and_a_failed_save_leave_training_to_finish(odd_data, tmp_path):
    out = tmp_path / "run ü"
    (out / "last.pth").mkdir(parents=True)  # os.replace cannot put a file there, even as root
    (out / "last.pth" / "keep").write_text("x")
    proc = train("configs/resnet50_distortion.py", f"--data_dir={odd_data}", f"--out_dir={out}", "--epochs=1",
                 "--image_size=32", "--batch_size=8")
    warnings = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if line.startswith("warning:")]
    assert len([line for line in warnings if str(out / "last.pth") in line]) == 2  # each evaluated epoch's save
    assert any("solo" in line for line in warnings)  # one image: only a negative
    assert [h["epoch"] for h in history(out)] == [0, 1] and history(out)[1]["train_loss"] > 0
    assert set(assert_loads(out / "tb_model.pth")["classes"]) == {"José María", "Zoë O'Neil", "linked person", "s4",
                                                                   "solo"}
    listed = dict(line.split("\t") for line in (out / "skipped_files.txt").read_text().splitlines())
    bad = {str(odd_data / "train" / "s4" / name) for name in BAD_IMAGES} | {str(odd_data / "valid" / "s4" /
                                                                             "cut valid.jpg")}
    assert set(listed) == bad and all(reason and reason != "readable now" for reason in listed.values())
    assert all("DecompressionBomb" in listed[path] for path in bad if path.endswith(("bomb.png", "huge.png")))
    assert_no_temporaries(out)


# -----------------------------------------------------------------------------
# runs that must stop, and say why

def test_a_nan_loss_stops_naming_lr_and_keeps_the_last_good_checkpoints(att_subset, tmp_path):
    out = tmp_path / "run"
    proc = train(f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=2", "--lr=1e30", *TINY, check=False)
    assert_refused(proc, "--lr")
    for name in ("last.pth", "tb_model.pth"):
        state = load_checkpoint(str(out / name))
        assert state["epoch"] == 0
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [h["epoch"] for h in history(out)] == [0]


def test_zero_epochs_evaluates_and_saves_the_untrained_network(att_subset, tmp_path):
    out = tmp_path / "run"
    train(f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=0", *TINY)
    assert [h["epoch"] for h in history(out)] == [0] and history(out)[0]["train_loss"] is None
    assert load_checkpoint(str(out / "tb_model.pth"))["epoch"] == 0
    assert load_checkpoint(str(out / "last.pth"))["step"] == 0


@pytest.mark.parametrize("flag,named", [("--epoch=3", "--epoch=3"), ("--loss=nope", "--loss")])
def test_a_bad_flag_is_a_usage_error_naming_it(flag, named, tmp_path):
    assert_refused(train(f"--data_dir={tmp_path}", flag, check=False), named, status=2)


def test_a_dataset_of_one_identity_stops_before_training(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    make_faces(data / "train", identities=1, images=4)
    make_faces(data / "valid", identities=2, images=1)
    assert_refused(train(f"--data_dir={data}", f"--out_dir={out}", *TINY, check=False), str(data / "train"))
    assert not out.exists()


def test_the_inherited_classifier_on_one_identity_stops_before_the_teacher_runs(tmp_path):
    """--loss=none --distill_loss=inherited (which learns the teacher's decision between people) on photos of one
    person: refused naming the training folder, before the teacher's cache is written."""
    data, out, cache = tmp_path / "data", tmp_path / "out", tmp_path / "cache"
    make_faces(data / "train", identities=1, images=4)
    make_faces(data / "valid", identities=2, images=2)
    teacher = write_teacher(tmp_path / "teacher", size=(32, 32))
    proc = train(f"--data_dir={data}", f"--out_dir={out}", "--loss=none", "--distill_loss=inherited",
                 f"--teacher={teacher}", f"--teacher_cache={cache}", *TINY, check=False)
    assert_refused(proc, str(data / "train"))
    assert not cache.exists()


def test_without_data_and_offline_train_py_says_in_one_line_how_to_prepare_it(tmp_path, monkeypatch):
    """The default data_dir, missing, is fetched through scikit-learn: offline (here a proxy that refuses every
    connection, into an empty scikit-learn cache), one error line names prepare.py. Run from an empty folder,
    where no data/att_faces can be found."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "scikit_learn_data"))
    (tmp_path / "cwd").mkdir()
    proc = run_script(os.path.join(ROOT, "train.py"), f"--out_dir={tmp_path / 'out'}", "--epochs=0", *TINY,
                      cwd=tmp_path / "cwd", check=False, timeout=300)
    assert_refused(proc, "prepare.py")
    assert not (tmp_path / "out").exists()


def write_code_running_checkpoint(path, marker):
    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)
    torch.save(dict(model={}, model_config={}, trap=Payload()), path)


@pytest.mark.parametrize("script", ["test.py", "predict.py"])
def test_a_file_that_is_no_checkpoint_or_would_run_code_is_refused(script, tmp_path):
    """test.py gets a pickle that would run code when loaded, predict.py a text file."""
    if script == "test.py":
        path = tmp_path / "evil.pth"
        write_code_running_checkpoint(path, tmp_path / "ran")
        proc = run_script("test.py", f"--checkpoint={path}", check=False)
    else:
        path = tmp_path / "notes.pth"
        path.write_text("not a checkpoint")
        proc = predict(path, write_image(tmp_path / "face.png"), check=False)
    assert_refused(proc, str(path))
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("args,named", [(["--verify", "a.jpg", "b.jpg", "c.jpg"], "--verify"),
                                        (["a.jpg", "--top_k=0"], "--top_k"), ([], "PHOTO")])
def test_predict_refuses_what_it_cannot_answer_before_loading_anything(args, named, tmp_path):
    assert_refused(predict(tmp_path / "absent.pth", *args, check=False), named)


def test_predict_help_lists_the_constants_and_the_photos():
    proc = run_script("predict.py", "--help")
    flags = set(re.findall(r"--([a-z_]+) \[?[A-Z]+", proc.stdout))
    assert flags == {"checkpoint", "onnx_norm", "gallery", "threshold", "top_k", "verify", "out_dir", "json_path",
                     "export", "onnx_path", "batch_size", "device", "amp"}
    assert "PHOTO" in proc.stdout
