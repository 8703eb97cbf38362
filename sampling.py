"""Training batches: triplets and balanced pairs drawn afresh each epoch (TripletFaceDataset, PairDataset,
collate_rows), P x K batches (PKBatchSampler), the training DataLoader of an objective (train_loader_for) and its
worker count (loader_workers), and the training images of a prepared dataset (training_images: identity folders or
insightface's records)."""
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from data_utils import DatasetError, FaceFolder
from recordio import RecordFaces


def draw_triplets(targets, by_label, rng, anchors=None):
    """(anchor, positive, negative) indices, one row per anchor: every image whose identity has another
    image is an anchor (or only those in `anchors`); the positive is another image of its identity, the
    negative any image of another."""
    targets = np.asarray(targets)
    rows = []
    for anchor in range(len(targets)) if anchors is None else anchors:
        label = targets[anchor]
        same = by_label[label]
        if len(same) < 2:
            continue
        positive = anchor
        while positive == anchor:
            positive = same[rng.integers(len(same))]
        negative = rng.integers(len(targets))
        while targets[negative] == label:
            negative = rng.integers(len(targets))
        rows.append((anchor, positive, negative))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def draw_pairs(targets, by_label, rng, anchors=None):
    """(i, j, same) rows, balanced: every image whose identity has another image is paired once with another
    image of its identity (same = 1) and once with an image of another identity (same = 0). The pairs are
    those of draw_triplets' (anchor, positive) and (anchor, negative)."""
    anchor, positive, negative = draw_triplets(targets, by_label, rng, anchors).T
    return np.concatenate([np.stack([anchor, positive, np.ones_like(anchor)], axis=1),
                           np.stack([anchor, negative, np.zeros_like(anchor)], axis=1)])


def check_pairable(faces, what):
    """Raise DatasetError unless `faces` has what a (same, different) pair of images needs: two identities,
    one of them with two images. `what` names the samples in the message."""
    if len(faces.classes) < 2:
        raise DatasetError(f"{faces.root}: {what} need at least two identities, found "
                           f"{len(faces.classes)} ({', '.join(faces.classes)})")
    if all(len(idx) < 2 for idx in faces.by_label):
        raise DatasetError(f"{faces.root}: every identity has a single image; {what} need a second image of "
                           f"an identity")


class TripletFaceDataset(Dataset):
    """((anchor, positive, negative), (their labels)) from a FaceFolder. The rows (`rows`) are drawn afresh for
    every epoch (`set_epoch`), reproducibly from (seed, epoch). Identities with one image serve only as
    negatives. With `anchor_pattern`, only images whose file name contains it are anchors (an ID or passport
    photo of each person); positives and negatives come from all images. Batch the items with collate_rows."""

    what = "triplets"

    def __init__(self, faces, seed=0, anchor_pattern=""):
        check_pairable(faces, self.what)
        self.faces, self.seed = faces, seed
        self.anchors = None
        if anchor_pattern:
            self.anchors = [i for i, (path, _) in enumerate(faces.samples) if anchor_pattern in os.path.basename(path)]
            if not self.anchors:
                raise DatasetError(f"{faces.root}: no image file name contains the anchor pattern {anchor_pattern!r}")
        self.set_epoch(0)

    def draw(self, rng):
        return draw_triplets(self.faces.targets, self.faces.by_label, rng, self.anchors)

    def set_epoch(self, epoch):
        self.rows = self.draw(np.random.default_rng([self.seed, epoch]))

    def __len__(self):
        return len(self.rows)

    def images(self, index):
        """The indices into `faces` of item `index`'s images."""
        return [int(i) for i in self.rows[index]]

    def __getitem__(self, index):
        indices = self.images(index)
        images, rows = zip(*(self.faces.load_item(i) for i in indices))
        item = images, tuple(self.faces.targets[i] for i in indices)
        return (*item, rows) if self.faces.with_items else item


class PairDataset(TripletFaceDataset):
    """((first, second), (their labels)) from a FaceFolder; `rows` are draw_pairs' (i, j, same) rows, as many
    pairs of one person as of two, drawn like TripletFaceDataset's. Identities with one image appear only in
    pairs of two people. Batch the items with collate_rows."""

    what = "pairs"

    def draw(self, rng):
        return draw_pairs(self.faces.targets, self.faces.by_label, rng, self.anchors)

    def images(self, index):
        return [int(i) for i in self.rows[index, :2]]


