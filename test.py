"""Evaluate a face-embedding checkpoint: identification, verification, open set and retrieval, in one pass.

    python test.py                                   # out/tb_model.pth on the data it was trained on
    python test.py --data_dir=data/lfw/unseen        # people never trained on (prepare.py split --unseen)
    python test.py --pairs=data/lfw/pairsDevTrain.txt       # + LFW's protocol (its photos in data/lfw/images)
    python test.py --data_dir=data/faces_emore --val_bins=lfw,cfp_fp,agedb_30    # + insightface's .bin sets
    python test.py --checkpoint=pixels --data_dir=data/lfw/unseen --pixel_size=64   # what raw pixels reach there
    python test.py --checkpoint=dlib --data_dir=data/lfw/unseen --pixel_size=112    # and a face network from elsewhere

The gallery is data_dir/train, the probes data_dir/test (images that chose nothing), or data_dir/valid when there
is no test/; every image is embedded once. A data_dir without train/ (insightface's train.rec and .bin sets, as
train.py trains on them) with --val_bins gives the metrics of the .bin sets alone. The protocol is stated with the
metrics: whether the probes' people were trained on, and whether the probes chose the checkpoint (train.py's
valid/). Identification: each gallery identity is the normalised mean of its normalised embeddings, each probe
goes to the most cosine-similar one (top-1, top-5, report, confusion matrix). Verification: same/different pairs of
probes, ROC, EER, TAR@FAR, 10-fold accuracy. Open set: a similarity threshold for a target false-accept rate,
checked on people outside the gallery. Retrieval: probes ranked against gallery images. Writes results.json,
confusion_matrix.png, roc.png and embeddings.png, and prints a summary table last. A network trained on aligned
faces (the checkpoint says so) sees every folder's photos aligned alike: photos of a folder that prepare.py align did
not write are aligned here. `--checkpoint=pixels` gives every metric of raw pixels instead of a network (the
photos' grey levels at pixel_size, pretrained.PixelBaseline): the reference a trained network has to beat;
`--checkpoint=dlib` those of dlib's face descriptor, trained elsewhere on millions of photos
(pretrained.DlibReference): what a network trained on far more people reaches under the same protocol. A face
network from elsewhere is evaluated alike: insightface's backbone.pth, dlib's network read into torch (dlib_resnet;
results in out/dlib_resnet), or an ONNX model (MODEL.onnx; its input normalisation from MODEL.onnx.json, else
insightface's), on photos aligned as it wants them.
"""
import io
import os
import sys
import time

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix
from torch.utils.data import DataLoader

import configurator
from align import AlignmentUnavailable, FaceAligner, aligned_as_trained, read_alignment
from data_utils import DatasetError, FaceFolder, as_hw, make_transform
from evaluation import (bin_pairs, cosine_similarity_pairs, evaluation_protocol, identification_accuracy, identify,
                        open_set_evaluation, pair_decisions, relabel, retrieval_metrics, score_pairs,
                        score_pairs_as_insightface, verifiable, verification_metrics, verification_pairs)
from figures import plot_confusion_matrix, plot_embeddings_2d, plot_roc
from files import save_json
from inference import embed, embed_files
from losses import build_objective
from model import select_device
from pairs import read_pairs_file, read_verification_bins
from pretrained import REFERENCES, load_face_network, network_identity, onnx_pixel_norm, results_folder
from sampling import loader_workers

