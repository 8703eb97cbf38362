"""Train a face-embedding network: triplet (random or mined), contrastive, pair-classifier or ArcFace loss.

    python train.py                          # the defaults below
    python train.py --backbone=resnet18 --epochs=20
    python train.py configs/NAME.py --lr=1e-4  # a file of overrides, then flags
    python train.py --resume=out/last.pth    # continue a run where it stopped, with its own settings
    torchrun --standalone --nproc_per_node=4 train.py   # DistributedDataParallel, one process per GPU

Every constant below can be overridden by a flag of the same name. Writes to out_dir: tb_model.pth (best
by valid identification accuracy), last.pth (all a resumed run needs), config.json, history.json, curves.png,
triplets.png and skipped_files.txt (the unreadable images, with the reason). Ctrl-C or SIGTERM stops after the
current step, saves last.pth and prints the command that resumes the run; a second Ctrl-C quits at once.
Under torchrun, batch_size is per process (the global batch is N times larger), and process 0 alone
evaluates, prints and saves.
"""
import datetime
import gc
import math
import os
import random
import shlex
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import configurator
from data_utils import (DatasetError, FaceFolder, PairDataset, PKBatchSampler, TripletFaceDataset, as_hw,
                        atomic_write, draw_pairs, draw_triplets, load_rgb, loader_workers, make_transform, normalize,
                        save_json, save_triplet_grid)
from evaluation import device_batch, embed, identification_accuracy, plot_history, relabel, triplet_accuracy
from losses import (ArcFaceLoss, CollapseDetector, ContrastiveLoss, OnlineContrastiveLoss, OnlineTripletLoss,
                    TripletLoss, gather_batch)
from model import CheckpointError, EmbeddingNet, PairHead, PretrainedUnavailable, load_checkpoint, select_device

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
num_workers = -1  # DataLoader worker processes: -1 auto (0 on the CPU, up to 8 on CUDA) | 0 (the main process) | N
cache_images = "auto"  # decode each image once, keep it resized in memory: auto (when all fit in 2 GiB) | true | false
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
eval_every = 1  # evaluate, keep the best and save last.pth every N epochs (and before the first, after the last)
save_every = 0  # also keep epoch_N.pth every N evaluated epochs (0: only tb_model.pth and last.pth)
plot_x = "epoch"  # x axis of curves.png: epoch | step (iterations)
# system
device = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
amp = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
seed = 0  # same seed and data on the CPU -> the same weights
channels_last = "auto"  # train in NHWC memory format: auto (on CUDA, for its tensor cores; not on the CPU) | true | false
compile = False  # torch.compile the network for training (PyTorch 2; the first steps wait for the compiler)
sync_bn = False  # torchrun on GPUs: batch-norm statistics over the global batch rather than each GPU's share
deterministic = False  # CUDA: deterministic kernels only, slower (an op without one stops the run); the CPU already is
resume = ""  # continue a stopped run: the path of its last.pth, or last (= <out_dir>/last.pth); "": a fresh run
# -----------------------------------------------------------------------------
defaults = configurator.constants(globals())
config = configurator.parse(globals(), description=__doc__.split("\n")[0])

# resume ----------------------------------------------------------------------
checkpoint, first_epoch, position = None, 0, None  # position: where in its epoch a resumed run had stopped
if resume:
    resume_path = os.path.join(out_dir, "last.pth") if resume == "last" else resume
    try:
        checkpoint = load_checkpoint(resume_path)  # weights_only: loading it cannot run code
    except CheckpointError as err:
        sys.exit(f"error: --resume: {err}")
    if "rng" not in checkpoint:
        sys.exit(f"error: --resume: {resume_path} holds no training state to resume from (tb_model.pth and "
                 f"epoch_N.pth never do, nor a last.pth from before --resume existed)")
    # the run goes on with its own settings; only these may be given anew, nothing that shapes the model, the data
    # or the optimisation. A constant newer than the checkpoint keeps its value here; a flag equal to its default
    # cannot be told from no flag, so it leaves the run's value. out_dir defaults to the checkpoint's folder.
    may_change = ("resume", "out_dir", "data_dir", "epochs", "num_workers", "verbosity", "eval_every", "save_every",
                  "plot_x", "device", "amp", "deterministic", "cache_images", "channels_last", "compile", "sync_bn")
    saved = {k: checkpoint["config"].get(k, v) for k, v in config.items()}
    given = {k: v for k, v in config.items() if v != defaults[k]}
    conflicts = [f"--{k}={v} (the run has {saved[k]})" for k, v in given.items()
                 if k not in may_change and v != saved[k]]
    if conflicts:
        sys.exit(f"error: --resume continues the run with its own settings, but {', '.join(conflicts)}; on resume "
                 f"only {', '.join(may_change[1:])} may change")
    config = {**saved, "out_dir": os.path.dirname(resume_path) or ".",
              **{k: v for k, v in given.items() if k in may_change}}
    globals().update(config)
    position = checkpoint["position"]  # None when it stopped after a whole epoch
    first_epoch = position["epoch"] if position else checkpoint["epoch"] + 1
    if first_epoch > epochs:
        sys.exit(f"error: --resume: {resume_path} has trained all its {epochs} epochs; add --epochs=N with "
                 f"N > {epochs} to train on")

