"""Train a face-embedding network: triplet (random or mined), contrastive, pair-classifier or ArcFace loss, and/or
distillation of a face network trained elsewhere (--teacher).

    python train.py                          # the defaults below (AT&T faces, fetched on first use)
    python train.py --backbone=resnet18 --epochs=20
    python train.py configs/NAME.py --lr=1e-4  # a file of overrides, then flags
    python train.py --resume=out/last.pth    # continue a run where it stopped, with its own settings
    python train.py --teacher=dlib --loss=none   # a student that learns dlib's face descriptor alone
    torchrun --standalone --nproc_per_node=4 train.py   # DistributedDataParallel, one process per GPU

Every constant below can be overridden by a flag of the same name. Writes to out_dir: tb_model.pth (the best
epoch by select_on), last.pth (all a resumed run needs), config.json, history.json, curves.png,
triplets.png and skipped_files.txt (the unreadable images, with the reason). Ctrl-C or SIGTERM stops after the
current step, saves last.pth and prints the command that resumes the run; a second Ctrl-C quits at once.
Under torchrun, batch_size is per process (the global batch is N times larger), and process 0 alone
evaluates, prints and saves.
"""
import datetime
import os
import random
import shlex
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import configurator
from align import AlignmentUnavailable, read_alignment
from checkpoint import (CheckpointError, Checkpointer, RandomState, RunState, ShardedCentres, resume_config,
                        resume_training, training_state)
from distill import DISTILL_LOSSES, Distillation, centred, teacher_centres, teacher_targets
from data_utils import AUGMENTATIONS, DatasetError, FaceFolder, as_hw, make_transform, some_names, write_skipped
from engine import (OPTIMIZERS, SCHEDULES, SELECTED, CollapseDetector, NonFinite, StopRequested, StopSignals,
                    TrainingStep, agreed, build_optimizer, build_schedule, check_config, describe,
                    deterministic_kernels, epoch_summary, evaluate, poisoned, selection_key, shut_down,
                    train_one_epoch, worker_signals)
from figures import plot_history, save_triplet_examples
from evaluation import held_out_pairs
from files import reported, save_json
from losses import ARCFACE_FORMS, OBJECTIVES, batch_rows, build_objective
from mining import MINING
from model import BACKBONES, HEADS, EmbeddingNet, PretrainedUnavailable, select_device
from partial_fc import build_partial_fc
from pairs import read_verification_bins
from prepare import ensure_att
from pretrained import init_weights, onnx_pixel_norm
from sampling import (TripletFaceDataset, draw_pairs, draw_triplets, loader_workers, train_loader_for,
                      training_images)

