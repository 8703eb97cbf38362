"""Train a face-embedding network: triplet (random or mined), contrastive, pair-classifier or ArcFace loss.

    python train.py                          # the defaults below
    python train.py --backbone=resnet18 --epochs=20
    python train.py configs/NAME.py --lr=1e-4  # a file of overrides, then flags

Every constant below can be overridden by a flag of the same name. Writes to out_dir: tb_model.pth (best
by valid identification accuracy), last.pth, config.json, history.json, curves.png and triplets.png.
"""
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_fscore_support
from torch.utils.data import DataLoader
from tqdm import tqdm

import configurator
from data_utils import (DatasetError, FaceFolder, PairDataset, PKBatchSampler, TripletFaceDataset, as_hw,
                        atomic_write, draw_pairs, draw_triplets, make_transform, save_json, save_triplet_grid)
from evaluation import embed, identification_accuracy, plot_history, relabel, triplet_accuracy
from losses import (ArcFaceLoss, CollapseDetector, ContrastiveLoss, OnlineContrastiveLoss, OnlineTripletLoss,
                    TripletLoss)
from model import EmbeddingNet, PairHead, PretrainedUnavailable, select_device

# -----------------------------------------------------------------------------
# data
data_dir = "data/att_faces"  # prepared dataset with train/ and valid/ identity folders (see data/README.md)
out_dir = "out"  # checkpoints, history, curves and the run config go here
identity_depth = 1  # folder level of the identity folders below train/ and valid/ (1: train/<identity>/...)
anchor_pattern = ""  # only images whose file name contains this are anchors (e.g. "script" for ID photos)
image_size = (64, 56)  # network input, height,width (one number: square); AT&T photos are 112x92
batch_size = 32  # triplets or pairs per step; images per step for P x K batches
images_per_identity = 4  # K of a P x K batch (P = batch_size // K)
fill = "repeat"  # P x K: identities with fewer than K images: repeat their images | drop them
num_workers = 0  # DataLoader worker processes; 0 loads in the main process
# model
backbone = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | vgg16 | alexnet | smallcnn
pretrained = False  # start from torchvision's ImageNet weights (downloads once into the torch cache)
freeze_backbone = False  # train only what sits on top (vgg16/alexnet: their fully connected layers stay trainable)
zero_init_residual = True  # ResNets: start each residual branch's last BatchNorm at zero (from-scratch stability)
head = "mlp"  # mlp: Linear(features, hidden_dim)-BatchNorm-ReLU-Linear(hidden_dim, embedding_dim) | linear
hidden_dim = 512  # width of the mlp head
embedding_dim = 128  # size of the L2-normalised embedding
# loss
loss = "arcface"  # triplet | contrastive (siamese pairs) | pair_bce (pair classifier) | arcface
mining = "none"  # none: random triplets / balanced pairs | batch_all | batch_hard | semihard: in P x K batches
margin = 0.2  # triplet: in units of the distance below; contrastive: Euclidean distance
squared = True  # triplet: squared Euclidean distances (FaceNet); False: plain Euclidean
arcface_scale = 30.0  # arcface: logit scale
arcface_margin = 0.5  # arcface: additive angular margin, radians
pair_hidden_dim = 64  # pair_bce: width of the pair classifier
# optimiser
optimizer = "adam"  # adam | adamw | sgd (momentum 0.9)
lr = 2e-3  # learning rate (peak learning rate for onecycle)
weight_decay = 0.0  # L2 penalty (decoupled for adamw)
epochs = 30  # passes over the training images; 0 evaluates and saves the untrained network
lr_schedule = "onecycle"  # step: StepLR | cosine: cosine decay to 0 | onecycle: warm-up then cosine decay
step_size = 5  # StepLR: multiply the learning rate by gamma every step_size epochs
gamma = 0.1
# logging
verbosity = 0  # 0: summary lines | 1: + architecture | 2: + optimiser | 3: + parameter counts per module
save_every = 0  # also keep epoch_N.pth every N epochs (0: only tb_model.pth and last.pth)
plot_x = "epoch"  # x axis of curves.png: epoch | step (iterations)
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
losses_known = ("triplet", "contrastive", "pair_bce", "arcface")
if loss not in losses_known:
    sys.exit(f"error: --loss={loss!r}; choose one of {', '.join(losses_known)}")
if mining not in ("none",) + OnlineTripletLoss.MINING:
    sys.exit(f"error: --mining={mining!r}; choose one of none, {', '.join(OnlineTripletLoss.MINING)}")
if loss == "pair_bce" and mining != "none":
    sys.exit("error: --loss=pair_bce trains on balanced pairs: use it with --mining=none")
if anchor_pattern and (mining != "none" or loss == "arcface"):
    sys.exit("error: --anchor_pattern chooses the anchors of random triplets and pairs: use it with --mining=none "
             "and a triplet, contrastive or pair_bce loss")
