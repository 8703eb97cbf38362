"""train.py and test.py end to end, run as a user runs them (subprocesses)."""
import importlib.util
import json
import os
import time

import pytest
import torch
from PIL import Image

from conftest import ROOT, make_faces, run_script, write_image

SMALL = ["--backbone=resnet18", "--image_size=48,40", "--batch_size=8"]


@pytest.fixture(scope="module")
def att_run(att_subset, tmp_path_factory):
    """One epoch of train.py on six AT&T people: (output folder, train.py's stdout)."""
    out = tmp_path_factory.mktemp("att_run")
    train = run_script("train.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=1", *SMALL)
    return out, train.stdout


def test_train_writes_checkpoints_history_and_figures(att_run):
    out, stdout = att_run
    assert "epoch 1/1 | train loss" in stdout
    for name in ("tb_model.pth", "last.pth", "config.json", "history.json", "curves.png", "triplets.png"):
        assert (out / name).is_file(), name
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["train_loss"] > 0 and 0 <= history[1]["valid_identification"] <= 1
    assert history[1]["images"] == 48 and history[1]["images_per_second"] > 0  # 6 people x 8 train images
    assert all(h["valid_seconds"] > 0 and h["save_seconds"] > 0 for h in history)  # what bench.py reads
    assert "cached the decoded images" in stdout  # AT&T fits in memory many times over
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["epochs"] == 1 and config["image_size"] == [48, 40]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_test_py_answers_identification_verification_open_set_and_retrieval(att_run, tmp_path):
    out, _ = att_run
    test = run_script("test.py", f"--checkpoint={out / 'last.pth'}", f"--out_dir={tmp_path}")
    assert "precision" in test.stdout and "identification top-1" in test.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"identification", "verification", "open_set", "retrieval", "pairs"} <= set(results)
    found = results["identification"]
    assert found["probes"] == 12 and found["probes_scored"] == 12  # 6 people x 2 valid images
    assert set(found["per_identity"]) == {"s1", "s2", "s3", "s4", "s5", "s6"}
    history = json.loads((out / "history.json").read_text())
    assert abs(found["accuracy"] - history[1]["valid_identification"]) < 1e-6  # train.py uses the same method
    assert found["accuracy"] <= found["top5"] <= 1 and found["top_k"] == 5
    verification = results["verification"]
    assert verification["same_pairs"] == 6 and verification["different_pairs"] == 6  # one pair per person
    assert 0 <= verification["auc"] <= 1 and 0 <= verification["eer"] <= 1 and "0.001" in verification["tar_at_far"]
    assert verification["folds"] == 10 and len(verification["fold_accuracies"]) == 10
    assert results["open_set"]["unknown_probes"] == 0 and results["open_set"]["false_accept_rate"] is None
    assert results["open_set"]["known_probes"] == 12 and results["pairs"] is None
    retrieval = results["retrieval"]
    assert retrieval["queries"] == 12 and 0 <= retrieval["map_at_r"] <= retrieval["r_precision"] <= 1
    for name in ("confusion_matrix.png", "roc.png", "embeddings.png"):
        assert Image.open(tmp_path / name).size[0] > 300, name
    summary = test.stdout[test.stdout.rindex("figure"):]  # the table comes last
    assert "probe pairs: 10-fold accuracy" in summary and "unresolved" in summary and "retrieval: MAP@R" in summary


def test_bench_times_the_embedding_pass_and_bare_inference_batch_by_batch(att_run, att_subset, monkeypatch):
    """bench.py's paired timing: a slower file pipeline lowers the pass against bare inference."""
    spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    checkpoint = str(att_run[0] / "tb_model.pth")
    plain = bench.embedding_speeds(checkpoint, str(att_subset), passes=1)
    read = bench.FaceFolder.__getitem__
    monkeypatch.setattr(bench.FaceFolder, "__getitem__", lambda self, i: (time.sleep(0.05), read(self, i))[1])
    slowed = bench.embedding_speeds(checkpoint, str(att_subset), passes=1)
    ratio = {name: speeds["test_speed"] / speeds["bare_test_speed"] for name, speeds in
             (("plain", plain), ("slowed", slowed))}
    # 50 ms an image: 3 s more for 60 images, far more than the noise of a loaded machine (where the other test
    # process's threads have slowed this network's 60 images to over a second)
    assert 0 < ratio["slowed"] < ratio["plain"] - 0.2, ratio


