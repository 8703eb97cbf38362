"""Face datasets in identity folders, triplet and pair sampling, transforms, dataset preparation and file helpers.

Layout: ROOT/<identity>/.../<image>. Every image anywhere below an identity folder (a `distortion/`
sub-folder of extra copies too) belongs to that identity.

    python data_utils.py split SRC DST [--valid=0.2] [--test=0.0] [--min_images=0] [--max_images=0] [--seed=0]
    python data_utils.py fetch-att DST
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
import zlib

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRAIN_ONLY_FOLDER = "distortion"  # extra copies of training images: never held out by `split`
# what Pillow raises for a file it cannot read; the bomb warning is raised as an error while loading
UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the path and what to do."""


# -----------------------------------------------------------------------------
# files

def is_image_file(name):
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(folder):
    """Every image file below `folder`, sorted. Symlinked folders are followed once; a cycle is not."""
    seen, found = set(), []
    for path, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(path)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(path, f) for f in sorted(files, key=natural_key) if is_image_file(f)]
    return found


def natural_key(name):
    """Sort key that puts s2 before s10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def identity_folders(root, depth=1):
    """{identity name: folder} for the folders `depth` levels below `root` (names are relative paths),
    in natural order."""
    level = [""]
    for _ in range(depth):
        level = [os.path.join(rel, d) for rel in level
                 for d in sorted(os.listdir(os.path.join(root, rel)), key=natural_key)
                 if not d.startswith(".") and os.path.isdir(os.path.join(root, rel, d))]
    return {rel.replace(os.sep, "/"): os.path.join(root, rel) for rel in level}


def _file_mode():
    """The mode open() gives a new file under this process's umask (read once: setting it is the only way)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def atomic_write(path, write, mode="wb"):
    """Write `path` through `write(file)` into a temporary file beside it, fsync, then rename over it:
    the target is either the complete new file or the old one, never half a file. A failure (an exception of
    `write` too) removes the temporary file and is raised."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.chmod(tmp, FILE_MODE)  # mkstemp's file is private (0600)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # the folder's entry too, so that the rename outlives a power cut (POSIX; some file systems refuse: no matter)
    with contextlib.suppress(OSError, AttributeError):
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)


def save_json(obj, path):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def save_figure(fig, path, dpi=120):
    import matplotlib.pyplot as plt
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)


# -----------------------------------------------------------------------------
# images

def load_rgb(path):
    """Any image file as an 8-bit RGB PIL image: grayscale, 16-bit, palette, RGBA, CMYK, 1-bit alike.
    Raises OSError (or ValueError, SyntaxError) for files Pillow cannot read, and for decompression bombs."""
    return load_image(path).convert("RGB")


def load_image(path):
    """load_rgb's image, but 8-bit grayscale ('L') where the file is grayscale without transparency (8-bit,
    16-bit, 1-bit): resizing one channel costs a third of three, and make_transform's tensors give it three
    equal channels, the same numbers as from RGB. Raises as load_rgb."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float greyscale
                pixels = np.asarray(img, dtype=np.float64)
                full_scale = 65535.0 if img.mode.startswith("I;16") or pixels.max() > 255 else 255.0
                img = Image.fromarray(np.clip(pixels * (255.0 / full_scale), 0, 255).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img)
            return img.convert("L" if img.mode in ("L", "1") else "RGB")


def as_hw(size):
    """Image size as (height, width) from an int or a one- or two-element sequence."""
    size = (size,) if isinstance(size, int) else tuple(size)
    if len(size) not in (1, 2) or min(size) < 8:
        raise ValueError(f"image_size must be one or two integers >= 8 (height, width), got {size}")
    return (size[0], size[0]) if len(size) == 1 else size


class ToPixels:
    """8-bit PIL image -> (3, H, W) uint8 tensor; a grayscale image's one channel is repeated (a view)."""

    def __call__(self, image):
        pixels = torch.from_numpy(np.array(image))  # (H, W) or (H, W, channels)
        return pixels.expand(3, *pixels.shape) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


