"""The honest evaluation protocol: prepare.py's people held out whole (DST/unseen, --valid_people), the verification
pairs of untrained people (evaluation.held_out_pairs) and the metric that chooses the checkpoint
(engine.selection_key, engine.evaluate's held-out pairs), starting a network from another run's
(pretrained.init_weights), what a test.py metric measures (evaluation.evaluation_protocol), grayscale augmentation
(data_utils.make_transform), and, in subprocesses, train.py never reading data_dir/test and test.py stating its
protocol. In-process tests run on tiny random images written into tmp_path."""
import json
import math
import os
import shutil
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import prepare
from checkpoint import CheckpointError, Checkpointer, load_checkpoint
from configurator import ConfigError
from conftest import make_faces, run_script, write_image
from data_utils import DatasetError, FaceFolder, make_transform
from engine import evaluate, selection_key
from evaluation import (cosine_similarity_pairs, evaluation_protocol, held_out_pairs, identification_accuracy,
                        verification_metrics)
from inference import embed
from losses import build_objective
from model import EmbeddingNet
from prepare import split_dataset
from pretrained import init_weights
from sampling import draw_pairs, draw_triplets, train_loader_for

SIZE = (32, 32)
EMBEDDING = 16
SPLITS = ("train", "valid", "test")
UNSEEN_SPLITS = tuple(f"unseen/{s}" for s in SPLITS)


def quiet(*_):
    pass


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def people(folder):
    """The identity folders directly below `folder` (none when it does not exist)."""
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def exit_status(err):
    return 0 if err.code is None else err.code if isinstance(err.code, int) else 1


def roles(dst):
    """(trained, unseen, valid people) of a split: the identities of DST/train, of DST/unseen/*, and those of
    DST/valid absent from DST/train."""
    trained = people(os.path.join(dst, "train"))
    unseen = set().union(*(people(os.path.join(dst, "unseen", s)) for s in SPLITS))
    return trained, unseen, people(os.path.join(dst, "valid")) - trained


def faces_with_extras(root, identities=8, images=6):
    """make_faces plus a distortion/ copy in every identity and an alignment.json at the top."""
    make_faces(root, identities=identities, images=images)
    for i in range(identities):
        write_image(os.path.join(root, f"p{i}", "distortion", "0_blur.png"), seed=7 + i)
    with open(os.path.join(root, "alignment.json"), "w") as f:
        json.dump(dict(size=112, template="five points"), f)
    return root


# -----------------------------------------------------------------------------
# prepare.split_dataset: people held out whole

def test_held_out_people_are_whole_and_only_where_they_belong(tmp_path):
    src = faces_with_extras(str(tmp_path / "src"))
    dst = str(tmp_path / "dst")
    counts = split_dataset(src, dst, valid=0.2, test=0.2, unseen=0.25, valid_people=0.25, seed=0, log=quiet)
    trained, unseen, valid_people = roles(dst)
    everyone = {f"p{i}" for i in range(8)}
    assert len(unseen) == 2 and len(valid_people) == 2 and len(trained) == 4  # 8 x 0.25, rounded
    assert trained | unseen | valid_people == everyone
    assert not (trained & unseen or trained & valid_people or unseen & valid_people)
    originals = {f"{j}.png" for j in range(6)}  # every image but the distortion copy
    for name in unseen:
        for split in SPLITS:  # none of their images in the trained people's splits
            assert not os.path.exists(os.path.join(dst, split, name))
        held = [f for s in SPLITS for f in listing(os.path.join(dst, "unseen", s, name))
                if os.path.isdir(os.path.join(dst, "unseen", s, name))]
        assert sorted(held) == sorted(originals)  # whole, each image once, no distortion/ copy
        for split in SPLITS:  # split per identity as the trained people are
            assert os.listdir(os.path.join(dst, "unseen", split, name))
    for name in valid_people:
        assert not os.path.exists(os.path.join(dst, "train", name))
        assert not os.path.exists(os.path.join(dst, "test", name))
        assert set(listing(os.path.join(dst, "valid", name))) == originals
    for name in trained:  # the trained people keep their distortion copy in train/ and an image in each split
        assert os.path.isfile(os.path.join(dst, "train", name, "distortion", "0_blur.png"))
        for split in ("valid", "test"):
            assert os.listdir(os.path.join(dst, split, name))
    assert not [p for p in listing(dst) if "distortion" in p and not p.startswith("train" + os.sep)]
    # the counts are what was written
    for split in SPLITS + UNSEEN_SPLITS:
        assert counts[split] == len([p for p in listing(os.path.join(dst, split)) if p.endswith(".png")]), split
    assert counts["unseen/train"] + counts["unseen/valid"] + counts["unseen/test"] == 2 * 6
    assert set(os.listdir(os.path.join(dst, "unseen"))) == {*SPLITS, "alignment.json"}
    # alignment.json of SRC in DST and DST/unseen (a dataset of the same shape)
    for folder in (dst, os.path.join(dst, "unseen")):
        with open(os.path.join(folder, "alignment.json")) as f:
            assert json.load(f) == dict(size=112, template="five points")


