"""predict.py end to end on AT&T faces: identification, the gallery cache, thresholds, --verify and the ONNX export.

One tiny model (1 epoch of resnet18 at 48x40 on six people) serves every test; each test works on its own copy
of the checkpoint, so that the gallery caches and results.json files beside it do not meet.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script

IDENTITIES = {f"s{k}" for k in range(1, 7)}
RESULT_LINE = re.compile(r"^(.+): (?:(s[1-6])|unknown \(nearest (s[1-6])) (-?[0-9]+\.[0-9]{4})\)?(?:; next: (.*))?$")


def results(stdout):
    """One dict(photo, identity ('unknown' below the threshold), nearest, similarity, next) per result line."""
    rows = []
    for line in stdout.splitlines():
        match = RESULT_LINE.match(line)
        if match:
            photo, known, nearest, score, rest = match.groups()
            rows.append(dict(photo=photo, identity=known or "unknown", nearest=known or nearest,
                             similarity=float(score), next=rest))
    return rows


@pytest.fixture(scope="module")
def trained(att_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_model")
    run_script("train.py", f"--data_dir={att_subset}", f"--out_dir={out}", "--epochs=1", "--backbone=resnet18",
               "--image_size=48,40", "--batch_size=8")
    return out / "tb_model.pth"


@pytest.fixture
def checkpoint(trained, tmp_path):
    """A private copy of the trained checkpoint (its cache and results.json go beside it)."""
    shutil.copy2(trained, tmp_path / "model.pth")
    return tmp_path / "model.pth"


def valid_photos(att_subset, *people):
    return [str(p) for person in people for p in sorted((att_subset / "valid" / person).iterdir())]


def predict(checkpoint, *args, check=True):
    return run_script("predict.py", f"--checkpoint={checkpoint}", *args, check=check)


def test_identifies_photos_and_caches_the_gallery_until_it_or_the_checkpoint_changes(att_subset, checkpoint, tmp_path):
    gallery = shutil.copytree(att_subset / "train", tmp_path / "gallery")
    photos = valid_photos(att_subset, "s1", "s4")
    cache = tmp_path / "model.gallery.pt"

    first = predict(checkpoint, *photos, f"--gallery={gallery}", "--top_k=3")
    assert "gallery: embedded 48 images of 6 identities" in first.stdout and cache.is_file()
    assert "threshold: none: no " in first.stdout and "results.json" in first.stdout  # said once, no decisions
    rows = results(first.stdout)
    assert [r["photo"] for r in rows] == photos
    assert all(r["identity"] in IDENTITIES and -1 <= r["similarity"] <= 1.0001 for r in rows)
    assert all(len(r["next"].split(", ")) == 2 for r in rows)  # top 3: the best and two more
    assert torch.load(cache, weights_only=True)["centroids"].shape == (6, 128)

    again = predict(checkpoint, *photos, f"--gallery={gallery}", "--top_k=3")
    assert "gallery: cached, 6 identities (48 images)" in again.stdout
    assert results(again.stdout) == rows

    touched = gallery / "s2" / sorted(os.listdir(gallery / "s2"))[0]
    os.utime(touched, ns=(os.stat(touched).st_atime_ns, os.stat(touched).st_mtime_ns + 10**9))
    assert "gallery: embedded 48 images" in predict(checkpoint, photos[0], f"--gallery={gallery}").stdout
    assert "gallery: cached" in predict(checkpoint, photos[0], f"--gallery={gallery}").stdout
    os.utime(checkpoint, ns=(os.stat(checkpoint).st_atime_ns, os.stat(checkpoint).st_mtime_ns + 10**9))
    assert "gallery: embedded 48 images" in predict(checkpoint, photos[0], f"--gallery={gallery}").stdout


def test_any_image_mode_and_size_works_and_an_unreadable_photo_fails_alone(att_subset, checkpoint, tmp_path):
    face = Image.open(valid_photos(att_subset, "s3")[0])
    odd = {"one_bit.png": face.convert("1"), "rgba.png": face.convert("RGBA"),
           "large.jpg": face.convert("RGB").resize((1600, 2000))}
    for name, image in odd.items():
        image.save(tmp_path / name)
    (tmp_path / "notes.jpg").write_text("not a picture")
    photos = [str(tmp_path / "one_bit.png"), str(tmp_path / "notes.jpg"), str(tmp_path / "rgba.png"),
              str(tmp_path / "large.jpg")]
    proc = predict(checkpoint, *photos, check=False)  # default gallery: the checkpoint's data_dir/train
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {photos[1]}: cannot be read as an image "
                      f"(cannot identify image file {photos[1]!r})"]
    assert [r["photo"] for r in results(proc.stdout)] == [photos[0], photos[2], photos[3]]


def test_thresholds_from_the_flag_or_from_results_json(att_subset, checkpoint, tmp_path):
    photos = valid_photos(att_subset, "s5")
    strict = predict(checkpoint, *photos, "--threshold=1.0")  # no unseen photo is that similar to a centroid
    assert "threshold: 1.0000 (--threshold)" in strict.stdout
    assert [r["identity"] for r in results(strict.stdout)] == ["unknown", "unknown"]

    (tmp_path / "results.json").write_text(json.dumps({"checkpoint": "elsewhere/tb_model.pth",
                                                       "open_set": {"threshold": 1.0}}))
    other = predict(checkpoint, *photos)  # calibrated for another checkpoint: not used
    assert "evaluated another checkpoint" in other.stdout and "no decisions" in other.stdout
    (tmp_path / "results.json").write_text(json.dumps({"checkpoint": os.path.abspath(checkpoint),
                                                       "open_set": {"threshold": 1.0}}))
    calibrated = predict(checkpoint, *photos)
    assert f"threshold: 1.0000 ({tmp_path / 'results.json'}, open_set.threshold)" in calibrated.stdout
    assert [r["identity"] for r in results(calibrated.stdout)] == ["unknown", "unknown"]
    lenient = predict(checkpoint, *photos, "--threshold=-1")  # the flag wins over results.json
    assert len(results(lenient.stdout)) == 2 and all(r["identity"] in IDENTITIES for r in results(lenient.stdout))


def test_verify_two_photos(att_subset, checkpoint, tmp_path):
    same = valid_photos(att_subset, "s2")
    # --verify takes the verification threshold (image to image), never the open-set one (image to centroid)
    (tmp_path / "results.json").write_text(json.dumps({"checkpoint": os.path.abspath(checkpoint),
                                                       "open_set": {"threshold": 1.0}}))
    assert "has no verification.threshold_mean" in predict(checkpoint, *same, "--verify=True").stdout
    (tmp_path / "results.json").write_text(json.dumps({"checkpoint": os.path.abspath(checkpoint),
                                                       "open_set": {"threshold": 1.0},
                                                       "verification": {"threshold_mean": -1.0}}))
    proc = predict(checkpoint, *same, "--verify=True")
    assert "threshold: -1.0000" in proc.stdout and "verification.threshold_mean" in proc.stdout
    assert re.search(rf"{re.escape(same[0])} vs {re.escape(same[1])}: cosine similarity -?[0-9.]+: same person",
                     proc.stdout)
    strict = predict(checkpoint, *same, "--verify=True", "--threshold=1.0")
    assert strict.stdout.rstrip().endswith("different people")

    for photos in (same[:1], same + same[:1]):
        wrong = predict(checkpoint, *photos, "--verify=True", check=False)
        assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
        assert f"--verify=True compares exactly two photos, got {len(photos)}" in wrong.stderr


def test_onnx_export_gives_the_pytorch_embeddings_for_any_batch_size(att_subset, checkpoint):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from data_utils import load_rgb, make_transform
    from model import load_checkpoint, model_from_checkpoint

    proc = predict(checkpoint, "--export=onnx")
    path = checkpoint.with_suffix(".onnx")
    assert f"wrote {path}" in proc.stdout and path.is_file()
    state = load_checkpoint(str(checkpoint))
    model = model_from_checkpoint(state).eval()
    transform = make_transform(state["image_size"], train=False)
    images = torch.stack([transform(load_rgb(p)) for p in valid_photos(att_subset, "s1", "s6")[:3]])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (images, images[:1]):
        with torch.no_grad():
            expected = model(batch).numpy()
        got = session.run(["embeddings"], {"images": batch.numpy()})[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4


def test_export_without_onnx_says_what_to_install(checkpoint, tmp_path, monkeypatch):
    hidden = tmp_path / "hide" / "onnx"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('No module named onnx (hidden by the test)')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hide"))
    proc = predict(checkpoint, "--export=onnx", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --export=onnx needs the onnx and onnxscript packages (torch's ONNX exporter); "
        "install them with: pip install onnx onnxruntime onnxscript"]
    assert not checkpoint.with_suffix(".onnx").exists()


def test_help_lists_the_constants_and_the_photos():
    proc = run_script("predict.py", "--help")
    flags = set(re.findall(r"--([a-z_]+) [A-Z]+", proc.stdout))
    assert flags == {"checkpoint", "gallery", "threshold", "top_k", "verify", "export", "onnx_path", "batch_size",
                     "device", "amp"}
    assert "PHOTO" in proc.stdout
