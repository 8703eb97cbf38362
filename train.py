"""Train a face-embedding network with the triplet loss.

    python train.py                          # the defaults below
    python train.py --backbone=resnet18 --epochs=20
    python train.py configs/NAME.py --lr=1e-4  # a file of overrides, then flags

Every constant below can be overridden by a flag of the same name. Writes to out_dir: tb_model.pth (best
by valid identification accuracy), last.pth, config.json, history.json, curves.png and triplets.png.
"""
import os
import random
import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import configurator
from data_utils import (DatasetError, FaceFolder, TripletFaceDataset, as_hw, atomic_write, draw_triplets,
                        make_transform, save_json, save_triplet_grid)
from evaluation import embed, identification_accuracy, plot_history, triplet_accuracy
from losses import TripletLoss
from model import EmbeddingNet, PretrainedUnavailable, select_device

# -----------------------------------------------------------------------------
# data
data_dir = "data/att_faces"  # prepared dataset with train/ and valid/ identity folders (see data/README.md)
out_dir = "out"  # checkpoints, history, curves and the run config go here
image_size = (112, 96)  # network input, height,width (one number: square); AT&T photos are 112x92
batch_size = 32  # triplets per step (each is 3 images)
num_workers = 0  # DataLoader worker processes; 0 loads in the main process
# model
backbone = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | resnet152
pretrained = False  # start from torchvision's ImageNet weights (downloads once into the torch cache)
head = "mlp"  # mlp: Linear(features, hidden_dim)-BatchNorm-ReLU-Linear(hidden_dim, embedding_dim) | linear
hidden_dim = 512  # width of the mlp head
embedding_dim = 128  # size of the L2-normalised embedding
zero_init_residual = False  # start each residual branch's last BatchNorm at zero (from-scratch stability)
# loss
margin = 0.2  # triplet margin, in units of the distance below
squared = True  # squared Euclidean distances (FaceNet); False: plain Euclidean
# optimiser
optimizer = "adam"  # adam | adamw | sgd (momentum 0.9)
lr = 2e-4  # learning rate
weight_decay = 0.0  # L2 penalty (decoupled for adamw)
epochs = 10  # passes over the training triplets; 0 evaluates and saves the untrained network
step_size = 5  # StepLR: multiply the learning rate by gamma every step_size epochs
gamma = 0.1
# system
device = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
amp = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
seed = 0  # same seed and data on the CPU -> the same weights
# -----------------------------------------------------------------------------
config = configurator.parse(globals(), description=__doc__.split("\n")[0])

try:
    device, autocast, fp16_scaling = select_device(device, amp)
except ValueError as err:
    sys.exit(f"error: {err}")
scaler = torch.amp.GradScaler("cuda", enabled=fp16_scaling)
random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)

# data ------------------------------------------------------------------------
if not os.path.isdir(os.path.join(data_dir, "train")):
    sys.exit(f"error: {os.path.join(data_dir, 'train')}: no such folder. Prepare a dataset first:\n"
             f"  python data_utils.py fetch-att {data_dir}        # AT&T faces through scikit-learn\n"
             f"  python data_utils.py split /path/to/att_faces {data_dir} --valid=0.2   # from a local copy\n"
             f"or point --data_dir at a folder with train/ and valid/ identity folders.")
image_size = as_hw(image_size)
try:
    train_faces = FaceFolder(os.path.join(data_dir, "train"), make_transform(image_size, train=True))
    train_set = TripletFaceDataset(train_faces, seed=seed)
    gallery = FaceFolder(train_faces.root, make_transform(image_size, train=False))
    probes = FaceFolder(os.path.join(data_dir, "valid"), make_transform(image_size, train=False))
except DatasetError as err:
    sys.exit(f"error: {err}")
lonely = train_faces.single_image_identities()
if lonely:
    print(f"warning: {len(lonely)} identities have a single training image and serve only as negatives: "
          f"{', '.join(lonely)}")
valid_triplets = draw_triplets(probes.targets, probes.by_label, np.random.default_rng(seed))
print(f"data: {len(train_faces.classes)} identities, {len(train_faces)} train images ({len(train_set)} anchors), "
      f"{len(probes)} valid images of {len(probes.classes)} identities")

loader_args = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=device.startswith("cuda"),
                   persistent_workers=num_workers > 0)
train_loader = DataLoader(train_set, shuffle=True, drop_last=len(train_set) > batch_size,
                          generator=torch.Generator().manual_seed(seed), **loader_args)
gallery_loader = DataLoader(gallery, **loader_args)
probe_loader = DataLoader(probes, **loader_args)

# model, loss, optimiser ------------------------------------------------------
try:
    model = EmbeddingNet(backbone, embedding_dim, head, hidden_dim, pretrained, zero_init_residual).to(device)