if deterministic:  # set before CUDA starts: cuBLAS reads its workspace setting once
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True  # (cudnn.benchmark, which picks kernels by timing, stays off)
# torchrun starts one process per GPU (or CPU share) and tells each its rank in the environment; a run under
# torchrun takes the distributed path even with one process (DDP, the process group, gathered mining)
rank, local_rank, world_size = (int(os.environ.get(name, 0)) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
distributed = "WORLD_SIZE" in os.environ
world_size, master = max(world_size, 1), rank == 0  # the master process alone evaluates, prints and saves
try:
    device, autocast, fp16_scaling = select_device(device, amp, local_rank if distributed else None)
except ValueError as err:
    sys.exit(f"error: {err}")
if sync_bn and distributed and not device.startswith("cuda"):
    sys.exit("error: --sync_bn=True needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
layout = str(channels_last).lower()  # (True from a config file or an older run's checkpoint reads as "true")
if layout not in ("auto", "true", "false"):
    sys.exit(f"error: --channels_last={channels_last!r}; choose auto, true or false")
# measured: ResNet50 at 224x224 on an H100 trains 1.7 times faster in it; on the CPU, with the whole step (fused
# Adam included), ResNet18 at 64x56 trains at 0.6-0.9 times the speed
channels_last = layout == "true" or (layout == "auto" and device.startswith("cuda"))
if distributed:
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    # the others wait while the master evaluates alone: allow that an hour, not NCCL's default 10 minutes
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=1))
    if not master:
        sys.stdout = open(os.devnull, "w")  # errors and warnings (stderr) still come from every process
scaler = torch.amp.GradScaler("cuda", enabled=fp16_scaling)
torch.backends.cudnn.benchmark = device.startswith("cuda") and not deterministic  # fixed shapes: time the kernels
random.seed(seed + rank)  # the processes draw different augmentations; the weights start as the master's
np.random.seed(seed + rank)
torch.manual_seed(seed + rank)

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
    # images travel as uint8 (a quarter of the float32 bytes to collate, pin and copy to the GPU) and are normalised
    # on the device: in embed_batches for training, in the embedding passes for evaluation
    train_faces = FaceFolder(os.path.join(data_dir, "train"), make_transform(image_size, train=True, pixels=True),
                             identity_depth)
    # random triplets: the batches of mining=none, and triplets.png whatever the batches
    triplet_view = TripletFaceDataset(train_faces, seed, anchor_pattern)
    train_set = PairDataset(train_faces, seed, anchor_pattern) if batch_kind == "pairs" else triplet_view
    gallery = FaceFolder(train_faces.root, make_transform(image_size, train=False, pixels=True), identity_depth)
    probes = FaceFolder(os.path.join(data_dir, "valid"), make_transform(image_size, train=False, pixels=True),
                        identity_depth)
except DatasetError as err:
    sys.exit(f"error: {err}")
if checkpoint and train_faces.classes != checkpoint["classes"]:
    sys.exit(f"error: --resume: the identities of {train_faces.root} ({len(train_faces.classes)}) are not those the "
             f"run trained on ({len(checkpoint['classes'])}); resume on the same data")
if cache_images not in ("auto", "true", "false"):
    sys.exit(f"error: --cache_images={cache_images!r}; choose auto, true or false")
cache_size = sum(folder.cache_bytes() or float("inf") for folder in (train_faces, probes))  # the gallery: shared
if cache_images == "true" or (cache_images == "auto" and cache_size <= 2 ** 31):
    train_faces.cache()
    gallery.cache(like=train_faces)  # the same files, decoded once
    probes.cache()
    print(f"cached the decoded images: {cache_size / 2 ** 20:.0f} MiB")
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


