"""Checkpoints: the run's state, saving it (atomic, a failure reported), loading it (weights_only), rebuilding the
network it describes, and the rules by which a stopped run is resumed.

A checkpoint is a dict of tensors and plain values. Every one holds what test.py and predict.py need: `model`,
`model_config`, `image_size`, `classes`, `epoch` (the last evaluated epoch), `metrics` (its evaluation), `config`
(the run's settings) and `loss_state` (the objective's parameters: ArcFace's centres, the pair classifier).
last.pth also holds all that --resume continues from: `optimizer`, `scheduler`, `scaler`, `world_size` and the
RunState's fields (`step`, `history`, `best`, `train_seconds`, `rng`, `position`). PartialFC's centres, sharded
over the processes, are saved whole (ShardedCentres), as an unsharded run's.
"""
import os
import pickle
import random
from dataclasses import asdict, dataclass, field
from math import nan

import numpy as np
import torch
import torch.distributed as dist

from configurator import ConfigError
from files import atomic_write, reported
from model import EmbeddingNet
from partial_fc import partial_fc_shard

# what a resumed run may be given anew: nothing that shapes the model, the data or the optimisation
RESUMABLE = ("resume", "out_dir", "data_dir", "epochs", "num_workers", "verbosity", "eval_every", "save_every",
             "plot_x", "device", "amp", "deterministic", "cache_images", "channels_last", "compile", "sync_bn",
             "teacher_cache")


class CheckpointError(ValueError):
    """A file that is missing, not a checkpoint of this repository, or does not fit its model."""


def read_weights(path, map_location="cpu"):
    """What a PyTorch file at `path` holds, read with weights_only=True: plain values and tensors only, so that
    reading it can never run code. Raises CheckpointError with the reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file (train one with: python train.py)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a pickled object that unpickling would construct or call
            raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain "
                                  f"values, which could run code when loaded") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({str(err).splitlines()[0]})") from None
    except Exception as err:  # torch.load's errors on arbitrary bytes vary (KeyError, EOFError, RuntimeError...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]})") from None


def is_checkpoint(state):
    """Whether what read_weights read is a checkpoint written by train.py."""
    return isinstance(state, dict) and {"model", "model_config"} <= state.keys()


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by train.py, read by read_weights. Raises CheckpointError with the reason."""
    checkpoint = read_weights(path, map_location)
    if not is_checkpoint(checkpoint):
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (no 'model' and 'model_config')")
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """Rebuild the network a checkpoint describes and load its weights."""
    config = checkpoint["model_config"]
    try:
        model = EmbeddingNet(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its model config {config} cannot be built: {err}") from None
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the network its config describes ({config}): "
                              f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
                              ) from None
    return model


def resume_config(config, defaults, path, out_dir):
    """(the settings a resumed run goes on with, its checkpoint). `path` is --resume's value ("last":
    `out_dir`/last.pth). The run keeps its own settings; only RESUMABLE ones may be given anew. A flag equal to its
    default cannot be told from no flag, so it leaves the run's value; a constant newer than the checkpoint keeps
    its value here. out_dir becomes the checkpoint's folder. Raises CheckpointError for a file that cannot be
    resumed, ConfigError for a flag that would change the run or an --epochs it has already trained."""
    path = os.path.join(out_dir, "last.pth") if path == "last" else path
    checkpoint = load_checkpoint(path)
    if "rng" not in checkpoint:
        raise CheckpointError(f"{path} holds no training state to resume from (tb_model.pth and epoch_N.pth "
                              f"never do, nor a last.pth from before --resume existed)")
    saved = {k: checkpoint["config"].get(k, v) for k, v in config.items()}
    given = {k: v for k, v in config.items() if v != defaults[k]}
    changed = [k for k, v in given.items() if k not in RESUMABLE and v != saved[k]]
    if changed:
        conflicts = ", ".join(f"--{k}={given[k]} (the run has {saved[k]})" for k in changed)
        raise ConfigError(changed[0], f"--resume continues the run with its own settings, but {conflicts}; on "
                                      f"resume only {', '.join(RESUMABLE[1:])} may change")
    resumed = {**saved, "out_dir": os.path.dirname(path) or ".",
               **{k: v for k, v in given.items() if k in RESUMABLE}, "resume": path}
    run = RunState.from_checkpoint(checkpoint)
    if run.next_epoch() > resumed["epochs"]:
        raise ConfigError("epochs", f"{path} has trained all its {resumed['epochs']} epochs; add --epochs=N with "
                                    f"N > {resumed['epochs']} to train on")
    return resumed, checkpoint