# -----------------------------------------------------------------------------
# data
data_dir = "data/att_faces"  # prepared dataset: train/ and valid/ identity folders (its test/ is never read here),
#   or insightface's train.rec (+ train.idx) with .bin verification sets beside it (faces_emore/), no valid/ needed
out_dir = "out"  # checkpoints, history, curves and the run config go here
identity_depth = 1  # folder level of the identity folders below train/ and valid/ (1: train/<identity>/...)
anchor_pattern = ""  # only images whose file name contains this are anchors (e.g. "script" for ID photos)
image_size = (64, 56)  # network input, height,width (one number: square); AT&T photos are 112x92
batch_size = 32  # triplets or pairs per step; images per step for P x K batches
images_per_identity = 4  # K of a P x K batch (P = batch_size // K)
fill = "repeat"  # P x K: identities with fewer than K images: repeat their images | drop them
num_workers = -1  # DataLoader worker processes: -1 auto (0 on the CPU, up to 8 on CUDA) | 0 (the main process) | N
grayscale = 0.0  # share of training images shown in grayscale (a colour-trained network that must serve grey photos)
augment = "light"  # training images: light (rotation, crop, flip) | strong (+ scale, brightness, contrast and
#   saturation jitter: for many people with few photos each, whom a network otherwise learns by heart)
cache_images = "auto"  # decode each image once, keep it resized in memory: auto (when all fit in 2 GiB; else
#   images, records too, are read as the batches want them)
val_bins = ""  # insightface verification sets scored at each evaluation, comma-separated: names of data_dir's
#   (lfw,cfp_fp,agedb_30: data_dir/lfw.bin ...) or paths of .bin files; they make valid/ optional
# model
backbone = "resnet50"  # a torchvision ResNet, VGG16, AlexNet, smallcnn for small grayscale data, insightface's
#   iresnet18-100 and mobilefacenet for 112x112 aligned faces, or dlib_resnet (dlib's face descriptor network)
pretrained = False  # start from torchvision's ImageNet weights (downloads once into the torch cache)
init_from = ""  # start from the network of this checkpoint, insightface backbone.pth or dlib_resnet (dlib's face
#   descriptor network, face-recognition-models' file read into torch); the same backbone; a head of another size
#   starts afresh
freeze_backbone = False  # train only what sits on top (vgg16/alexnet: their fully connected layers stay trainable)
zero_init_residual = True  # ResNets: start each residual branch's last BatchNorm at zero (from-scratch stability)
head = "mlp"  # mlp: Linear(features, hidden_dim)-BatchNorm-ReLU-Linear(hidden_dim, embedding_dim) | linear
hidden_dim = 512  # width of the mlp head
embedding_dim = 128  # size of the L2-normalised embedding
# loss
loss = "arcface"  # triplet | contrastive (siamese pairs) | pair_bce (pair classifier) | arcface | cosface | none
#   (the teacher alone: no labels used)
mining = "none"  # none: random triplets / balanced pairs; else mined in P x K batches (semihard: FaceNet's)
margin = 0.2  # triplet: in units of the distance below; contrastive: Euclidean distance
squared = True  # triplet: squared Euclidean distances (FaceNet); False: plain Euclidean
arcface_scale = 30.0  # arcface and cosface: logit scale
arcface_margin = 0.5  # arcface: additive angular margin, radians
arcface_form = "paper"  # arcface: paper: cos(theta + margin), cos(theta) - margin * sin(margin) past pi (insightface
#   until 2022) | arcface_torch: its form since December 2022, cos(theta + margin) without that fallback and with the
#   gradient of cos(theta) (its MS1MV3 recipe's)
cosface_margin = 0.35  # cosface: additive cosine margin
pair_hidden_dim = 64  # pair_bce: width of the pair classifier
partial_fc = 0.0  # arcface and cosface: PartialFC, the class centres sharded over torchrun's processes, each step
#   scoring the global batch's classes and this sample rate of the others: 0 off | above 0 up to 1 (1: every class)
# distillation
teacher = ""  # a face network to learn from: dlib | dlib_resnet (its network in torch: batched, on the GPU too) |
#   CHECKPOINT.pth (insightface's backbone.pth too) | MODEL.onnx
onnx_norm = ""  # --teacher=MODEL.onnx: its input's MEAN,STD (or three means, three stds) in 0-255 pixel units;
#   empty: its side file's (MODEL.onnx.json), else insightface's 127.5,127.5
distill = 1.0  # weight of the teacher's term beside the loss's
distill_loss = "cosine"  # cosine: the student's embedding (projected where sizes differ) to the teacher's |
#   relational: the batch's pairwise similarities to the teacher's | inherited: ArcFace (--arcface_scale,
#   --arcface_margin) over fixed class centres, the teacher's mean embedding of each person (ProxylessKD)
distill_centre = True  # learn the teacher's embeddings less their mean over the training photos (then normalised)
teacher_cache = ""  # folder of the teacher's embeddings of the training photos, computed once; empty: <out_dir>/
#   teacher_cache (share one between runs: it is keyed by teacher and photo)
teacher_views = 0  # augmented views of each training photo the teacher also embeds (turned, scaled, recoloured,
#   blurred, half blended with another photo); each item draws one of its photo's views or the photo itself
# optimiser
optimizer = "adam"  # adamw: decoupled weight decay; sgd: momentum 0.9
lr = 2e-3  # learning rate (peak learning rate for onecycle)
weight_decay = 0.0  # L2 penalty (decoupled for adamw)
epochs = 30  # passes over the training images; 0 evaluates and saves the untrained network
lr_schedule = "onecycle"  # step: StepLR | cosine: cosine decay to 0 | onecycle: warm-up then cosine decay
step_size = 5  # StepLR: multiply the learning rate by gamma every step_size epochs
gamma = 0.1
# logging
verbosity = 0  # 0: summary lines | 1: + architecture | 2: + optimiser | 3: + parameter counts per module
select_on = "auto"  # tb_model.pth is the epoch best by: top1 of valid/ probes of trained people | pairs: 10-fold
#   verification of valid/ people absent from train/ (never trained on) | bins: the mean 10-fold accuracy of the
#   val_bins sets | auto: bins when val_bins is given, else pairs when valid/ has such people, else top1
eval_every = 1  # evaluate, keep the best and save last.pth every N epochs (and before the first, after the last)
save_every = 0  # also keep epoch_N.pth every N evaluated epochs (0: only tb_model.pth and last.pth)
plot_x = "epoch"  # x axis of curves.png: epoch | step (iterations)
# system
device = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
amp = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
seed = 0  # same seed and data on the CPU -> the same weights
channels_last = "auto"  # train in NHWC memory format: auto (on CUDA, for its tensor cores; not on the CPU)
compile = False  # torch.compile the network for training (PyTorch 2; the first steps wait for the compiler)
sync_bn = False  # torchrun on GPUs: batch-norm statistics over the global batch rather than each GPU's share
deterministic = False  # CUDA: deterministic kernels only, slower (an op without one stops the run); the CPU always
resume = ""  # continue a stopped run: the path of its last.pth, or last (= <out_dir>/last.pth); "": a fresh run
# -----------------------------------------------------------------------------
CHOICES = dict(fill=("repeat", "drop"), augment=AUGMENTATIONS, cache_images=configurator.TRISTATE,
               backbone=tuple(BACKBONES), head=HEADS, loss=tuple(OBJECTIVES), mining=MINING, optimizer=OPTIMIZERS,
               lr_schedule=SCHEDULES, distill_loss=DISTILL_LOSSES, plot_x=("epoch", "step"),
               channels_last=configurator.TRISTATE, select_on=("auto", "top1", "pairs", "bins"),
               arcface_form=ARCFACE_FORMS)