# -----------------------------------------------------------------------------
# data
checkpoint = "out/tb_model.pth"  # written by train.py, insightface's backbone.pth or MODEL.onnx; pixels: raw pixels,
#   no network (the baseline to beat); dlib: dlib's pretrained face descriptor (what far more training data gives)
onnx_norm = ""  # MODEL.onnx: its input's MEAN,STD (or three means, three stds) in 0-255 pixel units; empty: its side
#   file's (MODEL.onnx.json), else insightface's 127.5,127.5
pixel_size = (64, 56)  # --checkpoint=pixels or dlib: height,width the photos are scaled to (one number: square;
#   dlib: the photos' own size, faces of 80 pixels or more)
data_dir = ""  # folder with train/ (gallery) and test/ or valid/ (probes); empty: the checkpoint's training data
probe_split = "auto"  # the probes: test | valid | auto (test/ when data_dir has one, else valid/)
out_dir = ""  # where results go; empty: the checkpoint's folder
gallery_pattern = ""  # only gallery images whose file name contains this (e.g. the ID photos of anchor_pattern)
unknown_dir = ""  # identity folders of people absent from the gallery (open set); empty: such probes of valid/
pairs = ""  # an LFW-style pairs.txt to score with its own 10 folds; empty: none
pairs_root = ""  # folder of the pairs file's identity folders; empty: the pairs file's folder (its images/, as LFW)
pairs_name_format = "{name}_{index:04d}"  # image file name in a pairs file's identity folder (AT&T: {index})
val_bins = ""  # insightface verification sets, comma-separated: paths of .bin files, or names of data_dir's
#   (lfw,cfp_fp,agedb_30: data_dir/lfw.bin ...); scored as insightface does (its 10 folds, mirror images added,
#   its accuracy; that of exact thresholds beside it); alone when data_dir has no train/ (a .rec dataset)
# metrics
target_far = 1e-2  # open set: false-accept rate the unknown-person threshold is calibrated for
pair_images = "auto"  # verification pairs among: probes | all (gallery and probes; people with one or two photos
#   each, as LFW's) | auto (all when no probe's person was trained on, else probes)
max_same_pairs = 0  # verification: same-identity pairs to sample (0: all), plus as many different pairs
seed = 0  # verification pair sampling, folds, t-SNE
flip = False  # embed each image and its mirror image, added before normalising (insightface's flip test)
batch_size = 64  # images per embedding batch
num_workers = -1  # DataLoader worker processes: -1 auto (0 on the CPU, up to 8 on CUDA) | 0 (the main process) | N
# system
device = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
amp = True  # mixed precision on CUDA; ignored on the CPU
# -----------------------------------------------------------------------------
configurator.parse(globals(), description=__doc__.split("\n")[0],
                   choices=dict(probe_split=("auto", "test", "valid"), pair_images=("auto", "probes", "all")))

reference = checkpoint if checkpoint in REFERENCES else None  # no checkpoint file: a reference
try:
    if not 0 < target_far < 1:
        raise configurator.ConfigError("target_far", "must be a rate in (0, 1)")
    device, autocast, _ = select_device(device, amp)
    num_workers = loader_workers(num_workers, device)
    try:
        pixel_hw = as_hw(pixel_size)
    except ValueError:
        raise configurator.ConfigError("pixel_size", "must be one or two integers >= 8 (height,width)") from None
    pixel_norm = onnx_pixel_norm(onnx_norm, checkpoint)
    model, state = load_face_network(checkpoint, pixel_hw if reference else None, pixel_norm)
    model = model.to(device)
    if not (data_dir or state.get("config", {}).get("data_dir")):  # a network from elsewhere: no training data
        raise configurator.ConfigError("data_dir", f"--checkpoint={checkpoint} has no training data: name the photos")
    if reference:  # trained on none of these people; the photos seen as data_dir holds them, aligned or not
        state["alignment"] = read_alignment(data_dir)
except (ValueError, AlignmentUnavailable) as err:  # CheckpointError and ConfigError are ValueErrors too
    sys.exit(f"error: {err}")
trained = state.get("config", {})
data_dir = data_dir or trained.get("data_dir", "")
identity_depth = trained.get("identity_depth", 1)
out_dir = out_dir or results_folder(checkpoint)
transform = make_transform(state["image_size"], train=False, pixels=True)  # uint8, normalised on the device
alignment = state.get("alignment")  # how the training photos were aligned; None: they were not
size = alignment["size"] if alignment else None
if pairs and not pairs_root:  # LFW keeps its photos in images/ beside its pairs files
    beside = os.path.dirname(pairs)
    pairs_root = os.path.join(beside, "images") if os.path.isdir(os.path.join(beside, "images")) else beside
try:
    # dlib is needed only for photos that prepare.py align did not write (a GPU server may lack it)
    unaligned = [f for f in (data_dir, unknown_dir, pairs and pairs_root) if f and not read_alignment(f)]
    aligner = FaceAligner.as_recorded(alignment) if alignment and unaligned else None
    data_transform = aligned_as_trained(transform, aligner, size, data_dir)
    bins = read_verification_bins(val_bins, data_dir)
    folders = os.path.isdir(os.path.join(data_dir, "train")) or not bins  # else a dataset of records: bins only
    if folders:
        gallery = FaceFolder(os.path.join(data_dir, "train"), data_transform, identity_depth, gallery_pattern)
        if probe_split == "auto":
            probe_split = "test" if os.path.isdir(os.path.join(data_dir, "test")) else "valid"
        probes = FaceFolder(os.path.join(data_dir, probe_split), data_transform, identity_depth)
    unknowns = (FaceFolder(unknown_dir, aligned_as_trained(transform, aligner, size, unknown_dir), identity_depth)
                if unknown_dir else None)
    pair_list = read_pairs_file(pairs, pairs_root, name_format=pairs_name_format) \
        if pairs else None
