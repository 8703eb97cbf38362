"""Training on insightface's data: a dataset of train.rec records (sampling.training_images) read like identity
folders (cache, P x K batches, loader workers, distributed shares), the .bin verification sets of --val_bins
(pairs.read_verification_bins, tested in test_pairs.py) scored as insightface does (evaluation.score_pairs,
bin_pairs; engine.evaluate_bins) and choosing the checkpoint (engine.selection_key "bins"), and one run of train.py
and test.py on packed AT&T faces."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import prepare
from checkpoint import load_checkpoint
from configurator import ConfigError
from conftest import insightface_accuracy, make_faces, run_script
from data_utils import DatasetError, FaceFolder, make_transform, write_skipped
from engine import epoch_summary, evaluate_bins, selection_key
from evaluation import bin_pairs, score_pairs
from figures import plot_history
from inference import embed_files
from model import Embedder
from recordio import RecordFaces, RecordWriter, pack_payload
from sampling import train_loader_for, training_images


def quiet(*_):
    pass


@pytest.fixture
def records(tmp_path):
    """(identity folders of 4 people x 4 random images, a dataset folder holding them packed as train.rec)."""
    src = make_faces(tmp_path / "faces", identities=4, images=4)
    prepare.pack_dataset(str(src), str(tmp_path / "emore" / "train.rec"), log=quiet)
    return src, tmp_path / "emore"


def png(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# the training images: identity folders or records

def test_data_dir_trains_on_its_train_rec_or_its_train_folder_and_refuses_both_or_neither(records, tmp_path):
    src, emore = records
    faces = training_images(str(emore), make_transform((16, 16), train=True, pixels=True))
    assert isinstance(faces, RecordFaces) and faces.classes == ["0", "1", "2", "3"] and len(faces) == 16
    image, label = faces[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 1  # the training transform
    (tmp_path / "folders").mkdir()
    os.symlink(src, tmp_path / "folders" / "train")
    assert isinstance(training_images(str(tmp_path / "folders")), FaceFolder)
    os.symlink(src, emore / "train")
    for data_dir in (emore, tmp_path / "nothing"):  # both: which one is meant? neither: nothing to train on
        with pytest.raises(DatasetError) as info:
            training_images(str(data_dir))
        assert "--data_dir" in str(info.value)


def test_records_cache_gives_the_items_read_on_demand_and_the_gallery_shares_it(records):
    _, emore = records
    items = []
    for cached in (False, True):
        faces = training_images(str(emore), make_transform((16, 14), train=True, pixels=True))
        assert faces.cache_bytes() == 16 * 3 * 18 * 15  # uint8, resized with the 1.1 margin
        if cached:
            faces.cache()
        torch.manual_seed(0)  # the random augmentation draws alike
        items.append([faces[i] for i in range(len(faces))])
    assert all(torch.equal(a, b) and la == lb for (a, la), (b, lb) in zip(*items))
    gallery = training_images(str(emore), make_transform((16, 14), train=False, pixels=True))
    gallery.cache(like=faces)
    assert gallery.cached is faces.cached  # decoded once


def test_an_undecodable_record_is_replaced_and_listed_with_its_reason(tmp_path):
    with RecordWriter(str(tmp_path / "train.rec")) as writer:
        for key, (label, image) in enumerate([(0, png(1)), (0, b"not an image"), (1, png(2)), (1, png(3))]):
            writer.write(key, pack_payload(label, image))
    faces = training_images(str(tmp_path))
    with pytest.warns(UserWarning):
        faces.cache()
    assert sorted(faces.cached) == [0, 2, 3] and faces[1][1] == 0  # its identity's other image
    write_skipped([faces], str(tmp_path / "skipped_files.txt"))
    name, reason = (tmp_path / "skipped_files.txt").read_text().strip().split("\t")
    assert name == f"{tmp_path / 'train.rec'}#1" and reason.startswith("UnidentifiedImageError")


def test_p_x_k_batches_of_records_in_a_worker_give_each_process_disjoint_identities(records):
    _, emore = records
    faces = training_images(str(emore), make_transform((16, 16), train=True, pixels=True))
    shares = []
    for rank in (0, 1):
        loader, sources = train_loader_for(faces, None, batch_size=4, images_per_identity=2, rank=rank,
                                           world_size=2, distributed=True, log=quiet, num_workers=1)
        sources[0].set_epoch(1)
        shares.append([(images, labels) for images, labels in loader])  # read by a worker process
    assert len(shares[0]) == len(shares[1]) == 2  # 16 images, K = 2, P = 2 a process: 2 global batches
    for (images_0, labels_0), (images_1, labels_1) in zip(*shares):
        assert images_0.shape == (4, 3, 16, 16) and images_1.shape == (4, 3, 16, 16)
        assert not set(labels_0.tolist()) & set(labels_1.tolist())  # P x K per process, disjoint identities
        assert all(labels_0.tolist().count(label) == 2 for label in labels_0.tolist())
    seen = sorted(label for share in shares for _, labels in share for label in labels.tolist())
    assert seen == sorted(faces.targets)  # together: every image once


# -----------------------------------------------------------------------------
# scoring a .bin set as insightface does

def test_bin_pairs_are_consecutive_images_in_ten_consecutive_folds():
    rows, folds = bin_pairs([True, False] * 10)
    assert rows[:2] == [(0, 1, True), (2, 3, False)] and rows[-1] == (38, 39, False)
    assert folds.tolist() == [k // 2 for k in range(20)]


def test_score_pairs_of_hand_made_embeddings_leaves_out_pairs_with_an_unreadable_image():
    same = [True, False] * 10
    rows, folds = bin_pairs(same)
    embeddings = np.zeros((40, 4), dtype=np.float32)
    for k, (i, j, s) in enumerate(rows):  # a same pair: one direction; a different one: orthogonal directions
        embeddings[i, k % 4] = embeddings[j, k % 4 if s else (k + 1) % 4] = 1
    metrics, scored = score_pairs(embeddings, list(range(40)), rows, folds)
    assert metrics["accuracy_mean"] == 1.0 and metrics["folds"] == 10 and metrics["auc"] == 1.0
    assert scored == list(range(20))
    embeddings[2, :] = -embeddings[3, :]  # pair 1 (different) scores -1, still rightly different
    readable = [i for i in range(40) if i != 5]  # image 5 (pair 2) could not be read: its pair is left out
    metrics, scored = score_pairs(embeddings[readable], readable, rows, folds)
    assert 2 not in scored and len(scored) == 19 and metrics["pairs"] == 19 and metrics["accuracy_mean"] == 1.0
    flipped = embeddings.copy()
    flipped[[1, 5, 9]] = -flipped[[1, 5, 9]]  # three same pairs now look like different people
    metrics, _ = score_pairs(flipped, list(range(40)), rows, folds)
    assert metrics["accuracy_mean"] == pytest.approx(0.85)  # three folds of two pairs get one of them wrong
    assert score_pairs(embeddings[:4], [0, 1, 2, 3], rows, folds) == (None, [0, 1])  # 2 pairs: no metrics


class Pixels(Embedder):
    """An 'embedding network' whose embedding is the image's pixels: alike images embed alike."""

    def unnormalised(self, images):
        return images.flatten(1)