# triplets: (a, p, n) rows; pairs: (x1, x2, same/different) rows; labelled: P x K batches of (images, labels)
batch_kind = ("labelled" if mining != "none" or loss == "arcface" else
              "triplets" if loss == "triplet" else "pairs")
if not os.path.isdir(os.path.join(data_dir, "train")):
    sys.exit(f"error: {os.path.join(data_dir, 'train')}: no such folder. Prepare a dataset first:\n"
             f"  python data_utils.py fetch-att {data_dir}        # AT&T faces through scikit-learn\n"
             f"  python data_utils.py split /path/to/att_faces {data_dir} --valid=0.2   # from a local copy\n"
             f"or point --data_dir at a folder with train/ and valid/ identity folders.")
image_size = as_hw(image_size)
try:
    train_faces = FaceFolder(os.path.join(data_dir, "train"), make_transform(image_size, train=True), identity_depth)
    # random triplets: the batches of mining=none, and triplets.png whatever the batches
    triplet_view = TripletFaceDataset(train_faces, seed, anchor_pattern)
    train_set = PairDataset(train_faces, seed, anchor_pattern) if batch_kind == "pairs" else triplet_view
    gallery = FaceFolder(train_faces.root, make_transform(image_size, train=False), identity_depth)
    probes = FaceFolder(os.path.join(data_dir, "valid"), make_transform(image_size, train=False), identity_depth)
except DatasetError as err:
    sys.exit(f"error: {err}")
lonely = train_faces.single_image_identities()
if lonely:
    print(f"warning: {len(lonely)} identities have a single training image and serve only as negatives: "
          f"{', '.join(lonely)}")
valid_rng = np.random.default_rng(seed)  # the same valid triplets and pairs every epoch
valid_triplets = draw_triplets(probes.targets, probes.by_label, valid_rng)
valid_pairs = draw_pairs(probes.targets, probes.by_label, valid_rng)
print(f"data: {len(train_faces.classes)} identities, {len(train_faces)} train images, {len(probes)} valid images "
      f"of {len(probes.classes)} identities; training on {batch_kind}"
      + (f" ({len(triplet_view)} anchors matching {anchor_pattern!r})" if anchor_pattern else ""))

loader_args = dict(num_workers=num_workers, pin_memory=device.startswith("cuda"),
                   persistent_workers=num_workers > 0)
if batch_kind == "labelled":
    identities = batch_size // images_per_identity
    if 2 <= len(train_faces.classes) < identities:
        identities = len(train_faces.classes)
        print(f"P x K batches: only {identities} identities, so P = {identities} (batches of "
              f"{identities * images_per_identity} images)")
    try:
        epoch_source = PKBatchSampler(train_faces.targets, identities, images_per_identity, seed, fill)
    except ValueError as err:
        sys.exit(f"error: --batch_size={batch_size} --images_per_identity={images_per_identity}: {err}")
    if epoch_source.short:
        print(f"P x K batches: {len(epoch_source.short)} identities have fewer than {images_per_identity} images "
              f"({'their images repeat' if fill == 'repeat' else 'left out'})")
    train_loader = DataLoader(train_faces, batch_sampler=epoch_source, **loader_args)
else:
    epoch_source = train_set  # draws new rows per epoch
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                              generator=torch.Generator().manual_seed(seed), **loader_args)
loader_args["batch_size"] = max(batch_size, 64)
gallery_loader = DataLoader(gallery, **loader_args)
probe_loader = DataLoader(probes, **loader_args)

# model, loss, optimiser ------------------------------------------------------
try:
    model = EmbeddingNet(backbone, embedding_dim, head, hidden_dim, pretrained, zero_init_residual,
                         freeze_backbone).to(device)
    if loss == "triplet":
        criterion = (TripletLoss(margin, squared, reduction="none") if batch_kind == "triplets"
                     else OnlineTripletLoss(margin, mining, squared))
    elif loss == "contrastive":
        criterion = ContrastiveLoss(margin) if batch_kind == "pairs" else OnlineContrastiveLoss(margin)
    elif loss == "pair_bce":
        criterion = PairHead(embedding_dim, pair_hidden_dim)  # trained with binary cross-entropy on its logits
    else:
        criterion = ArcFaceLoss(embedding_dim, len(train_faces.classes), arcface_scale, arcface_margin)
except (PretrainedUnavailable, ValueError) as err:
    sys.exit(f"error: {err}")
criterion = criterion.to(device)
optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "sgd": lambda params, **kw: torch.optim.SGD(params, momentum=0.9, **kw)}
if optimizer not in optimizers:
    sys.exit(f"error: --optimizer={optimizer!r}; choose one of {', '.join(optimizers)}")