def test_evaluation_on_people_never_trained_on_with_pairs_file_and_strangers(att_run, att_faces, tmp_path):
    """A model trained on s1..s6 evaluated on s7..s10 (gallery train/, probes valid/), with s11 and s12 as
    strangers for the open set, and the AT&T pairs file of tests/data (s1..s10, 2 folds) scored as LFW's."""
    out, _ = att_run
    raw, unknown = tmp_path / "raw", tmp_path / "unknown"
    for folder, people in ((raw, ("s7", "s8", "s9", "s10")), (unknown, ("s11", "s12"))):
        folder.mkdir()
        for name in people:
            os.symlink(os.path.abspath(os.path.join(att_faces, name)), folder / name)
    run_script("data_utils.py", "split", str(raw), str(tmp_path / "others"), "--valid=0.2", "--seed=0")
    test = run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--data_dir={tmp_path / 'others'}",
                      f"--out_dir={tmp_path / 'eval'}", f"--unknown_dir={unknown}",
                      f"--pairs={os.path.join(ROOT, 'tests', 'data', 'att_pairs.txt')}", f"--pairs_root={att_faces}",
                      "--pairs_name_format={index}")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["identification"]["per_identity"]) == {"s7", "s8", "s9", "s10"}
    assert results["identification"]["probes_scored"] == 8
    open_set = results["open_set"]
    assert open_set["unknown_probes"] == 20 and 0 <= open_set["false_accept_rate"] <= 1  # all 10 images of 2 people
    assert open_set["known_probes"] == 8 and open_set["target_far"] == 0.01
    pairs = results["pairs"]
    assert pairs["pairs"] == 40 and pairs["folds"] == 2 and pairs["missing_images"] == []
    assert 0 <= pairs["accuracy_mean"] <= 1 and "att_pairs.txt: 2-fold accuracy" in test.stdout


def test_headerless_pairs_file_and_a_single_probe_identity(att_run, att_faces, tmp_path):
    """A pairs file of one set (no header: one fold) is scored over random folds; one person alone has no
    different pairs and no impostors: those figures are null, with a warning, not a crash."""
    out, _ = att_run
    lines = open(os.path.join(ROOT, "tests", "data", "att_pairs.txt")).read().splitlines()[1:]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    os.makedirs(tmp_path / "raw")
    os.symlink(os.path.abspath(os.path.join(att_faces, "s7")), tmp_path / "raw" / "s7")
    run_script("data_utils.py", "split", str(tmp_path / "raw"), str(tmp_path / "one"), "--valid=0.4", "--seed=0")
    test = run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--data_dir={tmp_path / 'one'}",
                      f"--out_dir={tmp_path / 'eval'}", f"--pairs={tmp_path / 'pairs.txt'}", f"--pairs_root={att_faces}",
                      "--pairs_name_format={index}")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["verification"] is None and results["open_set"] is None
    assert "probe pairs: no verification figures" in test.stdout and "6 same and 0 different" in test.stdout
    assert results["pairs"]["pairs"] == 40 and results["pairs"]["folds"] == 10  # random folds over one set
    assert results["identification"]["accuracy"] == 1.0  # one identity to choose from


def test_zero_epochs_saves_the_untrained_model(att_subset, tmp_path):
    out = tmp_path / "untrained"
    run_script("train.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=0", *SMALL)
    state = torch.load(out / "tb_model.pth", weights_only=True)
    assert state["epoch"] == 0 and state["model_config"]["backbone"] == "resnet18"
    test = run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--out_dir={tmp_path / 'eval'}")
    assert "identification top-1" in test.stdout and (tmp_path / "eval" / "results.json").is_file()


def test_eval_every_evaluates_and_saves_every_n_epochs_and_after_the_last(tmp_path):
    data = tmp_path / "data"
    make_faces(data / "train", identities=3, images=4)
    make_faces(data / "valid", identities=3, images=2)
    out = tmp_path / "out"
    train = run_script("train.py", f"--data_dir={data}", f"--out_dir={out}", "--epochs=3", "--eval_every=2",
                       "--backbone=smallcnn", "--image_size=32", "--batch_size=6", "--images_per_identity=2",
                       "--num_workers=2")
    # persistent workers (P x K batches) are shut down before the exit, not killed by it with an error
    assert "Traceback" not in train.stderr and "killed by signal" not in train.stderr
    lines = [line for line in train.stdout.splitlines() if line.startswith("epoch ")]
    assert ["valid top-1" in line for line in lines] == [True, False, True, True]  # epochs 0, 1, 2, 3
    history = json.loads((out / "history.json").read_text())
    assert [h.get("valid_identification") is not None for h in history] == [True, False, True, True]
    assert history[1]["train_loss"] > 0 and history[1]["images"] == 12
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 3 and (out / "curves.png").is_file()