def test_evaluate_bins_embeds_each_set_with_its_mirror_images_and_averages_their_accuracies():
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(12)]
    encoded = []
    for picture in pictures:
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    mirrored = io.BytesIO()
    pictures[0].transpose(Image.FLIP_LEFT_RIGHT).save(mirrored, "PNG")
    # each same pair: an image and its mirror image (alike once mirror images are added), different: two images
    easy = [(encoded[k], mirrored.getvalue() if k == 0 else encoded[k], True) if k % 2 == 0 else
            (encoded[k], encoded[k + 1], False) for k in range(10)]
    hard = [(encoded[k], encoded[k + 1], k % 2 == 0) for k in range(10)]  # "same" pairs of two images: chance
    bins = {name: ([image for a, b, _ in pairs for image in (a, b)], np.array([s for *_, s in pairs]))
            for name, pairs in (("easy", easy), ("hard", hard))}
    transform, autocast = make_transform((16, 16), train=False, pixels=True), torch.autocast("cpu", enabled=False)
    metrics = evaluate_bins(Pixels(), bins, transform, "cpu", autocast)
    assert metrics["bin_easy_accuracy"] == 1.0 and 0 <= metrics["bin_hard_accuracy"] < 1
    embedded, _ = embed_files(Pixels(), [io.BytesIO(image) for image in bins["hard"][0]], transform, "cpu", autocast,
                              flip=True)
    assert metrics["bin_hard_accuracy"] == pytest.approx(insightface_accuracy(embedded, bins["hard"][1]), abs=1e-6)
    assert metrics["bins_accuracy"] == pytest.approx((1.0 + metrics["bin_hard_accuracy"]) / 2)
    assert evaluate_bins(Pixels(), {}, None, "cpu", None) == {}


# -----------------------------------------------------------------------------
# choosing the checkpoint on the sets