@dataclass
class RunState:
    """Where a run stands: optimiser steps taken, one history entry per finished epoch (epoch 0: the untrained
    network), the best evaluated entry, seconds of training, the random generators' state when it was saved
    (`rng`, RandomState.capture's), and for a run stopped mid-epoch its `position` in that epoch: dict(epoch,
    batches trained, loss_total and second_total over them, rng: the generators as the epoch began)."""
    step: int = 0
    history: list = field(default_factory=list)
    best: dict = None
    train_seconds: float = 0.0
    rng: dict = None
    position: dict = None

    def state_dict(self):
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint):
        return cls(**{k: checkpoint[k] for k in cls.__dataclass_fields__})

    def next_epoch(self):
        """The epoch training goes on with: the stopped one, or the one after the last evaluated."""
        if self.position:
            return self.position["epoch"]
        return self.history[-1]["epoch"] + 1 if self.history else 0

    def improved(self, metrics, key="valid_identification", tie=None):
        """Whether `metrics` beat the best epoch's by `key`, or with `tie` (a loss) equal them by `key` and beat them
        by a lower `tie` (NaN beats nothing)."""
        if self.best is None or metrics[key] > self.best[key]:
            return True
        return tie is not None and metrics[key] == self.best[key] and metrics.get(tie, nan) < self.best.get(tie, nan)


