"""gallery.py: the decision threshold predict.py uses (a flag, or test.py's results.json of this very checkpoint)
and the gallery's centroids, cached beside the checkpoint until a gallery file or the checkpoint changes."""
import json
import os
import shutil
from contextlib import nullcontext

import pytest
import torch
from torch.utils.data import DataLoader

import gallery
import inference
from conftest import make_faces, write_image
from data_utils import DatasetError, FaceFolder, make_transform
from evaluation import class_centroids
from gallery import decision_threshold, gallery_centroids
from model import EmbeddingNet

TRANSFORM = make_transform((32, 32), train=False, pixels=True)


# -----------------------------------------------------------------------------
# decision_threshold

def write_results(folder, results):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "run" / "tb_model.pth"
    path.parent.mkdir()
    path.write_bytes(b"weights")
    return str(path)


def test_a_threshold_flag_wins_over_results_json(checkpoint):
    write_results(os.path.dirname(checkpoint), dict(checkpoint=checkpoint, open_set=dict(threshold=0.4)))
    value, source = decision_threshold(checkpoint, 0.25)
    assert value == 0.25 and "--threshold" in source
    assert decision_threshold(checkpoint, -1.0, verify=True)[0] == -1.0  # the lowest cosine similarity counts


def test_results_json_of_this_checkpoint_gives_the_threshold(checkpoint):
    write_results(os.path.dirname(checkpoint), dict(checkpoint=checkpoint, open_set=dict(threshold=0.4),
                                                     verification=dict(threshold_mean=0.55)))
    value, source = decision_threshold(checkpoint)
    assert value == 0.4 and os.path.join(os.path.dirname(checkpoint), "results.json") in source
    assert decision_threshold(checkpoint, verify=True)[0] == 0.55


def test_results_json_is_matched_to_a_relative_checkpoint_path(checkpoint, monkeypatch):
    write_results(os.path.dirname(checkpoint), dict(checkpoint=checkpoint, open_set=dict(threshold=1)))
    monkeypatch.chdir(os.path.dirname(os.path.dirname(checkpoint)))
    value, _ = decision_threshold(os.path.join("run", "tb_model.pth"))
    assert value == 1.0 and isinstance(value, float)


def test_a_named_network_reads_its_results_in_out_name(tmp_path, monkeypatch):
    """dlib_resnet (no file of its own): test.py's results of it in out/dlib_resnet/ give its threshold; those of
    another network there do not."""
    monkeypatch.chdir(tmp_path)
    write_results(os.path.join("out", "dlib_resnet"), dict(checkpoint="dlib_resnet", open_set=dict(threshold=0.3)))
    assert decision_threshold("dlib_resnet")[0] == 0.3
    write_results(os.path.join("out", "dlib_resnet"), dict(checkpoint=str(tmp_path / "dlib_resnet"),
                                                           open_set=dict(threshold=0.3)))
    assert decision_threshold("dlib_resnet")[0] is None


@pytest.mark.parametrize("case", ["other_checkpoint", "missing", "not_json", "a_folder", "a_list", "no_section",
                                  "no_key", "a_bool", "a_string"])
def test_no_usable_results_json_gives_none_and_a_reason(checkpoint, case):
    folder = os.path.dirname(checkpoint)
    results = dict(checkpoint=checkpoint, open_set=dict(threshold=0.4), verification=dict(threshold_mean=0.5))
    if case == "other_checkpoint":
        results["checkpoint"] = os.path.join(folder, "last.pth")
    elif case == "no_section":
        del results["open_set"], results["verification"]
    elif case == "no_key":
        results = dict(checkpoint=checkpoint, open_set={}, verification=dict(threshold=0.5))
    elif case in ("a_bool", "a_string"):
        results = dict(checkpoint=checkpoint, open_set=dict(threshold=True if case == "a_bool" else "0.4"),
                       verification=dict(threshold_mean=True if case == "a_bool" else "0.5"))
    if case == "not_json":
        with open(os.path.join(folder, "results.json"), "w") as f:
            f.write('{"checkpoint": ')
    elif case == "a_folder":
        os.mkdir(os.path.join(folder, "results.json"))
    elif case == "a_list":
        write_results(folder, [results])
    elif case != "missing":
        write_results(folder, results)
    for verify in (False, True):
        value, reason = decision_threshold(checkpoint, verify=verify)
        assert value is None and isinstance(reason, str) and reason


# -----------------------------------------------------------------------------
# gallery_centroids

@pytest.fixture
def setup(tmp_path, checkpoint, monkeypatch):
    """A gallery of 3 identities x 3 images, a checkpoint file, a tiny model, and a count of embedding passes."""
    root = make_faces(str(tmp_path / "gallery"), identities=3, images=3)
    torch.manual_seed(0)
    model = EmbeddingNet("smallcnn", 16, "mlp", 32).eval()
    passes = []

    def counted_embed(*args, **kwargs):
        passes.append(1)
        return inference.embed(*args, **kwargs)
    monkeypatch.setattr(gallery, "embed", counted_embed)
    said = []

    def centroids(folder=root, depth=1):
        return gallery_centroids(model, checkpoint, folder, depth, TRANSFORM, "cpu", nullcontext(), log=said.append)
    return dict(root=root, model=model, passes=passes, said=said, centroids=centroids,
                cache=os.path.splitext(checkpoint)[0] + ".gallery.pt")


def direct_centroids(model, root):
    """(classes, centroids) of the gallery at `root` embedded here, without the cache."""
    faces = FaceFolder(root, TRANSFORM)
    embeddings, labels = inference.embed(model, DataLoader(faces, batch_size=64), "cpu", nullcontext())
    return faces.classes, class_centroids(embeddings, labels, len(faces.classes))