def test_held_out_shares_are_rounded_with_at_least_one(tmp_path):
    src = make_faces(str(tmp_path / "src"), identities=8, images=3)
    for k, (unseen, valid_people, expected) in enumerate([(0.3, 0.01, (2, 1)), (0.2, 0.0, (2, 0)),
                                                          (0.0, 0.45, (0, 4)), (0.01, 0.01, (1, 1)),
                                                          (0.6, 0.3, (5, 2)), (0.3125, 0.0, (3, 0))]):  # 2.5 people: 3
        dst = str(tmp_path / f"d{k}")
        split_dataset(src, dst, valid=0.3, unseen=unseen, valid_people=valid_people, log=quiet)
        trained, held_unseen, held_valid = roles(dst)
        assert (len(held_unseen), len(held_valid)) == expected, (unseen, valid_people)
        assert len(trained) == 8 - sum(expected)
    assert not os.path.exists(os.path.join(tmp_path, "d2", "unseen"))  # no unseen share: no DST/unseen


def test_the_seed_chooses_the_held_out_people(tmp_path):
    src = make_faces(str(tmp_path / "src"), identities=8, images=4)

    def chosen(seed, name):
        dst = str(tmp_path / name)
        split_dataset(src, dst, valid=0.25, unseen=0.25, valid_people=0.25, seed=seed, log=quiet)
        return roles(dst), listing(dst)

    first, again = chosen(0, "a"), chosen(0, "b")
    assert first == again  # the same people and the same files
    others = [chosen(seed, f"s{seed}")[0] for seed in (1, 2, 3)]
    assert any(roles_ != first[0] for roles_ in others)


def test_without_held_out_shares_the_split_is_the_one_of_before(tmp_path):
    src = faces_with_extras(str(tmp_path / "src"), identities=5, images=7)
    for seed in (0, 3):
        before = split_dataset(src, str(tmp_path / f"old{seed}"), valid=0.2, test=0.15, seed=seed, log=quiet)
        now = split_dataset(src, str(tmp_path / f"new{seed}"), valid=0.2, test=0.15, seed=seed, unseen=0.0,
                            valid_people=0.0, log=quiet)
        assert now == before
        assert set(now) == {"train", "valid", "test"}
        assert listing(tmp_path / f"new{seed}") == listing(tmp_path / f"old{seed}")
        assert not os.path.exists(tmp_path / f"new{seed}" / "unseen")
    assert listing(tmp_path / "new0") != listing(tmp_path / "new3")


@pytest.mark.parametrize("unseen,valid_people,flag", [(1.0, 0.0, "--unseen"), (-0.1, 0.0, "--unseen"),
                                                      (0.0, 1.0, "--valid_people"), (0.0, -0.5, "--valid_people"),
                                                      (1.5, 0.1, "--unseen")])
def test_a_share_outside_zero_one_is_refused(tmp_path, unseen, valid_people, flag):
    src = make_faces(str(tmp_path / "src"), identities=4, images=3)
    with pytest.raises(DatasetError) as info:
        split_dataset(src, str(tmp_path / "dst"), unseen=unseen, valid_people=valid_people, log=quiet)
    assert flag in str(info.value)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("identities,unseen,valid_people", [(2, 0.1, 0.1), (3, 0.5, 0.34), (4, 0.9, 0.0),
                                                            (1, 0.1, 0.0), (4, 0.0, 0.9)])
def test_shares_that_hold_out_every_identity_are_refused(tmp_path, identities, unseen, valid_people):
    src = make_faces(str(tmp_path / "src"), identities=identities, images=3)
    with pytest.raises(DatasetError):
        split_dataset(src, str(tmp_path / "dst"), unseen=unseen, valid_people=valid_people, log=quiet)
    assert not (tmp_path / "dst").exists() or not listing(tmp_path / "dst")  # nothing written