trainable = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
opt = optimizers[optimizer](trainable, lr=lr, weight_decay=weight_decay)
steps = max(epochs, 1) * len(train_loader)  # the schedules advance per optimiser step


def warmup_cosine(step, total, warmup=0.25):
    """Learning-rate factor of the one-cycle schedule: linear warm-up over the first quarter of the steps, then
    cosine decay to 0. (torch's OneCycleLR fails on runs of a few steps.)"""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


schedulers = {
    "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=max(step_size, 1) * len(train_loader),
                                                    gamma=gamma),
    "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
    "onecycle": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps)),
}
if lr_schedule not in schedulers:
    sys.exit(f"error: --lr_schedule={lr_schedule!r}; choose one of {', '.join(schedulers)}")
if plot_x not in ("epoch", "step"):
    sys.exit(f"error: --plot_x={plot_x!r}; choose epoch or step")
scheduler = schedulers[lr_schedule]()
print(f"model: {backbone}{' (frozen)' if freeze_backbone else ''} + {head} head -> {embedding_dim}-d, "
      f"{sum(p.numel() for p in trainable) / 1e6:.1f} M trainable parameters, {loss} loss, on {device}"
      + (f" with {autocast.fast_dtype} autocast" if isinstance(autocast, torch.autocast) else ""))
if verbosity >= 1:
    print(model, criterion, sep="\n")
if verbosity >= 2:
    print(opt, f"schedule: {lr_schedule}", sep="\n")
if verbosity >= 3:
    for name, module in list(model.named_children()) + [("loss", criterion)]:
        print(f"  {name}: {sum(p.numel() for p in module.parameters()):,} parameters, "
              f"{sum(p.numel() for p in module.parameters() if p.requires_grad):,} trainable")

os.makedirs(out_dir, exist_ok=True)
save_json(dict(config, device=device, image_size=list(image_size)), os.path.join(out_dir, "config.json"))
shown = [triplet_view[int(i)] for i in np.linspace(0, len(triplet_view) - 1, min(8, len(triplet_view)))]
a, p, n, la, ln = (torch.stack([torch.as_tensor(item[k]) for item in shown]) for k in range(5))
save_triplet_grid(a, p, n, la, ln, train_faces.classes, os.path.join(out_dir, "triplets.png"))


def embed_batches(*image_batches):
    """Embeddings (float32) of image batches concatenated, in one forward pass."""
    with autocast:
        return model(torch.cat(image_batches).to(device, non_blocking=True)).float()


def pair_loss(e1, e2, target):
    """Loss and accuracy of pairs (target 0 = same person): contrastive or the pair classifier's BCE."""
    target = torch.as_tensor(target).to(e1.device)
    if loss == "contrastive":
        return criterion(e1, e2, target), None
    logits = criterion(e1, e2)
    same = (target == 0).float()
    return F.binary_cross_entropy_with_logits(logits, same), ((logits > 0).float() == same).float().mean().item()


def batch_loss(batch):
    """(loss, a second figure: share of active triplets or pairs, or accuracy; embeddings) of a training batch."""
    if batch_kind == "triplets":
        anchor, positive, negative, _, _ = batch
        embeddings = embed_batches(anchor, positive, negative)
        losses = criterion(*embeddings.chunk(3))
        return losses.mean(), (losses > 0).float().mean().item(), embeddings
    if batch_kind == "pairs":
        first, second, target, _, _ = batch
        embeddings = embed_batches(first, second)
        return (*pair_loss(*embeddings.chunk(2), target), embeddings)
    images, labels = batch
    embeddings = embed_batches(images)
    return (*criterion(embeddings, labels.to(device)), embeddings)


second_figure = "accuracy" if loss in ("pair_bce", "arcface") else "active"


@torch.inference_mode()
def evaluate():
    """Identification top-1 of the valid images (probes) by the centroids of the train images (gallery), the
    test.py method; valid loss (of the training loss) and the share of valid triplets with d(a,p) < d(a,n);
    for the pair classifier, precision, recall and F1 on balanced valid pairs."""
    gallery_emb, gallery_labels = embed(model, gallery_loader, device, autocast)
    probe_emb, probe_labels = embed(model, probe_loader, device, autocast)
    result = dict(valid_identification=identification_accuracy(
        gallery_emb, gallery_labels, gallery.classes, probe_emb, probe_labels, probes.classes)["accuracy"],
        valid_loss=float("nan"), valid_triplet_accuracy=float("nan"))
    if len(valid_triplets):
        result["valid_triplet_accuracy"] = triplet_accuracy(probe_emb, valid_triplets)
    criterion.eval()
    probe_emb = probe_emb.to(device)
    if batch_kind == "triplets" and len(valid_triplets):
        result["valid_loss"] = criterion(*(probe_emb[valid_triplets[:, i]] for i in range(3))).mean().item()
    elif batch_kind == "pairs" and len(valid_pairs):
        first, second = probe_emb[valid_pairs[:, 0]], probe_emb[valid_pairs[:, 1]]
        result["valid_loss"] = pair_loss(first, second, valid_pairs[:, 2])[0].item()
        if loss == "pair_bce":
            predicted_same = (criterion(first, second) > 0).cpu().numpy()
            precision, recall, f1, _ = precision_recall_fscore_support(
                valid_pairs[:, 2] == 0, predicted_same, average="binary", zero_division=0)
            result.update(valid_pair_precision=precision, valid_pair_recall=recall, valid_pair_f1=f1)
    elif batch_kind == "labelled":
        labels = relabel(probe_labels, probes.classes, train_faces.classes)  # arcface centres are train identities
        known = labels >= 0
        if known.any():
            result["valid_loss"] = criterion(probe_emb[known.to(device)], labels[known].to(device))[0].item()
    criterion.train()
    return result