defaults = configurator.constants(globals())
config = configurator.parse(globals(), description=__doc__.split("\n")[0], choices=CHOICES)

# the configuration, checked in one place before anything is scanned, started or built -------------------------
checkpoint = None
try:
    if resume:  # the run goes on with its own settings (checkpoint.resume_config says which may change)
        config, checkpoint = resume_config(config, defaults, resume, out_dir)
        config = configurator.normalize_choices(config, CHOICES)
        globals().update(config)
    check_config(config)
    if data_dir == defaults["data_dir"]:
        ensure_att(data_dir)  # the first run: AT&T faces through scikit-learn
except (CheckpointError, configurator.ConfigError, DatasetError) as err:
    sys.exit(f"error: {'--resume: ' if isinstance(err, CheckpointError) else ''}{err}")
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
    if sync_bn and distributed and not device.startswith("cuda"):
        raise configurator.ConfigError("sync_bn", "needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU")
    workers = loader_workers(num_workers, device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
except ValueError as err:
    sys.exit(f"error: {err}")
deterministic_kernels(device)
# measured: ResNet50 at 224x224 on an H100 trains 1.7 times faster in it, ResNet18 at 64x56 on the CPU slower
nhwc = channels_last == "true" or (channels_last == "auto" and device.startswith("cuda"))
memory_format = torch.channels_last if nhwc else torch.preserve_format  # of the weights and the batches
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
image_size = as_hw(image_size)
rows = batch_rows(loss, mining)  # what batches train: "triplets", "pairs" or None (P x K batches)
# images travel as uint8 (a quarter of the float32 bytes to collate, pin and copy to the GPU) and are normalised on
# the device
evaluation_transform = make_transform(image_size, train=False, pixels=True)
try:
    training_transform = make_transform(image_size, train=True, pixels=True, grayscale=grayscale, augment=augment)
    train_faces = training_images(data_dir, training_transform, identity_depth)  # train/ folders, or train.rec
    triplet_view = TripletFaceDataset(train_faces, seed, anchor_pattern)  # shown in triplets.png
    bins = read_verification_bins(val_bins, data_dir)  # read once; embedded anew at each evaluation
    # valid/ (a .rec dataset has none) is optional when .bin sets can choose the checkpoint
    has_valid = os.path.isdir(os.path.join(data_dir, "valid")) or not bins
    probes = FaceFolder(os.path.join(data_dir, "valid"), evaluation_transform, identity_depth) if has_valid else None
    gallery = training_images(data_dir, evaluation_transform, identity_depth) if has_valid else None
except (DatasetError, configurator.ConfigError) as err:
    sys.exit(f"error: {err}")
datasets = [faces for faces in (train_faces, gallery, probes) if faces is not None]
if checkpoint and train_faces.classes != checkpoint["classes"]:
    sys.exit(f"error: --resume: the identities of {train_faces.source} ({len(train_faces.classes)}) are not those "
             f"the run trained on ({len(checkpoint['classes'])}); resume on the same data")
cache_size = sum(faces.cache_bytes() or float("inf") for faces in datasets if faces is not gallery)  # (it shares)
if cache_images == "true" or (cache_images == "auto" and cache_size <= 2 ** 31):
    train_faces.cache()
    if has_valid:
        gallery.cache(like=train_faces)  # the same images, decoded once
        probes.cache()
    print(f"cached the decoded images: {cache_size / 2 ** 20:.0f} MiB")
targets = None  # the teacher's targets of the training items' photos and views, by row
if teacher:
    try:
        targets, taught_by, train_faces.views = teacher_targets(
            teacher, train_faces, teacher_cache or os.path.join(out_dir, "teacher_cache"), data_dir, device,
            max(batch_size, 64), rank, world_size, distributed, onnx_pixel_norm(onnx_norm, teacher), teacher_views)
    except (CheckpointError, AlignmentUnavailable) as err:
        sys.exit(f"error: --teacher: {err}")
    train_faces.with_items, targets = True, (centred(targets) if distill_centre else targets).to(device)
lonely = train_faces.single_image_identities()
if lonely and rows in ("triplets", "pairs"):  # (P x K batches repeat their image: the sampler says so)
    print(f"warning: {len(lonely)} identities have a single training image and serve only as negatives: "
          f"{some_names(lonely)}")
valid_rows, probe_targets, probe_classes = dict(held_out=()), [], []
if has_valid:
    valid_rng = np.random.default_rng(seed)  # the same valid triplets and pairs every epoch
    valid_rows = dict(triplets=draw_triplets(probes.targets, probes.by_label, valid_rng))
    valid_rows["pairs"] = draw_pairs(probes.targets, probes.by_label, valid_rng)
    # valid/ people absent from train/: the checkpoint can be chosen on people never trained on
    valid_rows["held_out"] = held_out_pairs(probes.targets, probes.classes, train_faces.classes, valid_rng)
    probe_targets, probe_classes = probes.targets, probes.classes
try:
    select_key = selection_key(select_on, probe_targets, probe_classes, train_faces.classes, valid_rows["held_out"],
                               list(bins))
except configurator.ConfigError as err:
    sys.exit(f"error: {err}")
loader_args = dict(num_workers=workers, pin_memory=device.startswith("cuda"), worker_init_fn=worker_signals,
                   # random triplets and pairs are drawn anew each epoch in this process: workers must copy them anew
                   persistent_workers=workers > 0 and rows is None)
try:
    train_loader, epoch_sources = train_loader_for(train_faces, rows, batch_size, images_per_identity, seed, fill,
                                                   anchor_pattern, rank, world_size, distributed, **loader_args)
except ValueError as err:
    sys.exit(f"error: --batch_size={batch_size} --images_per_identity={images_per_identity}: {err}")
# evaluation draws nothing from the training's random streams (a loader takes its seed from its generator)
loader_args.update(batch_size=max(batch_size, 64), generator=torch.Generator())
gallery_loader, probe_loader = ((DataLoader(gallery, **loader_args), DataLoader(probes, **loader_args)) if has_valid
                                else (None, None))
chosen_on = dict(valid_identification="the top-1 of valid images of trained people",
                 valid_pairs_accuracy=f"{len(valid_rows['held_out'])} verification pairs of valid people never "
                                      f"trained on", bins_accuracy=f"the mean accuracy of {', '.join(bins)}.bin")
print(f"data: {len(train_faces.classes)} identities, {len(train_faces)} train {train_faces.unit}s"
      + (f", {len(probes)} valid images of {len(probes.classes)} identities" if has_valid else "")
      + "".join(f", {name}.bin {len(same)} pairs" for name, (_, same) in bins.items())
      + f"; training on {rows or 'P x K batches'}; choosing the checkpoint on {chosen_on[select_key]}"
      + (f" ({len(triplet_view)} anchors matching {anchor_pattern!r})" if anchor_pattern else ""))

# model, objective, optimiser -------------------------------------------------
try:
    model = EmbeddingNet(backbone, embedding_dim, head, hidden_dim, pretrained and not init_from, zero_init_residual,
                         freeze_backbone, checkpoint and checkpoint["model_config"].get("input_norm"))
    if init_from and not checkpoint:
        print(f"network initialised from {init_from}: its {' and '.join(init_weights(model, init_from))}")
    model = model.to(device, memory_format=memory_format)
    options = dict(mining=mining, margin=margin, squared=squared, embedding_dim=embedding_dim,
                   num_classes=len(train_faces.classes), arcface_scale=arcface_scale, arcface_margin=arcface_margin,
                   pair_hidden_dim=pair_hidden_dim, cosface_margin=cosface_margin, arcface_form=arcface_form)
    objective = (build_partial_fc(loss, partial_fc=partial_fc, rank=rank, world_size=world_size, **options)
                 if partial_fc else build_objective(loss, **options)).to(device)
    inherited = (teacher_centres(targets, np.repeat(train_faces.targets, teacher_views + 1), len(train_faces.classes))
                 if teacher and distill_loss == "inherited" else None)
    distiller = (Distillation(embedding_dim, targets.shape[1], distill_loss, inherited, arcface_scale, arcface_margin)
                 .to(device) if teacher else None)
except CheckpointError as err:
    sys.exit(f"error: --init_from: {err}")
except (PretrainedUnavailable, ValueError) as err:
    sys.exit(f"error: {err}")
if sync_bn and distributed:
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same modules, their batch norms replaced
learning = [model, objective] + ([distiller] if distiller else [])
trainable = [p for part in learning for p in part.parameters() if p.requires_grad]
opt = build_optimizer(optimizer, trainable, lr, weight_decay)
centres = ShardedCentres(objective, opt) if partial_fc else None  # saved whole, resumed in shares
scheduler = build_schedule(lr_schedule, opt, len(train_loader), epochs, step_size, gamma)
print(f"model: {backbone}{' (frozen)' if freeze_backbone else ''} + {head} head -> {embedding_dim}-d, "
      f"{sum(p.numel() for p in trainable) / 1e6:.1f} M trainable parameters, {loss} loss, on {device}"
      + (f" with {autocast.fast_dtype} autocast" if isinstance(autocast, torch.autocast) else ""))
if centres:
    print(objective.summary())
if teacher:
    print(f"teacher: {taught_by}, {targets.shape[1]}-d embeddings"
          + (f" of each photo and {teacher_views} augmented views of it" if teacher_views else "")
          + f"; {distill_loss} distillation x {distill:g}"
          + (f", projected from {embedding_dim}-d" if isinstance(distiller.projection, torch.nn.Linear) else ""))
describe(model, objective, opt, lr_schedule, verbosity)
if master:
    os.makedirs(out_dir, exist_ok=True)
    save_json(dict(config, device=device, image_size=list(image_size), world_size=world_size,
                   channels_last=nhwc, num_workers=workers), os.path.join(out_dir, "config.json"))
    save_triplet_examples(triplet_view, os.path.join(out_dir, "triplets.png"))
# what trains: the network and the objective, wrapped so that a distributed run averages their gradients over the
# processes (not PartialFC's: its processes hold different centres), and compiled on request; model and objective
# are what evaluates and is saved
network, train_objective, train_distiller = model, objective, distiller
if distributed:
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    network = DistributedDataParallel(model, device_ids)
    if any(p.requires_grad for p in objective.parameters()) and not centres:
        train_objective = DistributedDataParallel(objective, device_ids)
    if distiller and any(p.requires_grad for p in distiller.parameters()):
        train_distiller = DistributedDataParallel(distiller, device_ids)
if compile:
    network = torch.compile(network)
step = TrainingStep(network, train_objective, opt, scheduler, scaler, device, autocast, memory_format,
                    gather=distributed, stat=objective.stat, distiller=train_distiller, targets=targets,
                    weight=distill)

# resume ------------------------------------------------------------------------
randomness = RandomState(device, train_loader.generator, (rank, world_size) if distributed else None)
run, metrics = RunState(), None
if checkpoint:
    try:
        run = resume_training(checkpoint, (model, objective, opt, scheduler, scaler), randomness, world_size,
                              os.path.join(out_dir, "tb_model.pth"), centres=centres, distiller=distiller)
    except CheckpointError as err:
        sys.exit(f"error: --resume: {err}")
    metrics, checkpoint = checkpoint["metrics"], None  # loaded: PartialFC's whole centres need not stay in memory
    print(f"resuming {resume} at epoch {run.next_epoch()}/{epochs}"
          + (f", step {run.position['batches'] + 1} of {len(train_loader)}" if run.position else ""))
saver = Checkpointer(out_dir, model, objective, config, train_faces.classes, image_size, read_alignment(data_dir),
                     centres, distiller)
last_path = saver.path("last.pth")
stop = StopSignals(distributed, f"stopping after the current step to save {last_path}" if master else None).install()
loaders = [loader for loader in (train_loader, gallery_loader, probe_loader) if loader is not None]


def stop_at_nan(err):
    """Exit without saving: a non-finite loss or weight would spoil every checkpoint after it."""
    shut_down(loaders, step, distributed)
    sys.exit(f"error: {err}. Training stopped without saving: {out_dir}/last.pth and tb_model.pth keep the last "
             f"good state. Try a lower --lr (now {lr:g}), --amp=False, or check the data for broken images")


def stop_for_signal(where, position=None):
    """Exit with 128 + the signal's number (130: SIGINT, 143: SIGTERM), naming the command that resumes the run.
    Mid-epoch, last.pth is saved first with the `position` in the epoch; after an epoch, its saves just ran."""
    saved = last_saved
    if position:
        if agreed([poisoned(model, objective)], device, distributed)[0]:  # (PartialFC: each its own centres)
            stop_at_nan(NonFinite("the weights are no longer finite", position["epoch"], position["batches"],
                                  len(train_loader)))
        run.rng, run.position, whole = randomness.capture(), position, saver.gather()
        if master:
            saved = saver.save("last.pth", run.history[-1]["epoch"], metrics,
                               training_state(run, opt, scheduler, scaler, world_size), whole)
    shut_down(loaders, step, distributed)  # after the master's save: torchrun stops the others when one exits
    launcher = f"torchrun --nproc_per_node={world_size}" if distributed else "python"
    if master:
        print(f"{stop.name} {where}: " + (f"saved {last_path}" if saved else f"the save failed, so {last_path} "
              f"keeps the state saved before") + f"\nresume with: {launcher} train.py --resume="
              f"{shlex.quote(last_path)}", file=sys.stderr)
    sys.exit(128 + stop.signum)


# training --------------------------------------------------------------------
collapse = CollapseDetector(margin) if loss == "triplet" else None
listed, last_saved = None, None
for epoch in range(run.next_epoch(), epochs + 1):  # epoch 0 only evaluates the untrained network
    train_stats = {f"train_{objective.stat}": None, "train_loss": None}
    if epoch > 0:
        model.train()
        for source in epoch_sources:
            source.set_epoch(epoch)
        try:
            train_stats = train_one_epoch(step, train_loader, epoch, run, stop, randomness, distributed,
                                          world_size, collapse, master, f"epoch {epoch}/{epochs}")
        except StopRequested as stopped:
            stop_for_signal(f"in epoch {epoch} after step {stopped.position['batches']} of {len(train_loader)}",
                            stopped.position)
        except NonFinite as err:
            stop_at_nan(err)
        # an update can overflow the weights while its own loss was finite (PartialFC: in one process's centres)
        if agreed([poisoned(model, objective)], device, distributed)[0]:
            stop_at_nan(NonFinite("the weights are no longer finite", epoch, len(train_loader), len(train_loader)))
    # a stop signal gets the epoch evaluated and saved (one during the evaluation stops the run after it)
    stopping = stop.settle(agreed([stop.signum], device, distributed)[0])
    evaluating = epoch % eval_every == 0 or epoch == epochs or stopping
    run.rng = randomness.capture() if evaluating else None
    whole = saver.gather() if evaluating else None  # PartialFC: every process hands its centres to the master
    if master:  # the others wait for it at the agreement below
        started = time.time()
        if evaluating:
            metrics = evaluate(model, objective, gallery_loader, probe_loader, train_faces.classes, valid_rows,
                               device, autocast, bins, evaluation_transform, loader_args["batch_size"])
        run.history.append(dict(epoch=epoch, step=run.step, **train_stats, **(metrics if evaluating else {}),
                                train_seconds=round(run.train_seconds, 1), lr=opt.param_groups[0]["lr"],
                                valid_seconds=round(time.time() - started, 3), save_seconds=None))
        improved = evaluating and run.improved(metrics, select_key, "valid_loss" if OBJECTIVES[loss].decides else None)
        if improved:
            run.best = run.history[-1]
        if evaluating:
            last_saved = saver.save_epoch(run, epoch, metrics, training_state(run, opt, scheduler, scaler, world_size),
                                          save_every, whole)
            reported(saver.path("curves.png"),
                     lambda: plot_history(run.history, saver.path("curves.png"), x=plot_x, best_by=select_key))
        listed = write_skipped(datasets, saver.path("skipped_files.txt"), listed)
        run.history[-1]["save_seconds"] = round(time.time() - started - run.history[-1]["valid_seconds"], 3)
        reported(saver.path("history.json"), lambda: save_json(run.history, saver.path("history.json")))
        print(epoch_summary(epoch, epochs, train_stats, metrics if evaluating else None, objective.stat,
                            run.train_seconds, improved))
    # agreed again: a signal during the evaluation reached one process (an epoch not saved stops at the next step)
    stopping = stop.settle(agreed([stop.signum], device, distributed)[0]) or stopping
    if stopping and evaluating and epoch < epochs:
        stop_for_signal(f"after epoch {epoch}")

if master:
    print(f"best {SELECTED[select_key]} {100 * run.best[select_key]:.2f}% at epoch {run.best['epoch']}; "
          f"{run.train_seconds:.0f}s of training. Saved {saver.path('tb_model.pth')}\n"
          f"evaluate it with: python test.py --checkpoint={saver.path('tb_model.pth')}"
          + (f" --val_bins={shlex.quote(val_bins)}" if val_bins else ""))
shut_down(loaders, step, distributed)