def test_split_command_holds_people_out_and_force_clears_unseen(tmp_path, capsys):
    src = faces_with_extras(str(tmp_path / "src"), identities=8, images=5)
    cli, direct = str(tmp_path / "cli"), str(tmp_path / "direct")
    prepare.main(["split", src, cli, "--unseen=0.25", "--valid_people=0.25"])
    split_dataset(src, direct, unseen=0.25, valid_people=0.25, log=quiet)
    assert listing(cli) == listing(direct)
    trained, unseen, valid_people = roles(cli)
    assert len(unseen) == 2 and len(valid_people) == 2
    with pytest.raises(SystemExit) as info:  # a bad share: exit 1 naming the flag, DST untouched
        prepare.main(["split", src, cli, "--unseen=1.5", "--force"])
    assert exit_status(info.value) == 1 and "--unseen" in str(info.value.code)
    assert listing(cli) == listing(direct)
    with pytest.raises(SystemExit) as info:
        prepare.main(["split", src, cli, "--valid_people=0.9", "--unseen=0.9"])  # not empty, and no one left
    assert exit_status(info.value) == 1
    # --force replaces DST/unseen as well: a split without unseen people leaves none
    prepare.main(["split", src, cli, "--force", "--seed=2"])
    split_dataset(src, str(tmp_path / "plain"), seed=2, log=quiet)
    assert not os.path.exists(os.path.join(cli, "unseen"))
    assert [p for p in listing(cli) if p != "alignment.json"] == \
        [p for p in listing(tmp_path / "plain") if p != "alignment.json"]
    # and a forced split with other unseen people has only those in DST/unseen
    prepare.main(["split", src, cli, "--force", "--seed=5", "--unseen=0.25"])
    split_dataset(src, str(tmp_path / "seed5"), seed=5, unseen=0.25, log=quiet)
    assert listing(cli) == listing(tmp_path / "seed5")


def test_unseen_and_valid_people_never_reach_a_training_batch(tmp_path):
    src = make_faces(str(tmp_path / "src"), identities=8, images=6)
    dst = str(tmp_path / "dst")
    split_dataset(src, dst, valid=0.2, test=0.2, unseen=0.25, valid_people=0.25, log=quiet)
    trained, unseen, valid_people = roles(dst)
    faces = FaceFolder(os.path.join(dst, "train"), make_transform(SIZE, train=True, pixels=True))
    assert set(faces.classes) == trained
    for rows in (None, "triplets", "pairs"):
        loader, sources = train_loader_for(faces, rows, 8, images_per_identity=2, seed=0, log=quiet)
        seen = set()
        for epoch in (1, 2):
            for source in sources:
                source.set_epoch(epoch)
            for batch in loader:
                seen |= {faces.classes[int(y)] for y in batch[1]}
        assert seen and seen <= trained, rows
        assert not seen & (unseen | valid_people)


# -----------------------------------------------------------------------------
# evaluation.held_out_pairs

# a0 a0 b1 b1 b1 c2 d3 d3 e4: a and c trained; b, d and e (one image) never trained on
TARGETS = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4])
CLASSES = ["a", "b", "c", "d", "e"]


def test_held_out_pairs_index_the_images_of_untrained_people():
    rows = held_out_pairs(TARGETS, CLASSES, ["a", "c"], np.random.default_rng(0))
    assert rows.dtype == np.int64 and rows.shape[1] == 3
    names = np.array(CLASSES)[TARGETS]
    assert set(names[rows[:, :2].ravel()]) <= {"b", "d", "e"}
    assert (rows[:, 0] != rows[:, 1]).all()
    assert (rows[:, 2] == (TARGETS[rows[:, 0]] == TARGETS[rows[:, 1]])).all()  # indices into the original array
    same = {tuple(sorted(r[:2])) for r in rows if r[2]}
    assert same == {(2, 3), (2, 4), (3, 4), (6, 7)}  # every same pair of b and d
    assert (rows[:, 2] == 0).sum() == 4  # as many different pairs
    assert len({tuple(sorted(r[:2])) for r in rows}) == len(rows)
    again = held_out_pairs(TARGETS, CLASSES, ["a", "c"], np.random.default_rng(0))
    assert np.array_equal(rows, again)
    shifted = held_out_pairs(TARGETS, CLASSES, ["c", "a", "zed"], np.random.default_rng(0))  # train order, extras
    assert np.array_equal(rows, shifted)


def test_held_out_pairs_max_same():
    rows = held_out_pairs(TARGETS, CLASSES, ["a", "c"], np.random.default_rng(1), max_same=2)
    assert (rows[:, 2] == 1).sum() == 2 and (rows[:, 2] == 0).sum() == 2
    assert (rows[:, 2] == (TARGETS[rows[:, 0]] == TARGETS[rows[:, 1]])).all()
    assert set(np.array(CLASSES)[TARGETS][rows[:, :2].ravel()]) <= {"b", "d", "e"}


@pytest.mark.parametrize("targets,classes,trained", [
    (TARGETS, CLASSES, ["a", "c", "d", "e"]),  # one untrained person: same pairs only
    (TARGETS, CLASSES, CLASSES),  # nobody untrained
    (np.array([0, 1, 2, 3]), ["a", "b", "c", "d"], ["a"]),  # untrained people of one image each
    (np.array([0, 0, 1, 2]), ["a", "b", "c"], ["a"]),  # two untrained people, neither with two images
])
def test_held_out_pairs_are_empty_without_both_kinds(targets, classes, trained):
    rows = held_out_pairs(targets, classes, trained, np.random.default_rng(0))
    assert rows.shape == (0, 3) and rows.dtype == np.int64


# -----------------------------------------------------------------------------
# engine.selection_key

