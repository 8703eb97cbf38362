"""Identify the people in photos against a gallery of known faces, or verify that two photos show one person.

    python predict.py PHOTO [PHOTO ...] [--gallery=DIR]    # the nearest gallery identity of each photo
    python predict.py PHOTO_A PHOTO_B --verify=True        # one person or two
    python predict.py --export=onnx                        # the embedding network as an ONNX file

As in test.py, a gallery identity is the normalised mean of the embeddings of its images (identity folders,
DIR/<identity>/<image>), and a photo goes to the identity of highest cosine similarity; below the threshold
it is "unknown". The gallery's centroids are cached beside the checkpoint (<checkpoint stem>.gallery.pt) and
embedded anew when a gallery file or the checkpoint changes. The threshold is --threshold, else the one
test.py calibrated for this checkpoint in results.json beside it: results["open_set"]["threshold"], and for
--verify results["verification"]["threshold_mean"]. Photos of any size and image mode work.
Exit status 1 when a photo could not be read (the others are still predicted).
"""
import json
import os
import sys

import torch
from torch.utils.data import DataLoader

import configurator
from data_utils import DatasetError, FaceFolder, as_hw, atomic_write, find_images, identity_folders, make_transform
from evaluation import centroid_similarities, class_centroids, cosine_similarity_pairs, embed, embed_files
from model import load_checkpoint, model_from_checkpoint, select_device

# -----------------------------------------------------------------------------
# data
checkpoint = "out/tb_model.pth"  # written by train.py; the gallery cache and the ONNX file go beside it
gallery = ""  # identity folders of the known people; empty: the checkpoint's training data_dir/train
# decisions
threshold = -2.0  # cosine similarity below which a photo is unknown (--verify: 2 people); < -1: from results.json
top_k = 1  # gallery identities printed per photo, best first
verify = False  # compare exactly two photos (one person or two) instead of searching the gallery
# export
export = ""  # onnx: write the embedding network as ONNX (dynamic batch) and stop; no photos
onnx_path = ""  # where --export=onnx writes; empty: <checkpoint stem>.onnx beside the checkpoint
# system
batch_size = 64  # images per embedding batch
device = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
amp = True  # mixed precision on CUDA; ignored on the CPU
# -----------------------------------------------------------------------------
photos = configurator.parse(globals(), description=__doc__.split("\n")[0],
                            positional=("photos", "PHOTO", "image files (exactly two with --verify=True)"))["photos"]

ONNX_MISSING = ("error: --export=onnx needs the onnx and onnxscript packages (torch's ONNX exporter); "
                "install them with: pip install onnx onnxruntime onnxscript")
CACHE_VERSION = 1  # bump when the cache's contents change meaning


def export_onnx(model, image_size, path):
    """Write `model` (on the CPU, in eval mode) as ONNX through torch's exporter, batch size dynamic: input
    'images' (N, 3, H, W) normalised as make_transform does, output 'embeddings' (N, D), L2-normalised."""
    example = torch.zeros(2, 3, *as_hw(image_size))  # 2, not 1: a batch of 1 would be specialised as a constant
    program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["images"],
                                output_names=["embeddings"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    atomic_write(path, lambda f: f.write(program.model_proto.SerializeToString()))  # one file, weights inside


def decision_threshold():
    """(threshold or None, where it comes from or why there is none). --threshold wins; else the results.json
    that test.py wrote beside the checkpoint for this very checkpoint: its open-set threshold (image to identity
    centroid) for identification, its verification threshold (image to image) for --verify."""
    if threshold >= -1:
        return threshold, "--threshold"
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        return None, f"no {path} (run test.py, or pass --threshold)"
    except (OSError, ValueError) as err:
        return None, f"{path} is unreadable ({err})"
    if not isinstance(results, dict) or results.get("checkpoint") != os.path.abspath(checkpoint):
        return None, f"{path} evaluated another checkpoint (run test.py --checkpoint={checkpoint}, or pass --threshold)"
    section, key = ("verification", "threshold_mean") if verify else ("open_set", "threshold")
    value = (results.get(section) or {}).get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), f"{path}, {section}.{key}"
    return None, f"{path} has no {section}.{key} (too few valid images to calibrate it; pass --threshold)"


def gallery_files(root, depth):
    """[relative path, size, mtime in ns] of every image file of the gallery: what its cache is keyed on."""
    rows = []
    for folder in identity_folders(root, depth).values():
        for path in find_images(folder):
            stat = os.stat(path)
            rows.append([os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns])
    return rows