def test_selection_on_bins_and_auto_picks_them_when_given():
    targets, classes, trained = [0, 0, 1, 1], ["a", "b"], ["a", "b"]
    held_out = np.array([[0, 1, 1], [0, 2, 0]])
    assert selection_key("bins", targets, classes, trained, held_out, ["lfw"]) == "bins_accuracy"
    assert selection_key("auto", targets, classes, trained, held_out, ["lfw"]) == "bins_accuracy"
    assert selection_key("auto", [], [], trained, (), ["lfw"]) == "bins_accuracy"  # no valid/: the sets alone
    assert selection_key("top1", targets, classes, trained, held_out, ["lfw"]) == "valid_identification"
    for select_on, bins in (("bins", []), ("top1", ["lfw"])):  # no sets; no valid/ to take the top-1 of
        with pytest.raises(ConfigError) as info:
            selection_key(select_on, [], [], trained, (), bins)
        assert info.value.flag == "select_on"


def test_an_epoch_of_bins_alone_is_printed_and_plotted(tmp_path):
    metrics = dict(bin_lfw_accuracy=0.9, bin_cfp_fp_accuracy=0.8, bins_accuracy=0.85)
    line = epoch_summary(1, 2, dict(train_loss=0.5, train_accuracy=0.25), metrics, "accuracy", 3, True).split(" | ")
    assert line == ["epoch 1/2", "train loss 0.5000", "accuracy 25%", "lfw 90.00%", "cfp_fp 80.00%",
                    "bins mean 85.00%", "3s", "best"]
    history = [dict(epoch=0, step=0, train_loss=None, **metrics),
               dict(epoch=1, step=4, train_loss=0.5, train_accuracy=0.25, **dict(metrics, bins_accuracy=0.9))]
    plot_history(history, tmp_path / "curves.png", best_by="bins_accuracy")
    assert Image.open(tmp_path / "curves.png").size[0] > 800


# -----------------------------------------------------------------------------
# train.py on records, chosen on .bin sets; test.py and a resumed run on its checkpoints

@pytest.mark.e2e
def test_train_py_on_packed_att_records_chooses_on_bin_sets_resumes_and_test_py_scores_them(att_faces, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for person in range(1, 11):  # s1-s6 to train on, s7-s10 never trained on for the .bin sets
        folder = tmp_path / ("raw" if person <= 6 else "held_out")
        folder.mkdir(exist_ok=True)
        os.symlink(os.path.join(att_faces, f"s{person}"), folder / f"s{person}")
    data = tmp_path / "emore"  # insightface's layout: train.rec, train.idx, property and .bin sets beside them
    prepare.pack_dataset(str(tmp_path / "raw"), str(data / "train.rec"), log=quiet)
    prepare.bin_dataset(str(tmp_path / "held_out"), str(data / "held.bin"), pairs=20, log=quiet)
    prepare.bin_dataset(str(tmp_path / "held_out"), str(tmp_path / "other.bin"), pairs=20, seed=1, log=quiet)
    out = tmp_path / "out"
    run_script("train.py", f"--data_dir={data}", f"--val_bins=held,{tmp_path / 'other.bin'}", f"--out_dir={out}",
               "--epochs=1", "--backbone=smallcnn", "--image_size=32", "--batch_size=8", "--images_per_identity=2")
    proc = run_script("train.py", "--resume=last", f"--out_dir={out}", "--epochs=2")
    assert "resuming" in proc.stdout and "held" in proc.stdout.splitlines()[-3]  # the epoch line names the sets
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and "valid_identification" not in history[0]
    means = [h["bins_accuracy"] for h in history]
    assert means == [pytest.approx((h["bin_held_accuracy"] + h["bin_other_accuracy"]) / 2) for h in history]
    best = load_checkpoint(str(out / "tb_model.pth"))
    assert best["epoch"] == int(np.argmax(means)) and best["classes"] == ["0", "1", "2", "3", "4", "5"]
    assert best["config"]["val_bins"] == f"held,{tmp_path / 'other.bin'}"
    other = tmp_path / "other_emore"  # resuming on other records: other identities, refused
    prepare.pack_dataset(make_faces(str(tmp_path / "other"), identities=2), str(other / "train.rec"), log=quiet)
    os.symlink(data / "held.bin", other / "held.bin")
    refused = run_script("train.py", "--resume=last", f"--out_dir={out}", "--epochs=3",
                         f"--data_dir={other}", check=False)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}", "--val_bins=held")
    results = json.loads((out / "results.json").read_text())
    assert "bins" in results and "identification" not in results  # records: no gallery, the sets alone
    held = results["bins"]["held"]
    assert held["pairs_scored"] == 20 and held["folds"] == 10 and {"eer", "tar_at_far", "auc"} <= set(held)
    assert held["accuracy_mean"] == pytest.approx(history[best["epoch"]]["bin_held_accuracy"])  # as in training
    # predict.py names photos after a gallery of identity folders (the records' identities are label numbers)
    named = run_script("predict.py", f"--checkpoint={out / 'tb_model.pth'}", f"--gallery={tmp_path / 'held_out'}",
                       os.path.join(att_faces, "s7", "1.pgm")).stdout
    assert re.search(r"1\.pgm: s(7|8|9|10) ", named)