class Normalize:
    """(..., 3, H, W) uint8 pixels -> float32 normalised with ImageNet statistics, in one multiply-add on the
    pixels' device (ToTensor and then Normalize cost several times more per image, which shows in an embedding
    pass). Training batches travel as uint8, a quarter of the bytes, and are normalised here on the GPU."""

    def __init__(self):
        scale = 1 / (255 * torch.tensor(IMAGENET_STD).view(3, 1, 1))
        self.on_device = {torch.device("cpu"): (-255 * torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * scale, scale)}

    def __call__(self, pixels):
        if pixels.device not in self.on_device:  # copied once per device, not at every batch
            self.on_device[pixels.device] = tuple(t.to(pixels.device) for t in self.on_device[torch.device("cpu")])
        shift, scale = self.on_device[pixels.device]
        return torch.addcmul(shift, pixels.float(), scale)


normalize = Normalize()


def make_transform(image_size, train, pixels=False):
    """Training: resize with a margin, small rotation, random crop, flip. Evaluation: the same resize and a
    centre crop. Both normalise with ImageNet statistics (what torchvision's pretrained backbones expect), or
    with `pixels` stop at uint8 (3, H, W) tensors for `normalize` to finish."""
    h, w = as_hw(image_size)
    resize = T.Resize((round(h * 1.1), round(w * 1.1)), antialias=True)
    if train:
        steps = [resize, T.RandomRotation(10), T.RandomCrop((h, w)), T.RandomHorizontalFlip()]
    else:
        steps = [resize, T.CenterCrop((h, w))]
    return T.Compose(steps + ([ToPixels()] if pixels else [ToPixels(), normalize, torch.Tensor.contiguous]))