def test_selection_key_auto_picks_pairs_when_there_are_held_out_rows():
    rows = held_out_pairs(TARGETS, CLASSES, ["a", "c"], np.random.default_rng(0))
    none = np.empty((0, 3), dtype=np.int64)
    assert selection_key("auto", TARGETS, CLASSES, ["a", "c"], rows) == "valid_pairs_accuracy"
    assert selection_key("auto", TARGETS, CLASSES, ["a", "c"], none) == "valid_identification"
    assert selection_key("top1", TARGETS, CLASSES, ["a", "c"], rows) == "valid_identification"
    assert selection_key("pairs", TARGETS, CLASSES, ["a", "c"], rows) == "valid_pairs_accuracy"
    assert selection_key("pairs", [1, 1, 3], CLASSES, ["a"], held_out_pairs([1, 1, 3], CLASSES, ["a"],
                                                                            np.random.default_rng(0))) \
        == "valid_pairs_accuracy"  # pairs need no trained person in valid/


@pytest.mark.parametrize("select_on,targets,trained,held", [
    ("pairs", TARGETS, ["a", "c"], False),  # no held-out rows
    ("top1", [1, 1, 3, 3], ["a", "c"], True),  # no valid image of a trained person
    ("auto", [1, 1, 1], ["a", "c"], False),  # auto -> top1, and nobody trained in valid/
])
def test_selection_key_errors_name_select_on(select_on, targets, trained, held):
    rows = held_out_pairs(targets, CLASSES, trained, np.random.default_rng(0)) if held else \
        np.empty((0, 3), dtype=np.int64)
    assert bool(len(rows)) == held
    with pytest.raises(ConfigError) as info:
        selection_key(select_on, targets, CLASSES, trained, rows)
    assert info.value.flag == "select_on"


# -----------------------------------------------------------------------------
# engine.evaluate on held-out people

class Unreadable(Dataset):
    """A gallery that must not be read: its classes are there, any item raises."""

    def __init__(self, classes, length=6):
        self.classes, self.length = classes, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        raise AssertionError("the gallery was read")


@pytest.fixture(scope="module")
def eval_roots(tmp_path_factory):
    """gallery: t0..t2 (4 images each); probes: 3 images of each of t0 and of held-out h0..h2."""
    root = tmp_path_factory.mktemp("protocol_eval")
    for i in range(3):
        for j in range(4):
            write_image(os.path.join(root, "gallery", f"t{i}", f"{j}.png"), seed=10 * i + j)
    for name, base in (("t0", 500), ("h0", 600), ("h1", 700), ("h2", 800)):
        for j in range(3):
            write_image(os.path.join(root, "probes", name, f"{j}.png"), seed=base + j)
    return root


def valid_rows_for(probes, train_classes):
    rng = np.random.default_rng(0)
    rows = dict(triplets=draw_triplets(probes.targets, probes.by_label, rng))
    rows["pairs"] = draw_pairs(probes.targets, probes.by_label, rng)
    rows["held_out"] = held_out_pairs(probes.targets, probes.classes, train_classes, rng)
    return rows


def test_evaluate_scores_the_held_out_pairs_as_verification_metrics_does(eval_roots):
    transform = make_transform(SIZE, train=False, pixels=True)
    gallery = FaceFolder(str(eval_roots / "gallery"), transform)
    probes = FaceFolder(str(eval_roots / "probes"), transform)
    rows = valid_rows_for(probes, gallery.classes)
    assert len(rows["held_out"]) and rows["held_out"][:, 2].any() and not rows["held_out"][:, 2].all()
    torch.manual_seed(0)
    model = EmbeddingNet("smallcnn", EMBEDDING, "mlp", 32)
    objective = build_objective("arcface", embedding_dim=EMBEDDING, num_classes=len(gallery.classes))
    result = evaluate(model, objective, DataLoader(gallery, batch_size=5), DataLoader(probes, batch_size=4),
                      gallery.classes, rows, "cpu", nullcontext())
    probe_emb, probe_labels = embed(model, DataLoader(probes, batch_size=64), "cpu", nullcontext())
    direct = verification_metrics(cosine_similarity_pairs(probe_emb, rows["held_out"]), rows["held_out"][:, 2])
    assert result["valid_pairs_accuracy"] == pytest.approx(direct["accuracy_mean"])
    assert result["valid_pairs_auc"] == pytest.approx(direct["auc"])
    gallery_emb, gallery_labels = embed(model, DataLoader(gallery, batch_size=64), "cpu", nullcontext())
    top1 = identification_accuracy(gallery_emb, gallery_labels, gallery.classes, probe_emb, probe_labels,
                                   probes.classes)["accuracy"]
    assert result["valid_identification"] == pytest.approx(top1)  # t0's probes: top-1 still measured
    # without held-out rows: no pairs metrics
    plain = evaluate(model, objective, DataLoader(gallery, batch_size=5), DataLoader(probes, batch_size=4),
                     gallery.classes, dict(rows, held_out=np.empty((0, 3), dtype=np.int64)), "cpu", nullcontext())
    assert "valid_pairs_accuracy" not in plain and "valid_pairs_auc" not in plain


