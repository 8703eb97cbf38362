"""Face detection and five-point alignment (align.py) and `prepare.py align` on real LFW and AT&T photos."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import prepare
from align import (PASSES, FaceAligner, MainFace, aligned_as_trained, alignment_record, main_face, photo_faces,
                   read_alignment, similarity_transform, template, warp)
from checkpoint import load_checkpoint
from conftest import ROOT, run_script, write_image
from data_utils import load_image, make_transform
from pretrained import DlibReference

PEOPLE = ("Aaron_Peirsol", "Ai_Sugiyama", "Abdoulaye_Wade")


@pytest.fixture(scope="module")
def aligner():
    return FaceAligner()


def lfw_photo(lfw_faces, person, index=0):
    folder = os.path.join(lfw_faces, person)
    return os.path.join(folder, sorted(os.listdir(folder))[index])


def test_similarity_transform_recovers_a_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = math.radians(17), 1.7, np.array([12.0, -30.0])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    matrix = similarity_transform(points, points @ rotation.T + shift)
    np.testing.assert_allclose(matrix, np.hstack([rotation, shift[:, None]]), atol=1e-9)


def test_warp_moves_marked_points_onto_the_template():
    """Dots drawn where a similarity puts the template's points land, after warp, on the template."""
    angle, scale, shift = math.radians(-12), 2.2, np.array([40.0, 25.0])
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    placed = template() @ rotation.T + shift
    pixels = np.zeros((400, 400), dtype=np.uint8)
    for x, y in placed:
        pixels[int(round(y)) - 3:int(round(y)) + 4, int(round(x)) - 3:int(round(x)) + 4] = 255
    aligned = np.asarray(warp(Image.fromarray(pixels, "L"), placed, size=112))
    for x, y in template():
        patch = aligned[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3]
        assert patch.mean() > 100, (x, y)
    assert aligned.shape == (112, 112) and aligned.mean() < 40  # the dots, not the whole crop


def test_the_main_face_is_the_largest_near_the_centre():
    boxes = [(0, 0, 100, 100), (120, 120, 170, 170), (290, 290, 300, 300)]  # four times larger, off-centre
    assert main_face(boxes, 300, 300) == 0
    assert main_face([(0, 0, 40, 40), (130, 130, 170, 170)], 300, 300) == 1  # same size: the central one


def test_lfw_faces_land_their_eyes_on_the_template(aligner, lfw_faces):
    for person in PEOPLE:
        image = Image.open(lfw_photo(lfw_faces, person)).convert("RGB")
        aligned, faces, main, found_by = aligner.align(image)
        assert aligned.size == (112, 112) and len(faces) >= 1 and main is not None and found_by == "hog"
        # the aligned face, found again (at twice the size: the detector wants faces over ~80 pixels)
        again = aligner.faces(aligned.resize((224, 224)))
        eyes = again[0][1][:2] / 2
        assert np.abs(eyes - template()[:2]).max() < 4, (person, eyes)


@pytest.fixture
def photos(lfw_faces, att_faces, tmp_path):
    """SRC of identity folders: two LFW people, an AT&T person (grayscale PGM), and `odd`: random noise (no face),
    a text file named .jpg (unreadable), and two LFW faces side by side on one canvas (several faces)."""
    src = tmp_path / "src"
    for person in PEOPLE[:2]:
        os.symlink(os.path.join(lfw_faces, person), src / person if src.exists() else (src.mkdir(), src / person)[1])
    os.symlink(os.path.join(att_faces, "s2"), src / "s2")
    write_image(str(src / "odd" / "noise.png"), size=(160, 160))
    (src / "odd" / "text.jpg").write_text("not an image")
    canvas = Image.new("RGB", (400, 200), "gray")
    for i, person in enumerate(PEOPLE[1:]):
        canvas.paste(Image.open(lfw_photo(lfw_faces, person)).convert("RGB"), (16 + 200 * i, 16))
    canvas.save(src / "odd" / "two.jpg")
    return src


def report(dst):
    """{path: (the pass that found its face or "none", notes)} of DST's alignment report."""
    with open(dst / prepare.ALIGN_REPORT) as f:
        return {path: (found_by, notes) for path, found_by, notes in (line.rstrip("\n").split("\t") for line in f)}


