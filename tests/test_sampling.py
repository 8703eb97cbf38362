"""sampling: the worker count of a loader, triplet and pair datasets and their batches, P x K sampling; on small image
trees written into tmp_path."""
import os
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_faces, write_image
from data_utils import DatasetError, FaceFolder, make_transform
from sampling import PKBatchSampler, PairDataset, TripletFaceDataset, collate_rows, draw_pairs, loader_workers


# -----------------------------------------------------------------------------
# loader workers

def test_auto_worker_count_is_none_on_the_cpu_and_a_share_of_the_cores_on_cuda(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader_workers(-1, "cpu") == 0 and loader_workers(3, "cpu") == 3 and loader_workers(0, "cuda") == 0
    assert loader_workers(-1, "cuda") == 8 and loader_workers(-1, "cuda:1") == 8
    assert loader_workers(-1, "cuda", processes=4) == 3  # 4 cores each under torchrun: 3 workers beside each
    assert loader_workers(-1, "cuda", processes=16) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_workers(-1, "cuda") == 1
    with pytest.raises(ValueError, match="--num_workers=-2"):
        loader_workers(-2, "cpu")


# -----------------------------------------------------------------------------
# triplets

def test_triplet_item_gives_the_images_and_labels_of_its_row(tmp_path):
    make_faces(tmp_path, identities=2, images=2)
    data = TripletFaceDataset(FaceFolder(str(tmp_path), make_transform((20, 16), train=False)))
    for index in range(len(data)):
        images, labels = data[index]
        assert len(images) == len(labels) == 3
        for image, label, i in zip(images, labels, data.rows[index]):
            assert image.shape == (3, 20, 16) and torch.equal(image, data.faces.load(int(i)))
            assert label == data.faces.targets[i]
        anchor_label, positive_label, negative_label = labels
        assert anchor_label == positive_label != negative_label


def test_single_image_identity_is_only_a_negative(tmp_path):
    make_faces(tmp_path, identities=3, images=3)
    write_image(tmp_path / "lonely" / "only.png", seed=9)
    faces = FaceFolder(str(tmp_path))
    assert faces.single_image_identities() == ["lonely"]
    lonely = faces.classes.index("lonely")
    data = TripletFaceDataset(faces, seed=0)
    targets = np.array(faces.targets)
    negatives = set()
    for epoch in range(20):
        data.set_epoch(epoch)
        assert (targets[data.rows[:, 0]] != lonely).all()
        negatives |= set(targets[data.rows[:, 2]].tolist())
    assert lonely in negatives


def test_one_identity_is_an_error(tmp_path):
    make_faces(tmp_path, identities=1, images=4)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path))):
        TripletFaceDataset(FaceFolder(str(tmp_path)))


def test_anchor_pattern_restricts_anchors_not_positives(tmp_path):
    for person in ("ann", "bob", "cid"):
        write_image(tmp_path / person / f"{person}_passport.png", seed=1)
        for j in range(3):
            write_image(tmp_path / person / f"{person}_photo{j}.png", seed=j + 2)
    faces = FaceFolder(str(tmp_path))
    data = TripletFaceDataset(faces, seed=0, anchor_pattern="passport")
    names = [os.path.basename(p) for p, _ in faces.samples]
    assert len(data) == 3
    assert all("passport" in names[a] for a in data.rows[:, 0])
    assert all("photo" in names[p] for p in data.rows[:, 1])  # the other images of the same person
    with pytest.raises(DatasetError, match="'script'"):
        TripletFaceDataset(faces, anchor_pattern="script")
    gallery = FaceFolder(str(tmp_path), name_pattern="passport")
    assert len(gallery) == 3 and gallery.classes == ["ann", "bob", "cid"]


# -----------------------------------------------------------------------------
# pairs

def check_pairs(pairs, targets):
    """Balanced pairs of the right kind: every i with a second image of its identity, once with each kind
    (same = 1: one person, 0: two)."""
    i, j, kind = pairs.T
    assert pairs.dtype == np.int64 and (kind == 1).sum() == (kind == 0).sum() > 0
    same, different = kind == 1, kind == 0
    assert (same | different).all()
    assert (targets[i[same]] == targets[j[same]]).all() and (i[same] != j[same]).all()
    assert (targets[i[different]] != targets[j[different]]).all()
    assert sorted(i[same]) == sorted(i[different])


def test_draw_pairs_by_hand():
    targets = [0, 0, 1, 2, 2, 2]
    by_label = [[0, 1], [2], [3, 4, 5]]
    pairs = draw_pairs(targets, by_label, np.random.default_rng(0))
    check_pairs(pairs, np.array(targets))
    same = pairs[pairs[:, 2] == 1, :2].tolist()
    assert sorted(i for i, _ in same) == [0, 1, 3, 4, 5]  # not 2: its identity has one image
    assert {i: j for i, j in same if i < 2} == {0: 1, 1: 0}  # identity 0 has one other image each
    assert 2 not in {k for pair in same for k in pair}
    assert draw_pairs([0, 1], [[0], [1]], np.random.default_rng(0)).shape == (0, 3)