def test_evaluate_without_probes_of_gallery_people_never_reads_the_gallery(eval_roots, tmp_path):
    transform = make_transform(SIZE, train=False, pixels=True)
    for name in ("h0", "h1", "h2"):  # the held-out people alone
        shutil.copytree(eval_roots / "probes" / name, tmp_path / "probes" / name)
    probes = FaceFolder(str(tmp_path / "probes"), transform)
    train_classes = ["t0", "t1", "t2"]
    rows = valid_rows_for(probes, train_classes)
    torch.manual_seed(1)
    model = EmbeddingNet("smallcnn", EMBEDDING, "mlp", 32)
    objective = build_objective("arcface", embedding_dim=EMBEDDING, num_classes=3)
    result = evaluate(model, objective, DataLoader(Unreadable(train_classes), batch_size=2),
                      DataLoader(probes, batch_size=4), train_classes, rows, "cpu", nullcontext())
    assert math.isnan(result["valid_identification"])
    probe_emb, _ = embed(model, DataLoader(probes, batch_size=64), "cpu", nullcontext())
    direct = verification_metrics(cosine_similarity_pairs(probe_emb, rows["held_out"]), rows["held_out"][:, 2])
    assert result["valid_pairs_accuracy"] == pytest.approx(direct["accuracy_mean"])
    assert result["valid_pairs_auc"] == pytest.approx(direct["auc"])


# -----------------------------------------------------------------------------
# pretrained.init_weights

def saved_network(tmp_path, **config):
    """A smallcnn EmbeddingNet (seeded, its weights and BatchNorm statistics moved off their initial values) saved
    as train.py's Checkpointer saves it; returns (path, its state dict)."""
    torch.manual_seed(0)
    model = EmbeddingNet(**dict(dict(backbone="smallcnn", embedding_dim=EMBEDDING, head="mlp", hidden_dim=32),
                                **config))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    objective = build_objective("arcface", embedding_dim=model.config["embedding_dim"], num_classes=3)
    saver = Checkpointer(str(tmp_path), model, objective, dict(backbone="smallcnn"), ["a", "b", "c"], SIZE)
    assert saver.save("source.pth", 1, dict(valid_identification=0.5))
    return str(tmp_path / "source.pth"), {k: v.clone() for k, v in model.state_dict().items()}