def save_checkpoint(name, epoch, metrics, training_state=True):
    """Write a checkpoint atomically; a failed save is reported and training goes on. Without the training
    state (optimiser, schedule) it is a third of the size: all that test.py needs."""
    path = os.path.join(out_dir, name)
    state = dict(model=model.state_dict(), model_config=model.config, image_size=list(image_size),
                 classes=train_faces.classes, epoch=epoch, metrics=metrics, config=config,
                 loss_state=criterion.state_dict())
    if training_state:
        state.update(optimizer=opt.state_dict(), scheduler=scheduler.state_dict())
    if loss == "pair_bce":
        state["pair_head_config"] = criterion.config
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as err:
        print(f"warning: could not save {path}: {err}; training goes on", file=sys.stderr)


# training --------------------------------------------------------------------
collapse = CollapseDetector(margin) if loss == "triplet" else None
history, best, train_seconds, step = [], None, 0.0, 0
for epoch in range(epochs + 1):  # epoch 0 only evaluates the untrained network
    train_loss = train_second = None
    if epoch > 0:
        model.train()
        epoch_source.set_epoch(epoch)
        started, total, second_total, count = time.time(), 0.0, 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True, disable=None)
        for batch in bar:
            batch_value, second, embeddings = batch_loss(batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(batch_value).backward()
            scaler.step(opt)
            scaler.update()
            scheduler.step()
            step, count, total = step + 1, count + 1, total + batch_value.item()
            second_total += second or 0.0
            shown_second = {} if second is None else {second_figure: f"{second:.2f}"}
            bar.set_postfix(loss=f"{total / count:.4f}", **shown_second)
            if collapse is not None and collapse.update(batch_value.item(), embeddings):
                tqdm.write(f"warning: the embeddings are collapsing (loss {batch_value.item():.3f} ~ margin {margin}, "
                           f"spread {collapse.spread:.3f} for {collapse.patience} steps): try a lower --lr, "
                           f"--zero_init_residual=True, --mining=semihard, or a larger --margin")
        train_loss, train_second = total / count, (second_total / count if second is not None else None)
        train_seconds += time.time() - started
    metrics = evaluate()
    history.append(dict(epoch=epoch, step=step, train_loss=train_loss, **{f"train_{second_figure}": train_second},
                        **metrics, train_seconds=round(train_seconds, 1), lr=opt.param_groups[0]["lr"]))
    improved = best is None or metrics["valid_identification"] > best["valid_identification"]
    if improved:
        best = history[-1]
        save_checkpoint("tb_model.pth", epoch, metrics, training_state=False)
    save_checkpoint("last.pth", epoch, metrics)
    if save_every and epoch and epoch % save_every == 0:
        save_checkpoint(f"epoch_{epoch}.pth", epoch, metrics, training_state=False)
    save_json(history, os.path.join(out_dir, "history.json"))
    plot_history(history, os.path.join(out_dir, "curves.png"), x=plot_x)
    print(f"epoch {epoch}/{epochs} | train loss {'-' if train_loss is None else f'{train_loss:.4f}'} | "
          + ("" if train_second is None else f"{second_figure} {100 * train_second:.0f}% | ")
          + f"valid loss {metrics['valid_loss']:.4f} | valid triplets {100 * metrics['valid_triplet_accuracy']:.1f}% | "
          + (f"valid pair F1 {metrics['valid_pair_f1']:.3f} | " if "valid_pair_f1" in metrics else "")
          + f"valid top-1 {100 * metrics['valid_identification']:.2f}% | {train_seconds:.0f}s"
          + (" | best" if improved else ""))

print(f"best valid top-1 {100 * best['valid_identification']:.2f}% at epoch {best['epoch']}; "
      f"{train_seconds:.0f}s of training. Saved {os.path.join(out_dir, 'tb_model.pth')}\n"
      f"evaluate it with: python test.py --checkpoint={os.path.join(out_dir, 'tb_model.pth')}")
