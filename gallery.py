"""The gallery of known people that predict.py names faces against: its class centroids, cached beside the
checkpoint until a gallery file or the checkpoint changes, and the similarity threshold of its decisions."""
import json
import os
import sys

import torch
from torch.utils.data import DataLoader

from data_utils import FaceFolder, find_images, identity_folders
from evaluation import class_centroids
from files import atomic_write
from inference import embed
from pretrained import network_identity, results_folder

CACHE_VERSION = 1  # bump when the cache's contents change meaning


def decision_threshold(checkpoint, threshold=-2.0, verify=False):
    """(threshold or None, where it comes from or why there is none). A `threshold` >= -1 wins; else the
    results.json that test.py wrote for this very checkpoint (beside it; out/<name>/ for a named network): its
    open-set threshold (image to identity centroid) for identification, its verification threshold (image to
    image) with `verify`."""
    if threshold >= -1:
        return threshold, "--threshold"
    path = os.path.join(results_folder(checkpoint), "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        return None, f"no {path} (run test.py, or pass --threshold)"
    except (OSError, ValueError) as err:
        return None, f"{path} is unreadable ({err})"
    if not isinstance(results, dict) or results.get("checkpoint") != network_identity(checkpoint):
        return None, f"{path} evaluated another checkpoint (run test.py --checkpoint={checkpoint}, or pass --threshold)"
    section, key = ("verification", "threshold_mean") if verify else ("open_set", "threshold")
    value = (results.get(section) or {}).get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), f"{path}, {section}.{key}"
    return None, f"{path} has no {section}.{key} (too few valid images to calibrate it; pass --threshold)"


def face_answer(box, classes, best, scores, limit=None):
    """One face's answer: dict(box (left, top, right, bottom) or None for a whole photo, name ("unknown" below
    `limit`), score, nearest: [(name, score)] of the `best` gallery indices with their `scores`, best first)."""
    nearest = [(classes[c], round(s, 4)) for c, s in zip(best, scores)]
    name = "unknown" if limit is not None and scores[0] < limit else classes[best[0]]
    return dict(box=None if box is None else [int(v) for v in box], name=name, score=round(scores[0], 4),
                nearest=nearest)


def answer_line(answer):
    """The text predict.py prints after a photo's path for one face_answer."""
    where = "" if answer["box"] is None else " face at ({}, {}, {}, {})".format(*answer["box"])
    first, score = answer["nearest"][0]
    text = f"unknown (nearest {first} {score:.4f})" if answer["name"] == "unknown" else f"{first} {score:.4f}"
    rest = "; next: " + ", ".join(f"{n} {s:.4f}" for n, s in answer["nearest"][1:]) if answer["nearest"][1:] else ""
    return f"{where}: {text}{rest}"


def gallery_key(checkpoint, root, depth, aligned=False):
    """What a gallery cache is valid for: the checkpoint's path, size and mtime; the gallery's folder, identity
    depth, whether its photos are aligned when embedded, and every image file's relative path, size and mtime."""
    stat = os.stat(checkpoint)
    files = []
    for folder in identity_folders(root, depth).values():
        for path in find_images(folder):
            image = os.stat(path)
            files.append([os.path.relpath(path, root), image.st_size, image.st_mtime_ns])
    return dict(version=CACHE_VERSION, checkpoint=[os.path.abspath(checkpoint), stat.st_size, stat.st_mtime_ns],
                gallery=os.path.abspath(root), identity_depth=depth, files=files, aligned=aligned)


def cached_centroids(cache_path, key):
    """The cache entry at `cache_path` when its key is `key`, else None (a damaged file is warned about)."""
    try:
        cached = torch.load(cache_path, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as err:  # torch.load's errors on a damaged file vary; the cache is rebuilt either way
        print(f"warning: ignoring the unreadable gallery cache {cache_path} ({type(err).__name__})", file=sys.stderr)
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


def gallery_centroids(model, checkpoint, root, depth, transform, device, autocast, batch_size=64, log=print,
                      aligned=False, cache_path=None):
    """(identity names, centroids (C, D)) of the gallery at `root` (identity folders `depth` levels down), from
    the cache beside `checkpoint` (<stem>.gallery.pt, or `cache_path`) while its key still matches, else embedded
    with `model` and cached anew (a cache that cannot be written is said, not fatal). Logs which. Raises
    DatasetError for a gallery without images. `aligned`: the transform aligns each photo (part of the cache's
    key). `checkpoint` is the file of the network's weights (dlib: its descriptor model's)."""
    cache_path = cache_path or os.path.splitext(checkpoint)[0] + ".gallery.pt"
    key = gallery_key(checkpoint, root, depth, aligned)
    cached = cached_centroids(cache_path, key)
    if cached:
        log(f"gallery: cached, {len(cached['classes'])} identities ({cached['images']} images) from {cache_path}")
        return cached["classes"], cached["centroids"]
    faces = FaceFolder(root, transform, depth)
    embeddings, labels = embed(model, DataLoader(faces, batch_size=batch_size), device, autocast)
    entry = dict(key=key, classes=faces.classes, centroids=class_centroids(embeddings, labels, len(faces.classes)),
                 images=len(faces))
    try:
        atomic_write(cache_path, lambda f: torch.save(entry, f))
        where = f"cached in {cache_path}"
    except OSError as err:
        where = f"not cached ({err})"
    log(f"gallery: embedded {len(faces)} images of {len(faces.classes)} identities from {root}, {where}")
    return faces.classes, entry["centroids"]