except (DatasetError, AlignmentUnavailable, configurator.ConfigError) as err:
    sys.exit(f"error: {err}")
results = dict(checkpoint=network_identity(checkpoint), data_dir=os.path.abspath(data_dir), flip=flip)
rows, roc_curves = [], []  # (metric, value) of the summary table; (name, fpr, tpr, auc, eer) of roc.png


def percent(value):
    return "-" if value is None else f"{100 * value:.2f} %"


def verify(name, metrics, same):
    """Summary rows of verification metrics (verification_metrics'), and their ROC curve for roc.png; None, with a
    warning, when there are none (`same`: the truth of the pairs there were: too few, or of one kind)."""
    if metrics is None:
        same = np.asarray(same, dtype=bool)
        print(f"warning: {name}: no verification figures: they need 4 pairs or more, same-identity and different "
              f"ones, and there are {int(same.sum())} same and {int(len(same) - same.sum())} different")
        return None
    roc = metrics.pop("roc")
    roc_curves.append((name, roc["fpr"], roc["tpr"], metrics["auc"], metrics["eer"]))
    unresolved = f" (FAR below 1/{metrics['different_pairs']} different pairs: unresolved)"
    rows.extend([(f"{name}: ROC AUC", f"{metrics['auc']:.4f}"), (f"{name}: EER", percent(metrics["eer"]))])
    rows.extend((f"{name}: TAR @ FAR {far}", percent(tar) + (unresolved if float(far) < metrics["far_floor"] else ""))
                for far, tar in metrics["tar_at_far"].items())
    exact = metrics.get("exact_thresholds")  # (.bin sets: insightface's accuracy, and that of exact thresholds)
    rows.append((f"{name}: {metrics['folds']}-fold accuracy" + (" (insightface's)" if exact else ""),
                 f"{percent(metrics['accuracy_mean'])} ± {100 * metrics['accuracy_std']:.2f}"))
    if exact:
        rows.append((f"{name}: {metrics['folds']}-fold accuracy (exact thresholds)",
                     f"{percent(exact['accuracy_mean'])} ± {100 * exact['accuracy_std']:.2f}"))
    return metrics


def embed_and_score(name, sources, pair_rows, fold_ids, data_transform, mirror, counted, score=score_pairs):
    """Verification metrics (verify's, or None) of pairs (i, j, same) of `pair_rows`, i and j indices into
    `sources` (image paths or file objects), each image embedded once; pairs with an unreadable image are left out
    and the rest scored over their `fold_ids` by `score` (evaluation.score_pairs, or score_pairs_as_insightface). A
    summary row says how many were scored (`counted(scored)`, before the metrics). Returns (metrics, the indices of
    the pairs scored, the indices of the sources read)."""
    emb, readable = embed_files(model, sources, data_transform, device, autocast, batch_size, mirror)
    metrics, scored = score(emb, readable, pair_rows, fold_ids, seed)
    rows.append((f"{name}: pairs scored", counted(len(scored))))
    return verify(name, metrics, [pair_rows[k][2] for k in scored]), scored, readable


def score_bin(name, images, same):
    """results["bins"][name] for an insightface verification set: its aligned images embedded with their mirror
    images, its pairs scored as insightface scores them (evaluation.score_pairs_as_insightface: its 10 folds of
    consecutive pairs, its accuracy; that of exact thresholds beside it)."""
    metrics, scored, _ = embed_and_score(name, [io.BytesIO(image) for image in images], *bin_pairs(same), transform,
                                         True, lambda count: f"{count} of {len(same)}", score_pairs_as_insightface)
    return dict(metrics or {}, pairs_in_file=len(same), pairs_scored=len(scored))