def worker_signals(worker_id):
    """DataLoader workers leave Ctrl-C, which the terminal sends to all the run's processes, to the main process: it
    stops after the current step, then shuts them down. SIGTERM goes back to its default, fatal to them (they are
    forked with the main process's handler, and Python's exit stops them with it); sent to every process (as some
    job schedulers do), it ends the run with their error, and a resumed run starts from the last epoch's last.pth."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


try:
    num_workers = loader_workers(num_workers, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
except ValueError as err:
    sys.exit(f"error: {err}")
loader_args = dict(num_workers=num_workers, pin_memory=device.startswith("cuda"),
                   worker_init_fn=worker_signals,
                   # random triplets and pairs are drawn anew each epoch in this process: workers must copy them anew
                   persistent_workers=num_workers > 0 and batch_kind == "labelled")
if batch_kind == "labelled":
    identities = batch_size // images_per_identity  # per process
    if 2 * world_size <= len(train_faces.classes) < identities * world_size:
        identities = len(train_faces.classes) // world_size
        print(f"P x K batches: only {len(train_faces.classes)} identities, so P = {identities} (batches of "
              f"{identities * images_per_identity} images{' per process' if distributed else ''})")
    try:
        epoch_source = PKBatchSampler(train_faces.targets, identities, images_per_identity, seed, fill, rank,
                                      world_size)
    except ValueError as err:
        sys.exit(f"error: --batch_size={batch_size} --images_per_identity={images_per_identity}: {err}")
    if epoch_source.short:
        print(f"P x K batches: {len(epoch_source.short)} identities have fewer than {images_per_identity} images "
              f"({'their images repeat' if fill == 'repeat' else 'left out'})")
    train_loader = DataLoader(train_faces, batch_sampler=epoch_source, **loader_args)
    epoch_sources = [epoch_source]
elif distributed:  # each process a different share of the epoch's random rows
    shares = DistributedSampler(train_set, world_size, rank, seed=seed, drop_last=True)
    train_loader = DataLoader(train_set, batch_size=batch_size, sampler=shares,
                              drop_last=len(train_set) > batch_size * world_size, **loader_args)
    epoch_sources = [train_set, shares]  # train_set draws new rows per epoch
else:
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size,
                              generator=torch.Generator().manual_seed(seed), **loader_args)
    epoch_sources = [train_set]
# evaluation draws nothing from the training's random streams (a loader takes its seed from its generator)
loader_args.update(batch_size=max(batch_size, 64), generator=torch.Generator())
gallery_loader = DataLoader(gallery, **loader_args)
probe_loader = DataLoader(probes, **loader_args)

# model, loss, optimiser ------------------------------------------------------
memory_format = torch.channels_last if channels_last else torch.preserve_format  # of the weights and the batches
try:
    model = EmbeddingNet(backbone, embedding_dim, head, hidden_dim, pretrained, zero_init_residual,
                         freeze_backbone).to(device, memory_format=memory_format)
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
if sync_bn and distributed:
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same modules, their batch norms replaced
optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "sgd": lambda params, **kw: torch.optim.SGD(params, momentum=0.9, **kw)}
if optimizer not in optimizers:
    sys.exit(f"error: --optimizer={optimizer!r}; choose one of {', '.join(optimizers)}")
trainable = [p for p in list(model.parameters()) + list(criterion.parameters()) if p.requires_grad]
# fused: one kernel for the whole update; on the CPU the per-tensor loop costs ~10 % of a ResNet18 step
opt = optimizers[optimizer](trainable, lr=lr, weight_decay=weight_decay, fused=True)
steps = max(epochs, 1) * len(train_loader)  # the schedules advance per optimiser step


def warmup_cosine(step, total, warmup=0.25):
    """Learning-rate factor of the one-cycle schedule: linear warm-up over the first quarter of the steps, then
    cosine decay to 0. (torch's OneCycleLR fails on runs of a few steps.)"""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


# cosine and onecycle are functions of (step, total steps), so a resumed run with more --epochs spreads them
# over the new total (the learning rate rises again from where the decay had taken it)
schedulers = {
    "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=max(step_size, 1) * len(train_loader),
                                                    gamma=gamma),
    "cosine": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 + math.cos(math.pi * min(1, s / steps))) / 2),
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

