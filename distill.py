"""Distillation: a teacher network's embeddings of the training photos, computed once and cached on disk, and the
loss by which a student learns them (train.py --teacher).

The teacher (pretrained.load_face_network's: dlib, an ONNX model, a checkpoint or insightface's backbone.pth)
embeds each training photo and its mirror image, as its own transform and alignment want them; the two are added
and normalised (the flip test), so that the target does not depend on the flips of the student's augmentation.
The cache is a folder per teacher, named by a hash of the teacher's file and settings, of part files each holding
photo keys (hashes of the photos' bytes) and their vectors: another teacher or a changed photo is never served a
stale vector, and a run stopped while caching goes on with the parts it wrote.

With views (TeacherViews), the teacher also embeds augmented views of each photo, each drawn from a generator
seeded by the photo's key and the view's number, keyed by everything that makes its pixels; training draws one of
a photo's views (the photo itself among them) for each item, and the student learns the teacher's vector of it.
"""
import hashlib
import json
import os
import warnings
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision.transforms import functional as TF
from tqdm import tqdm

from align import FaceAligner, aligned_as_trained
from checkpoint import CheckpointError, read_weights
from data_utils import UNREADABLE_IMAGE, DatasetError, make_transform
from files import atomic_write, save_json
from inference import embed_batch
from losses import ArcFaceLoss
from model import EmbeddingNet
from pretrained import load_face_network, network_file

DISTILL_LOSSES = ("cosine", "relational", "inherited")
PART_SIZE = 256  # photos per cache part: what a stopped caching run loses at most


def file_digest(path, chunk=1 << 20):
    """sha1 of a file's bytes."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_identity(spec, state):
    """What names a teacher's cache: its file's bytes (dlib and dlib_resnet: dlib's descriptor model's) and the
    settings of its input, and its name (so that those two never share one). Two teachers share a cache only when
    they compute the same vectors."""
    settings = dict(file=file_digest(network_file(spec)), image_size=list(state["image_size"]),
                    alignment=state["alignment"], views=["photo", "mirror"], spec=os.path.basename(spec))
    if state.get("pixel_norm"):  # an ONNX model's input normalisation (its side file's)
        settings["pixel_norm"] = state["pixel_norm"]
    return settings, hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def photo_keys(faces):
    """A key per training item: the sha1 of its image's bytes as stored (None where it cannot be read)."""
    keys = []
    for index in range(len(faces)):
        try:
            keys.append(hashlib.sha1(faces.image_bytes(index)).hexdigest())
        except (OSError, DatasetError):
            keys.append(None)
    return keys


def read_cache(folder):
    """{photo key: (2, D) vectors} of every readable part in `folder`; a part that cannot be read is warned
    about and its photos computed anew."""
    cached = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not name.startswith("part-") or not name.endswith(".pt"):
            continue
        try:
            part = read_weights(os.path.join(folder, name))
            cached.update(zip(part["keys"], part["vectors"]))
        except (CheckpointError, KeyError, TypeError) as err:
            warnings.warn(f"{os.path.join(folder, name)}: an unreadable cache part, computed anew ({err})")
    return cached


def write_part(folder, keys, vectors):
    """A cache part of `keys` and their (n, 2, D) `vectors`, written atomically, named by its keys (so that the
    processes of a distributed run never write the same name)."""
    name = "part-" + hashlib.sha1("".join(keys).encode()).hexdigest()[:16] + ".pt"
    atomic_write(os.path.join(folder, name), lambda f: torch.save(dict(keys=keys, vectors=vectors.clone()), f))


# -----------------------------------------------------------------------------
# augmented views of the training photos