def test_same_seed_on_cpu_gives_identical_weights(tmp_path):
    data = tmp_path / "data"
    make_faces(data / "train", identities=3, images=4)
    make_faces(data / "valid", identities=3, images=2)
    weights = []
    for run in ("a", "b"):
        run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / run}", "--epochs=2",
                   "--backbone=smallcnn", "--image_size=32", "--batch_size=6", "--images_per_identity=2", "--seed=7")
        weights.append(torch.load(tmp_path / run / "last.pth", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bad_training_data_is_reported_not_fatal(tmp_path):
    data = tmp_path / "data"
    make_faces(data / "train", identities=3, images=4)
    make_faces(data / "valid", identities=3, images=2)
    write_image(data / "train" / "solo" / "only.png", seed=5)
    (data / "train" / "p0" / "text.jpg").write_text("not a picture")
    whole = (data / "train" / "p1" / "0.png").read_bytes()
    (data / "train" / "p1" / "0.png").write_bytes(whole[: len(whole) // 2])
    proc = run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--epochs=1",
                      "--backbone=resnet18", "--image_size=32", "--batch_size=6", "--images_per_identity=2")
    log = proc.stdout + proc.stderr
    assert "text.jpg" in log  # unreadable header: skipped at scan
    assert os.path.join("p1", "0.png") in log  # truncated: replaced while loading
    assert "single training image" in log and "solo" in log
    assert (tmp_path / "out" / "tb_model.pth").is_file()


def test_probe_identities_missing_from_gallery_are_named(tmp_path):
    data = tmp_path / "data"
    make_faces(data / "train", identities=3, images=3)
    make_faces(data / "valid", identities=3, images=1)
    write_image(data / "valid" / "stranger" / "1.png", seed=42)
    run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--epochs=0",
               "--backbone=resnet18", "--image_size=32")
    test = run_script("test.py", f"--checkpoint={tmp_path / 'out' / 'tb_model.pth'}")
    assert "absent from the gallery" in test.stdout and "stranger (1)" in test.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())["identification"]
    assert results["probes"] == 4 and results["probes_scored"] == 3
    assert results["probes_identity_not_in_gallery"] == 1
    assert list(results["identities_not_in_gallery"]) == ["stranger"]


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    proc = run_script("train.py", f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'o'}",
                      check=False)
    assert proc.returncode != 0
    assert "fetch-att" in proc.stderr and "split" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("setup,message", [
    ("one_identity", "at least two identities"),
    ("empty", "no images found"),
])
def test_unusable_datasets_stop_before_training(tmp_path, setup, message):
    data = tmp_path / "data"
    if setup == "one_identity":
        make_faces(data / "train", identities=1, images=4)
    else:
        (data / "train" / "p0").mkdir(parents=True)
    make_faces(data / "valid", identities=2, images=1)
    proc = run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--backbone=resnet18",
                      check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag,message", [
    ("--epoch=3", "unknown option '--epoch=3'"),
    ("--lr=fast", "--lr: expected a number"),
    ("--optimizer=rmsprop", "choose one of adam, adamw, sgd"),
    ("--anchor_pattern=script", "use it with --mining=none"),
    ("--loss=hinge", "choose one of triplet, contrastive, pair_bce, arcface"),
    ("--num_workers=-2", "--num_workers=-2: choose -1 (auto), 0"),
    ("--channels_last=maybe", "--channels_last='maybe'; choose auto, true or false"),
])
def test_bad_flags_stop_train_py_with_the_flag_named(tmp_path, flag, message):
    data = tmp_path / "data"
    make_faces(data / "train", identities=2, images=2)
    make_faces(data / "valid", identities=2, images=1)
    proc = run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--backbone=resnet18",
                      "--epochs=0", flag, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_test_py_refuses_bad_checkpoints_without_a_traceback(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    for path, message in ((tmp_path / "missing.pth", "no such checkpoint"),
                          (tmp_path / "notes.pth", "not a")):
        proc = run_script("test.py", f"--checkpoint={path}", check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_split_then_train_on_a_nested_dataset_with_distortions(tmp_path):
    raw = make_faces(tmp_path / "raw", identities=3, images=5)
    for person in ("p0", "p1", "p2"):
        write_image(raw / person / "distortion" / "blur.png", seed=7)
    run_script("data_utils.py", "split", str(raw), str(tmp_path / "data"), "--valid=0.2")
    assert all(not (tmp_path / "data" / "valid" / p / "distortion").exists() for p in ("p0", "p1", "p2"))
    proc = run_script("train.py", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'o'}",
                      "--epochs=1", "--backbone=resnet18", "--image_size=32", "--batch_size=6",
                      "--images_per_identity=2")
    assert "15 train images" in proc.stdout  # 4 originals + 1 distortion per identity


RECIPES = sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_end_to_end_on_att_faces(recipe, att_subset, tmp_path):
    """Each recipe of configs/ for one short epoch on six AT&T people at a small input size, then test.py."""
    out = tmp_path / "run"
    args = ["train.py", f"configs/{recipe}", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=1",
            "--image_size=48,40", "--pretrained=False"]
    if recipe == "siamese_contrastive.py":
        args.append("--save_every=1")  # its recipe keeps a checkpoint every n epochs
    if recipe == "passport_vgg16.py":
        args.append("--anchor_pattern=1.pgm")  # AT&T has no ID photos: image 1 of each person stands in
    if "batch_size" in open(os.path.join("configs", recipe)).read():
        args.append("--batch_size=16")
    proc = run_script(*args)
    assert "epoch 1/1 | train loss" in proc.stdout
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["train_loss"] > 0
    if recipe == "pair_classifier.py":
        assert 0 <= history[-1]["valid_pair_f1"] <= 1 and "valid pair F1" in proc.stdout
    if recipe == "siamese_contrastive.py":
        assert "trainable" in proc.stdout and "Adam (" in proc.stdout  # verbosity 3: architecture to counts
        assert (out / "epoch_1.pth").is_file()
    test = run_script("test.py", f"--checkpoint={out / 'last.pth'}")
    assert "identification top-1" in test.stdout
    if recipe == "pair_classifier.py":  # the classifier's own decisions on test.py's balanced probe pairs
        figures = json.loads((out / "results.json").read_text())["verification"]["pair_classifier"]
        assert set(figures) == {"precision", "recall", "f1"} and 0 <= figures["f1"] <= 1
        assert "pair classifier: precision / recall / F1" in test.stdout


def test_passport_anchors_and_gallery_of_id_photos(tmp_path):
    data = tmp_path / "data"
    for split, photos in (("train", 3), ("valid", 2)):
        for person in ("ann", "bob", "cid"):
            if split == "train":
                write_image(data / split / "group" / person / f"{person}_script.png", seed=hash(person) % 100)
            for j in range(photos):
                write_image(data / split / "group" / person / f"{person}_{j}.png", seed=j + 10 * len(person))
    proc = run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--epochs=1",
                      "--backbone=smallcnn", "--image_size=32", "--batch_size=2", "--identity_depth=2",
                      "--loss=triplet", "--anchor_pattern=script")
    assert "3 anchors matching 'script'" in proc.stdout
    test = run_script("test.py", f"--checkpoint={tmp_path / 'o' / 'last.pth'}", "--gallery_pattern=script")
    assert "gallery 3 images of 3 identities" in test.stdout
    results = json.loads((tmp_path / "o" / "results.json").read_text())["identification"]
    assert set(results["per_identity"]) == {"group/ann", "group/bob", "group/cid"}
    assert results["probes_scored"] == 6


@pytest.mark.parametrize("flags", [["--compile=True"], ["--channels_last=True", "--cache_images=false"]],
                         ids=["compile", "channels_last_no_cache"])
def test_system_flags_train_and_the_checkpoint_loads_in_test_py(tmp_path, flags):
    data = tmp_path / "data"
    make_faces(data / "train", identities=3, images=4)
    make_faces(data / "valid", identities=3, images=2)
    out = tmp_path / "out"
    train = run_script("train.py", f"--data_dir={data}", f"--out_dir={out}", "--epochs=1", "--backbone=resnet18",
                       "--image_size=32", "--batch_size=6", "--images_per_identity=2", *flags)
    assert ("cached the decoded images" in train.stdout) == ("--cache_images=false" not in flags)
    config = json.loads((out / "config.json").read_text())  # channels_last=auto: not on the CPU
    assert config["channels_last"] is ("--channels_last=True" in flags) and config["num_workers"] == 0
    test = run_script("test.py", f"--checkpoint={out / 'last.pth'}")
    assert "identification top-1" in test.stdout