if master:
    os.makedirs(out_dir, exist_ok=True)
    save_json(dict(config, device=device, image_size=list(image_size), world_size=world_size,
                   channels_last=channels_last, num_workers=num_workers), os.path.join(out_dir, "config.json"))
    shown = [triplet_view[int(i)] for i in np.linspace(0, len(triplet_view) - 1, min(8, len(triplet_view)))]
    a, p, n, la, ln = (torch.stack([torch.as_tensor(item[k]) for item in shown]) for k in range(5))
    save_triplet_grid(normalize(a), normalize(p), normalize(n), la, ln, train_faces.classes,
                      os.path.join(out_dir, "triplets.png"))

# what trains: the network and the loss, wrapped so that a distributed run averages their gradients over the
# processes, and compiled on request; model and criterion are what evaluates and is saved
network, train_criterion = model, criterion
if distributed:
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    network = DistributedDataParallel(model, device_ids)
    if any(p.requires_grad for p in criterion.parameters()):
        train_criterion = DistributedDataParallel(criterion, device_ids)
if compile:
    network = torch.compile(network)


def embed_batches(*image_batches):
    """Embeddings (float32) of uint8 image batches concatenated, in one forward pass. Each batch goes to the device
    as the DataLoader pinned it and is concatenated there: concatenated first, it would be copied into unpinned
    memory, and the GPU would wait for a blocking transfer (ResNet50 at 224x224 on an H100: 2,506 images/s that
    way, 2,979 this way)."""
    images = torch.cat([device_batch(batch, device, memory_format) for batch in image_batches])
    with autocast:
        return network(images).float()


def pair_loss(e1, e2, target, head):
    """Loss and accuracy of pairs (target 0 = same person): contrastive (`head`: the loss) or the pair classifier's
    BCE (`head`: the classifier)."""
    target = torch.as_tensor(target).to(e1.device)
    if loss == "contrastive":
        return head(e1, e2, target), None
    logits = head(e1, e2)
    same = (target == 0).float()
    return F.binary_cross_entropy_with_logits(logits, same), ((logits > 0).float() == same).float().mean().item()


def batch_loss(batch):
    """(loss, a second figure: share of active triplets or pairs, or accuracy; this process's embeddings) of a
    training batch. In a distributed run, P x K batches are mined (and ArcFace's mean taken) over the global batch;
    random triplets and pairs, independent rows, need no gathering."""
    if batch_kind == "triplets":
        anchor, positive, negative, _, _ = batch
        embeddings = embed_batches(anchor, positive, negative)
        losses = train_criterion(*embeddings.chunk(3))
        return losses.mean(), (losses > 0).float().mean().item(), embeddings
    if batch_kind == "pairs":
        first, second, target, _, _ = batch
        embeddings = embed_batches(first, second)
        return (*pair_loss(*embeddings.chunk(2), target, train_criterion), embeddings)
    images, labels = batch
    embeddings = embed_batches(images)
    return (*train_criterion(*gather_batch(embeddings, labels.to(device))), embeddings)


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
        result["valid_loss"] = pair_loss(first, second, valid_pairs[:, 2], criterion)[0].item()
        if loss == "pair_bce":
            from sklearn.metrics import precision_recall_fscore_support  # 1.5 s to import: only here
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


def reported(path, save):
    """Run `save()`, which writes `path`; a failure (a full disk, no permission, a folder gone) is reported rather
    than raised, so that training goes on. Returns whether it saved."""
    try:
        save()
        return True
    except OSError as err:
        print(f"warning: could not save {path}: {err}; training goes on", file=sys.stderr)
        return False