class RandomState:
    """Every random generator training draws from, captured and restored as tensors and plain values
    (weights_only loads them): Python's, NumPy's, torch's on the CPU and the device, and the training
    DataLoader's `generator` (None: it has none). The P x K batches and the random triplets and pairs are drawn
    from (seed, epoch) alone (set_epoch): nothing to save. In a distributed run (`ranks` = (rank, world_size)),
    every process's generators, gathered: all the processes must call capture together."""

    def __init__(self, device, generator=None, ranks=None):
        self.device, self.generator, self.ranks = device, generator, ranks

    def capture(self):
        numpy_state = np.random.get_state()
        state = dict(python=random.getstate(), numpy=[numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                     torch=torch.get_rng_state(),
                     cuda=torch.cuda.get_rng_state(self.device) if self.device.startswith("cuda") else None,
                     loader=self.generator.get_state() if self.generator else None)
        if not self.ranks:
            return state
        states = [None] * self.ranks[1]
        dist.all_gather_object(states, state)
        return dict(ranks=states)

    def restore(self, state):
        if "ranks" in state:
            state = state["ranks"][self.ranks[0] if self.ranks else 0]
        random.setstate(state["python"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and self.device.startswith("cuda"):  # None from the CPU: the GPU's as seeded
            torch.cuda.set_rng_state(state["cuda"], self.device)
        if state["loader"] is not None and self.generator is not None:
            self.generator.set_state(state["loader"])


class ShardedCentres:
    """PartialFC's class centres (`objective`, a partial_fc.PartialFC: each process holds the rows of its share) and the
    `optimizer`'s state of them (SGD's momentum, Adam's moments), as checkpoints hold them: whole, in the layout of
    the unsharded margin softmax (loss_state {"weight": (C, D)}, the optimiser's state of its (C, D) centres), so
    that a checkpoint does not depend on the process that saved it, and a run resumes on any number of
    processes."""

    def __init__(self, objective, optimizer):
        self.objective, self.optimizer = objective, optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.index = next(i for i, p in enumerate(params) if p is objective.margin.weight)  # its key in state_dict

    def local(self):
        """This process's rows: {"weight": its centres, and each of the optimiser's states of them by name}."""
        weight = self.objective.margin.weight
        state = self.optimizer.state.get(weight, {})
        return dict(weight=weight.detach(), **{name: value for name, value in sorted(state.items())
                                               if torch.is_tensor(value) and value.shape == weight.shape})

    def gather(self):
        """On process 0, whole()'s checkpoint parts; None on the others. Every process must call it at once."""
        world_size = self.objective.world_size
        if world_size == 1:
            return self.whole({name: [rows] for name, rows in self.local().items()})
        sizes = [end - start for start, end in (partial_fc_shard(self.objective.num_classes, rank, world_size)
                                                for rank in range(world_size))]
        shards = {name: _gather_rows(rows, sizes) for name, rows in self.local().items()}
        return None if dist.get_rank() else self.whole(shards)

    def whole(self, shards):
        """dict(loss_state=the whole centres, optimizer=the optimiser's state_dict with their whole state) from
        `shards`: {name: every process's rows of it, in rank order} (local()'s names)."""
        tensors = {name: torch.cat([rows.cpu() for rows in parts]) for name, parts in shards.items()}
        optimizer = self.optimizer.state_dict()
        moments = {name: tensor for name, tensor in tensors.items() if name != "weight"}
        if moments:  # (new dicts: state_dict's inner ones are the optimiser's own)
            optimizer["state"] = {**optimizer["state"], self.index: {**optimizer["state"][self.index], **moments}}
        return dict(loss_state=dict(weight=tensors["weight"]), optimizer=optimizer)

    def shard(self, checkpoint):
        """`checkpoint` (whole centres) with this process's rows of them, in its loss_state and optimizer."""
        whole, start, end = checkpoint["loss_state"]["weight"], self.objective.start, self.objective.end

        def rows(value):  # a copy: the whole layer is not kept alive behind a view
            return value[start:end].clone() if torch.is_tensor(value) and value.shape == whole.shape else value

        optimizer = checkpoint["optimizer"]
        if self.index in optimizer["state"]:
            state = {name: rows(value) for name, value in optimizer["state"][self.index].items()}
            optimizer = {**optimizer, "state": {**optimizer["state"], self.index: state}}
        return {**checkpoint, "loss_state": {"margin.weight": rows(whole)}, "optimizer": optimizer}


def _gather_rows(tensor, sizes):
    """Every process's rows of `tensor` (sizes[r] of them on process r), a list in rank order on process 0 (on the
    CPU), None on the others. All the processes call it at once."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))  # (gather takes tensors of one shape)
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes] if dist.get_rank() == 0 else None
    dist.gather(padded, parts, dst=0)
    return [part[:size].cpu() for part, size in zip(parts, sizes)] if parts else None


class Checkpointer:
    """Writes a run's checkpoints into `out_dir`, each atomically (files.atomic_write), a failure reported. `model`
    and `objective` are the plain modules (not their distributed or compiled wrappers); `identity` holds the
    values every checkpoint repeats: model_config, image_size, classes, config, and `alignment` (the record of
    the dataset's alignment, align.read_alignment's; None for unaligned data), by which test.py and predict.py
    prepare photos as the training data was. `centres`: the ShardedCentres of a PartialFC objective, or None.
    `distiller`: a distilled run's distill.Distillation (its projection), saved as `distill_state` for --resume
    (test.py never needs it: the student's embedding is its own)."""

    def __init__(self, out_dir, model, objective, config, classes, image_size, alignment=None, centres=None,
                 distiller=None):
        self.out_dir, self.model, self.objective, self.centres = out_dir, model, objective, centres
        self.distiller = distiller
        self.identity = dict(model_config=model.config, image_size=list(image_size), classes=classes, config=config,
                             alignment=alignment)

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def gather(self):
        """What save's `whole` wants: PartialFC's centres and their optimiser state, whole, on the master (None on
        the others, and without PartialFC). Every process calls it at once, before the master saves."""
        return self.centres.gather() if self.centres else None

    def save(self, name, epoch, metrics, training=None, whole=None):
        """Write `name` for the evaluated `epoch` and its `metrics`; returns whether it saved. Without `training`,
        all that test.py needs; with it (training_state's dict), all that --resume continues from. `whole`: gather's,
        replacing this process's share of sharded centres."""
        state = dict(model=self.model.state_dict(), loss_state=self.objective.state_dict(), epoch=epoch,
                     metrics=metrics, **self.identity, **(training or {}))
        if self.distiller is not None:
            state["distill_state"] = self.distiller.state_dict()
        if whole:
            state.update(loss_state=whole["loss_state"], **(dict(optimizer=whole["optimizer"]) if training else {}))
        path = self.path(name)
        return reported(path, lambda: atomic_write(path, lambda f: torch.save(state, f)))

    def save_epoch(self, run, epoch, metrics, training, save_every=0, whole=None):
        """The saves after an evaluated epoch: tb_model.pth when it is the best so far (`run.best` is this
        epoch's entry), last.pth with the training state, epoch_N.pth every `save_every` epochs (`whole`: see
        save). Returns whether last.pth saved."""
        if run.best is not None and run.best["epoch"] == epoch:
            self.save("tb_model.pth", epoch, metrics, whole=whole)
        saved = self.save("last.pth", epoch, metrics, training, whole)
        if save_every and epoch and epoch % save_every == 0:
            self.save(f"epoch_{epoch}.pth", epoch, metrics, whole=whole)
        return saved


def training_state(run, optimizer, scheduler, scaler, world_size):
    """What last.pth adds to a checkpoint: the optimiser, schedule and grad scaler, and the run's state."""
    return dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                world_size=world_size, **run.state_dict())


def resume_training(checkpoint, parts, randomness, world_size, best_path, log=print, centres=None, distiller=None):
    """Load a resumed checkpoint into the built `parts` (model, objective, optimizer, scheduler, grad scaler) and
    the random generators (RandomState `randomness`); returns its RunState. The best epoch is forgotten when
    `best_path` (tb_model.pth, rewritten only by a better epoch) is missing. A run of another number of processes
    starts its random augmentation anew, which a run stopped mid-epoch cannot (CheckpointError). `centres`: the
    ShardedCentres of a PartialFC objective, which takes its share of the saved centres; `distiller`: a distilled
    run's distill.Distillation."""
    if centres:
        checkpoint = centres.shard(checkpoint)
    model, objective, optimizer, scheduler, scaler = parts
    model.load_state_dict(checkpoint["model"])
    objective.load_state_dict(checkpoint["loss_state"])
    if distiller is not None:
        distiller.load_state_dict(checkpoint["distill_state"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:  # empty when saved without float16 loss scaling (CPU, bfloat16)
        scaler.load_state_dict(checkpoint["scaler"])
    run = RunState.from_checkpoint(checkpoint)
    if not os.path.isfile(best_path):
        run.best = None
    saved_world = checkpoint.get("world_size", 1)
    if saved_world == world_size:
        randomness.restore(checkpoint["rng"])
    elif run.position:
        raise CheckpointError(f"it stopped in the middle of an epoch of a run of {saved_world} processes; resume it "
                              f"with as many, or resume the last.pth of an epoch's end")
    else:
        log(f"resuming a run of {saved_world} processes with {world_size}: the random augmentation starts anew")
    return run
