"""Evaluate a face-embedding checkpoint: identify each probe image by the nearest class centroid.

    python test.py                                   # out/tb_model.pth on the data it was trained on
    python test.py --checkpoint=out/last.pth --data_dir=data/other_faces

The gallery is data_dir/train, the probes data_dir/valid. Each gallery identity is represented by the
normalised mean of its normalised embeddings; each probe goes to the identity of highest cosine
similarity. Prints a classification report and top-1 accuracy; writes confusion_matrix.png and results.json.
"""
import os
import sys
import time

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix
from torch.utils.data import DataLoader

import configurator
from data_utils import DatasetError, FaceFolder, make_transform, save_json
from evaluation import embed, identification_accuracy, plot_confusion_matrix
from model import CheckpointError, load_checkpoint, model_from_checkpoint, select_device

# -----------------------------------------------------------------------------
# data
checkpoint = "out/tb_model.pth"  # written by train.py
data_dir = ""  # folder with train/ (gallery) and valid/ (probes); empty: the one the checkpoint was trained on
out_dir = ""  # where results go; empty: the checkpoint's folder
gallery_pattern = ""  # only gallery images whose file name contains this (e.g. the ID photos of anchor_pattern)
batch_size = 64  # images per embedding batch
num_workers = 0  # DataLoader worker processes; 0 loads in the main process
# system
device = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
amp = True  # mixed precision on CUDA; ignored on the CPU
# -----------------------------------------------------------------------------
configurator.parse(globals(), description=__doc__.split("\n")[0])

try:
    device, autocast, _ = select_device(device, amp)
except ValueError as err:
    sys.exit(f"error: {err}")
try:
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).to(device)
except CheckpointError as err:
    sys.exit(f"error: {err}")
trained = state.get("config", {})
data_dir = data_dir or trained.get("data_dir", "")
identity_depth = trained.get("identity_depth", 1)
out_dir = out_dir or os.path.dirname(os.path.abspath(checkpoint))
transform = make_transform(state["image_size"], train=False)
try:
    gallery = FaceFolder(os.path.join(data_dir, "train"), transform, identity_depth, gallery_pattern)
    probes = FaceFolder(os.path.join(data_dir, "valid"), transform, identity_depth)
except DatasetError as err:
    sys.exit(f"error: {err}")
print(f"{checkpoint}: {model.config['backbone']}, {model.config['embedding_dim']}-d, epoch {state.get('epoch')}; "
      f"gallery {len(gallery)} images of {len(gallery.classes)} identities, probes {len(probes)} images")

started = time.time()
loader_args = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=device.startswith("cuda"))
gallery_emb, gallery_labels = embed(model, DataLoader(gallery, **loader_args), device, autocast)
probe_emb, probe_labels = embed(model, DataLoader(probes, **loader_args), device, autocast)
result = identification_accuracy(gallery_emb, gallery_labels, gallery.classes,
                                 probe_emb, probe_labels, probes.classes)
seconds = time.time() - started

truth, predicted, scores = (result[k].numpy() for k in ("truth", "predicted", "scores"))
known = truth >= 0
missing = {}  # probe identities absent from the gallery: name -> predicted names
for name, guess in zip(np.array(probes.classes)[probe_labels.numpy()[~known]], predicted[~known]):
    missing.setdefault(str(name), []).append(gallery.classes[guess])
if missing:
    print(f"warning: {int((~known).sum())} probes of {len(missing)} identities absent from the gallery are "
          f"left out of the accuracy: " + ", ".join(f"{k} ({len(v)})" for k, v in sorted(missing.items())))

labels = list(range(len(gallery.classes)))
report = classification_report(truth[known], predicted[known], labels=labels, target_names=gallery.classes,
                               zero_division=0, output_dict=True)
print(classification_report(truth[known], predicted[known], labels=labels, target_names=gallery.classes,
                            zero_division=0, digits=4))
correct = int((truth[known] == predicted[known]).sum())
print(f"top-1 accuracy: {100 * result['accuracy']:.2f}% ({correct}/{int(known.sum())} probes); "
      f"embedding and matching took {seconds:.1f}s")

os.makedirs(out_dir, exist_ok=True)
plot_confusion_matrix(confusion_matrix(truth[known], predicted[known], labels=labels), gallery.classes,
                      os.path.join(out_dir, "confusion_matrix.png"))
save_json(dict(
    checkpoint=os.path.abspath(checkpoint), data_dir=os.path.abspath(data_dir),
    accuracy=result["accuracy"], correct=correct, probes=len(probes), probes_scored=int(known.sum()),
    probes_identity_not_in_gallery=int((~known).sum()),
    identities_not_in_gallery={k: dict(probes=len(v), predicted_as=v) for k, v in sorted(missing.items())},
    per_identity={name: {k: report[name][k] for k in ("precision", "recall", "f1-score", "support")}
                  for name in gallery.classes},
    mean_similarity_correct=float(scores[known][truth[known] == predicted[known]].mean()) if correct else None,
    seconds=round(seconds, 2),
), os.path.join(out_dir, "results.json"))
print(f"wrote {os.path.join(out_dir, 'confusion_matrix.png')} and {os.path.join(out_dir, 'results.json')}")