def collate_rows(items):
    """A DataLoader's collate_fn for TripletFaceDataset and PairDataset: B items of k image tensors and k labels
    -> (images (k*B, ...), labels (k*B,) int64, rows (B, k) int64). Images and labels are position-major (all
    first images, then all second ...), and rows[b] = [b, B+b, 2B+b] indexes item b's images in them. Items
    with the images' teacher rows (with_items: their dataset indices, or with views the rows of the views drawn)
    add those, (k*B,) int64 in the same order, last."""
    count, k = len(items), len(items[0][0])
    # default_collate stacks as the DataLoader's default does (into shared memory inside a worker: no extra copy)
    images, labels, *indices = (default_collate([item[part][position] for position in range(k) for item in items])
                                for part in range(len(items[0])))
    rows = torch.arange(k * count, dtype=torch.int64).view(k, count).t().contiguous()
    return images, labels, rows, *indices


class PKBatchSampler(torch.utils.data.Sampler):
    """Batches of P identities x K images each, for mining triplets inside the batch.

    Each identity's images are shuffled and cut into groups of K; an epoch serves every group once, P groups
    of distinct identities per batch, so every image is seen about once. An identity with fewer than K images
    (and any last group short of K) is filled up with repeats of its own images (`fill='repeat'`); with
    `fill='drop'`, identities with fewer than K images are left out (listed in `short`). The batches are
    drawn reproducibly from (seed, epoch): call `set_epoch` before each epoch.

    Across the `world_size` processes of a distributed run, each epoch draws global batches of P x world_size
    identities and process `rank` takes the `rank`-th block of P identities of each: at every step the processes
    hold disjoint identities and images, and together the batch a single process with P x world_size would draw.
    """

    def __init__(self, labels, p, k, seed=0, fill="repeat", rank=0, world_size=1):
        if p < 2 or k < 2:
            raise ValueError(f"a P x K batch needs P >= 2 identities and K >= 2 images, got P={p}, K={k}")
        if fill not in ("repeat", "drop"):
            raise ValueError(f"fill must be 'repeat' or 'drop', got {fill!r}")
        labels = np.asarray(labels, dtype=np.int64)
        identities, sizes = np.unique(labels, return_counts=True)
        self.short = identities[sizes < k].tolist()
        kept = sizes >= k if fill == "drop" else np.ones(len(sizes), dtype=bool)
        wanted = p * world_size  # the identities of a global batch
        per_process = f" ({p} in each of {world_size} processes)" if world_size > 1 else ""
        if kept.sum() < wanted:
            raise ValueError(f"P={wanted} identities per batch{per_process}, but only {kept.sum()} identities "
                             f"can fill a group of K={k}" if fill == "drop" else
                             f"P={wanted} identities per batch{per_process}, but the data has only {len(sizes)}")
        # the kept identities' items side by side (`items`, `sizes` of each) and each item's identity (0, 1, ...)
        self.items = np.argsort(labels, kind="stable")[np.repeat(kept, sizes)]
        self.sizes = sizes[kept]
        self.owner = np.repeat(np.arange(len(self.sizes)), self.sizes)
        self.p, self.k, self.seed, self.rank, self.world_size = p, k, seed, rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        sizes, k, wanted = self.sizes, self.k, self.p * self.world_size
        # each identity's items in a random order, then random repeats of its own up to a multiple of K, cut into
        # groups of K (numpy throughout: MS1MV3 has 5.2 million): identity i's are rows first[i], first[i] + 1, ...
        # (sorted by identity, then a random key: one sort of exact integers, ten times faster than lexsort)
        shuffled = self.items[np.argsort(self.owner << 32 | rng.integers(2 ** 32, size=len(self.items)))]
        filler_owner = np.repeat(np.arange(len(sizes)), -sizes % k)
        fillers = self.items[(np.cumsum(sizes) - sizes)[filler_owner]
                             + (rng.random(len(filler_owner)) * sizes[filler_owner]).astype(np.int64)]
        owners = np.concatenate([self.owner, filler_owner])
        groups = np.concatenate([shuffled, fillers])[np.argsort(owners, kind="stable")].reshape(-1, k)
        count = np.bincount(owners, minlength=len(sizes)) // k
        first = (np.cumsum(count) - count).tolist()
        # each batch takes a group of each of the identities with the most groups left (ties at random), so that all
        # run out together. In buckets by groups left, a batch costs its own identities, not a pass over all of them
        # (which made an epoch of 100,000 identities take minutes)
        buckets = [[] for _ in range(count.max() + 1)]
        for identity, groups_left in enumerate(count.tolist()):
            buckets[groups_left].append(identity)
        top, left, rows = len(buckets) - 1, len(sizes), []  # the most groups left; identities with any left
        for ties in rng.random((len(groups) // wanted, wanted)).tolist():  # (at most as many batches)
            if left < wanted:
                break
            chosen, level = [], top
            for tie in ties:
                bucket = buckets[level]
                while not bucket:
                    level -= 1
                    bucket = buckets[level]
                j = int(tie * len(bucket))  # a random one of the bucket, the bucket's last put in its place
                chosen.append((bucket[j], level))
                bucket[j] = bucket[-1]
                bucket.pop()
            for identity, groups_left in chosen:  # (moved down after the draw: an identity once per batch)
                rows.append(first[identity] + groups_left - 1)
                if groups_left > 1:
                    buckets[groups_left - 1].append(identity)
                else:
                    left -= 1
            while top and not buckets[top]:
                top -= 1
        mine = np.array(rows, dtype=np.int64).reshape(-1, wanted)[:, self.rank * self.p:(self.rank + 1) * self.p]
        self.batches = groups[mine].reshape(len(mine), self.p * k).tolist()

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def loader_workers(num_workers, device, processes=1):
    """A DataLoader's worker count: `num_workers`, or for -1 (auto) 0 on the CPU (on 2 cores, 1 or 2 workers
    train no faster than the main process: the network needs the cores) and on CUDA up to 8, one core of this
    process's share of the machine (`processes` per machine, as under torchrun) left to the main process."""
    if num_workers < -1:
        raise ValueError(f"--num_workers={num_workers}: choose -1 (auto), 0 (load in the main process) or a number "
                         f"of worker processes")
    if num_workers >= 0:
        return num_workers
    if not device.startswith("cuda"):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // processes - 1))


def train_loader_for(faces, rows, batch_size, images_per_identity=4, seed=0, fill="repeat", anchor_pattern="",
                     rank=0, world_size=1, distributed=False, log=print, **loader_args):
    """(the training DataLoader over `faces`, the objects whose set_epoch must be called before each epoch).

    rows None (objectives that mine or classify): P x K batches (PKBatchSampler) of P = batch_size // K identities
    per process, fewer when the data has fewer (logged). rows "triplets" / "pairs": batch_size random triplets or
    balanced pairs (collate_rows), redrawn each epoch; "images": batch_size images in random order, whatever their
    labels (a student learning from a teacher alone); in a distributed run each process takes a different share
    of them. Raises ValueError for a P x K batch the data cannot fill."""
    if rows is None:
        identities = batch_size // images_per_identity
        if 2 * world_size <= len(faces.classes) < identities * world_size:
            identities = len(faces.classes) // world_size
            log(f"P x K batches: only {len(faces.classes)} identities, so P = {identities} (batches of "
                f"{identities * images_per_identity} images{' per process' if distributed else ''})")
        sampler = PKBatchSampler(faces.targets, identities, images_per_identity, seed, fill, rank, world_size)
        if sampler.short:
            log(f"P x K batches: {len(sampler.short)} identities have fewer than {images_per_identity} images "
                f"({'their images repeat' if fill == 'repeat' else 'left out'})")
        return DataLoader(faces, batch_sampler=sampler, **loader_args), [sampler]
    if rows == "images":
        dataset = faces
        loader_args.update(batch_size=batch_size)
    else:
        dataset = (TripletFaceDataset if rows == "triplets" else PairDataset)(faces, seed, anchor_pattern)
        loader_args.update(batch_size=batch_size, collate_fn=collate_rows)
    drawn = [] if rows == "images" else [dataset]  # (triplets and pairs are drawn anew each epoch)
    if distributed:
        shares = DistributedSampler(dataset, world_size, rank, seed=seed, drop_last=True)
        return (DataLoader(dataset, sampler=shares, drop_last=len(dataset) > batch_size * world_size, **loader_args),
                [*drawn, shares])
    return (DataLoader(dataset, shuffle=True, drop_last=len(dataset) > batch_size,
                       generator=torch.Generator().manual_seed(seed), **loader_args), drawn)


def training_images(data_dir, transform=None, identity_depth=1, log=print):
    """The training images of a prepared dataset: identity folders data_dir/train/ (a FaceFolder), or insightface's
    data_dir/train.rec (a RecordFaces; the layout of faces_emore/ and the like, whose .bin verification sets lie
    beside it). Raises DatasetError when data_dir holds both (which one is meant cannot be guessed) or neither."""
    folder, records = os.path.join(data_dir, "train"), os.path.join(data_dir, "train.rec")
    if os.path.isdir(folder) and os.path.isfile(records):
        raise DatasetError(f"--data_dir={data_dir} holds both train/ (identity folders) and train.rec (records): "
                           f"keep one of them there, or move train.rec and its .idx to a folder of their own")
    if os.path.isfile(records):
        return RecordFaces(data_dir, transform, log=log)
    if not os.path.isdir(folder):
        raise DatasetError(f"--data_dir={data_dir} holds neither train/ (identity folders) nor train.rec "
                           f"(insightface's records): prepare one with prepare.py split or prepare.py pack")
    return FaceFolder(folder, transform, identity_depth)