def view_params(key, view, keys):
    """The augmentation of view `view` (1, 2, ...) of the photo whose cache key is `key`, from a generator seeded
    by both (the same in every process and run): rotation within 12 degrees, scale and shift within 10 and 5 %,
    brightness, contrast and saturation within 30 %, a Gaussian blur in half of the views, and in half of them a
    blend with another training photo (`keys`: every photo's key, None where unreadable) weighing 15 to 45 %, so
    that the teacher names faces no photo shows. The partner is recorded by its key."""
    rng = np.random.default_rng(int(hashlib.sha1(f"{key}/{view}".encode()).hexdigest()[:15], 16))
    params = dict(angle=rng.uniform(-12, 12), scale=rng.uniform(0.9, 1.1), shift=rng.uniform(-0.05, 0.05, 2).tolist(),
                  colour=rng.uniform(0.7, 1.3, 3).tolist(), blur=rng.uniform(0.3, 1.2) if rng.random() < 0.5 else 0.0)
    partner = int(rng.integers(len(keys)))
    if rng.random() < 0.5 and keys[partner] not in (None, key):
        params.update(partner=keys[partner], partner_index=partner, blend=rng.uniform(0.15, 0.45))
    return params


def view_key(key, params):
    """The cache key of a photo's view: a hash of the photo's key and of everything that makes the view's pixels."""
    made = {name: value for name, value in params.items() if name != "partner_index"}
    return hashlib.sha1((key + json.dumps(made, sort_keys=True)).encode()).hexdigest()


def view_image(image, params, partner=None):
    """The view `params` (view_params') of a PIL image: blended with `partner` (a PIL image of the partner photo,
    resized to the image's size) where the view has one, turned, scaled, shifted, its colours changed and
    blurred. Sizes and shifts are relative, so that a view of a resized photo is the resized view."""
    width, height = image.size
    if partner is not None and "blend" in params:
        image = Image.blend(image, partner.convert(image.mode).resize(image.size, Image.BILINEAR), params["blend"])
    shift = [round(params["shift"][0] * width), round(params["shift"][1] * height)]
    image = TF.affine(image, params["angle"], shift, params["scale"], [0.0, 0.0],
                      interpolation=TF.InterpolationMode.BILINEAR)
    brightness, contrast, saturation = params["colour"]
    image = TF.adjust_contrast(TF.adjust_brightness(image, brightness), contrast)
    if image.mode == "RGB":
        image = TF.adjust_saturation(image, saturation)
    if params["blur"]:
        image = image.filter(ImageFilter.GaussianBlur(params["blur"] * width / 112))
    return image


class TeacherViews:
    """A distilled run's `count` augmented views of each training photo besides the photo itself. Rows of the
    teacher's targets: photo i's view v (0: the photo) is row i * (count + 1) + v. `keys`: the photos' cache keys."""

    def __init__(self, count, keys):
        self.count, self.keys = count, keys

    def params(self, index, view):
        """view_params of photo `index`'s view `view` (None for the photo itself or a photo without a key)."""
        return view_params(self.keys[index], view, self.keys) if view and self.keys[index] else None

    def row_keys(self):
        """The cache key of every row (None where the photo cannot be read)."""
        return [view_key(self.keys[index], params) if (params := self.params(index, view)) else self.keys[index]
                for index in range(len(self.keys)) for view in range(self.count + 1)]

    def edit(self, index, view, read):
        """The function that makes photo `index`'s view `view` of an image of the photo, its partner photo read by
        `read` (an item's image, as LabelledImages reads or stages it); None for the photo itself."""
        params = self.params(index, view)
        if params is None:
            return None
        partner = read(params["partner_index"]) if "partner_index" in params else None
        return lambda image: view_image(image, params, partner)

    def read(self, faces, row):
        """The PIL image of teacher row `row` of `faces`: its photo as read, or the view of it."""
        index, view = divmod(row, self.count + 1)
        edit = self.edit(index, view, faces.read)
        image = faces.read(index)
        return edit(image) if edit else image

    def draw(self, faces, index):
        """(the transformed image of one of photo `index`'s views, drawn at random, the row of its target):
        LabelledImages.load_item's with views. A view whose partner photo cannot be read is the photo itself."""
        view = int(torch.randint(self.count + 1, ()))
        try:
            edit = self.edit(index, view, faces.staged)
        except (DatasetError, *UNREADABLE_IMAGE):
            edit = None
        return faces.load(index, edit), index * (self.count + 1) + (view if edit else 0)


