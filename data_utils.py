"""Face datasets in identity folders: image files and decoding, transforms, triplet and pair sampling, P x K
batches, LFW-style pairs files and insightface's .bin verification sets (--val_bins). The base of the datasets,
LabelledImages, serves recordio.RecordFaces too.

Layout: ROOT/<identity>/.../<image>. Every image anywhere below an identity folder (a `distortion/`
sub-folder of extra copies too) belongs to that identity. prepare.py makes such folders (train/valid splits).
"""
import codecs
import os
import pickle
import re
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import transforms as T

from configurator import ConfigError
from evaluation import verifiable
from files import atomic_write, reported

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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


def normalize(pixels):
    """(..., 3, H, W) uint8 pixels -> float32 normalised with ImageNet statistics, in one multiply-add on the
    pixels' device (ToTensor and then Normalize cost several times more per image, which shows in an embedding
    pass). Training batches travel as uint8, a quarter of the bytes, and are normalised here on the GPU."""
    scale = 1 / (255 * torch.tensor(IMAGENET_STD, device=pixels.device).view(3, 1, 1))
    shift = -255 * torch.tensor(IMAGENET_MEAN, device=pixels.device).view(3, 1, 1) * scale
    return torch.addcmul(shift, pixels.float(), scale)


AUGMENTATIONS = ("light", "strong")


def make_transform(image_size, train, pixels=False, grayscale=0.0, augment="light"):
    """Training: resize with a margin, small rotation (`augment` light), or rotation and scale jitter of 10 % with
    brightness, contrast and saturation jitter of 30 % (strong: for many people with one or two photos each), random
    crop, flip, and a share `grayscale` of the images in grey (still 3 channels). Evaluation: the same resize and a
    centre crop. Both normalise with ImageNet statistics (what torchvision's pretrained backbones expect), or with
    `pixels` stop at uint8 (3, H, W) tensors for `normalize` to finish."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    h, w = as_hw(image_size)
    resize = T.Resize((round(h * 1.1), round(w * 1.1)), antialias=True)
    if train:
        strong = augment == "strong"
        steps = [resize, T.RandomAffine(10, scale=(0.9, 1.1)) if strong else T.RandomRotation(10),
                 T.RandomCrop((h, w)), T.RandomHorizontalFlip()] + [T.ColorJitter(0.3, 0.3, 0.3)] * strong
        if grayscale > 0:
            steps.append(T.RandomGrayscale(grayscale))
    else:
        steps = [resize, T.CenterCrop((h, w))]
    return T.Compose(steps + ([ToPixels()] if pixels else [ToPixels(), normalize, torch.Tensor.contiguous]))


def denormalize(images):
    """Undo make_transform's normalisation: (N, 3, H, W) tensors back to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1)