def check_triplets(rows, targets):
    a, p, n = rows.T
    assert (p != a).all(), "positive must be another file"
    assert (targets[p] == targets[a]).all() and (targets[n] != targets[a]).all()


@pytest.mark.parametrize("dataset,check,rows_per_image", [(TripletFaceDataset, check_triplets, 1),
                                                          (PairDataset, check_pairs, 2)])
def test_rows_are_valid_fresh_each_epoch_and_reproducible(tmp_path, dataset, check, rows_per_image):
    make_faces(tmp_path, identities=4, images=5)
    faces = FaceFolder(str(tmp_path))
    data = dataset(faces, seed=3)
    for epoch in range(3):
        data.set_epoch(epoch)
        check(data.rows, np.array(faces.targets))
        assert len(data) == rows_per_image * len(faces)  # every image an anchor once (pairs: once per kind)
    data.set_epoch(1)
    first = data.rows.copy()
    data.set_epoch(2)
    assert not np.array_equal(first, data.rows), "rows must be drawn afresh per epoch"
    again = dataset(FaceFolder(str(tmp_path)), seed=3)
    again.set_epoch(1)
    assert np.array_equal(first, again.rows)
    other_seed = dataset(faces, seed=4)
    other_seed.set_epoch(1)
    assert not np.array_equal(first, other_seed.rows)


def test_pair_item_gives_the_images_and_labels_of_its_row(tmp_path):
    make_faces(tmp_path, identities=2, images=2)
    data = PairDataset(FaceFolder(str(tmp_path), make_transform((20, 16), train=False)))
    seen = set()
    for index in range(len(data)):
        (image1, image2), (label1, label2) = data[index]
        i, j, same = data.rows[index]
        assert image1.shape == image2.shape == (3, 20, 16)
        assert torch.equal(image1, data.faces.load(int(i))) and torch.equal(image2, data.faces.load(int(j)))
        assert (label1, label2) == (data.faces.targets[i], data.faces.targets[j])
        assert (label1 == label2) == (same == 1)
        seen.add(int(same))
    assert seen == {0, 1}


@pytest.mark.parametrize("dataset,k", [(TripletFaceDataset, 3), (PairDataset, 2)])
def test_collate_rows_index_each_items_images_and_labels(tmp_path, dataset, k):
    make_faces(tmp_path, identities=3, images=3)
    data = dataset(FaceFolder(str(tmp_path), make_transform((20, 16), train=False, pixels=True)), seed=1)
    items = [data[index] for index in range(5)]
    images, labels, rows = collate_rows(items)
    assert images.shape == (k * 5, 3, 20, 16) and images.dtype == torch.uint8
    assert labels.shape == (k * 5,) and labels.dtype == torch.int64
    assert rows.shape == (5, k) and rows.dtype == torch.int64
    assert rows.tolist() == [[b + position * 5 for position in range(k)] for b in range(5)]
    for b, (item_images, item_labels) in enumerate(items):
        for position in range(k):
            assert torch.equal(images[rows[b, position]], item_images[position])
            assert labels[rows[b, position]] == item_labels[position]
    loader = DataLoader(data, batch_size=4, collate_fn=collate_rows)
    images, labels, rows = next(iter(loader))
    assert images.shape[0] == labels.shape[0] == 4 * k and rows.shape == (4, k)
    if dataset is PairDataset:  # whether a pair is of one person is read from the labels
        assert (labels[rows[:, 0]] == labels[rows[:, 1]]).tolist() == (data.rows[:4, 2] == 1).tolist()
    else:
        anchor, positive, negative = labels[rows].T
        assert (anchor == positive).all() and (anchor != negative).all()


def test_single_image_identity_is_never_in_a_same_pair(tmp_path):
    make_faces(tmp_path, identities=3, images=3)
    write_image(tmp_path / "lonely" / "only.png", seed=9)
    faces = FaceFolder(str(tmp_path))
    lonely = faces.classes.index("lonely")
    data = PairDataset(faces, seed=0)
    targets = np.array(faces.targets)
    in_different = False
    for epoch in range(20):
        data.set_epoch(epoch)
        check_pairs(data.rows, targets)
        i, j, same = data.rows.T
        assert (targets[i] != lonely).all()
        assert (targets[j[same == 1]] != lonely).all()
        in_different |= bool((targets[j[same == 0]] == lonely).any())
    assert in_different