# -----------------------------------------------------------------------------
# the teacher's targets and their cache

@torch.inference_mode()
def embed_views(teacher, images, device):
    """(n, 2, D) float32 CPU vectors of a batch of uint8 images: each image and its mirror image."""
    return torch.stack([embed_batch(teacher, views, device, nullcontext()) for views in (images, images.flip(3))],
                       dim=1)


def compute_missing(teacher, source, transform, keys, missing, folder, device, batch_size, show):
    """Embed the rows `missing` (`source(row)`: the row's PIL image; `keys`: every row's key) with the teacher in
    parts of PART_SIZE, each written to `folder` as soon as it is done. A row whose image cannot be read is left out
    (its target stays unknown)."""
    bar = tqdm(total=len(missing), desc="teacher embeddings", unit="image", dynamic_ncols=True,
               disable=None if show else True)
    for start in range(0, len(missing), PART_SIZE):
        part_keys, vectors = [], []
        chunk = missing[start:start + PART_SIZE]
        for batch_start in range(0, len(chunk), batch_size):
            images, batch_keys = [], []
            for index in chunk[batch_start:batch_start + batch_size]:
                try:
                    images.append(transform(source(index)))
                    batch_keys.append(keys[index])
                except (DatasetError, *UNREADABLE_IMAGE):
                    continue  # (the dataset warns about it when training reads it)
            if images:
                vectors.append(embed_views(teacher, torch.stack(images), device))
                part_keys += batch_keys
            bar.update(len(chunk[batch_start:batch_start + batch_size]))
        if part_keys:
            write_part(folder, part_keys, torch.cat(vectors))
    bar.close()


def teacher_targets(spec, faces, cache_dir, data_dir, device="cpu", batch_size=64, rank=0, world_size=1,
                    distributed=False, pixel_norm=None, views=0, log=print):
    """(the targets (len(faces) * (views + 1), D): the normalised sum of the teacher's vectors of each training
    item's image and its mirror, the photo's then those of its `views` augmented views (TeacherViews' rows); zero
    where an image could not be read; the teacher's description; the TeacherViews, or None without views).
    `pixel_norm`: an ONNX teacher's input normalisation, over its side file's (load_face_network's). Vectors come
    from the cache in `cache_dir` where it has them; the others are computed (each process of a distributed run its
    share), cached, and read back. Raises CheckpointError for a teacher that cannot be loaded."""
    teacher, state = load_face_network(spec, pixel_norm=pixel_norm)
    settings, name = teacher_identity(spec, state)
    folder = os.path.join(cache_dir, name)
    os.makedirs(folder, exist_ok=True)
    save_json(settings, os.path.join(folder, "teacher.json"))
    views = TeacherViews(views, photo_keys(faces)) if views else None
    keys = views.row_keys() if views else photo_keys(faces)
    if distributed:  # every process reads the cache as it stands before any of them adds to it
        dist.barrier()
    cached = read_cache(folder)
    if distributed:  # so that all find the same photos missing, and share them out alike
        dist.barrier()
    missing = [i for i, key in enumerate(keys) if key is not None and key not in cached]
    log(f"teacher {state.get('network', spec)}: {len(keys) - len(missing)} of {len(keys)} training "
        f"{'photos and views' if views else 'photos'} cached in {folder}")
    if missing:
        alignment = state["alignment"]
        transform = aligned_as_trained(make_transform(state["image_size"], train=False, pixels=True),
                                       FaceAligner.as_recorded(alignment) if alignment else None,
                                       alignment and alignment["size"], data_dir)
        device = device if isinstance(teacher, EmbeddingNet) else "cpu"  # (dlib and onnxruntime: the CPU)
        compute_missing(teacher.to(device), partial(views.read, faces) if views else faces.read, transform, keys,
                        missing[rank::world_size], folder, device, batch_size, rank == 0)
        if distributed:
            dist.barrier()
        cached = read_cache(folder)
    if not cached:
        raise CheckpointError(f"{spec}: it embedded none of the training photos")
    targets = torch.zeros(len(keys), next(iter(cached.values())).shape[-1])
    for index, key in enumerate(keys):
        if key in cached:
            targets[index] = F.normalize(cached[key].sum(0), dim=0)
    return targets, state.get("network", spec), views