def part(state, name):
    return {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")}


def equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_weights_takes_backbone_and_head_of_the_same_network(tmp_path):
    path, source = saved_network(tmp_path)
    torch.manual_seed(5)
    model = EmbeddingNet("smallcnn", EMBEDDING, "mlp", 32)
    assert not equal_states(model.state_dict(), source)
    assert tuple(init_weights(model, path)) == ("backbone", "head")
    assert equal_states(model.state_dict(), source)


@pytest.mark.parametrize("change", [dict(embedding_dim=8), dict(hidden_dim=16), dict(head="linear")])
def test_init_weights_keeps_a_fresh_head_of_another_shape(tmp_path, change):
    path, source = saved_network(tmp_path)
    torch.manual_seed(5)
    model = EmbeddingNet(**dict(dict(backbone="smallcnn", embedding_dim=EMBEDDING, head="mlp", hidden_dim=32),
                                **change))
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert tuple(init_weights(model, path)) == ("backbone",)
    assert equal_states(model.backbone.state_dict(), part(source, "backbone"))
    assert equal_states(model.head.state_dict(), fresh_head)
    with torch.no_grad():  # and it runs
        assert model.eval()(torch.zeros(2, 3, *SIZE)).shape == (2, model.config["embedding_dim"])


def test_init_weights_refuses_another_backbone_or_a_missing_file(tmp_path):
    path, _ = saved_network(tmp_path)
    model = EmbeddingNet("resnet18", EMBEDDING, "mlp", 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        init_weights(model, path)
    assert "--backbone" in str(info.value)
    assert equal_states(model.state_dict(), before)
    with pytest.raises(CheckpointError):
        init_weights(EmbeddingNet("smallcnn", EMBEDDING, "mlp", 32), str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        init_weights(EmbeddingNet("smallcnn", EMBEDDING, "mlp", 32), str(tmp_path / "junk.pth"))


def test_init_weights_accepts_a_minimal_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = EmbeddingNet("smallcnn", EMBEDDING, "linear", 32)
    torch.save(dict(model=source.state_dict(), model_config=source.config), tmp_path / "minimal.pth")
    torch.manual_seed(4)
    model = EmbeddingNet("smallcnn", EMBEDDING, "linear", 32)
    assert tuple(init_weights(model, str(tmp_path / "minimal.pth"))) == ("backbone", "head")
    assert equal_states(model.state_dict(), source.state_dict())


# -----------------------------------------------------------------------------
# evaluation.evaluation_protocol

@pytest.fixture
def protocol_data(tmp_path):
    """DATA/train: a, b, c; DATA/valid: a, b and x (never trained on); DATA/test: a, b, c; OTHER/valid: y, z."""
    data = tmp_path / "data"
    for split, names in (("train", "abc"), ("valid", "abx"), ("test", "abc")):
        for name in names:
            write_image(str(data / split / name / "0.png"), seed=ord(name))
    for name in "yz":
        write_image(str(tmp_path / "other" / "valid" / name / "0.png"), seed=ord(name))
    os.symlink(data, tmp_path / "link")
    return tmp_path


def test_evaluation_protocol_counts_people_and_who_chose_the_checkpoint(protocol_data):
    data, link, other = (str(protocol_data / n) for n in ("data", "link", "other"))
    trained = ["a", "b", "c"]
    valid = evaluation_protocol(FaceFolder(os.path.join(data, "valid")), trained, data, None, "valid")
    assert (valid["probe_people"], valid["probe_people_trained_on"]) == (3, 2)  # mixed
    assert valid["probes_chose_checkpoint"] is True and valid["split"] == "valid" and valid["aligned"] is False
    assert valid["probes"] == os.path.abspath(os.path.join(data, "valid"))
    json.dumps(valid)  # plain JSON
    for probes_root, trained_dir in ((os.path.join(link, "valid"), data), (os.path.join(data, "valid"), link),
                                     (os.path.join(data, "valid"), data + os.sep)):
        assert evaluation_protocol(FaceFolder(probes_root), trained, trained_dir, None, "valid")[
            "probes_chose_checkpoint"] is True, (probes_root, trained_dir)
    test = evaluation_protocol(FaceFolder(os.path.join(data, "test")), trained, data, dict(size=112), "test")
    assert (test["probe_people"], test["probe_people_trained_on"]) == (3, 3)  # all trained
    assert test["probes_chose_checkpoint"] is False and test["aligned"] is True and test["split"] == "test"
    unseen = evaluation_protocol(FaceFolder(os.path.join(other, "valid")), trained, data, None, "valid")
    assert (unseen["probe_people"], unseen["probe_people_trained_on"]) == (2, 0)  # none trained
    assert unseen["probes_chose_checkpoint"] is False  # another dataset's valid/
    for unknown in ("", None):  # the training data is not known
        assert evaluation_protocol(FaceFolder(os.path.join(data, "valid")), trained, unknown, None, "valid")[
            "probes_chose_checkpoint"] is False
    summaries = [p["summary"] for p in (valid, test, unseen)]
    assert all(isinstance(s, str) and s and "\n" not in s for s in summaries)
    assert len(set(summaries)) == 3
    not_chosen = evaluation_protocol(FaceFolder(os.path.join(data, "valid")), trained, "", None, "valid")
    assert not_chosen["summary"] != valid["summary"]  # whether they chose the checkpoint is said


# -----------------------------------------------------------------------------
# data_utils.make_transform(grayscale=, augment=)

def colour_photo(path):
    pixels = np.zeros((40, 36, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 220, 40, 120
    pixels[10:30, 8:28] = (10, 200, 30)
    Image.fromarray(pixels).save(path)
    return Image.open(path).convert("RGB")


def grey(image):
    return torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_grayscale_augmentation_shows_images_in_grey(tmp_path):
    photo = colour_photo(tmp_path / "colour.png")
    torch.manual_seed(0)
    always = make_transform(SIZE, train=True, pixels=True, grayscale=1.0)
    never = make_transform(SIZE, train=True, pixels=True, grayscale=0.0)
    default = make_transform(SIZE, train=True, pixels=True)
    for _ in range(5):
        image = always(photo)
        assert image.shape == (3, *SIZE) and grey(image)
        assert not grey(never(photo)) and not grey(default(photo))
    half = make_transform(SIZE, train=True, pixels=True, grayscale=0.5)
    shown = [grey(half(photo)) for _ in range(40)]
    assert 0 < sum(shown) < 40
    normalised = make_transform(SIZE, train=True, grayscale=1.0)(photo)  # float: grey, then per-channel statistics
    assert normalised.shape == (3, *SIZE) and normalised.dtype == torch.float32
    assert not grey(make_transform(SIZE, train=False, pixels=True, grayscale=1.0)(photo))  # evaluation: never


def test_strong_augmentation_jitters_brightness_and_scale_but_never_evaluation(tmp_path):
    photo = colour_photo(tmp_path / "colour.png")  # a green square on magenta: its centre is green at any crop
    torch.manual_seed(0)
    light = make_transform(SIZE, train=True, pixels=True)
    strong = make_transform(SIZE, train=True, pixels=True, augment="strong")
    centres = {name: {tuple(t(photo)[:, SIZE[0] // 2, SIZE[1] // 2].tolist()) for _ in range(20)}
               for name, t in (("light", light), ("strong", strong))}
    assert centres["light"] == {(10, 200, 30)}  # rotation, crop and flip move the square, not its colour
    assert len(centres["strong"]) > 10  # brightness, contrast and saturation differ from draw to draw
    # scale jitter: the square's width varies beyond what a rotation of at most 10 degrees and a crop give
    def width(image):  # of the square on the middle row: where green outweighs red, whatever the jitter
        return int((image[1, SIZE[0] // 2] > image[0, SIZE[0] // 2]).sum())
    widths = {width(strong(photo)) for _ in range(40)}
    square = width(light(photo))
    assert len(widths) > 3 and max(widths) > square + 1 and strong(photo).shape == (3, *SIZE)
    evaluation = make_transform(SIZE, train=False, pixels=True)(photo)
    assert torch.equal(make_transform(SIZE, train=False, pixels=True, augment="strong")(photo), evaluation)
    with pytest.raises(ValueError, match="augment"):
        make_transform(SIZE, train=True, augment="heavy")


# -----------------------------------------------------------------------------
# end to end: train.py and test.py

def tiny(**changes):
    """train.py's flags for a small, fast run on the CPU, with `changes`."""
    flags = dict(backbone="smallcnn", image_size=32, batch_size=8, images_per_identity=4, embedding_dim=16,
                 hidden_dim=32, epochs=1, device="cpu", num_workers=0, seed=0)
    flags.update(changes)
    return [f"--{k}={v}" for k, v in flags.items()]


def assert_refused(proc, named, status=1):
    assert proc.returncode == status and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and named in errors[0], proc.stderr


def model_weights(path):
    return load_checkpoint(str(path))["model"]


@pytest.fixture(scope="module")
def protocol_runs(tmp_path_factory):
    """A dataset of 8 people split with test/, 2 valid people and 2 unseen, trained twice with the same seed:
    first with DST/test a file (any read of it would fail), then with DST/test as written."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        root = tmp_path_factory.mktemp("protocol_e2e")
        src, data = str(root / "src"), str(root / "data")
        make_faces(src, identities=8, images=10)
        split_dataset(src, data, valid=0.2, test=0.2, unseen=0.25, valid_people=0.25, seed=0, log=quiet)
        test_dir = os.path.join(data, "test")
        shutil.move(test_dir, str(root / "test_aside"))
        with open(test_dir, "w") as f:  # a file: listing or opening anything below it fails
            f.write("not a folder")
        blind = run_script("train.py", f"--data_dir={data}", f"--out_dir={root / 'blind'}",
                           *tiny(select_on="pairs"))
        os.remove(test_dir)
        shutil.copytree(str(root / "test_aside"), test_dir)
        seeing = run_script("train.py", f"--data_dir={data}", f"--out_dir={root / 'seeing'}", *tiny())
        yield dict(root=root, data=data, blind=root / "blind", seeing=root / "seeing", outputs=(blind, seeing))


@pytest.mark.e2e
@pytest.mark.xdist_group("protocol")
def test_train_py_never_reads_test_and_chooses_on_held_out_people(protocol_runs, tmp_path):
    data = protocol_runs["data"]
    for out in (protocol_runs["blind"], protocol_runs["seeing"]):
        history = json.loads((out / "history.json").read_text(encoding="utf-8"))
        assert [h["epoch"] for h in history] == [0, 1]
        for entry in history:
            assert 0 <= entry["valid_pairs_accuracy"] <= 1 and 0 <= entry["valid_pairs_auc"] <= 1
        best = max(history, key=lambda h: h["valid_pairs_accuracy"])  # pairs chose tb_model.pth (first best)
        assert load_checkpoint(str(out / "tb_model.pth"))["epoch"] == best["epoch"]
    blind, seeing = (model_weights(protocol_runs[k] / "tb_model.pth") for k in ("blind", "seeing"))
    assert blind.keys() == seeing.keys() and all(torch.equal(blind[k], seeing[k]) for k in blind)
    # --select_on=top1 with no trained person in valid/: refused before training, naming select_on
    only_held = tmp_path / "only_held"
    shutil.copytree(data, only_held, ignore=shutil.ignore_patterns("unseen"))
    for name in os.listdir(only_held / "train"):
        shutil.rmtree(only_held / "valid" / name)
    proc = run_script("train.py", f"--data_dir={only_held}", f"--out_dir={tmp_path / 'top1'}",
                      *tiny(select_on="top1"), check=False)
    assert_refused(proc, "select_on")
    assert not (tmp_path / "top1" / "tb_model.pth").exists()
    # and --select_on=pairs without valid people is refused the same way
    no_held = tmp_path / "no_held"
    shutil.copytree(data, no_held, ignore=shutil.ignore_patterns("unseen"))
    for name in set(os.listdir(no_held / "valid")) - set(os.listdir(no_held / "train")):
        shutil.rmtree(no_held / "valid" / name)
    proc = run_script("train.py", f"--data_dir={no_held}", f"--out_dir={tmp_path / 'pairs'}",
                      *tiny(select_on="pairs"), check=False)
    assert_refused(proc, "select_on")


@pytest.mark.e2e
@pytest.mark.xdist_group("protocol")
def test_test_py_states_its_protocol_and_init_from_starts_a_run(protocol_runs, tmp_path):
    data, tb_model = protocol_runs["data"], protocol_runs["seeing"] / "tb_model.pth"
    trained = set(os.listdir(os.path.join(data, "train")))

    def results(out, *args):
        run_script("test.py", f"--checkpoint={tb_model}", f"--out_dir={out}", "--device=cpu", *args)
        return json.loads((out / "results.json").read_text(encoding="utf-8"))

    default = results(tmp_path / "default")
    protocol = default["protocol"]
    assert protocol["split"] == "test" and protocol["probes_chose_checkpoint"] is False
    assert protocol["probes"] == os.path.abspath(os.path.join(data, "test"))
    assert protocol["probe_people"] == protocol["probe_people_trained_on"] == len(trained)
    chose = results(tmp_path / "valid", "--probe_split=valid")["protocol"]
    assert chose["split"] == "valid" and chose["probes_chose_checkpoint"] is True
    assert chose["probe_people"] == len(os.listdir(os.path.join(data, "valid")))
    assert chose["probe_people_trained_on"] == len(trained)
    unseen = results(tmp_path / "unseen", f"--data_dir={os.path.join(data, 'unseen')}")
    assert unseen["protocol"]["probe_people_trained_on"] == 0 and unseen["protocol"]["probes_chose_checkpoint"] is False
    assert unseen["protocol"]["split"] == "test"
    assert unseen["verification"]["images"] == "all"
    # raw pixels under the same protocol: the same pairs, every metric, and errors naming their flag
    run_script("test.py", "--checkpoint=pixels", "--pixel_size=16,12", f"--out_dir={tmp_path / 'px'}",
               f"--data_dir={os.path.join(data, 'unseen')}")
    pixels = json.loads((tmp_path / "px" / "results.json").read_text(encoding="utf-8"))
    assert pixels["protocol"]["probe_people_trained_on"] == 0 and pixels["verification"]["images"] == "all"
    assert all(pixels["verification"][k] == unseen["verification"][k] for k in ("same_pairs", "different_pairs"))
    assert 0 <= pixels["identification"]["accuracy"] <= 1 and 0 <= pixels["retrieval"]["precision_at_1"] <= 1
    assert_refused(run_script("test.py", "--checkpoint=pixels", check=False), "--data_dir")
    assert_refused(run_script("test.py", "--checkpoint=pixels", "--pixel_size=4", f"--data_dir={data}",
                              check=False), "--pixel_size")
    # dlib's face descriptor likewise (these synthetic photos have no face: each is described whole)
    run_script("test.py", "--checkpoint=dlib", "--pixel_size=48", f"--out_dir={tmp_path / 'dlib'}",
               f"--data_dir={os.path.join(data, 'unseen')}")
    described = json.loads((tmp_path / "dlib" / "results.json").read_text(encoding="utf-8"))
    assert all(described["verification"][k] == unseen["verification"][k] for k in ("same_pairs", "different_pairs"))
    assert_refused(run_script("test.py", "--checkpoint=dlib", check=False), "--data_dir")
    assert_refused(run_script("test.py", "--checkpoint=pixels", "--onnx_norm=127.5,127.5", f"--data_dir={data}",
                              check=False), "--onnx_norm")
    # a run started from that network, with an embedding of another size: its backbone is tb_model.pth's
    out = tmp_path / "init"
    proc = run_script("train.py", f"--data_dir={data}", f"--out_dir={out}", f"--init_from={tb_model}",
                      *tiny(embedding_dim=8, epochs=0, seed=1))  # another seed: other fresh weights
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "error" not in proc.stderr.lower()
    started, source = model_weights(out / "tb_model.pth"), model_weights(tb_model)
    assert all(torch.equal(started[k], source[k]) for k in source if k.startswith("backbone."))
    assert started["head.3.weight"].shape[0] == 8
    first_line = run_script("test.py", f"--checkpoint={out / 'tb_model.pth'}").stdout.splitlines()[0]
    assert str(tb_model) in first_line  # its figures say which network the run started from
    proc = run_script("train.py", f"--data_dir={data}", f"--out_dir={tmp_path / 'other'}", f"--init_from={tb_model}",
                      *tiny(backbone="resnet18"), check=False)
    assert_refused(proc, "--init_from")
    assert not (tmp_path / "other" / "tb_model.pth").exists()
