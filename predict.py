"""Identify the people in photos against a gallery of known faces, or verify that two photos show one person.

    python predict.py PHOTO [PHOTO ...] [--gallery=DIR]    # the nearest gallery identity of each photo
    python predict.py PHOTO_A PHOTO_B --verify             # one person or two
    python predict.py --export=onnx                        # the embedding network as an ONNX file
    python predict.py PHOTO --checkpoint=dlib --gallery=DIR   # or a network from elsewhere (dlib, dlib_resnet,
                                                              # MODEL.onnx, insightface's backbone.pth)

As in test.py, a gallery identity is the normalised mean of the embeddings of its images (identity folders,
DIR/<identity>/<image>), and a photo goes to the identity of highest cosine similarity; below the threshold
it is "unknown". The gallery's centroids are cached beside the checkpoint (<checkpoint stem>.gallery.pt) and
embedded anew when a gallery file or the checkpoint changes. The threshold is --threshold, else the one
test.py calibrated for this checkpoint in results.json beside it: results["open_set"]["threshold"], and for
--verify results["verification"]["threshold_mean"]. Photos of any size and image mode work.
A network trained on aligned faces (prepare.py align; its checkpoint or ONNX side file says so; insightface's
models are) and dlib name every face of a photo: each is found, aligned as the training photos were and named,
and an annotated copy of the photo goes to out_dir; --verify compares the main faces of the two photos. Exit
status 1 when a photo could not be read (the others are still predicted).
"""
import os
import sys

import torch

import configurator
from align import (PASSES, AlignmentUnavailable, FaceAligner, MainFace, aligned_as_trained, alignment_record,
                   photo_faces)
from checkpoint import CheckpointError
from data_utils import UNREADABLE_IMAGE, DatasetError, as_hw, load_image, make_transform
from evaluation import centroid_similarities, cosine_similarity_pairs
from figures import save_annotated
from files import save_json
from gallery import answer_line, decision_threshold, face_answer, gallery_centroids
from inference import embed_batch, export_onnx
from model import EmbeddingNet, select_device
from pretrained import (NAMED_NETWORKS, load_face_network, network_file, onnx_pixel_norm, onnx_side_file,
                        results_folder, write_onnx_side)

# -----------------------------------------------------------------------------
# data
checkpoint = "out/tb_model.pth"  # written by train.py (the gallery cache and the ONNX file go beside it), insightface's
#   backbone.pth, MODEL.onnx, dlib (dlib's face descriptor; its gallery cache goes to out_dir) or dlib_resnet (its
#   network in torch: a network of this repository; its ONNX file goes to out/dlib_resnet/)
onnx_norm = ""  # MODEL.onnx: its input's MEAN,STD (or three means, three stds) in 0-255 pixel units; empty: its side
#   file's (MODEL.onnx.json), else insightface's 127.5,127.5
gallery = ""  # identity folders of the known people; empty: the checkpoint's training data_dir/train
# decisions
threshold = -2.0  # cosine similarity below which a photo is unknown (--verify: 2 people); < -1: from results.json
top_k = 1  # gallery identities printed per photo, best first
verify = False  # compare exactly two photos (one person or two) instead of searching the gallery
# output (networks trained on aligned faces: every face of a photo is found, aligned and named)
out_dir = "predictions"  # annotated copies of the photos (boxes, names, scores); empty: none
json_path = ""  # also write every answer as JSON here, for scripts; empty: none
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
    pixel_norm = onnx_pixel_norm(onnx_norm, checkpoint)
    model, state = load_face_network(checkpoint, pixel_norm=pixel_norm)
    if checkpoint == "dlib":  # each face aligned to a square crop (dlib finds it again there), not a photo stretched
        state["alignment"] = alignment_record(as_hw(state["image_size"])[0], PASSES)
    if export and not isinstance(model, EmbeddingNet):
        raise CheckpointError(f"--export=onnx exports a network of this repository; {checkpoint} is not one")
except (ValueError, AlignmentUnavailable) as err:  # CheckpointError is a ValueError too
    sys.exit(f"error: {err}")