except PretrainedUnavailable as err:
    sys.exit(f"error: {err}")
criterion = TripletLoss(margin, squared)
optimizers = {"adam": lambda p: torch.optim.Adam(p, lr=lr, weight_decay=weight_decay),
              "adamw": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay),
              "sgd": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=weight_decay)}
if optimizer not in optimizers:
    sys.exit(f"error: --optimizer={optimizer!r}; choose one of {', '.join(optimizers)}")
opt = optimizers[optimizer](model.parameters())
scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=max(step_size, 1), gamma=gamma)
print(f"model: {backbone} + {head} head -> {embedding_dim}-d, "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, on {device}"
      + (f" with {autocast.fast_dtype} autocast" if isinstance(autocast, torch.autocast) else ""))

os.makedirs(out_dir, exist_ok=True)
save_json(dict(config, device=device, image_size=list(image_size)), os.path.join(out_dir, "config.json"))
shown = [train_set[int(i)] for i in np.linspace(0, len(train_set) - 1, min(8, len(train_set)))]
a, p, n, la, ln = (torch.stack([torch.as_tensor(item[k]) for item in shown]) for k in range(5))
save_triplet_grid(a, p, n, la, ln, train_faces.classes, os.path.join(out_dir, "triplets.png"))


def evaluate():
    """Valid triplet loss and accuracy, and identification accuracy of the valid images (probes) by the
    centroids of the train images (gallery): the test.py method."""
    gallery_emb, gallery_labels = embed(model, gallery_loader, device, autocast)
    probe_emb, probe_labels = embed(model, probe_loader, device, autocast)
    result = dict(valid_identification=identification_accuracy(
        gallery_emb, gallery_labels, gallery.classes, probe_emb, probe_labels, probes.classes)["accuracy"])
    if len(valid_triplets):
        t = torch.as_tensor(valid_triplets)
        result["valid_loss"] = criterion(probe_emb[t[:, 0]], probe_emb[t[:, 1]], probe_emb[t[:, 2]]).item()
        result["valid_triplet_accuracy"] = triplet_accuracy(probe_emb, valid_triplets)
    else:
        result["valid_loss"] = result["valid_triplet_accuracy"] = float("nan")
    return result


def save_checkpoint(name, epoch, metrics):
    """Write a checkpoint atomically; a failed save is reported and training goes on."""
    path = os.path.join(out_dir, name)
    state = dict(model=model.state_dict(), model_config=model.config, image_size=list(image_size),
                 classes=train_faces.classes, epoch=epoch, metrics=metrics, config=config,
                 optimizer=opt.state_dict(), scheduler=scheduler.state_dict())
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as err:
        print(f"warning: could not save {path}: {err}; training goes on", file=sys.stderr)


# training --------------------------------------------------------------------
history, best, train_seconds = [], None, 0.0
for epoch in range(epochs + 1):  # epoch 0 only evaluates the untrained network
    train_loss = None
    if epoch > 0:
        model.train()
        train_set.set_epoch(epoch)
        started, total, count = time.time(), 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True)
        for anchor, positive, negative, _, _ in bar:
            images = torch.cat([anchor, positive, negative]).to(device, non_blocking=True)
            with autocast:
                embeddings = model(images)
            loss = criterion(*embeddings.float().chunk(3))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total, count = total + loss.item() * len(anchor), count + len(anchor)
            bar.set_postfix(loss=f"{total / count:.4f}")
        scheduler.step()
        train_loss, train_seconds = total / count, train_seconds + time.time() - started
    metrics = evaluate()
    history.append(dict(epoch=epoch, train_loss=train_loss, **metrics, train_seconds=round(train_seconds, 1),
                        lr=opt.param_groups[0]["lr"]))
    improved = best is None or metrics["valid_identification"] > best["valid_identification"]
    if improved:
        best = history[-1]
        save_checkpoint("tb_model.pth", epoch, metrics)
    save_checkpoint("last.pth", epoch, metrics)
    save_json(history, os.path.join(out_dir, "history.json"))
    plot_history(history, os.path.join(out_dir, "curves.png"))
    print(f"epoch {epoch}/{epochs} | train loss {'-' if train_loss is None else f'{train_loss:.4f}'} | "
          f"valid loss {metrics['valid_loss']:.4f} | valid triplets {100 * metrics['valid_triplet_accuracy']:.1f}% | "
          f"valid top-1 {100 * metrics['valid_identification']:.2f}% | {train_seconds:.0f}s"
          + (" | best" if improved else ""))

print(f"best valid top-1 {100 * best['valid_identification']:.2f}% at epoch {best['epoch']}; "
      f"{train_seconds:.0f}s of training. Saved {os.path.join(out_dir, 'tb_model.pth')}\n"
      f"evaluate it with: python test.py --checkpoint={os.path.join(out_dir, 'tb_model.pth')}")