def rng_state():
    """Every random generator training draws from, as tensors and plain values (weights_only loads them). The P x K
    batches and the random triplets and pairs are drawn from (seed, epoch) alone (set_epoch): nothing to save.
    In a distributed run, every process's generators, gathered: all the processes must call it together."""
    numpy_state = np.random.get_state()
    state = dict(python=random.getstate(), numpy=[numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                 torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state(device) if device.startswith("cuda") else None,
                 loader=train_loader.generator.get_state() if train_loader.generator else None)
    if not distributed:
        return state
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return dict(ranks=states)


def set_rng_state(state):
    if "ranks" in state:
        state = state["ranks"][rank]
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.startswith("cuda"):  # None from the CPU: the GPU's stays as seeded
        torch.cuda.set_rng_state(state["cuda"], device)
    if state["loader"] is not None:
        train_loader.generator.set_state(state["loader"])


def save_checkpoint(name, epoch, metrics, rng=None, position=None):
    """Write a checkpoint atomically, a failure reported (see `reported`); returns whether it saved. `epoch` is the
    last evaluated epoch and `metrics` its evaluation. Without the training state it is a third of the size: all
    that test.py needs. With it (last.pth: given `rng`, the rng_state() of this moment), it holds all that --resume
    continues from, as tensors and plain values: optimiser, schedule, grad scaler, step, history, best epoch,
    training time, random generators and, for a run stopped mid-epoch, its `position` in the epoch (the weights
    are then those of that step)."""
    path = os.path.join(out_dir, name)
    state = dict(model=model.state_dict(), model_config=model.config, image_size=list(image_size),
                 classes=train_faces.classes, epoch=epoch, metrics=metrics, config=config,
                 loss_state=criterion.state_dict())
    if rng:
        state.update(optimizer=opt.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                     step=step, history=history, best=best, train_seconds=train_seconds, rng=rng,
                     position=position, world_size=world_size)
    if loss == "pair_bce":
        state["pair_head_config"] = criterion.config
    return reported(path, lambda: atomic_write(path, lambda f: torch.save(state, f)))


def why_unreadable(path):
    """What Pillow says about `path` now (FaceFolder keeps only the paths of the files it skipped)."""
    try:
        load_rgb(path)
    except Exception as err:  # any: it only describes the file
        return f"{type(err).__name__}: {err}"
    return "readable now"


def save_skipped(listed):
    """Rewrite out_dir/skipped_files.txt if the unreadable files differ from those `listed` before: one
    `path<TAB>reason` line per file skipped at the scan or found unreadable while loading since (empty: none).
    With num_workers > 0 the loading happens in the workers: only their warnings name the files they find.
    Returns the files the file lists."""
    skipped = list(dict.fromkeys(train_faces.skipped + gallery.skipped + probes.skipped))
    if skipped == listed:
        return listed
    path = os.path.join(out_dir, "skipped_files.txt")

    def write(f):
        f.writelines(f"{p}\t{why_unreadable(p)}\n" for p in skipped)
    return skipped if reported(path, lambda: atomic_write(path, write, mode="w")) else listed


def poisoned():
    """Whether a weight or running statistic of the network or the loss has become NaN or infinite."""
    tensors = list(model.state_dict().values()) + list(criterion.state_dict().values())
    return not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def stop_at_nan(what, epoch, batch):
    """Exit without saving: a NaN or infinite loss or weight would spoil every checkpoint after it. All the
    processes call it together."""
    message = (f"error: {what} in epoch {epoch} at step {batch} of {len(train_loader)}. Training stopped without "
               f"saving: {out_dir}/last.pth and tb_model.pth keep the last good state. Try a lower --lr (now {lr:g}), "
               f"--amp=False, or check the data for broken images")
    wind_up()
    sys.exit(message)


stop_signal = 0  # the SIGINT or SIGTERM that asked training to stop (0: none yet)


def on_stop_signal(signum, frame):
    """The first SIGINT (Ctrl-C) or SIGTERM lets the current step finish (the training loop then stops); a second
    one exits at once (atomic_write leaves no half-written file behind). Under torchrun the second is ignored: the
    launcher follows the terminal's Ctrl-C with a SIGTERM of its own, and kills what has not ended 30 s later."""
    global stop_signal
    if stop_signal:
        if distributed:
            return
        sys.exit(128 + signum)
    stop_signal = signum
    if master:  # os.write: print is not safe in a signal handler
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after the current step to save {out_dir}/last.pth"
                    f"{'' if distributed else '; press Ctrl-C again to quit at once'}\n".encode())


def agreed(*flags):
    """Each flag's largest value over the processes of a distributed run (one small all_reduce), so that they all
    stop at the same step, whichever of them got the signal or saw the loss go bad."""
    if not distributed:
        return flags
    values = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [int(v) for v in values.tolist()]


def wind_up():
    """Before exiting, what must not be left to the interpreter's shutdown: persistent DataLoader workers (left,
    each is waited for 5 s, then killed with an error) are stopped by dropping the loader's iterator; and all the
    processes of a distributed run leave the process group together, the wrappers that hold it first, so that
    gloo's and NCCL's threads end here (at shutdown they can abort the interpreter)."""
    global network, train_criterion, train_loader, batches, bar, gallery_loader, probe_loader
    train_loader = batches = bar = gallery_loader = probe_loader = None  # the last references to their iterators
    if distributed:
        dist.barrier()
        network = train_criterion = None
    gc.collect()
    if distributed:
        dist.destroy_process_group()