named = checkpoint in NAMED_NETWORKS  # no file of its own: what is written for it goes to out/<name>/ or out_dir

if export:
    onnx_path = onnx_path or (os.path.join(results_folder(checkpoint), checkpoint) if named else
                              os.path.splitext(checkpoint)[0]) + ".onnx"
    try:
        export_onnx(model, state["image_size"], onnx_path)
        write_onnx_side(onnx_path, state["image_size"], state.get("alignment"), state["classes"])
    except Exception as err:  # the exporter's errors are many and long: one line, the first of the message
        sys.exit(f"error: ONNX export failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    print(f"wrote {onnx_path}: input 'images' (N, 3, {', '.join(map(str, as_hw(state['image_size'])))}) "
          f"normalised with ImageNet mean and std, output 'embeddings' (N, {model.config['embedding_dim']}) "
          f"L2-normalised; how to prepare its input in {onnx_side_file(onnx_path)}")
    sys.exit(0)

model = model.to(device)
transform = make_transform(state["image_size"], train=False)
alignment = state.get("alignment")  # how the training photos were aligned; None: they were not
try:
    aligner = FaceAligner.as_recorded(alignment) if alignment else None
except AlignmentUnavailable as err:
    sys.exit(f"error: {err}")
size = alignment["size"] if alignment else None
limit, source = decision_threshold(checkpoint, threshold, verify)
print(f"threshold: {limit:.4f} ({source})" if limit is not None else f"threshold: none: {source}; no decisions")


def read_photo(path):
    """The photo at `path` (load_image's), or None after a one-line error on stderr."""
    try:
        return load_image(path)
    except UNREADABLE_IMAGE as err:
        print(f"error: {path}: cannot be read as an image ({err})", file=sys.stderr)
        return None


def embeddings_of(crops):
    return embed_batch(model, torch.stack([transform(crop) for crop in crops]), device, autocast)


if verify:
    images = [read_photo(path) for path in photos]
    crops = [None if image is None else MainFace(aligner, size)(image) if aligner else image for image in images]
    if any(crop is None for crop in crops):
        sys.exit(1)
    similarity = float(cosine_similarity_pairs(embeddings_of(crops), [[0, 1]])[0])
    decision = ("no decision" if limit is None else
                "same person" if similarity >= limit else "different people")
    print(f"{photos[0]} vs {photos[1]}: cosine similarity {similarity:.4f}: {decision}")
    sys.exit(0)

trained = state.get("config", {})
gallery = gallery or os.path.join(trained.get("data_dir", ""), "train")
if not os.path.isdir(gallery):
    sys.exit(f"error: {gallery}: no such gallery folder (--gallery: identity folders of the known people)")
# a gallery of ordinary photos is aligned as the training photos were; an aligned one is taken as it is
gallery_transform = aligned_as_trained(transform, aligner, size, gallery)
try:
    classes, centroids = gallery_centroids(model, network_file(checkpoint), gallery,
                                           trained.get("identity_depth", 1), gallery_transform, device, autocast,
                                           batch_size, aligned=gallery_transform is not transform,
                                           cache_path=named and os.path.join(out_dir or ".",
                                                                             f"{checkpoint}.gallery.pt"))
except DatasetError as err:
    sys.exit(f"error: {err}")
answers, failed = [], 0
for path in photos:
    image = read_photo(path)
    if image is None:
        failed += 1
        continue
    faces = photo_faces(image, aligner, size)
    if not faces:
        print(f"{path}: no face found")
    else:
        scores, best = centroid_similarities(embeddings_of([crop for _, crop in faces]), centroids).topk(
            min(top_k, len(classes)), dim=1)
        named = [face_answer(box, classes, row_best, row_scores, limit)
                 for (box, _), row_best, row_scores in zip(faces, best.tolist(), scores.tolist())]
        for answer in named:
            print(f"{path}{answer_line(answer)}")
        if aligner and out_dir:
            save_annotated(image, named, os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png"))
        answers.append(dict(photo=path, faces=named))
if json_path:
    save_json(answers, json_path)
sys.exit(1 if failed else 0)