def gallery_centroids(root, depth, cache_path):
    """(identity names, centroids (C, D)) of the gallery at `root`, from the cache when its key (the checkpoint's
    path, size and mtime; the gallery's folder, identity depth and files) still matches, else embedded and
    cached anew. Prints which."""
    stat = os.stat(checkpoint)
    key = dict(version=CACHE_VERSION, checkpoint=[os.path.abspath(checkpoint), stat.st_size, stat.st_mtime_ns],
               gallery=os.path.abspath(root), identity_depth=depth, files=gallery_files(root, depth))
    try:
        cached = torch.load(cache_path, weights_only=True)
        if isinstance(cached, dict) and cached.get("key") == key:
            print(f"gallery: cached, {len(cached['classes'])} identities ({cached['images']} images) "
                  f"from {cache_path}")
            return cached["classes"], cached["centroids"]
    except FileNotFoundError:
        pass
    except Exception as err:  # torch.load's errors on a damaged file vary; the cache is rebuilt either way
        print(f"warning: ignoring the unreadable gallery cache {cache_path} ({type(err).__name__})", file=sys.stderr)
    faces = FaceFolder(root, transform, depth)
    embeddings, labels = embed(model, DataLoader(faces, batch_size=batch_size), device, autocast)
    centroids = class_centroids(embeddings, labels, len(faces.classes))
    entry = dict(key=key, classes=faces.classes, centroids=centroids, images=len(faces))
    try:
        atomic_write(cache_path, lambda f: torch.save(entry, f))
        where = f"cached in {cache_path}"
    except OSError as err:
        where = f"not cached ({err})"
    print(f"gallery: embedded {len(faces)} images of {len(faces.classes)} identities from {root}, {where}")
    return faces.classes, centroids


if export and export != "onnx":
    sys.exit(f"error: --export={export}: the only export format is onnx")
if export and photos:
    sys.exit("error: --export=onnx takes no photos")
if export:
    try:
        # what torch.onnx.export's exporter needs, checked before the slow checkpoint load to fail fast
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        sys.exit(ONNX_MISSING)
elif not photos:
    sys.exit("error: no photos given: python predict.py PHOTO [PHOTO ...] (or --export=onnx)")
elif verify and len(photos) != 2:
    sys.exit(f"error: --verify=True compares exactly two photos, got {len(photos)}")
if top_k < 1:
    sys.exit(f"error: --top_k must be at least 1, got {top_k}")
try:
    device, autocast, _ = select_device(device, amp)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).eval()
except ValueError as err:  # CheckpointError is one too
    sys.exit(f"error: {err}")
stem = os.path.splitext(checkpoint)[0]

if export:
    onnx_path = onnx_path or stem + ".onnx"
    try:
        export_onnx(model, state["image_size"], onnx_path)
    except Exception as err:  # the exporter's errors are many and long: one line, the first of the message
        sys.exit(f"error: ONNX export failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    print(f"wrote {onnx_path}: input 'images' (N, 3, {', '.join(map(str, as_hw(state['image_size'])))}) "
          f"normalised with ImageNet mean and std, output 'embeddings' (N, {model.config['embedding_dim']}) "
          f"L2-normalised")
    sys.exit(0)

model = model.to(device)
transform = make_transform(state["image_size"], train=False)
limit, source = decision_threshold()
print(f"threshold: {limit:.4f} ({source})" if limit is not None else f"threshold: none: {source}; no decisions")
if verify:
    embeddings, kept = embed_files(model, photos, transform, device, autocast, batch_size)  # errors: on stderr
    if len(kept) < 2:
        sys.exit(1)
    similarity = float(cosine_similarity_pairs(embeddings, [[0, 1]])[0])
    decision = ("no decision" if limit is None else
                "same person" if similarity >= limit else "different people")
    print(f"{photos[0]} vs {photos[1]}: cosine similarity {similarity:.4f}: {decision}")
    sys.exit(0)

trained = state.get("config", {})
gallery = gallery or os.path.join(trained.get("data_dir", ""), "train")
if not os.path.isdir(gallery):
    sys.exit(f"error: {gallery}: no such gallery folder (--gallery: identity folders of the known people)")
try:
    classes, centroids = gallery_centroids(gallery, trained.get("identity_depth", 1), stem + ".gallery.pt")
except DatasetError as err:
    sys.exit(f"error: {err}")
embeddings, kept = embed_files(model, photos, transform, device, autocast, batch_size)  # errors: on stderr
if embeddings is not None:
    # evaluation.identify's similarities, top_k instead of its top 1
    scores, best = centroid_similarities(embeddings, centroids).topk(min(top_k, len(classes)), dim=1)
    for i, row_scores, row_best in zip(kept, scores.tolist(), best.tolist()):
        name, score = classes[row_best[0]], row_scores[0]
        line = (f"{photos[i]}: unknown (nearest {name} {score:.4f})" if limit is not None and score < limit else
                f"{photos[i]}: {name} {score:.4f}")
        if len(row_best) > 1:
            line += "; next: " + ", ".join(f"{classes[c]} {s:.4f}" for c, s in zip(row_best[1:], row_scores[1:]))
        print(line)
sys.exit(1 if len(kept) < len(photos) else 0)