def stop_for_signal(where, position=None):
    """Exit after a stop signal with 128 + its number (130: SIGINT, 143: SIGTERM), naming the command that resumes
    the run. Mid-epoch, last.pth is saved first with the `position` in the epoch; after an epoch, its saves just
    ran. A resumed run goes on from that very step, as if never stopped. All the processes call it together."""
    path = os.path.join(out_dir, "last.pth")
    if position and poisoned():
        stop_at_nan("the weights are no longer finite", epoch, position["batches"])
    saved = last_saved
    if position:
        rng = rng_state()
        if master:
            saved = save_checkpoint("last.pth", history[-1]["epoch"], metrics, rng, position)
    wind_up()  # after the master's save: torchrun stops the others when one process exits
    launcher = f"torchrun --nproc_per_node={world_size}" if distributed else "python"
    if master:
        print(f"{signal.Signals(stop_signal).name} {where}: " + (f"saved {path}" if saved else
              f"the save failed, so {path} keeps the state saved before") +
              f"\nresume with: {launcher} train.py --resume={shlex.quote(path)}", file=sys.stderr)
    sys.exit(128 + stop_signal)


# training --------------------------------------------------------------------
collapse = CollapseDetector(margin) if loss == "triplet" else None
history, best, train_seconds, step, listed, last_saved = [], None, 0.0, 0, None, None
if checkpoint:
    model.load_state_dict(checkpoint["model"])
    criterion.load_state_dict(checkpoint["loss_state"])
    opt.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:  # empty when saved without float16 loss scaling (CPU, bfloat16)
        scaler.load_state_dict(checkpoint["scaler"])
    history, step, train_seconds, metrics = (checkpoint[k] for k in ("history", "step", "train_seconds", "metrics"))
    # tb_model.pth is rewritten only by an epoch better than `best`: in a folder without it, the best starts afresh
    best = checkpoint["best"] if os.path.isfile(os.path.join(out_dir, "tb_model.pth")) else None
    saved_world = checkpoint.get("world_size", 1)
    if saved_world == world_size:
        set_rng_state(checkpoint["rng"])
    elif position:
        sys.exit(f"error: --resume: {resume_path} stopped in the middle of an epoch of a run of {saved_world} "
                 f"processes; resume it with {saved_world}, or resume the last.pth of an epoch's end")
    else:
        print(f"resuming a run of {saved_world} processes with {world_size}: the random augmentation starts anew")
    print(f"resuming {resume_path} at epoch {first_epoch}/{epochs}"
          + (f", step {position['batches'] + 1} of {len(train_loader)}" if position else ""))
