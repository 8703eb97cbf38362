"""The training engine: the run's settings checked, the optimiser and schedule built, one optimiser step, one epoch,
the evaluation of an epoch, how a run stops (a stop signal, a non-finite loss) and the watch for collapsing embeddings,
each with explicit arguments so that it can be called and tested on its own. train.py puts them together."""
import gc
import io
import math
import os
import re
import signal
import sys
import time
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from configurator import ConfigError
from data_utils import as_hw
from evaluation import (bin_pairs, cosine_similarity_pairs, identification_accuracy, pair_decisions, relabel,
                        score_pairs_as_insightface, triplet_accuracy, verification_metrics)
from inference import device_batch, embed, embed_files
from losses import OBJECTIVES, batch_rows, objective_conflicts
from model import BACKBONES
from partial_fc import gather_batch
from pretrained import onnx_pixel_norm

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("step", "cosine", "onecycle", "poly")


# -----------------------------------------------------------------------------
# settings

def check_config(config):
    """Raise ConfigError for the first setting train.py cannot run with, before anything is scanned, started or
    built. The choices of each constant are checked by configurator.parse; these are the rules between them."""
    c = config
    conflicts = objective_conflicts(c["loss"], c["mining"], c["partial_fc"])  # (losses.py's rules)
    rules = [
        ("mining", "mining" in conflicts, conflicts.get("mining")),
        ("anchor_pattern", c["anchor_pattern"] and (c["mining"] != "none" or OBJECTIVES[c["loss"]].margin_softmax),
         "chooses the anchors of random triplets and pairs: use it with --mining=none and a triplet, contrastive "
         "or pair_bce loss"),
        ("device", not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c["device"]), "choose auto, cpu, cuda or cuda:N"),
        ("num_workers", c["num_workers"] < -1, "choose -1 (auto), 0 (the main process) or a number of workers"),
        ("images_per_identity", batch_rows(c["loss"], c["mining"]) is None and c["images_per_identity"] < 2,
         "a P x K batch needs K >= 2 images of an identity"),
        ("batch_size", c["batch_size"] < 1, "must be at least 1"),
        ("epochs", c["epochs"] < 0, "must be 0 (evaluate the untrained network) or more"),
        ("eval_every", c["eval_every"] < 1, "must be at least 1"),
        ("save_every", c["save_every"] < 0, "must be 0 (never) or more"),
        ("lr", not c["lr"] > 0, "must be positive"),
        ("embedding_dim", c["embedding_dim"] < 1, "must be positive"),
        ("partial_fc", not 0 <= c["partial_fc"] <= 1, "is a sample rate: 0 (off) or above 0 up to 1"),
        ("partial_fc", "partial_fc" in conflicts, conflicts.get("partial_fc")),
        ("loss", c["loss"] == "none" and not c["teacher"], "none learns from a teacher alone: give --teacher"),
        ("distill", c["distill"] < 0 or (c["teacher"] and not c["distill"] > 0),
         "weighs the teacher's term: a positive number (with --teacher)"),
        ("teacher_views", c["teacher_views"] < 0 or (c["teacher_views"] and not c["teacher"]),
         "counts the teacher's augmented views of each photo: 0 or more, with --teacher"),
        ("arcface_form", c["arcface_form"] != "paper" and c["loss"] != "arcface",
         "is the form of ArcFace's margin: use it with --loss=arcface (or leave it at paper)"),
    ]
    for flag, broken, message in rules:
        if broken:
            raise ConfigError(flag, message)
    onnx_pixel_norm(c["onnx_norm"], c["teacher"])
    try:
        size = as_hw(c["image_size"])
    except ValueError as err:
        raise ConfigError("image_size", str(err)) from None
    smallest = BACKBONES[c["backbone"]].min_size  # (configurator.parse checked the name)
    if min(size) < smallest:
        raise ConfigError("image_size", f"{c['backbone']} takes images of at least {smallest}x{smallest}")


def deterministic_kernels(device):
    """On the CPU, PyTorch's deterministic kernels (as train.py --deterministic asks of CUDA): its threads otherwise
    sum some gradients in varying order (indexing's backward over repeated rows: the pair classifier's every pair of
    a batch, random triplets), and the same seed would not give the same weights."""
    if device == "cpu":
        torch.use_deterministic_algorithms(True)