def test_prepare_align_keeps_names_lists_what_it_missed_and_goes_on_where_it_stopped(photos, tmp_path):
    dst = tmp_path / "dst"
    counts = prepare.align_dataset(str(photos), str(dst), log=lambda line: None)
    listed = report(dst)
    assert set(listed) >= {os.path.join("odd", "noise.png"), os.path.join("odd", "text.jpg"),
                           os.path.join("odd", "two.jpg")}
    assert listed[os.path.join("odd", "text.jpg")][1].startswith("unreadable")
    assert not (dst / "odd" / "noise.png").exists() and not (dst / "odd" / "text.jpg").exists()
    two = Image.open(dst / "odd" / "two.jpg")  # aligned all the same: the larger, more central of the two
    assert two.size == (112, 112)
    pgm = Image.open(dst / "s2" / "1.pgm")
    assert pgm.size == (112, 112) and pgm.mode == "L"  # grayscale stays grayscale, names stay
    sources = [f for p in photos.iterdir() for f in (photos / p.name).iterdir()]
    aligned = [f for p in dst.iterdir() if p.is_dir() for f in p.iterdir()]
    assert counts["aligned"] == len(aligned) == len(sources) - counts["missed"] and counts["several"] >= 1
    again = prepare.align_dataset(str(photos), str(dst), log=lambda line: None)
    assert again["done before"] == len(aligned) and again["aligned"] == 0 and report(dst) == listed
    assert Image.open(dst / prepare.ALIGN_GRID).size[1] > 300  # the first photos beside their crops