def test_pairs_need_two_identities_and_a_second_image(tmp_path):
    make_faces(tmp_path / "one", identities=1, images=4)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "one"))):
        PairDataset(FaceFolder(str(tmp_path / "one")))
    make_faces(tmp_path / "singles", identities=3, images=1)
    for dataset in (PairDataset, TripletFaceDataset):
        with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "singles"))):
            dataset(FaceFolder(str(tmp_path / "singles")))


# -----------------------------------------------------------------------------
# P x K batches

def test_pk_batches_hold_p_identities_of_k_images_and_cover_the_epoch():
    labels = np.repeat(np.arange(10), 8)
    sampler = PKBatchSampler(labels, p=5, k=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4  # 10 identities x 2 groups of 4 / 5 per batch
    for batch in batches:
        assert len(batch) == 20
        ids, counts = np.unique(labels[batch], return_counts=True)
        assert len(ids) == 5 and (counts == 4).all()
    seen = sorted(i for batch in batches for i in batch)
    assert seen == list(range(80))  # every image exactly once


def test_pk_batches_are_reproducible_and_change_per_epoch():
    labels = np.random.default_rng(0).integers(0, 12, 200)
    first = PKBatchSampler(labels, 4, 3, seed=2)
    second = PKBatchSampler(labels, 4, 3, seed=2)
    assert list(first) == list(second)
    first.set_epoch(1)
    assert list(first) != list(second)
    second.set_epoch(1)
    assert list(first) == list(second)
    covered = {i for batch in first for i in batch}
    assert len(covered) > 0.9 * len(labels)  # about once per epoch, up to the leftover groups


def test_pk_small_identities_repeat_or_are_dropped():
    labels = np.array([0] * 6 + [1] * 6 + [2] * 2 + [3] * 6)
    repeat = PKBatchSampler(labels, 2, 4, fill="repeat")
    assert repeat.short == [2]
    assert any(sorted(labels[b].tolist()).count(2) == 4 for b in repeat)  # two images, each shown twice
    drop = PKBatchSampler(labels, 2, 4, fill="drop")
    assert all(2 not in labels[b] for b in drop) and len(drop) > 0


def test_pk_sampler_rejects_impossible_batches():
    labels = np.repeat(np.arange(3), 4)
    with pytest.raises(ValueError, match="P=4"):
        PKBatchSampler(labels, 4, 2)
    with pytest.raises(ValueError, match="P=1"):
        PKBatchSampler(labels, 1, 4)
    with pytest.raises(ValueError, match="K=5"):
        PKBatchSampler(labels, 2, 5, fill="drop")


def test_pk_ranks_split_the_global_batch_into_disjoint_identity_blocks():
    labels = np.repeat(np.arange(12), 6)
    whole = PKBatchSampler(labels, 6, 3, seed=4)  # one process drawing P = 3 x 2
    ranks = [PKBatchSampler(labels, 3, 3, seed=4, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        for sampler in [whole, *ranks]:
            sampler.set_epoch(epoch)
        assert len(ranks[0]) == len(ranks[1]) == len(whole) == 4
        for first, second, together in zip(ranks[0], ranks[1], whole):
            assert first + second == together  # the ranks' batches make up the single-process batch, in order
            assert not set(labels[first]) & set(labels[second])  # disjoint identities, hence disjoint images
            assert len(set(labels[first])) == 3 and len(first) == 9
    with pytest.raises(ValueError, match="P=14"):  # the global batch's identities
        PKBatchSampler(labels, 7, 3, rank=1, world_size=2)


def test_pk_identities_with_the_most_groups_left_go_first_so_that_all_run_out_together():
    labels = np.array([0] * 12 + [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6])  # six groups of K = 2, then one each
    for seed in range(5):
        batches = list(PKBatchSampler(labels, p=2, k=2, seed=seed))
        assert len(batches) == 6 and all(0 in labels[b] for b in batches)  # identity 0 in every batch
        assert sorted(i for b in batches for i in b) == list(range(len(labels)))  # so that nothing is left over


def test_an_epoch_draws_random_numbers_in_proportion_to_its_images_not_to_identities_times_batches(monkeypatch):
    """A draw that scores every identity for every batch takes minutes at 100,000 identities; the random numbers an
    epoch takes tell the two apart without timing (63,750 here for such a draw, 1,500 for this one)."""
    drawn = []
    generator = np.random.default_rng

    class Counted:
        def __init__(self, seed):
            self.rng = generator(seed)

        def __getattr__(self, name):
            def counted(*args, **kwargs):
                values = getattr(self.rng, name)(*args, **kwargs)
                drawn.append(np.size(values))
                return values
            return counted
    labels = np.repeat(np.arange(500), 2)
    sampler = PKBatchSampler(labels, p=2, k=2, seed=0)
    monkeypatch.setattr(np.random, "default_rng", Counted)
    sampler.set_epoch(1)
    assert len(sampler) == 250 and 0 < sum(drawn) <= 2 * len(labels)