def build_optimizer(name, params, lr, weight_decay):
    """Adam, AdamW or SGD (momentum 0.9) over `params`, fused: one kernel for the whole update (on the CPU the
    per-tensor loop costs ~10 % of a ResNet18 step)."""
    kinds = dict(adam=torch.optim.Adam, adamw=torch.optim.AdamW, sgd=torch.optim.SGD)
    extra = dict(momentum=0.9) if name == "sgd" else {}
    return kinds[name](params, lr=lr, weight_decay=weight_decay, fused=True, **extra)


def warmup_cosine(step, total, warmup=0.25):
    """Learning-rate factor of the one-cycle schedule: linear warm-up over the first quarter of the steps, then
    cosine decay to 0. (torch's OneCycleLR fails on runs of a few steps.)"""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def build_schedule(name, optimizer, steps_per_epoch, epochs, step_size=5, gamma=0.1):
    """The learning-rate schedule, advanced once per optimiser step: StepLR every `step_size` epochs, cosine decay
    to 0, one-cycle, or poly: insightface's polynomial decay, (1 - step / steps) ** 2 to 0. cosine, onecycle and
    poly are functions of (step, total steps), so a resumed run with more epochs spreads them over the new total
    (the learning rate rises again from where the decay had taken it)."""
    steps = max(epochs, 1) * steps_per_epoch
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(step_size, 1) * steps_per_epoch, gamma=gamma)
    factors = dict(cosine=lambda s: (1 + math.cos(math.pi * min(1, s / steps))) / 2,
                   poly=lambda s: (1 - min(1, s / steps)) ** 2, onecycle=lambda s: warmup_cosine(s, steps))
    factor = factors[name]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def describe(model, objective, optimizer, schedule, verbosity=0):
    """Print the run's parts as --verbosity asks: 1 the architecture, 2 the optimiser and schedule too, 3 the
    parameter counts of each top-level module too."""
    if verbosity >= 1:
        print(model, objective, sep="\n")
    if verbosity >= 2:
        print(optimizer, f"schedule: {schedule}", sep="\n")
    if verbosity >= 3:
        for name, module in list(model.named_children()) + [("loss", objective)]:
            print(f"  {name}: {sum(p.numel() for p in module.parameters()):,} parameters, "
                  f"{sum(p.numel() for p in module.parameters() if p.requires_grad):,} trainable")


# -----------------------------------------------------------------------------
# training

class TrainingStep:
    """One optimiser step on a batch: embed its images in one forward pass, the objective's loss (over the global
    batch of a distributed run for labelled batches, so that mining sees every process's images; rows of random
    triplets and pairs index this process's batch and need no gathering), backward, step, schedule.

    `network` and `objective` are what trains (wrapped in DistributedDataParallel or compiled as the run wants);
    a batch is (images, labels) or (images, labels, rows), images uint8 or float (N, 3, H, W) as the DataLoader
    gives them. A distilled run passes `distiller` (distill.Distillation, wrapped as the network is), `targets`
    (the teacher's (items, T) targets, on the device) and `weight`; its batches end with the items' dataset
    indices, and the loss adds weight x the distillation loss of this process's embeddings. Calling it returns
    (the loss, detached; the objective's stats, with the distiller's; this process's embeddings)."""

    def __init__(self, network, objective, optimizer, scheduler, scaler, device, autocast,
                 memory_format=torch.preserve_format, gather=False, stat="", distiller=None, targets=None,
                 weight=1.0):
        self.network, self.objective, self.optimizer, self.scheduler = network, objective, optimizer, scheduler
        self.scaler, self.device, self.autocast, self.memory_format = scaler, device, autocast, memory_format
        self.gather, self.stat = gather, stat  # the objective's stat shown and averaged per epoch
        self.distiller, self.targets, self.weight = distiller, targets, weight

    def embed(self, images):
        """Float32 embeddings of a batch. It goes to the device as the DataLoader pinned it (copied without
        waiting) and is normalised there when it travels as uint8."""
        with self.autocast:
            return self.network(device_batch(images, self.device, self.memory_format)).float()

    def __call__(self, batch):
        images, labels, *rows = batch
        items = rows.pop().to(self.device) if self.distiller is not None else None
        rows = rows[0].to(self.device) if rows else None
        embeddings = self.embed(images)
        labels = torch.as_tensor(labels).to(self.device)
        scored, scored_labels = (gather_batch(embeddings, labels) if self.gather and rows is None
                                 else (embeddings, labels))
        loss, stats = self.objective(scored, scored_labels, rows)
        if items is not None:
            distilled, taught = self.distiller(embeddings, self.targets[items], labels)
            loss, stats = loss + self.weight * distilled, {**stats, **taught}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # float16 scaling skips a step whose gradients overflowed: not an error
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), stats, embeddings

    def release(self):
        """Drop the wrappers that hold the process group, so that it can be destroyed."""
        self.network = self.objective = self.distiller = None