def seen_rows(targets):
    """Which rows of the targets the teacher saw (a photo it could not read has a zero row)."""
    return targets.abs().sum(1) > 0


def centred(targets):
    """The targets less their mean over the photos the teacher saw, normalised again (unseen rows stay zero). Face
    descriptors share a large common direction (dlib's: a cosine of 0.84 between random training photos), on which
    a cosine between student and teacher would otherwise spend itself; centred, random photos are orthogonal."""
    seen = seen_rows(targets)
    result = torch.zeros_like(targets)
    result[seen] = F.normalize(targets[seen] - targets[seen].mean(0), dim=1)
    return result


def teacher_centres(targets, labels, num_classes):
    """(num_classes, T): the normalised mean of the teacher's targets of each identity's photos (those it saw); a
    zero row for an identity it saw none of. The class centres a teacher without a classifier implies."""
    if num_classes < 2:
        raise ValueError(f"distill_loss 'inherited' learns the teacher's decision between identities: it needs photos "
                         f"of two or more, got {num_classes}")
    seen = seen_rows(targets)
    sums = torch.zeros(num_classes, targets.shape[1], dtype=targets.dtype, device=targets.device)
    sums.index_add_(0, torch.as_tensor(labels, device=targets.device)[seen], targets[seen])
    return F.normalize(sums, dim=1)


class Distillation(nn.Module):
    """The loss by which a student learns a teacher's embeddings: student embeddings (N, D), the teacher's targets
    (N, T) of the same photos (unit vectors; a zero row, a photo the teacher could not see, is left out) and, for
    'inherited', their labels (N,).
    'cosine': the mean of 1 - cos(P s, t), P a learnt projection to the teacher's size where D != T (dropped after
    training: the student's embedding is its own); 'relational': the mean squared difference of the batch's
    cosine-similarity matrices (the student keeps the teacher's geometry, whatever its size); 'inherited'
    (ProxylessKD): an ArcFace loss of `scale` and `margin` over the teacher's class centres, `centres`
    (num_classes, T) held fixed (teacher_centres), so that the student is placed in the teacher's space by the
    identities' decision itself. stats: {"teacher_cosine": the mean cosine of the projected student and teacher
    embeddings, where comparable}."""

    def __init__(self, student_dim, teacher_dim, kind="cosine", centres=None, scale=30.0, margin=0.5):
        super().__init__()
        if kind not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}, got {kind!r}")
        self.kind = kind
        self.projection = (nn.Linear(student_dim, teacher_dim, bias=False)
                           if kind != "relational" and student_dim != teacher_dim else nn.Identity())
        if kind == "inherited":
            if centres is None or centres.shape[1] != teacher_dim:
                raise ValueError(f"distill_loss 'inherited' needs the teacher's class centres (classes, {teacher_dim})")
            self.inherited = ArcFaceLoss(teacher_dim, len(centres), scale, margin)
            self.inherited.weight.data.copy_(centres)
            self.inherited.weight.requires_grad_(False)

    def forward(self, embeddings, targets, labels=None):
        seen = seen_rows(targets)
        student = F.normalize(self.projection(embeddings[seen].float()), dim=1)
        targets = targets[seen].float()
        cosines = (student * targets).sum(1) if student.shape[1] == targets.shape[1] else None
        if not len(targets):
            loss = student.sum() * 0
        elif self.kind == "relational":
            loss = (student @ student.T - targets @ targets.T).pow(2).mean()
        elif self.kind == "inherited":
            loss = self.inherited(student, labels[seen])[0]
        else:
            loss = (1 - cosines).mean()
        cosine = cosines.mean().item() if cosines is not None and len(targets) else float("nan")
        return loss, {"teacher_cosine": cosine}