def finish(written):
    """roc.png, results.json and the summary table; `written`: the other figures written to out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    if roc_curves:
        plot_roc(roc_curves, os.path.join(out_dir, "roc.png"))
    save_json(results, os.path.join(out_dir, "results.json"))
    print(f"wrote {', '.join(['results.json'] + ['roc.png'] * bool(roc_curves) + written)} to {out_dir}")
    width = max(len(name) for name, _ in rows)
    print(f"\n{'figure':<{width}} | value\n{'-' * width}-|------")
    print("\n".join(f"{name:<{width}} | {value}" for name, value in rows))


started = f", started from {trained['init_from']}" if trained.get("init_from") else ""
taught = ("" if not trained.get("teacher") else f", distilled from {trained['teacher']}" if state.get("epoch")
          else f", before its run's distillation from {trained['teacher']}")
network = state.get("network") or (f"{model.config['backbone']}, {model.config['embedding_dim']}-d, epoch "
                                   f"{state.get('epoch')}{started}{taught}")
if not folders:
    print(f"{checkpoint}: {network}; {data_dir} has no train/ gallery (a dataset of records): scoring "
          f"{', '.join(bins)}.bin alone")
    results["bins"] = {name: score_bin(name, *data) for name, data in bins.items()}
    finish([])
    sys.exit(0)
print(f"{checkpoint}: {network}; gallery {len(gallery)} images of {len(gallery.classes)} identities, probes "
      f"{len(probes)} images"
      + (f", {len(unknowns)} images of {len(unknowns.classes)} unknown identities" if unknowns else ""))

# one embedding pass -----------------------------------------------------------
started = time.time()
loader_args = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=device.startswith("cuda"))
gallery_emb, gallery_labels = embed(model, DataLoader(gallery, **loader_args), device, autocast, flip)
probe_emb, probe_labels = embed(model, DataLoader(probes, **loader_args), device, autocast, flip)
unknown_emb = embed(model, DataLoader(unknowns, **loader_args), device, autocast, flip)[0] if unknowns else None
embed_seconds = time.time() - started
protocol = evaluation_protocol(probes, state["classes"], trained.get("data_dir"), alignment, probe_split)
if protocol["probes_chose_checkpoint"]:
    print(f"warning: {probes.root} chose this checkpoint (train.py's best epoch on it): its figures are optimistic; "
          f"measure on images that chose nothing (test/, or people held out by prepare.py split --unseen)")
results.update(protocol=protocol, aligned_here=data_transform is not transform)  # data_dir's photos aligned here
rows.append(("protocol", protocol["summary"]))

# identification -----------------------------------------------------------------
found = identification_accuracy(gallery_emb, gallery_labels, gallery.classes, probe_emb, probe_labels, probes.classes)
truth, predicted, scores = (found[k].numpy() for k in ("truth", "predicted", "scores"))
known = truth >= 0
missing = {}  # probe identities absent from the gallery: name -> predicted names
for name, guess in zip(np.array(probes.classes)[probe_labels.numpy()[~known]], predicted[~known]):
    missing.setdefault(str(name), []).append(gallery.classes[guess])
if missing:
    print(f"warning: {int((~known).sum())} probes of {len(missing)} identities absent from the gallery are "
          f"left out of the accuracy" + ("" if unknowns else " (they are the strangers of the open-set figures)")
          + ": " + ", ".join(f"{k} ({len(v)})" for k, v in sorted(missing.items())))
labels = list(range(len(gallery.classes)))
report_args = dict(labels=labels, target_names=gallery.classes, zero_division=0)
report = classification_report(truth[known], predicted[known], output_dict=True, **report_args)
print(classification_report(truth[known], predicted[known], digits=4, **report_args))
correct = int((truth[known] == predicted[known]).sum())
results["identification"] = dict(
    accuracy=found["accuracy"], top5=found["top5"], top_k=found["top_k"], correct=correct, probes=len(probes),
    probes_scored=int(known.sum()), probes_identity_not_in_gallery=int((~known).sum()),
    identities_not_in_gallery={k: dict(probes=len(v), predicted_as=v) for k, v in sorted(missing.items())},
    per_identity={name: {k: report[name][k] for k in ("precision", "recall", "f1-score", "support")}
                  for name in gallery.classes},
    mean_similarity_correct=float(scores[known][truth[known] == predicted[known]].mean()) if correct else None)
rows += [("identification top-1", f"{percent(found['accuracy'])} ({correct}/{int(known.sum())})"),
         (f"identification top-{found['top_k']}", percent(found["top5"]))]
os.makedirs(out_dir, exist_ok=True)
plot_confusion_matrix(confusion_matrix(truth[known], predicted[known], labels=labels), gallery.classes,
                      os.path.join(out_dir, "confusion_matrix.png"))


# verification -------------------------------------------------------------------
def pair_classifier_decisions(probe_pairs):
    """The pair classifier recipe's own decisions on the probe pairs: precision, recall and F1."""
    head = build_objective("pair_bce", embedding_dim=model.config["embedding_dim"],
                           pair_hidden_dim=trained.get("pair_hidden_dim", 64))
    head.load_state_dict(state["loss_state"])
    with torch.inference_mode():
        decided = (head.eval().logits(probe_emb[probe_pairs[:, 0]], probe_emb[probe_pairs[:, 1]]) > 0).numpy()
    return pair_decisions(probe_pairs[:, 2] == 1, decided)