class StopRequested(Exception):
    """A stop signal arrived mid-epoch; `position` is where in the epoch the run stopped (RunState.position)."""

    def __init__(self, position):
        super().__init__(f"stopped in epoch {position['epoch']} after step {position['batches']}")
        self.position = position


class NonFinite(Exception):
    """The training loss or the weights are no longer finite. Nothing after this may be saved: it would spoil
    every checkpoint."""

    def __init__(self, what, epoch, step, steps):
        super().__init__(f"{what} in epoch {epoch} at step {step} of {steps}")


class StopSignals:
    """The first SIGINT (Ctrl-C) or SIGTERM lets the current step finish (`signum` is set; the training loop then
    stops); a second one exits at once (atomic_write leaves no half-written file behind). Under torchrun
    (`distributed`) the second is ignored: the launcher follows the terminal's Ctrl-C with a SIGTERM of its own,
    and kills what has not ended 30 s later. `announce` is the line written (by the master) at the first signal."""

    def __init__(self, distributed=False, announce=None):
        self.signum, self.distributed, self.announce = 0, distributed, announce

    def install(self):
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum:
            if self.distributed:
                return
            sys.exit(128 + signum)
        self.signum = signum
        if self.announce:  # os.write: print is not safe in a signal handler
            os.write(2, f"\n{signal.Signals(signum).name}: {self.announce}\n".encode())

    def settle(self, agreed_signum):
        """`agreed_signum`, the signal agreed over the processes (agreed(): 0 for none), on which they all decide
        alike; this process keeps a signal of its own that came during the agreement, for the next one."""
        self.signum = self.signum or agreed_signum
        return agreed_signum

    @property
    def name(self):
        return signal.Signals(self.signum).name