def test_missing_centre_keeps_a_faceless_photo_as_its_centre_crop_and_the_command_line_sizes(photos, tmp_path):
    dst = tmp_path / "dst"
    prepare.main(["align", str(photos / ".." / "src"), str(dst), "--missing=centre", "--size=96", "--passes=hog"])
    assert Image.open(dst / "odd" / "noise.png").size == (96, 96) and read_alignment(str(dst))["passes"] == ["hog"]
    assert not (dst / "odd" / "text.jpg").exists()  # unreadable: nothing to crop
    with pytest.raises(SystemExit) as info:
        prepare.main(["align", str(photos), str(tmp_path / "other"), "--missing=guess"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        prepare.main(["align", str(tmp_path / "absent"), str(tmp_path / "other")])
    assert info.value.code not in (None, 0, 2)  # an error message: exit status 1


# -----------------------------------------------------------------------------
# detection passes: HOG, HOG upsampled once more, dlib's CNN

@pytest.fixture(scope="module")
def cascade():
    return FaceAligner(passes=PASSES)


def small(photo, side=80):
    """`photo` shrunk to `side` pixels amid a grey 160x160 canvas: a face HOG finds only upsampled."""
    canvas = Image.new("RGB", (160, 160), "gray")
    canvas.paste(photo.resize((side, side), Image.Resampling.BILINEAR), ((160 - side) // 2,) * 2)
    return canvas


def noisy(photo, sd=60):
    """`photo` under Gaussian noise of standard deviation `sd` (seeded): a face only dlib's CNN finds."""
    pixels = np.asarray(photo, dtype=np.float64) + np.random.default_rng(0).normal(0, sd, (*photo.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def counted(detector, name, calls):
    """`detector` noting (name, upsample) in `calls` each time it is run."""
    def detect(pixels, upsample):
        calls.append((name, upsample))
        return detector(pixels, upsample)
    return detect


def test_each_pass_sees_only_the_photos_the_passes_before_found_no_face_in(cascade, lfw_faces, monkeypatch):
    calls = []
    monkeypatch.setattr(cascade, "detector", counted(cascade.detector, "hog", calls))
    monkeypatch.setattr(cascade, "cnn", counted(cascade.cnn, "cnn", calls))
    photo = Image.open(lfw_photo(lfw_faces, PEOPLE[0])).convert("RGB")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    for image, found_by, run in ((photo, "hog", [("hog", 0)]), (small(photo), "hog_up", [("hog", 0), ("hog", 1)]),
                                 (noise, None, [("hog", 0), ("hog", 1), ("cnn", 0)])):
        calls.clear()
        assert cascade.align(image)[3] == found_by and calls == run


def test_the_cnn_pass_finds_a_face_hog_misses_with_its_points_in_place(cascade, lfw_faces):
    photo = Image.open(lfw_photo(lfw_faces, PEOPLE[0])).convert("RGB")
    hard = noisy(photo)
    assert not cascade.rectangles(np.asarray(hard), "hog") and not cascade.rectangles(np.asarray(hard), "hog_up")
    found_by, faces = cascade.detect(hard)
    assert found_by == "cnn" and len(faces) == 1
    assert np.abs(faces[0][1] - cascade.faces(photo)[0][1]).max() < 4  # the five points, against the clean photo's
    assert cascade.align(hard)[0].size == (112, 112)


def test_the_report_the_summary_and_the_progress_bar_say_which_pass_found_each_face(lfw_faces, tmp_path, capsys):
    photo, folder = Image.open(lfw_photo(lfw_faces, PEOPLE[0])).convert("RGB"), tmp_path / "src" / "someone"
    folder.mkdir(parents=True)
    for name, image in (("plain", photo), ("small", small(photo)), ("noisy", noisy(photo))):
        image.save(folder / f"{name}.png")
    write_image(str(folder / "noise.png"), size=(160, 160))
    lines = []
    counts = prepare.align_dataset(str(tmp_path / "src"), str(tmp_path / "dst"), log=lines.append)
    assert {path: found_by for path, (found_by, _) in report(tmp_path / "dst").items()} == {
        os.path.join("someone", f"{name}.png"): found_by
        for name, found_by in (("plain", "hog"), ("small", "hog_up"), ("noisy", "cnn"), ("noise", "none"))}
    assert [counts[key] for key in ("hog", "hog_up", "cnn", "aligned", "missed")] == [1, 1, 1, 3, 1]
    assert "faces found by hog 1, hog_up 1, cnn 1;" in lines[-1]
    assert "hog=1, hog_up=1, cnn=1, missed=1" in capsys.readouterr().err


def test_photos_aligned_for_a_network_meet_the_passes_that_found_its_training_faces():
    before = FaceAligner.as_recorded(dict(template="arcface 5-point", size=112, detector="dlib HOG + 68 landmarks"))
    recorded = FaceAligner.as_recorded(alignment_record(112, ("hog", "cnn"), 1))
    assert (before.passes, before.upsample, before.cnn) == (("hog",), 0, None)
    assert (recorded.passes, recorded.upsample) == (("hog", "cnn"), 1)


# -----------------------------------------------------------------------------
# aligned datasets and networks

def test_photo_faces_are_every_face_aligned_or_the_whole_photo_without_an_aligner(aligner, lfw_faces):
    canvas = Image.new("RGB", (400, 200), "gray")
    for i, person in enumerate(PEOPLE[:2]):
        canvas.paste(Image.open(lfw_photo(lfw_faces, person)).convert("RGB"), (16 + 200 * i, 16))
    faces = photo_faces(canvas, aligner, 96)
    assert len(faces) == 2 and all(crop.size == (96, 96) for _, crop in faces)
    assert sorted(box[0] < 200 for box, _ in faces) == [False, True]  # one face on each half
    assert photo_faces(canvas) == [(None, canvas)]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    assert photo_faces(noise, aligner) == [] and MainFace(aligner, 64)(noise).size == (64, 64)  # centre crop


def test_an_aligned_dataset_says_so_and_its_split_keeps_it(photos, tmp_path):
    prepare.align_dataset(str(photos), str(tmp_path / "aligned"), size=96, log=lambda line: None)
    record = read_alignment(str(tmp_path / "aligned"))
    assert record["size"] == 96
    prepare.split_dataset(str(tmp_path / "aligned"), str(tmp_path / "split"), log=lambda line: None)
    assert read_alignment(str(tmp_path / "split")) == record
    assert read_alignment(str(tmp_path / "split" / "train")) == record  # a gallery folder of the split set
    assert read_alignment(str(photos)) is None
    step = str  # any transform
    assert aligned_as_trained(step, None, 112, str(photos)) is step  # a network of unaligned photos
    assert aligned_as_trained(step, "an aligner", 96, str(tmp_path / "split" / "train")) is step  # aligned already
    composed = aligned_as_trained(step, "an aligner", 96, str(photos)).transforms
    assert isinstance(composed[0], MainFace) and composed[0].size == 96 and composed[1] is step


@pytest.mark.e2e
def test_a_network_trained_on_aligned_faces_names_every_face_of_a_photo(photos, lfw_faces, tmp_path):
    """prepare.py align -> split -> train.py records the alignment -> predict.py finds, aligns and names both
    faces of a photo (with dlib too), writes its annotated copy and JSON, says when a photo has no face, and
    verifies main faces;
    test.py aligns a dataset of unaligned photos itself."""
    prepare.align_dataset(str(photos), str(tmp_path / "aligned"), log=lambda line: None)
    prepare.split_dataset(str(tmp_path / "aligned"), str(tmp_path / "data"), log=lambda line: None)
    out = tmp_path / "out"
    run_script("train.py", f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", "--epochs=1", "--backbone=smallcnn",
               "--image_size=56", "--batch_size=8", "--embedding_dim=32", "--hidden_dim=64")
    assert load_checkpoint(str(out / "tb_model.pth"))["alignment"]["size"] == 112
    two, noise = photos / "odd" / "two.jpg", photos / "odd" / "noise.png"
    proc = run_script("predict.py", f"--checkpoint={out / 'tb_model.pth'}", str(two), str(noise),
                      f"--out_dir={tmp_path / 'seen'}", f"--json_path={tmp_path / 'answers.json'}", "--threshold=0.5")
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert [a["photo"] for a in answers] == [str(two)] and len(answers[0]["faces"]) == 2
    assert all(len(face["box"]) == 4 and face["name"] for face in answers[0]["faces"])
    assert len([line for line in proc.stdout.splitlines() if line.startswith(f"{two} face at (")]) == 2
    assert any(line.startswith(f"{noise}:") for line in proc.stdout.splitlines())  # its own line: no face
    assert Image.open(tmp_path / "seen" / "two.png").size == (400, 200)
    # dlib, too, finds and names each face of the photo (not the photo stretched to a square)
    run_script("predict.py", "--checkpoint=dlib", str(two), f"--gallery={tmp_path / 'data' / 'train'}",
               f"--out_dir={tmp_path / 'dlib'}", f"--json_path={tmp_path / 'dlib.json'}", "--threshold=0.5")
    faces = json.loads((tmp_path / "dlib.json").read_text())[0]["faces"]
    left = [face for face in faces if face["box"][2] < 200]  # the face prepare.py aligned as the gallery's "odd"
    assert len(faces) == 2 and len(left) == 1 and left[0]["name"] == "odd" and left[0]["score"] > 0.99
    prepare.split_dataset(str(photos), str(tmp_path / "unaligned"), log=lambda line: None)
    run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", f"--data_dir={tmp_path / 'unaligned'}",
               f"--out_dir={tmp_path / 'eval'}")
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["aligned_here"] is True
    no_dlib = tmp_path / "no_dlib"  # a machine without dlib still evaluates the photos prepare.py align wrote
    no_dlib.mkdir()
    (no_dlib / "dlib.py").write_text("raise ImportError('no dlib on this machine')\n")
    proc = subprocess.run([sys.executable, "test.py", f"--checkpoint={out / 'tb_model.pth'}",
                           f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'eval_aligned'}"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(no_dlib)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "eval_aligned" / "results.json").read_text())["aligned_here"] is False
    verified = run_script("predict.py", f"--checkpoint={out / 'tb_model.pth'}", "--verify", str(two),
                          lfw_photo(lfw_faces, PEOPLE[1]), "--threshold=0.5")
    assert re.search(r"cosine similarity -?[0-9.]+: (same person|different people)$", verified.stdout, re.M)


def test_dlib_reference_describes_a_person_alike_across_photos_framings_and_a_faceless_image(lfw_faces):
    photos = [load_image(lfw_photo(lfw_faces, PEOPLE[0], i)) for i in (0, 1)] + \
             [load_image(lfw_photo(lfw_faces, person)) for person in PEOPLE[1:]]
    zoomed = photos[0].crop((14, 14, 154, 154))  # the same photo framed tighter: the face found and aligned again
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (168, 168, 3), dtype=np.uint8))
    transform = make_transform(168, train=False)
    embeddings = DlibReference()(torch.stack([transform(image) for image in [*photos, zoomed, noise]]))
    assert embeddings.shape == (6, 128) and torch.allclose(embeddings.norm(dim=1), torch.ones(6), atol=1e-5)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 4] > 0.98  # framing barely moves a descriptor
    assert similarity[0, 1] > max(similarity[i, j] for i in (0, 1) for j in (2, 3))  # same person above others
