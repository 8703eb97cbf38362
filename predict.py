"""Identify the people in photos against a gallery of known faces, or verify that two photos show one person.

    python predict.py PHOTO [PHOTO ...] [--gallery=DIR]    # the nearest gallery identity of each photo
    python predict.py PHOTO_A PHOTO_B --verify             # one person or two
    python predict.py --export=onnx                        # the embedding network as an ONNX file

As in test.py, a gallery identity is the normalised mean of the embeddings of its images (identity folders,
DIR/<identity>/<image>), and a photo goes to the identity of highest cosine similarity; below the threshold
it is "unknown". The gallery's centroids are cached beside the checkpoint (<checkpoint stem>.gallery.pt) and
embedded anew when a gallery file or the checkpoint changes. The threshold is --threshold, else the one
test.py calibrated for this checkpoint in results.json beside it: results["open_set"]["threshold"], and for
--verify results["verification"]["threshold_mean"]. Photos of any size and image mode work.
Exit status 1 when a photo could not be read (the others are still predicted).
"""
import os
import sys

import configurator
from checkpoint import load_checkpoint
from data_utils import DatasetError, as_hw, make_transform
from evaluation import centroid_similarities, cosine_similarity_pairs
from gallery import decision_threshold, gallery_centroids
from inference import embed_files, export_onnx
from model import model_from_checkpoint, select_device

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
                            positional=("photos", "PHOTO", "image files (exactly two with --verify)"),
                            choices=dict(export=("", "onnx")))["photos"]

ONNX_MISSING = ("error: --export=onnx needs the onnx and onnxscript packages (torch's ONNX exporter); "
                "install them with: pip install onnx onnxruntime onnxscript")


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
    sys.exit(f"error: --verify compares exactly two photos, got {len(photos)}")
if top_k < 1:
    sys.exit(f"error: --top_k must be at least 1, got {top_k}")
try:
    device, autocast, _ = select_device(device, amp)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).eval()
except ValueError as err:  # CheckpointError is one too
    sys.exit(f"error: {err}")

if export:
    onnx_path = onnx_path or os.path.splitext(checkpoint)[0] + ".onnx"
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
limit, source = decision_threshold(checkpoint, threshold, verify)
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
    classes, centroids = gallery_centroids(model, checkpoint, gallery, trained.get("identity_depth", 1), transform,
                                           device, autocast, batch_size)
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