def worker_signals(worker_id):
    """DataLoader workers leave Ctrl-C, which the terminal sends to all the run's processes, to the main process: it
    stops after the current step, then shuts them down. SIGTERM goes back to its default, fatal to them (they are
    forked with the main process's handler, and Python's exit stops them with it); sent to every process (as some
    job schedulers do), it ends the run with their error, and a resumed run starts from the last epoch's last.pth."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def agreed(flags, device, distributed):
    """Each flag's largest value over the processes of a distributed run (one small all_reduce), so that they all
    stop at the same step, whichever of them got the signal or saw the loss go bad."""
    if not distributed:
        return list(flags)
    values = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [int(v) for v in values.tolist()]


def poisoned(*modules):
    """Whether a weight or running statistic of the modules has become NaN or infinite."""
    tensors = [t for module in modules for t in module.state_dict().values()]
    return not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def train_one_epoch(step, loader, epoch, run, stop, randomness, distributed=False, world_size=1, collapse=None,
                    progress=True, label=""):
    """Train `epoch` over the batches of `loader` (its sources' set_epoch already called) with `step` (a
    TrainingStep). A run resumed mid-epoch (`run.position` in this epoch) draws the epoch's batches from the
    random state it began with, passes over those it trained, and goes on from the saved state. `randomness` is
    the run's RandomState, `stop` its StopSignals; `collapse` an optional CollapseDetector.

    Returns the epoch's train_stats: train_loss, train_<stat> (the mean of the objective's stat), epoch_seconds,
    images and images_per_second (of the steps trained in this call). Raises StopRequested after the step a
    signal arrived in (not after the last one: the epoch then ends and saves), NonFinite for a non-finite loss."""
    position = run.position if run.position and run.position["epoch"] == epoch else None
    if position:
        randomness.restore(position["rng"])
    epoch_rng, batches = randomness.capture(), iter(loader)
    count, total, second_total = 0, 0.0, 0.0
    if position:
        count, total, second_total = position["batches"], position["loss_total"], position["second_total"]
        for _ in range(count):
            next(batches)
        randomness.restore(run.rng)
        run.position = None
    started, images = time.time(), 0
    bar = tqdm(batches, desc=label or f"epoch {epoch}", total=len(loader), initial=count, leave=False,
               dynamic_ncols=True, disable=None if progress else True)
    for batch in bar:
        loss, stats, embeddings = step(batch)
        value = loss.item()  # the CPU waits for the step here: the NaN check and the progress bar need it
        signalled, diverged = agreed((stop.signum, not math.isfinite(value)), step.device, distributed)
        if diverged:
            raise NonFinite(f"the training loss is {value}" if not math.isfinite(value) else
                            "the training loss of another process is not finite", epoch, count + 1, len(loader))
        stopping = stop.settle(signalled)
        run.step, count, total = run.step + 1, count + 1, total + value
        images += len(embeddings) * world_size
        second = stats.get(step.stat)
        second_total += second or 0.0
        bar.set_postfix(loss=f"{total / count:.4f}", **({} if second is None else {step.stat: f"{second:.2f}"}))
        if collapse is not None and collapse.update(value, embeddings):
            tqdm.write(f"warning: the embeddings are collapsing (loss {value:.3f} ~ margin {collapse.margin}, "
                       f"spread {collapse.spread:.3f} for {collapse.patience} steps): try a lower --lr, "
                       f"--zero_init_residual=True, --mining=semihard, or a larger --margin")
        if stopping and count < len(loader):
            run.train_seconds += time.time() - started
            raise StopRequested(dict(epoch=epoch, batches=count, loss_total=total, second_total=second_total,
                                     rng=epoch_rng))
    seconds = max(time.time() - started, 1e-6)  # (a coarse clock can measure nothing)
    run.train_seconds += seconds
    return dict(train_loss=total / count, **{f"train_{step.stat}": second_total / count},
                epoch_seconds=round(seconds, 3), images=images, images_per_second=round(images / seconds, 2))


# -----------------------------------------------------------------------------
# evaluation

SELECTED = dict(valid_identification="valid top-1", valid_pairs_accuracy="held-out pairs accuracy",
                bins_accuracy="mean .bin accuracy")  # select_on's metrics, as the final line names them


def selection_key(select_on, probe_targets, probe_classes, train_classes, held_out, bins=()):
    """The key of the evaluation's metrics that chooses tb_model.pth: "valid_identification" for select_on "top1",
    "valid_pairs_accuracy" for "pairs" (`held_out`: held_out_pairs' rows of the valid people never trained on),
    "bins_accuracy" for "bins" (`bins`: the names of the .bin verification sets, evaluate_bins'); for "auto" bins
    when there are sets, else pairs when there are such pairs, else top1. Raises ConfigError when the valid images
    or the sets cannot measure it (without valid/, `probe_targets` and `probe_classes` are empty)."""
    if select_on == "auto":
        select_on = "bins" if len(bins) else "pairs" if len(held_out) else "top1"
    if select_on == "bins":
        if not len(bins):
            raise ConfigError("select_on", "bins needs insightface verification sets: --val_bins=lfw,cfp_fp,...")
        return "bins_accuracy"
    if select_on == "pairs" and not len(held_out):
        raise ConfigError("select_on", "pairs needs valid/ people absent from train/ (two or more, one of them with "
                                       "two images or more): prepare.py split --valid_people=...")
    trained = set(train_classes)
    if select_on == "top1" and not any(probe_classes[t] in trained for t in probe_targets):
        raise ConfigError("select_on", "top1 needs valid/ images of people in train/; valid/ has none")
    return "valid_identification" if select_on == "top1" else "valid_pairs_accuracy"


Embedded = namedtuple("Embedded", "embeddings labels classes")  # a valid folder's, as inference.embed gives them


@torch.inference_mode()
def evaluate(model, objective, gallery_loader, probe_loader, train_classes, valid_rows, device, autocast, bins=None,
             transform=None, batch_size=64):
    """An epoch's validation, in the order it runs. The valid images embedded (embed_valid): the probes of valid/,
    and the gallery (the training images) when a probe is of a training identity. From them: the identification
    top-1 of the probes by the centroids of the gallery (test.py's method; NaN when no probe is of a training
    identity); the share of valid triplets (valid_rows["triplets"]) with d(a,p) < d(a,n); the 10-fold accuracy and
    ROC AUC of the verification pairs of the valid people never trained on (held_out_metrics); the objective's
    loss on the probes, and the pair classifier's decisions (valid_objective). Then the .bin sets of `bins`, each
    image through `transform` (evaluate_bins). Without valid images (probe_loader None) the sets alone; {} without
    either."""
    metrics = {}
    if probe_loader is not None:
        probes, gallery = embed_valid(model, gallery_loader, probe_loader, device, autocast)
        metrics = dict(valid_identification=float("nan"), valid_loss=float("nan"),
                       valid_triplet_accuracy=float("nan"))
        if gallery is not None:
            metrics["valid_identification"] = identification_accuracy(*gallery, *probes)["accuracy"]
        if len(valid_rows["triplets"]):
            metrics["valid_triplet_accuracy"] = triplet_accuracy(probes.embeddings, valid_rows["triplets"])
        metrics.update(held_out_metrics(probes.embeddings, valid_rows.get("held_out", ())))
        objective.eval()
        metrics.update(valid_objective(objective, probes.embeddings.to(device), probes.labels, probes.classes,
                                       train_classes, valid_rows))
        objective.train()
    metrics.update(evaluate_bins(model, bins or {}, transform, device, autocast, batch_size))
    return metrics


def embed_valid(model, gallery_loader, probe_loader, device, autocast):
    """(probes, gallery), each Embedded: the gallery None when no probe is of a training identity (nothing to
    identify, so the training images are not embedded)."""
    probes = Embedded(*embed(model, probe_loader, device, autocast), probe_loader.dataset.classes)
    if not (relabel(probes.labels, probes.classes, gallery_loader.dataset.classes) >= 0).any():
        return probes, None
    return probes, Embedded(*embed(model, gallery_loader, device, autocast), gallery_loader.dataset.classes)


def held_out_metrics(embeddings, held_out):
    """valid_pairs_accuracy and valid_pairs_auc: the 10-fold accuracy and ROC AUC of the verification pairs
    `held_out` (held_out_pairs' rows (i, j, same) into the probes' `embeddings`); {} without pairs."""
    if not len(held_out):
        return {}
    metrics = verification_metrics(cosine_similarity_pairs(embeddings, held_out), held_out[:, 2])
    return dict(valid_pairs_accuracy=metrics["accuracy_mean"], valid_pairs_auc=metrics["auc"])


def valid_objective(objective, embeddings, labels, classes, train_classes, valid_rows):
    """evaluate's loss (and the pair classifier's decisions) on the probes' embeddings. Nothing (the loss stays NaN)
    for PartialFC's centres sharded over the processes: the master evaluates alone and holds only its share."""
    if getattr(objective, "sharded", False) or objective.rows == "images":  # (loss none: no objective to score)
        return {}
    device = embeddings.device
    metrics = {}
    if hasattr(objective, "logits") and len(valid_rows.get("pairs", ())):  # the pair classifier, however it trains
        pairs = torch.as_tensor(valid_rows["pairs"][:, :2])
        same = (labels[pairs[:, 0]] == labels[pairs[:, 1]]).numpy()
        decided = (objective.logits(embeddings[pairs[:, 0]], embeddings[pairs[:, 1]]) > 0).cpu().numpy()
        metrics.update({f"valid_pair_{k}": v for k, v in pair_decisions(same, decided).items()})
    if objective.rows is None:
        labels = relabel(labels, classes, train_classes)
        known = labels >= 0
        if known.any():
            metrics["valid_loss"] = objective(embeddings[known.to(device)], labels[known].to(device))[0].item()
        return metrics
    rows = torch.as_tensor(valid_rows[objective.rows][:, :3 if objective.rows == "triplets" else 2])
    if len(rows):
        metrics["valid_loss"] = objective(embeddings, labels.to(device), rows.to(device))[0].item()
    return metrics


@torch.inference_mode()
def evaluate_bins(model, bins, transform, device, autocast, batch_size=64):
    """insightface's verification of the sets of `bins` ({name: (images, same)}, pairs.read_verification_bins'),
    scored as test.py --val_bins scores them: each image through `transform` and embedded with its mirror image
    (insightface's flip test), insightface's 10-fold accuracy (evaluation.bin_pairs, score_pairs_as_insightface).
    Returns {f"bin_{name}_accuracy": the mean fold accuracy (NaN when too few of its images could be read)} and
    bins_accuracy, their mean; {} without sets."""
    metrics = {}
    for name, (images, same) in bins.items():
        embeddings, readable = embed_files(model, [io.BytesIO(image) for image in images], transform, device,
                                           autocast, batch_size, flip=True)
        scored, _ = score_pairs_as_insightface(embeddings, readable, *bin_pairs(same))
        metrics[f"bin_{name}_accuracy"] = scored["accuracy_mean"] if scored else float("nan")
    if metrics:
        metrics["bins_accuracy"] = float(np.mean(list(metrics.values())))
    return metrics


def epoch_summary(epoch, epochs, train_stats, metrics, stat, seconds, improved):
    """The line printed after each epoch: the training's `train_stats` (train_one_epoch's; none for epoch 0) with
    the objective's `stat`, the evaluation when there was one (`metrics`, evaluate's), the seconds of training so
    far, and whether it is the best epoch yet."""
    parts = [f"epoch {epoch}/{epochs}", "train loss " + ("-" if not epoch else f"{train_stats['train_loss']:.4f}")]
    if epoch:
        parts.append(f"{stat} {100 * train_stats[f'train_{stat}']:.0f}%")
    if metrics and "valid_loss" in metrics:
        # a NaN metric had nothing to measure (one valid image per person has no triplets): left out of the line
        if math.isfinite(metrics["valid_loss"]):
            parts.append(f"valid loss {metrics['valid_loss']:.4f}")
        if math.isfinite(metrics["valid_triplet_accuracy"]):
            parts.append(f"valid triplets {100 * metrics['valid_triplet_accuracy']:.1f}%")
        if "valid_pair_f1" in metrics:
            parts.append(f"valid pair F1 {metrics['valid_pair_f1']:.3f}")
        if math.isfinite(metrics["valid_identification"]):  # NaN: no trained person's images
            parts.append(f"valid top-1 {100 * metrics['valid_identification']:.2f}%")
        if "valid_pairs_accuracy" in metrics:
            parts.append(f"held-out pairs {100 * metrics['valid_pairs_accuracy']:.2f}% "
                         f"(AUC {metrics['valid_pairs_auc']:.4f})")
    sets = {key[len("bin_"):-len("_accuracy")]: value for key, value in (metrics or {}).items()
            if key.startswith("bin_") and key.endswith("_accuracy")}
    parts += [f"{name} {100 * value:.2f}%" for name, value in sets.items()]
    if len(sets) > 1:
        parts.append(f"bins mean {100 * metrics['bins_accuracy']:.2f}%")
    return " | ".join(parts + [f"{seconds:.0f}s"] + (["best"] if improved else []))


# -----------------------------------------------------------------------------
# the end of a run

def shut_down(loaders, step=None, distributed=False):
    """Before exiting, what must not be left to the interpreter's shutdown: persistent DataLoader workers (left,
    each is waited for 5 s, then killed with an error) are stopped; and all the processes of a distributed run
    leave the process group together, the wrappers that hold it first, so that gloo's and NCCL's threads end here
    (at shutdown they can abort the interpreter)."""
    for loader in loaders:
        workers = getattr(loader, "_iterator", None)
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()
        loader._iterator = None
    if distributed:
        dist.barrier()
        if step is not None:
            step.release()
    gc.collect()
    if distributed:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# training health

def embedding_spread(embeddings):
    """1 - |mean of the L2-normalised embeddings|^2: 0 when every embedding is the same point, near 1 when they
    spread over the sphere."""
    return 1 - F.normalize(embeddings.detach().float(), dim=1).mean(dim=0).pow(2).sum().item()


class CollapseDetector:
    """Watches a margin loss for collapse: every embedding alike (spread below `min_spread`) while the loss sits
    at the margin (within `tolerance` of it), for `patience` steps in a row. `update` returns True once, at the
    step where that happens."""

    def __init__(self, margin, patience=10, min_spread=0.05, tolerance=0.1):
        self.margin, self.patience, self.min_spread, self.tolerance = margin, patience, min_spread, tolerance
        self.steps, self.spread = 0, 1.0

    def update(self, loss, embeddings):
        self.spread = embedding_spread(embeddings)
        at_margin = abs(float(loss) - self.margin) <= self.tolerance * max(self.margin, 1e-8)
        self.steps = self.steps + 1 if self.spread < self.min_spread and at_margin else 0
        return self.steps == self.patience