if pair_images == "auto":
    pair_images = "all" if protocol["probe_people_trained_on"] == 0 else "probes"
if pair_images == "all":  # the gallery's and the probes' images, their identities named alike
    names = np.array(gallery.classes)[gallery_labels.numpy()].tolist() + \
        np.array(probes.classes)[probe_labels.numpy()].tolist()
    pair_emb, pair_labels = torch.cat([gallery_emb, probe_emb]), np.unique(names, return_inverse=True)[1]
else:
    pair_emb, pair_labels = probe_emb, probe_labels.numpy()
probe_pairs = verification_pairs(pair_labels, np.random.default_rng(seed), max_same_pairs or None)
same = probe_pairs[:, 2]
results["verification"] = verify(f"{'all' if pair_images == 'all' else 'probe'} pairs", verification_metrics(
    cosine_similarity_pairs(pair_emb, probe_pairs), same, seed=seed) if verifiable(same) else None, same)
if results["verification"]:
    results["verification"]["images"] = pair_images
if results["verification"] and trained.get("loss") == "pair_bce" and pair_images == "probes":
    decisions = results["verification"]["pair_classifier"] = pair_classifier_decisions(probe_pairs)
    rows.append(("pair classifier: precision / recall / F1", " / ".join(f"{decisions[k]:.3f}" for k in
                                                                        ("precision", "recall", "f1"))))


def score_pairs_file(pair_list):
    """results["pairs"] for an LFW-style pairs file: its images embedded, its pairs scored with its own folds."""
    for line, path in pair_list["missing"]:
        print(f"warning: {pairs}:{line}: missing image {path}")
    files = sorted({path for a, b, _ in pair_list["pairs"] for path in (a, b)})
    position = {path: i for i, path in enumerate(files)}
    metrics, scored, readable = embed_and_score(
        os.path.basename(pairs), files, [(position[a], position[b], same) for a, b, same in pair_list["pairs"]],
        pair_list["fold_ids"], aligned_as_trained(transform, aligner, size, pairs_root), flip,
        lambda count: f"{count} (missing images: {len(pair_list['missing'])})")
    return dict(file=os.path.abspath(pairs), pairs_scored=len(scored), **(metrics or {}),
                missing_images=[dict(line=line, path=path) for line, path in pair_list["missing"]],
                unreadable_images=sorted(set(files) - {files[i] for i in readable}))


results["pairs"] = score_pairs_file(pair_list) if pair_list else None
results["bins"] = {name: score_bin(name, *data) for name, data in bins.items()}

# open set: a threshold calibrated on the known probes as if each were a stranger, checked on people really absent
# from the gallery ------------------------------------------------------------------------------------------------
stranger_scores = identify(unknown_emb, found["centroids"])[1].numpy() if unknowns else None
results["open_set"] = open_set_evaluation(found, target_far, stranger_scores)
if results["open_set"]:
    results["open_set"]["unknown_source"] = unknown_dir or f"{probe_split}/ identities absent from train/"
    rows += [(f"open set: threshold (FAR {target_far:g} on known probes)", f"{results['open_set']['threshold']:.4f}"),
             ("open set: detection and identification rate",
              percent(results["open_set"]["detection_identification_rate"])),
             ("open set: false-accept rate on unknown people",
              percent(results["open_set"]["false_accept_rate"]) + f" ({results['open_set']['unknown_probes']} probes)")]

# retrieval ----------------------------------------------------------------------
results["retrieval"] = retrieval_metrics(probe_emb, relabel(probe_labels, probes.classes, gallery.classes),
                                         gallery_emb, gallery_labels)
rows += [("retrieval: precision@1", percent(results["retrieval"]["precision_at_1"])),
         ("retrieval: R-precision", percent(results["retrieval"]["r_precision"])),
         ("retrieval: MAP@R", percent(results["retrieval"]["map_at_r"]))]

method = plot_embeddings_2d(probe_emb, probe_labels, probes.classes, os.path.join(out_dir, "embeddings.png"), seed)
embedded = len(gallery) + len(probes) + (len(unknowns) if unknowns else 0)
results["seconds"] = dict(embedding=round(embed_seconds, 2), images_embedded=embedded,
                          images_per_second=round(embedded / embed_seconds, 2), total=round(time.time() - started, 2))
finish(["confusion_matrix.png", f"embeddings.png ({method})"])