def denormalize(images):
    """Undo make_transform's normalisation: (N, 3, H, W) tensors back to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1)


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


# -----------------------------------------------------------------------------
# datasets

class FaceFolder(Dataset):
    """Labelled images of an identity-folder tree. Yields (image, label).

    Files that are not images (by extension, case-insensitive) and hidden files are ignored. Files whose
    header Pillow cannot read are skipped at scan time; a file that fails later (e.g. truncated) is
    replaced by another image of the same identity. Either way it is warned about and kept in `skipped`.
    `identity_depth` is the folder level of the identities below `root` (1: ROOT/<identity>/...);
    `name_pattern` keeps only the images whose file name contains it.
    """

    def __init__(self, root, transform=None, identity_depth=1, name_pattern=""):
        if not os.path.isdir(root):
            raise DatasetError(f"{root}: no such folder")
        self.root, self.transform, self.skipped = root, transform, []
        self.cached = None  # {index: image after the transform's deterministic steps}, once cache() has run
        self.classes, self.samples = [], []
        for name, folder in identity_folders(root, identity_depth).items():
            paths = [p for p in find_images(folder)
                     if name_pattern in os.path.basename(p) and self._readable_header(p)]
            if paths:
                self.samples += [(p, len(self.classes)) for p in paths]
                self.classes.append(name)
        if not self.samples:
            raise DatasetError(f"{root}: no images found in identity folders "
                               f"(expected {root}/<identity>/<image>, e.g. {root}/s1/1.pgm)")
        self.targets = [label for _, label in self.samples]
        self.by_label = [[] for _ in self.classes]
        for i, label in enumerate(self.targets):
            self.by_label[label].append(i)
        if self.skipped:
            warnings.warn(f"{root}: skipped {len(self.skipped)} unreadable file(s): " + ", ".join(self.skipped))

    def _readable_header(self, path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                Image.open(path).close()
            return True
        except UNREADABLE_IMAGE:
            self.skipped.append(path)
            return False

    def _split_transform(self):
        """(the transform's leading resizes, the rest). Only resizes are kept in the cache, so that the training
        images and a gallery of the same files, which differ from there on, can share it."""
        steps = self.transform.transforms if isinstance(self.transform, T.Compose) else []
        n = next((i for i, step in enumerate(steps) if not isinstance(step, T.Resize)), len(steps))
        return T.Compose(steps[:n]), T.Compose(steps[n:])

    def cache_bytes(self):
        """Memory the decoded images would take in cache() (at most: grayscale ones take a third), or None when the
        transform does not fix their size."""
        sizes = [step.size for step in self._split_transform()[0].transforms]
        if not sizes or not isinstance(sizes[-1], (tuple, list)) or len(sizes[-1]) != 2:
            return None
        return len(self.samples) * 3 * sizes[-1][0] * sizes[-1][1]

    def cache(self, like=None):
        """Decode every image once and keep it in memory resized (uint8); items then apply only the rest of the
        transform (cropping, random augmentation, tensor conversion). Unreadable images are skipped as when loading.
        DataLoader workers share the filled cache (they fork after it). `like`: a cached FaceFolder of the same files
        whose transform resizes alike (train.py's training images for its gallery) lends its cache instead."""
        prepare, self.after_cache = self._split_transform()
        if (like is not None and like.cached is not None and like.samples == self.samples
                and repr(like._split_transform()[0]) == repr(prepare)):
            self.cached = like.cached
            return
        self.cached = {}
        for i, (path, _) in enumerate(self.samples):
            try:
                self.cached[i] = prepare(load_image(path))
            except UNREADABLE_IMAGE as err:
                self._skip(path, err)

    def _skip(self, path, err):
        if path not in self.skipped:
            self.skipped.append(path)
            warnings.warn(f"skipping unreadable image {path}: {err}")

    def single_image_identities(self):
        return [self.classes[y] for y, idx in enumerate(self.by_label) if len(idx) == 1]

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """The transformed image at `index` (read by load_image: a grayscale file gives an 'L' image), or another
        image of its identity if that file is unreadable."""
        if self.cached is not None and index in self.cached:
            return self.after_cache(self.cached[index])
        label = self.targets[index]
        candidates = self.by_label[label]
        start = candidates.index(index)
        for i in candidates[start:] + candidates[:start]:
            if self.cached is not None:
                if i in self.cached:
                    return self.after_cache(self.cached[i])
                continue
            path = self.samples[i][0]
            try:
                image = load_image(path)
            except UNREADABLE_IMAGE as err:
                self._skip(path, err)
                continue
            return self.transform(image) if self.transform else image
        raise DatasetError(f"no readable image left for identity {self.classes[label]!r} in {self.root}")

    def __getitem__(self, index):
        return self.load(index), self.targets[index]


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
    """(i, j, target) rows, balanced: every image whose identity has another image is paired once with another
    image of its identity (target 0, same) and once with an image of another identity (target 1, different).
    The pairs are those of draw_triplets' (anchor, positive) and (anchor, negative)."""
    anchor, positive, negative = draw_triplets(targets, by_label, rng, anchors).T
    return np.concatenate([np.stack([anchor, positive, np.zeros_like(anchor)], axis=1),
                           np.stack([anchor, negative, np.ones_like(anchor)], axis=1)])


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
    """(anchor, positive, negative, anchor label, negative label) from a FaceFolder. The rows (`rows`) are
    drawn afresh for every epoch (`set_epoch`), reproducibly from (seed, epoch). Identities with one image
    serve only as negatives. With `anchor_pattern`, only images whose file name contains it are anchors
    (an ID or passport photo of each person); positives and negatives come from all images."""

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

    def __getitem__(self, index):
        a, p, n = (int(i) for i in self.rows[index])
        targets = self.faces.targets
        return self.faces.load(a), self.faces.load(p), self.faces.load(n), targets[a], targets[n]


class PairDataset(TripletFaceDataset):
    """(image 1, image 2, target, label 1, label 2) from a FaceFolder, target 0 for a pair of one person and 1
    for two (draw_pairs: as many of each), drawn like TripletFaceDataset's rows. Identities with one image
    appear only in pairs of two people."""

    what = "pairs"

    def draw(self, rng):
        return draw_pairs(self.faces.targets, self.faces.by_label, rng, self.anchors)

    def __getitem__(self, index):
        i, j, target = (int(x) for x in self.rows[index])
        targets = self.faces.targets
        return self.faces.load(i), self.faces.load(j), target, targets[i], targets[j]


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
        by_label = {}
        for index, label in enumerate(labels):
            by_label.setdefault(int(label), []).append(index)
        self.short = sorted(label for label, idx in by_label.items() if len(idx) < k)
        if fill == "drop":
            by_label = {label: idx for label, idx in by_label.items() if len(idx) >= k}
        wanted = p * world_size  # the identities of a global batch
        per_process = f" ({p} in each of {world_size} processes)" if world_size > 1 else ""
        if len(by_label) < wanted:
            raise ValueError(f"P={wanted} identities per batch{per_process}, but only {len(by_label)} identities "
                             f"can fill a group of K={k}" if fill == "drop" else
                             f"P={wanted} identities per batch{per_process}, but the data has only {len(by_label)}")
        self.by_label, self.p, self.k, self.seed, self.rank, self.world_size = by_label, p, k, seed, rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        groups = {}
        for label, indices in self.by_label.items():
            order = [indices[i] for i in rng.permutation(len(indices))]
            order += [indices[i] for i in rng.integers(len(indices), size=-len(order) % self.k)]
            groups[label] = [order[i:i + self.k] for i in range(0, len(order), self.k)]
        self.batches, wanted, mine = [], self.p * self.world_size, slice(self.rank * self.p, (self.rank + 1) * self.p)
        while True:
            labels = np.array([label for label, g in groups.items() if g])
            if len(labels) < wanted:
                break
            left = np.array([len(groups[label]) for label in labels])
            # the identities with the most groups left (ties at random), so that all run out together
            chosen = labels[np.argsort(rng.random(len(labels)) - left)[:wanted]]
            drawn = [groups[label].pop() for label in chosen]
            self.batches.append([i for group in drawn[mine] for i in group])

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


# -----------------------------------------------------------------------------
# figures

def save_triplet_grid(anchor, positive, negative, anchor_labels, negative_labels, classes, path, rows=8):
    """A PNG with one (anchor, positive, negative) row per triplet, un-normalised, for checking augmentation
    and triplet construction by eye."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = min(rows, len(anchor))
    columns = [("anchor", anchor, anchor_labels), ("positive", positive, anchor_labels),
               ("negative", negative, negative_labels)]
    h, w = anchor.shape[-2:]
    fig, axes = plt.subplots(rows, 3, figsize=(3 * 1.6 * w / h + 0.4, rows * 1.75), squeeze=False)
    for col, (title, images, labels) in enumerate(columns):
        images = denormalize(images[:rows]).permute(0, 2, 3, 1).numpy()
        for row in range(rows):
            ax = axes[row, col]
            ax.imshow(images[row])
            ax.set_title(f"{title}: {classes[int(labels[row])]}", fontsize=8,
                         color="tab:red" if col == 2 else "black")
            ax.axis("off")
    fig.suptitle("training triplets, as the network sees them", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# -----------------------------------------------------------------------------
# dataset preparation

def split_dataset(src, dst, valid=0.2, test=0.0, min_images=0, max_images=0, seed=0, force=False,
                  identity_depth=1, log=print):
    """Copy an identity-folder dataset into DST/train, DST/valid (and DST/test when test > 0), per identity,
    so that every identity with images enough appears in every split. Images below a `distortion/` folder
    stay in train. Identities with fewer than `min_images` or more than `max_images` (when > 0) images are
    left out. The same seed gives the same split; SRC is only read. Returns {split: image count}."""
    if not os.path.isdir(src):
        raise DatasetError(f"{src}: no such folder")
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise DatasetError(f"valid ({valid}) and test ({test}) must be fractions in [0, 1) that sum below 1")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src + os.sep):
        raise DatasetError(f"{dst} lies inside {src}; the source must stay untouched")
    if os.path.isdir(dst) and os.listdir(dst):
        if not force:
            raise DatasetError(f"{dst} is not empty; choose another folder or pass --force to replace "
                               f"its train/valid/test folders")
        for name in ("train", "valid", "test"):
            shutil.rmtree(os.path.join(dst, name), ignore_errors=True)
    splits = ["train", "valid"] + (["test"] if test > 0 else [])
    counts, skipped, kept, short = dict.fromkeys(splits, 0), [], 0, []
    for name, folder in identity_folders(src, identity_depth).items():
        files = [os.path.relpath(p, folder) for p in find_images(folder)]
        train_only = [f for f in files if TRAIN_ONLY_FOLDER in f.split(os.sep)[:-1]]
        pool = [f for f in files if f not in train_only]
        if not pool:
            skipped.append(f"{name} (no images)")
            continue
        if len(pool) < min_images or (max_images and len(pool) > max_images):
            skipped.append(f"{name} ({len(pool)} images, outside --min_images={min_images} "
                           f"--max_images={max_images})")
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        pool = [pool[i] for i in rng.permutation(len(pool))]
        held = {"valid": valid, "test": test}
        n_held = {s: int(len(pool) * held[s] + 0.5) for s in splits[1:]}
        if len(pool) >= len(splits):  # images enough for one in every split
            n_held = {s: max(n, 1 if held[s] > 0 else 0) for s, n in n_held.items()}
            while sum(n_held.values()) >= len(pool):  # keep at least one for training
                largest = max(n_held, key=n_held.get)
                n_held[largest] -= 1
        else:
            n_held = dict.fromkeys(n_held, 0)
            short.append(name)
        assignment, start = {}, 0
        for s in splits[1:]:
            assignment.update({f: s for f in pool[start:start + n_held[s]]})
            start += n_held[s]
        for f in files:
            split = assignment.get(f, "train")
            target = os.path.join(dst, split, name, f)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(folder, f), target)
            counts[split] += 1
        kept += 1
    if not kept:
        raise DatasetError(f"{src}: no identity folder with images passed the filters"
                           + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    log(f"split {src} -> {dst} (seed {seed}, valid {valid}, test {test})")
    log(f"  identities: {kept} kept, {len(skipped)} skipped")
    log("  images: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    if short:
        log(f"  {len(short)} identities too small to appear in every split (all in train): {', '.join(short)}")
    for line in skipped:
        log(f"  skipped {line}")
    return counts


def fetch_att(dst, seed=0, force=False, log=print):
    """The AT&T (ORL) faces through scikit-learn's Olivetti copy (400 images, 64x64, cached by scikit-learn),
    written as identity folders s1..s40 and split 8/2 into DST/train and DST/valid."""
    from sklearn.datasets import fetch_olivetti_faces
    try:
        with warnings.catch_warnings():  # its retry warnings; the failure is reported below in one line
            warnings.simplefilter("ignore")
            faces = fetch_olivetti_faces(n_retries=1)
    except OSError as err:
        raise DatasetError(f"fetch-att: could not download the Olivetti faces ({err}); with a local copy of "
                           f"att_faces run: python data_utils.py split /path/to/att_faces {dst}") from None
    with tempfile.TemporaryDirectory() as raw:
        count = {}
        for image, target in zip(faces.images, faces.target):
            person = f"s{int(target) + 1}"
            count[person] = count.get(person, 0) + 1
            os.makedirs(os.path.join(raw, person), exist_ok=True)
            pixels = np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(os.path.join(raw, person, f"{count[person]}.pgm"))
        return split_dataset(raw, dst, valid=0.2, seed=seed, force=force, log=log)


# -----------------------------------------------------------------------------
# pairs files

def read_pairs_file(path, root, extensions=IMAGE_EXTENSIONS, name_format="{name}_{index:04d}"):
    """The verification pairs of an LFW-style pairs.txt, with their images below `root`.

    Format: an optional header line "N" or "S N" (S sets, each of N same-person pairs then N different-people
    pairs; "N" is one set), then one pair a line: "name i j" (images i and j of one person) or
    "name1 i name2 j" (two people). Image i of `name` is ROOT/<name>/<name_format>.<ext> with the first
    extension of `extensions` that exists (in the order given; a set in sorted order); LFW's default name
    format gives Aaron_Peirsol/Aaron_Peirsol_0001.jpg, AT&T's faces use name_format="{index}" (s1/1.pgm).

    Returns dict(pairs=[(path_a, path_b, same: bool)], fold_ids=[set index of each pair, 0..S-1; all 0
    without a header], folds=S (1 without a header), missing=[(line number, path)]). A pair with a missing
    image is left out of `pairs` and its image listed in `missing` (ROOT/<name>/<stem>.* when several
    extensions were tried). Raises DatasetError naming the file and line for a malformed line, header counts
    that do not match the lines, and a name whose image would lie outside `root` once real paths are
    resolved (../, absolute paths, path separators, a symlink leading out).
    """
    real_root = os.path.realpath(root)
    if not os.path.isdir(real_root):
        raise DatasetError(f"{root}: no such folder")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(number, line.split()) for number, line in enumerate(f, 1) if line.strip()]
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the pairs file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a text pairs file (not UTF-8)") from None
    if not lines:
        raise DatasetError(f"{path}: no pairs in the file")
    order = sorted(extensions) if isinstance(extensions, (set, frozenset)) else list(extensions)

    def fail(number, message):
        raise DatasetError(f"{path}, line {number}: {message}")

    def image(number, name, index):
        """The image's path, or None (and listed in `missing`) when no file with any of the extensions exists."""
        if not re.fullmatch(r"[0-9]+", index):
            fail(number, f"image index {index!r} is not a non-negative integer")
        if name in (".", "..") or any(c in name for c in "/\\\0"):
            fail(number, f"name {name!r} is not a folder name below {root} (no path separators, no ..)")
        stem = os.path.join(root, name, name_format.format(name=name, index=int(index)))
        found = next((stem + ext for ext in order if os.path.isfile(stem + ext)), None)
        if not os.path.realpath(found or stem).startswith(real_root + os.sep):
            fail(number, f"image {found or stem} lies outside {root}")
        if not found:
            missing.append((number, stem + (order[0] if len(order) == 1 else ".*")))
        return found

    folds, per_set = 1, None
    if len(lines[0][1]) in (1, 2):
        number, header = lines.pop(0)
        if not all(re.fullmatch(r"[0-9]+", v) for v in header) or int(header[-1]) < 1 or int(header[0]) < 1:
            fail(number, f"header {' '.join(header)!r} is not 'N' or 'S N' (positive integers)")
        folds, per_set = (1, int(header[0])) if len(header) == 1 else map(int, header)
        if len(lines) != folds * 2 * per_set:
            where = lines[folds * 2 * per_set][0] if len(lines) > folds * 2 * per_set else number
            fail(where, f"the header announces {folds} set(s) of {per_set} same + {per_set} different pairs "
                        f"({folds * 2 * per_set} lines), the file has {len(lines)} pair lines")
    pairs, fold_ids, missing = [], [], []
    for position, (number, fields) in enumerate(lines):
        if len(fields) == 3:
            name_a, i, j = fields
            name_b, same = name_a, True
        elif len(fields) == 4:
            name_a, i, name_b, j = fields
            same = False
        else:
            fail(number, f"expected 'name i j' or 'name1 i name2 j', got {len(fields)} fields")
        if per_set and same != (position % (2 * per_set) < per_set):
            fail(number, f"expected a {'same-person' if not same else 'different-people'} pair here: each set "
                         f"of the header's layout is {per_set} same-person lines, then {per_set} different")
        path_a, path_b = image(number, name_a, i), image(number, name_b, j)
        if path_a and path_b:
            pairs.append((path_a, path_b, same))
            fold_ids.append(position // (2 * per_set) if per_set else 0)
    return dict(pairs=pairs, fold_ids=fold_ids, folds=folds, missing=missing)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare face datasets.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="copy SRC into DST/train, DST/valid (and DST/test) per identity")
    split.add_argument("src")
    split.add_argument("dst")
    split.add_argument("--valid", type=float, default=0.2, help="fraction of each identity's images")
    split.add_argument("--test", type=float, default=0.0, help="fraction of each identity's images")
    split.add_argument("--min_images", type=int, default=0, help="leave out identities with fewer images")
    split.add_argument("--max_images", type=int, default=0, help="leave out identities with more (0: no limit)")
    split.add_argument("--identity_depth", type=int, default=1, help="folder level of the identities")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--force", action="store_true", help="replace DST's train/valid/test folders")
    fetch = commands.add_parser("fetch-att", help="download AT&T faces (via scikit-learn) and split them 8/2")
    fetch.add_argument("dst")
    fetch.add_argument("--seed", type=int, default=0)
    fetch.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            split_dataset(args.src, args.dst, args.valid, args.test, args.min_images, args.max_images,
                          args.seed, args.force, args.identity_depth)
        else:
            fetch_att(args.dst, args.seed, args.force)
    except DatasetError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