def assert_centroids(result, expected):
    (classes, centroids), (expected_classes, expected_centroids) = result, expected
    assert classes == expected_classes
    assert centroids.shape == expected_centroids.shape
    torch.testing.assert_close(centroids, expected_centroids, rtol=0, atol=1e-6)


def test_the_first_call_embeds_and_caches_the_second_reads_the_cache(setup):
    expected = direct_centroids(setup["model"], setup["root"])
    first = setup["centroids"]()
    assert setup["passes"] == [1] and os.path.isfile(setup["cache"])
    assert_centroids(first, expected)
    assert first[0] == ["p0", "p1", "p2"]
    second = setup["centroids"]()
    assert setup["passes"] == [1]  # nothing changed: no embedding pass
    assert second[0] == first[0] and torch.equal(second[1], first[1])
    assert len(setup["said"]) == 2
    cached = torch.load(setup["cache"], weights_only=True)  # a cache that loading cannot run code from
    assert torch.equal(cached["centroids"], first[1])


def touch(path):
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))


def change(setup, checkpoint, what):
    """Change the gallery or the checkpoint as `what` says."""
    image = os.path.join(setup["root"], "p1", "0.png")
    if what == "touched_image":
        touch(image)
    elif what == "image_of_another_size":  # the same modification time, another size
        stat = os.stat(image)
        write_image(image, seed=7, size=(30, 26))
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert os.stat(image).st_size != stat.st_size
    elif what == "new_image":
        write_image(os.path.join(setup["root"], "p2", "9.png"), seed=9)
    elif what == "removed_image":
        os.remove(image)
    elif what == "new_identity":
        write_image(os.path.join(setup["root"], "p3", "0.png"), seed=11)
    elif what == "touched_checkpoint":
        touch(checkpoint)
    elif what == "rewritten_checkpoint":
        with open(checkpoint, "wb") as f:
            f.write(b"other weights")


@pytest.mark.parametrize("what", ["touched_image", "image_of_another_size", "new_image", "removed_image",
                                  "new_identity", "touched_checkpoint", "rewritten_checkpoint"])
def test_a_changed_gallery_or_checkpoint_rebuilds_the_cache(setup, checkpoint, what):
    setup["centroids"]()
    change(setup, checkpoint, what)
    rebuilt = setup["centroids"]()
    assert setup["passes"] == [1, 1]
    assert_centroids(rebuilt, direct_centroids(setup["model"], setup["root"]))
    again = setup["centroids"]()
    assert setup["passes"] == [1, 1]  # cached anew
    assert again[0] == rebuilt[0] and torch.equal(again[1], rebuilt[1])


def test_another_gallery_folder_rebuilds_the_cache(setup, tmp_path):
    setup["centroids"]()
    copy = shutil.copytree(setup["root"], str(tmp_path / "copy"))  # the same files, times and sizes
    setup["centroids"](copy)
    assert setup["passes"] == [1, 1]


@pytest.mark.parametrize("damage", [b"", b"not a torch file", "a_list", "another_version"])
def test_a_damaged_or_foreign_cache_is_ignored_and_rebuilt(setup, capsys, damage):
    expected = setup["centroids"]()
    capsys.readouterr()
    if damage == "a_list":
        torch.save([torch.zeros(2)], setup["cache"])
    elif damage == "another_version":
        cached = torch.load(setup["cache"], weights_only=True)
        cached["key"]["version"] += 1
        torch.save(cached, setup["cache"])
    else:
        with open(setup["cache"], "wb") as f:
            f.write(damage)
    rebuilt = setup["centroids"]()
    assert setup["passes"] == [1, 1]
    assert rebuilt[0] == expected[0] and torch.equal(rebuilt[1], expected[1])
    err = capsys.readouterr().err
    assert (setup["cache"] in err) == isinstance(damage, bytes)  # an unreadable file is warned about
    setup["centroids"]()
    assert setup["passes"] == [1, 1]  # the rebuilt cache is read


def test_a_cache_that_cannot_be_written_is_not_fatal(setup):
    os.mkdir(setup["cache"])
    expected = direct_centroids(setup["model"], setup["root"])
    for calls in (1, 2):
        assert_centroids(setup["centroids"](), expected)
        assert len(setup["passes"]) == calls
    assert os.path.isdir(setup["cache"])


def test_a_gallery_without_images_is_a_dataset_error(setup, tmp_path):
    (tmp_path / "empty" / "p0").mkdir(parents=True)
    with pytest.raises(DatasetError):
        setup["centroids"](str(tmp_path / "empty"))


# -----------------------------------------------------------------------------
# answers

def test_a_face_answer_names_the_nearest_identity_or_unknown_below_the_threshold():
    classes = ["ann", "bob", "cy"]
    answer = gallery.face_answer((1.6, 2, 30, 40), classes, [2, 0], [0.81234, 0.5], limit=0.7)
    assert answer == dict(box=[1, 2, 30, 40], name="cy", score=0.8123, nearest=[("cy", 0.8123), ("ann", 0.5)])
    assert gallery.answer_line(answer) == " face at (1, 2, 30, 40): cy 0.8123; next: ann 0.5000"
    unknown = gallery.face_answer(None, classes, [1], [0.6], limit=0.7)
    assert unknown["name"] == "unknown" and unknown["box"] is None
    assert gallery.answer_line(unknown) == ": unknown (nearest bob 0.6000)"  # a whole photo: no box
    assert gallery.face_answer(None, classes, [1], [0.6])["name"] == "bob"  # no threshold: no decision