def some_names(names, shown=10):
    """The first `shown` of `names`, comma-separated, and how many more: a warning about 2,000 LFW people stays
    one readable line."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


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

class LabelledImages(Dataset):
    """What a dataset of identities' images holds and does, whatever stores the images (FaceFolder: files,
    recordio.RecordFaces: records): `classes`, `targets` (a label per item), `by_label` (the items of each label),
    `samples` ((name, label) per item: a path, or "PATH.rec#KEY"), `skipped` (the names of what could not be read,
    each warned about once), (image, label) items, and what loading them does: decode (the subclass's `read`),
    fall back on the other images of an item's identity when one cannot be read, and the optional in-memory cache.
    `unit` names what a warning skips, `source` (a folder or a .rec) what a dataset error names."""

    unit = "image"
    cached = None  # {index: image after the transform's deterministic steps}, once cache() has run
    with_items = False  # items are (image, label, index): a distilled run looks up its teacher's targets by index

    def read(self, index):
        """The decoded image of item `index` (load_image's). Raises DatasetError or UNREADABLE_IMAGE's errors."""
        raise NotImplementedError

    def _label_items(self, targets):
        """Set `targets` and `by_label` from a label per item."""
        self.targets = list(targets)
        self.by_label = [[] for _ in self.classes]
        for i, label in enumerate(self.targets):
            self.by_label[label].append(i)

    def _skip(self, name, err):
        if name not in self.skipped:
            self.skipped.append(name)
            warnings.warn(f"skipping unreadable {self.unit} {name}: {err}")

    def why_unreadable(self, name):
        """What reading the skipped `name` says now (only names are kept of what was skipped)."""
        try:
            load_rgb(name)
        except Exception as err:  # any: it only describes the file
            return f"{type(err).__name__}: {err}"
        return "readable now"

    def same_identity(self, index):
        """The items of `index`'s identity from `index` on, then round: the order `load` tries them in."""
        candidates = self.by_label[self.targets[index]]
        start = candidates.index(index)
        return candidates[start:] + candidates[:start]

    def single_image_identities(self):
        return [self.classes[y] for y, idx in enumerate(self.by_label) if len(idx) == 1]

    def _split_transform(self):
        """(the transform's leading resizes, the rest). Only resizes are kept in the cache, so that the training
        images and a gallery of the same images, which differ from there on, can share it."""
        steps = self.transform.transforms if isinstance(self.transform, T.Compose) else []
        n = next((i for i, step in enumerate(steps) if not isinstance(step, T.Resize)), len(steps))
        return T.Compose(steps[:n]), T.Compose(steps[n:])

    def cache_bytes(self):
        """Memory the decoded images would take in cache() (at most: grayscale ones take a third), or None when the
        transform does not fix their size."""
        sizes = [step.size for step in self._split_transform()[0].transforms]
        if not sizes or not isinstance(sizes[-1], (tuple, list)) or len(sizes[-1]) != 2:
            return None
        return len(self) * 3 * sizes[-1][0] * sizes[-1][1]

    def cache(self, like=None):
        """Decode every image once and keep it in memory resized (uint8); items then apply only the rest of the
        transform (cropping, random augmentation, tensor conversion). Unreadable images are skipped as when loading.
        DataLoader workers share the filled cache (they fork after it). `like`: a cached dataset of the same images
        whose transform resizes alike (train.py's training images for its gallery) lends its cache instead."""
        prepare, self.after_cache = self._split_transform()
        if (like is not None and like.cached is not None and like.samples == self.samples
                and repr(like._split_transform()[0]) == repr(prepare)):
            self.cached = like.cached
            return
        self.cached = {}
        for i in range(len(self)):
            try:
                self.cached[i] = prepare(self.read(i))
            except (DatasetError, *UNREADABLE_IMAGE) as err:
                self._skip(self.samples[i][0], err)

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """The transformed image at `index`, or another image of its identity if that one cannot be read."""
        if self.cached is not None and index in self.cached:
            return self.after_cache(self.cached[index])
        for i in self.same_identity(index):
            if self.cached is not None:
                if i in self.cached:
                    return self.after_cache(self.cached[i])
                continue
            try:
                image = self.read(i)
            except (DatasetError, *UNREADABLE_IMAGE) as err:
                self._skip(self.samples[i][0], err)
                continue
            return self.transform(image) if self.transform else image
        raise DatasetError(f"no readable {self.unit} left for identity {self.classes[self.targets[index]]!r} in "
                           f"{self.source}")

    def __getitem__(self, index):
        item = self.load(index), self.targets[index]
        return (*item, index) if self.with_items else item


class FaceFolder(LabelledImages):
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
        self.root = self.source = root
        self.transform, self.skipped = transform, []
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
        self._label_items(label for _, label in self.samples)
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

    def read(self, index):
        """The image file of item `index`, read by load_image (a grayscale file gives an 'L' image)."""
        return load_image(self.samples[index][0])

    def image_bytes(self, index):
        """The image file of item `index`, as stored."""
        with open(self.samples[index][0], "rb") as f:
            return f.read()


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
        item = tuple(self.faces.load(i) for i in indices), tuple(self.faces.targets[i] for i in indices)
        return (*item, tuple(indices)) if self.faces.with_items else item


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
    with the images' dataset indices (with_items) add those, (k*B,) int64 in the same order, last."""
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


# -----------------------------------------------------------------------------
# pairs files

class _VerificationUnpickler(pickle.Unpickler):
    """Unpickling that builds plain values only: bytes, lists, tuples, bools (and ints, floats, strings), none of
    which needs a global. The one global admitted is _codecs.encode, the way protocol-2 pickles store bytes; any
    other (a class to build, a function to call: how a pickle runs code) is refused."""

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise DatasetError(f"refused: it would load {module}.{name}; a verification set holds only image bytes and "
                           f"booleans, and a pickle naming anything else can run code")

    def persistent_load(self, pid):  # (the default's refusal is a message of two lines)
        raise DatasetError(f"refused: it holds a persistent id ({str(pid)[:40]!r}), which only the program that "
                           f"wrote it can resolve; a verification set holds only image bytes and booleans")


def read_verification_bin(path):
    """(images: list of 2N encoded images as bytes, same: (N,) bool numpy array) of an insightface verification
    set (lfw.bin, cfp_fp.bin, agedb_30.bin): a pickled (list of JPEG bytes, list of is-same bools), two images per
    pair. Read without running code (_VerificationUnpickler). Raises DatasetError for anything else."""
    try:
        with open(path, "rb") as f:
            loaded = _VerificationUnpickler(f, encoding="bytes").load()
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as err:
        raise DatasetError(f"{path}: not a readable verification set ({type(err).__name__}: {err})") from None
    images, same = loaded if isinstance(loaded, (tuple, list)) and len(loaded) == 2 else (None, None)
    if not (isinstance(images, (list, tuple)) and isinstance(same, (list, tuple))
            and all(isinstance(i, (bytes, bytearray)) for i in images)
            and all(isinstance(s, bool) for s in same) and len(images) == 2 * len(same) and same):
        raise DatasetError(f"{path}: not a verification set: expected (a list of 2N image bytes, a list of N "
                           f"booleans)")
    return [bytes(i) for i in images], np.array(same, dtype=bool)


def read_verification_bins(val_bins, data_dir):
    """{name: read_verification_bin's (images, same)} of the insightface verification sets of `val_bins` (the
    --val_bins of train.py and test.py): comma-separated names of data_dir's sets (lfw: data_dir/lfw.bin) or paths
    of .bin files, each named by its file's stem; {} for "". Raises ConfigError naming val_bins for a set that is
    missing, unreadable, named twice, or has too few pairs to measure (evaluation.verifiable)."""
    bins = {}
    for entry in filter(None, (part.strip() for part in val_bins.split(","))):
        path = entry if entry.endswith(".bin") else os.path.join(data_dir, f"{entry}.bin")
        name = os.path.basename(path)[:-len(".bin")]
        if name in bins:
            raise ConfigError("val_bins", f"two sets named {name!r}: name each set once")
        if not os.path.isfile(path):
            raise ConfigError("val_bins", f"{path}: no such file (a name NAME stands for data_dir/NAME.bin)")
        try:
            bins[name] = read_verification_bin(path)
        except DatasetError as err:
            raise ConfigError("val_bins", str(err)) from None
        if not verifiable(bins[name][1]):
            raise ConfigError("val_bins", f"{path}: {len(bins[name][1])} pairs, {int(bins[name][1].sum())} of one "
                                          f"person: verification needs 4 pairs or more, of both kinds")
    return bins


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
    that do not match the lines, and a name whose image would lie outside `root` once its path is
    written out (../, absolute paths, path separators); identity folders that are symlinks are followed (an LFW
    assembled from two halves).
    """
    if not os.path.isdir(os.path.realpath(root)):
        raise DatasetError(f"{root}: no such folder")
    lines = _pair_lines(path)
    folds, per_set = _pairs_header(path, lines)
    order = sorted(extensions) if isinstance(extensions, (set, frozenset)) else list(extensions)
    pairs, fold_ids, missing = [], [], []
    for position, (number, fields) in enumerate(lines):
        where = f"{path}, line {number}"
        *images, same = _pair_fields(where, fields)
        if per_set and same != (position % (2 * per_set) < per_set):
            raise DatasetError(f"{where}: expected a {'same-person' if not same else 'different-people'} pair here: "
                               f"each set of the header's layout is {per_set} same-person lines, then {per_set} "
                               f"different")
        found = [_pair_image(where, name, index, root, order, name_format) for name, index in images]
        missing += [(number, wanted) for image, wanted in found if image is None]
        if all(image for image, _ in found):
            pairs.append((found[0][0], found[1][0], same))
            fold_ids.append(position // (2 * per_set) if per_set else 0)
    return dict(pairs=pairs, fold_ids=fold_ids, folds=folds, missing=missing)


def _pair_lines(path):
    """The non-blank lines of a pairs file as (line number, fields)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(number, line.split()) for number, line in enumerate(f, 1) if line.strip()]
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the pairs file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a text pairs file (not UTF-8)") from None
    if not lines:
        raise DatasetError(f"{path}: no pairs in the file")
    return lines


def _pairs_header(path, lines):
    """(sets S, same-person pairs per set N) from a header line "N" or "S N", which is taken off `lines` after
    checking that the pair lines number S * 2N; (1, None) when the first line is a pair, not a header."""
    if len(lines[0][1]) not in (1, 2):
        return 1, None
    number, header = lines.pop(0)
    if not all(re.fullmatch(r"[0-9]+", v) for v in header) or int(header[-1]) < 1 or int(header[0]) < 1:
        raise DatasetError(f"{path}, line {number}: header {' '.join(header)!r} is not 'N' or 'S N' "
                           f"(positive integers)")
    folds, per_set = (1, int(header[0])) if len(header) == 1 else map(int, header)
    expected = folds * 2 * per_set
    if len(lines) != expected:
        where = lines[expected][0] if len(lines) > expected else number  # the first line too many, or the header
        raise DatasetError(f"{path}, line {where}: the header announces {folds} set(s) of {per_set} same + "
                           f"{per_set} different pairs ({expected} lines), the file has {len(lines)} pair lines")
    return folds, per_set


def _pair_fields(where, fields):
    """((name, index), (name, index), same person) from a pair line's fields: "name i j" or "name1 i name2 j"."""
    if len(fields) == 3:
        return (fields[0], fields[1]), (fields[0], fields[2]), True
    if len(fields) == 4:
        return (fields[0], fields[1]), (fields[2], fields[3]), False
    raise DatasetError(f"{where}: expected 'name i j' or 'name1 i name2 j', got {len(fields)} fields")


def _pair_image(where, name, index, root, order, name_format):
    """(path, None) for image `index` of `name`: ROOT/<name>/<name_format>.<ext> with the first extension of `order`
    that exists; (None, what was looked for) when there is none. Raises DatasetError for an index that is not a
    number and for a name (or `name_format`) whose image path leads outside `root` as written: symlinks below `root`
    are followed, a user's linked folders being theirs."""
    if not re.fullmatch(r"[0-9]+", index):
        raise DatasetError(f"{where}: image index {index!r} is not a non-negative integer")
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise DatasetError(f"{where}: name {name!r} is not a folder name below {root} (no path separators, no ..)")
    stem = os.path.join(root, name, name_format.format(name=name, index=int(index)))
    if not os.path.abspath(stem).startswith(os.path.abspath(root) + os.sep):
        raise DatasetError(f"{where}: image {stem} lies outside {root}")
    found = next((stem + ext for ext in order if os.path.isfile(stem + ext)), None)
    return found, None if found else stem + (order[0] if len(order) == 1 else ".*")


# -----------------------------------------------------------------------------
# training batches

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


def write_skipped(folders, path, listed=None):
    """Rewrite `path` (skipped_files.txt) if the unreadable images of the datasets `folders` (LabelledImages)
    differ from those `listed` before: one `name<TAB>reason` line per image (a path, or PATH.rec#KEY) skipped at
    the scan or found unreadable while loading since (empty: none). With num_workers > 0 the loading happens in
    the workers: only their warnings name the images they find. A failed write is reported, not raised. Returns
    the images the file lists."""
    owner = {}  # name -> the first dataset that skipped it, which can say why
    for folder in folders:
        for name in folder.skipped:
            owner.setdefault(name, folder)
    skipped = list(owner)
    if skipped == listed:
        return listed

    def write(f):
        f.writelines(f"{p}\t{owner[p].why_unreadable(p)}\n" for p in skipped)
    return skipped if reported(path, lambda: atomic_write(path, write, mode="w")) else listed