signal.signal(signal.SIGINT, on_stop_signal)
signal.signal(signal.SIGTERM, on_stop_signal)
for epoch in range(first_epoch, epochs + 1):  # epoch 0 only evaluates the untrained network
    train_loss = train_second = None
    if epoch > 0:
        model.train()
        for source in epoch_sources:
            source.set_epoch(epoch)
        if position:  # resumed mid-epoch: the states the epoch began with draw the same batches
            set_rng_state(position["rng"])
        epoch_rng, batches = rng_state(), iter(train_loader)
        started, count, total, second_total, images = time.time(), 0, 0.0, 0.0, 0
        if position:  # those trained on before the stop are loaded and passed over; on from there
            count, total, second_total = position["batches"], position["loss_total"], position["second_total"]
            for _ in range(count):
                next(batches)
            set_rng_state(checkpoint["rng"])
            position = None
        bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", total=len(train_loader), initial=count, leave=False,
                   dynamic_ncols=True, disable=None if master else True)
        for batch in bar:
            batch_value, second, embeddings = batch_loss(batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(batch_value).backward()
            scaler.step(opt)  # float16 scaling skips a step whose gradients overflowed: not an error
            scaler.update()
            scheduler.step()
            value = batch_value.item()
            signalled, diverged = agreed(stop_signal, not math.isfinite(value))
            if diverged:
                stop_at_nan(f"the training loss is {value}" if not math.isfinite(value) else
                            "the training loss of another process is not finite", epoch, count + 1)
            stop_signal = signalled
            step, count, total = step + 1, count + 1, total + value
            images += len(embeddings) * world_size
            second_total += second or 0.0
            shown_second = {} if second is None else {second_figure: f"{second:.2f}"}
            bar.set_postfix(loss=f"{total / count:.4f}", **shown_second)
            if collapse is not None and collapse.update(value, embeddings):
                tqdm.write(f"warning: the embeddings are collapsing (loss {value:.3f} ~ margin {margin}, "
                           f"spread {collapse.spread:.3f} for {collapse.patience} steps): try a lower --lr, "
                           f"--zero_init_residual=True, --mining=semihard, or a larger --margin")
            if stop_signal and count < len(train_loader):  # after the epoch's last step, the epoch ends and saves
                train_seconds += time.time() - started
                stop_for_signal(f"in epoch {epoch} after step {count} of {len(train_loader)}",
                                dict(epoch=epoch, batches=count, loss_total=total, second_total=second_total,
                                     rng=epoch_rng))
        if poisoned():  # an update can overflow the weights while its own loss was finite
            stop_at_nan("the weights are no longer finite", epoch, count)
        train_loss, train_second = total / count, (second_total / count if second is not None else None)
        epoch_seconds = time.time() - started
        train_seconds += epoch_seconds
        # bench.py sets this throughput against the bare network's (a resumed epoch: of its remaining steps)
        speed = dict(epoch_seconds=round(epoch_seconds, 3), images=images,
                     images_per_second=round(images / epoch_seconds, 2))
    # a stop signal gets the epoch evaluated and saved (one during the evaluation stops the next step)
    stop_signal = agreed(stop_signal)[0]
    evaluating = epoch % max(eval_every, 1) == 0 or epoch == epochs or stop_signal
    rng = rng_state() if evaluating else None
    if master:  # the others go on to the next epoch's first step, where they wait for it
        started = time.time()
        if evaluating:
            metrics = evaluate()
        history.append(dict(epoch=epoch, step=step, train_loss=train_loss, **{f"train_{second_figure}": train_second},
                            **(metrics if evaluating else {}), train_seconds=round(train_seconds, 1),
                            lr=opt.param_groups[0]["lr"], **(speed if epoch else {}),
                            valid_seconds=round(time.time() - started, 3),
                            save_seconds=None))  # known after the saves below: last.pth keeps None
        improved = evaluating and (best is None or metrics["valid_identification"] > best["valid_identification"])
        history_path, curves_path = os.path.join(out_dir, "history.json"), os.path.join(out_dir, "curves.png")
        if improved:
            best = history[-1]
            save_checkpoint("tb_model.pth", epoch, metrics)
        if evaluating:
            last_saved = save_checkpoint("last.pth", epoch, metrics, rng)
            if save_every and epoch and epoch % save_every == 0:
                save_checkpoint(f"epoch_{epoch}.pth", epoch, metrics)
            reported(curves_path, lambda: plot_history(history, curves_path, x=plot_x))
        listed = save_skipped(listed)
        history[-1]["save_seconds"] = round(time.time() - started - history[-1]["valid_seconds"], 3)  # with the plot
        reported(history_path, lambda: save_json(history, history_path))
        print(f"epoch {epoch}/{epochs} | train loss {'-' if train_loss is None else f'{train_loss:.4f}'} | "
              + ("" if train_second is None else f"{second_figure} {100 * train_second:.0f}% | ")
              + (f"valid loss {metrics['valid_loss']:.4f} | "
                 f"valid triplets {100 * metrics['valid_triplet_accuracy']:.1f}% | "
                 + (f"valid pair F1 {metrics['valid_pair_f1']:.3f} | " if "valid_pair_f1" in metrics else "")
                 + f"valid top-1 {100 * metrics['valid_identification']:.2f}% | " if evaluating else "")
              + f"{train_seconds:.0f}s" + (" | best" if improved else ""))
    if stop_signal and epoch < epochs:
        stop_for_signal(f"after epoch {epoch}")

if master:
    print(f"best valid top-1 {100 * best['valid_identification']:.2f}% at epoch {best['epoch']}; "
          f"{train_seconds:.0f}s of training. Saved {os.path.join(out_dir, 'tb_model.pth')}\n"
          f"evaluate it with: python test.py --checkpoint={os.path.join(out_dir, 'tb_model.pth')}")
wind_up()
