"""Face images in identity folders: image files and decoding, transforms, and the datasets of labelled images
(LabelledImages, the base that serves recordio.RecordFaces too, and FaceFolder), with the list of the images they
could not read (write_skipped).

Layout: ROOT/<identity>/.../<image>. Every image anywhere below an identity folder (a `distortion/`
sub-folder of extra copies too) belongs to that identity. prepare.py makes such folders (train/valid splits).
"""
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

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
    with_items = False  # items are (image, label, row): a distilled run looks up its teacher's targets by row
    views = None  # distill.TeacherViews: a distilled run's augmented views of each photo, one drawn per item

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
        if not isinstance(self.transform, T.Compose):  # None, or a function of its own: nothing to split
            return T.Compose([]), self.transform or T.Compose([])
        steps = self.transform.transforms
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

    def load(self, index, edit=None):
        """The transformed image at `index`, or another image of its identity if that one cannot be read. `edit`: a
        function of the image after the transform's leading resizes (staged's), applied before the rest of it."""
        if self.cached is not None and index in self.cached:
            return self.after_cache(edit(self.cached[index]) if edit else self.cached[index])
        for i in self.same_identity(index):
            try:
                image = self.staged(i)
            except (DatasetError, *UNREADABLE_IMAGE):
                continue
            return self._split_transform()[1](edit(image) if edit else image)
        raise DatasetError(f"no readable {self.unit} left for identity {self.classes[self.targets[index]]!r} in "
                           f"{self.source}")

    def staged(self, index):
        """Item `index`'s image after the transform's leading resizes: from the cache, else read (an unreadable one
        is warned about once, and raises DatasetError or UNREADABLE_IMAGE's errors)."""
        if self.cached is not None:
            if index not in self.cached:
                raise DatasetError(f"{self.samples[index][0]}: unreadable")
            return self.cached[index]
        try:
            return self._split_transform()[0](self.read(index))
        except (DatasetError, *UNREADABLE_IMAGE) as err:
            self._skip(self.samples[index][0], err)
            raise

    def load_item(self, index):
        """(the transformed image of item `index`, the row of its teacher's target): with `views`, one of the
        photo's views drawn at random and its row; else the image and `index`."""
        return self.views.draw(self, index) if self.views is not None else (self.load(index), index)

    def __getitem__(self, index):
        image, row = self.load_item(index)
        return (image, self.targets[index], row) if self.with_items else (image, self.targets[index])


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
