"""engine.py: the rules between train.py's settings, the optimiser and schedules, one training step, one epoch
(its train_stats, a stop signal, a non-finite loss, a resumed epoch that ends with the very weights of an uninterrupted
one), the evaluation of an epoch, the stop signals, the end of a run and the watch for collapse. Tiny networks on
tiny image folders."""
import math
import multiprocessing
import os
import random
import signal
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from checkpoint import Checkpointer, RandomState, RunState, load_checkpoint, resume_training, training_state
from configurator import ConfigError
from conftest import make_faces, write_image
from data_utils import FaceFolder, make_transform, normalize
from engine import (CollapseDetector, NonFinite, StopRequested, StopSignals, TrainingStep, agreed, build_optimizer,
                    build_schedule, check_config, describe, deterministic_kernels, embedding_spread, epoch_summary,
                    evaluate, poisoned, shut_down, train_one_epoch, valid_objective, warmup_cosine, worker_signals)
from evaluation import identification_accuracy, pair_decisions, relabel, triplet_accuracy
from inference import embed
from losses import batch_rows, build_objective
from model import EmbeddingNet
from partial_fc import build_partial_fc
from sampling import draw_pairs, draw_triplets, train_loader_for

SIZE = (32, 32)
EMBEDDING = 16
# train.py's defaults of the settings check_config reads
VALID = dict(loss="arcface", mining="none", anchor_pattern="", device="auto", num_workers=-1, images_per_identity=4,
             batch_size=32, epochs=30, eval_every=1, save_every=0, lr=2e-3, embedding_dim=128, image_size=(64, 56),
             partial_fc=0.0, arcface_form="paper", teacher="", distill=1.0, onnx_norm="", teacher_views=0,
             backbone="resnet50")
# the three kinds of training batches: P x K (labelled), random triplets, balanced pairs; 4 steps an epoch each
PATHS = {"pk_arcface": ("arcface", "none", 4), "random_triplets": ("triplet", "none", 4),
         "random_pairs": ("contrastive", "none", 8)}


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tiny_model():
    return EmbeddingNet("smallcnn", EMBEDDING, "mlp", 32)


def weights(*modules):
    return [t.clone() for module in modules for t in module.state_dict().values()]


def same_weights(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -----------------------------------------------------------------------------
# check_config

def test_train_py_defaults_pass_and_edge_values_are_allowed():
    check_config(VALID)
    for change in (dict(device="cpu"), dict(device="cuda"), dict(device="cuda:1"), dict(num_workers=0),
                   dict(epochs=0), dict(save_every=0), dict(images_per_identity=2), dict(image_size=8),
                   dict(loss="triplet", mining="none", anchor_pattern="script"),
                   dict(loss="pair_bce", mining="none", anchor_pattern="script"),
                   dict(loss="triplet", mining="none", images_per_identity=1),  # K only counts in P x K batches
                   dict(partial_fc=1.0), dict(loss="cosface", partial_fc=0.1), dict(arcface_form="arcface_torch"),
                   dict(loss="none", teacher="dlib"), dict(loss="triplet", teacher="t.onnx", distill=0.1),
                   dict(teacher="t.onnx", onnx_norm="127.5,127.5"), dict(teacher="t.onnx", onnx_norm="1,2,3,4,5,6"),
                   dict(teacher="dlib", loss="none", teacher_views=3), dict(backbone="dlib_resnet", image_size=103),
                   dict(backbone="dlib_resnet", image_size=(150, 103))):
        check_config(dict(VALID, **change))


@pytest.mark.parametrize("change,flag", [
    (dict(loss="pair_bce", mining="batch_hard"), "mining"),
    (dict(loss="triplet", mining="semihard", anchor_pattern="script"), "anchor_pattern"),
    (dict(loss="arcface", mining="none", anchor_pattern="script"), "anchor_pattern"),
    (dict(device="gpu"), "device"),
    (dict(device="cuda:x"), "device"),
    (dict(num_workers=-2), "num_workers"),
    (dict(images_per_identity=1), "images_per_identity"),
    (dict(batch_size=0), "batch_size"),
    (dict(epochs=-1), "epochs"),
    (dict(eval_every=0), "eval_every"),
    (dict(save_every=-1), "save_every"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(embedding_dim=0), "embedding_dim"),
    (dict(image_size=(4, 4)), "image_size"),
    (dict(image_size=(64, 56, 3)), "image_size"),
    (dict(backbone="dlib_resnet", image_size=102), "image_size"),  # (its last strided conv: under 3x3)
    (dict(backbone="dlib_resnet", image_size=(150, 64)), "image_size"),
    (dict(partial_fc=-0.1), "partial_fc"),
    (dict(partial_fc=1.5), "partial_fc"),
    (dict(partial_fc=float("nan")), "partial_fc"),
    (dict(loss="triplet", mining="batch_hard", partial_fc=0.5), "partial_fc"),
    (dict(loss="contrastive", partial_fc=1.0), "partial_fc"),
    (dict(loss="none"), "loss"),
    (dict(teacher="dlib", distill=0.0), "distill"),
    (dict(teacher="dlib", distill=float("nan")), "distill"),
    (dict(distill=-1.0), "distill"),
    (dict(loss="cosface", arcface_form="arcface_torch"), "arcface_form"),
    (dict(teacher="dlib", onnx_norm="127.5,127.5"), "onnx_norm"),
    (dict(onnx_norm="127.5,127.5"), "onnx_norm"),
    (dict(teacher="t.onnx", onnx_norm="127.5"), "onnx_norm"),
    (dict(teacher="t.onnx", onnx_norm="127.5,0"), "onnx_norm"),
    (dict(teacher="t.onnx", onnx_norm="mean,std"), "onnx_norm"),
    (dict(teacher="t.onnx", onnx_norm="nan,1"), "onnx_norm"),
    (dict(teacher="dlib", teacher_views=-1), "teacher_views"),
    (dict(teacher_views=2), "teacher_views"),
])
def test_each_rule_names_its_flag(change, flag):
    with pytest.raises(ConfigError) as info:
        check_config(dict(VALID, **change))
    assert info.value.flag == flag


# -----------------------------------------------------------------------------
# optimiser and schedules

@pytest.mark.parametrize("name,kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_build_optimizer_kinds_are_fused_and_step(name, kind):
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = build_optimizer(name, [weight], 0.1, 0.01)
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert group["fused"] and (group["lr"], group["weight_decay"]) == (0.1, 0.01)
    assert group.get("momentum", 0.9) == 0.9
    weight.grad = torch.ones(4)
    optimizer.step()
    assert (weight < 1).all()


def test_warmup_cosine_rises_over_a_quarter_then_decays_to_zero():
    factors = [warmup_cosine(step, 8) for step in range(10)]  # warm-up over 2 steps, cosine over the other 6
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 6)), 0.75, 0.5, 0.25, 0.5 * (1 - math.cos(math.pi / 6)),
                0.0, 0.0]
    assert factors == pytest.approx(expected, abs=1e-12)
    assert warmup_cosine(0, 1) == 1.0 and warmup_cosine(0, 0) == 1.0  # runs of a step or none


def lrs(schedule, optimizer, steps):
    """The learning rate before the first step and after each of `steps` steps."""
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


def sgd():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs():
    optimizer = sgd()
    schedule = build_schedule("step", optimizer, steps_per_epoch=3, epochs=10, step_size=2, gamma=0.1)
    seen = lrs(schedule, optimizer, 12)
    assert seen == pytest.approx([1.0] * 6 + [0.1] * 6 + [0.01])


def test_cosine_and_onecycle_factors_at_known_steps():
    optimizer = sgd()
    seen = lrs(build_schedule("cosine", optimizer, steps_per_epoch=4, epochs=2), optimizer, 10)
    assert seen == pytest.approx([0.5 * (1 + math.cos(math.pi * min(1, s / 8))) for s in range(11)], abs=1e-12)
    assert (seen[4], seen[8], seen[10]) == pytest.approx((0.5, 0.0, 0.0), abs=1e-12)
    optimizer = sgd()
    seen = lrs(build_schedule("onecycle", optimizer, steps_per_epoch=4, epochs=2), optimizer, 8)
    assert seen == pytest.approx([warmup_cosine(s, 8) for s in range(9)], abs=1e-12)
    optimizer = sgd()
    seen = lrs(build_schedule("poly", optimizer, steps_per_epoch=4, epochs=2), optimizer, 10)
    assert seen == pytest.approx([(1 - min(1, s / 8)) ** 2 for s in range(11)], abs=1e-12)
    assert (seen[4], seen[8]) == pytest.approx((0.25, 0.0), abs=1e-12)
    optimizer = sgd()  # 0 epochs (evaluation only) still builds a schedule of one epoch
    assert lrs(build_schedule("cosine", optimizer, steps_per_epoch=2, epochs=0), optimizer, 1)[1] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["cosine", "onecycle"])
def test_a_longer_resumed_run_spreads_the_schedule_over_the_new_total(tmp_path, name):
    optimizer = sgd()
    schedule = build_schedule(name, optimizer, steps_per_epoch=4, epochs=2)
    lrs(schedule, optimizer, 6)
    torch.save(schedule.state_dict(), tmp_path / "schedule.pth")
    optimizer = sgd()
    longer = build_schedule(name, optimizer, steps_per_epoch=4, epochs=4)
    longer.load_state_dict(torch.load(tmp_path / "schedule.pth", weights_only=True))
    seen = lrs(longer, optimizer, 10)[1:]  # after steps 7 .. 16 of 16
    if name == "cosine":
        expected = [0.5 * (1 + math.cos(math.pi * s / 16)) for s in range(7, 17)]
    else:
        expected = [warmup_cosine(s, 16) for s in range(7, 17)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)


# -----------------------------------------------------------------------------
# one training step

def batch_for(rows, generator):
    """A batch of uint8 images as the DataLoader gives it for `rows` (None: labelled, "triplets", "pairs")."""
    if rows is None:
        labels = torch.tensor([0, 0, 1, 1, 2, 2])
        extra = ()
    else:
        columns = [[0, 1, 2, 0], [0, 1, 2, 0], [1, 2, 0, 1]] if rows == "triplets" else [[0, 1, 2, 0], [0, 2, 2, 1]]
        labels = torch.tensor(columns).flatten()  # position-major, as collate_rows gives them
        extra = (torch.arange(len(labels)).view(len(columns), 4).t().contiguous(),)
    images = torch.randint(0, 256, (len(labels), 3, *SIZE), dtype=torch.uint8, generator=generator)
    return (images, labels, *extra)


def training_parts(loss, mining, num_classes=3, steps_per_epoch=4):
    """((model, objective, optimizer, schedule, scaler), their TrainingStep), as train.py builds them on the CPU."""
    model = tiny_model()
    objective = build_objective(loss, mining=mining, embedding_dim=EMBEDDING, num_classes=num_classes)
    optimizer = build_optimizer("adam", [*model.parameters(), *objective.parameters()], 1e-2, 0.0)
    schedule = build_schedule("onecycle", optimizer, steps_per_epoch, epochs=2)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    step = TrainingStep(model, objective, optimizer, schedule, scaler, "cpu", nullcontext(), stat=objective.stat)
    return (model, objective, optimizer, schedule, scaler), step


def step_parts(loss, mining):
    seed_all(0)
    (model, objective, _, schedule, _), step = training_parts(loss, mining)
    return model, objective, schedule, step


OBJECTIVES = [("arcface", "none"), ("triplet", "batch_hard"), ("contrastive", "batch_all"), ("triplet", "none"),
              ("contrastive", "none"), ("pair_bce", "none")]


@pytest.mark.parametrize("loss,mining", OBJECTIVES)
def test_a_training_step_returns_the_detached_loss_stats_and_embeddings_and_trains(loss, mining):
    model, objective, schedule, step = step_parts(loss, mining)
    batch = batch_for(objective.rows, torch.Generator().manual_seed(0))
    first_conv, head = model.backbone[0].weight.clone(), model.head[0].weight.clone()
    trained_objective = weights(objective)
    loss_value, stats, embeddings = step(batch)
    assert loss_value.ndim == 0 and torch.isfinite(loss_value) and not loss_value.requires_grad
    assert loss_value.grad_fn is None
    assert isinstance(stats[objective.stat], float)
    assert embeddings.shape == (len(batch[0]), EMBEDDING) and embeddings.dtype == torch.float32
    assert not torch.equal(model.backbone[0].weight, first_conv) and not torch.equal(model.head[0].weight, head)
    if list(objective.parameters()):  # ArcFace's centres, the pair classifier: they train too
        unchanged = same_weights(weights(objective), trained_objective)
        assert not unchanged
    assert schedule.last_epoch == 1


@pytest.mark.parametrize("loss,mining", [("arcface", "none"), ("triplet", "none")])
def test_uint8_images_are_normalised_as_data_utils_normalize_does(loss, mining):
    results = []
    for as_float in (False, True):
        model, objective, _, step = step_parts(loss, mining)
        images, *rest = batch_for(objective.rows, torch.Generator().manual_seed(0))
        torch.manual_seed(5)  # the same dropout draws
        loss_value, _, embeddings = step((normalize(images) if as_float else images, *rest))
        results.append((loss_value, embeddings, weights(model, objective)))
    (loss_a, emb_a, w_a), (loss_b, emb_b, w_b) = results
    equal = torch.equal(loss_a, loss_b) and torch.equal(emb_a, emb_b) and same_weights(w_a, w_b)
    assert equal


# -----------------------------------------------------------------------------
# one epoch

@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    return make_faces(str(tmp_path_factory.mktemp("train")), identities=4, images=4)


def quiet(*_):
    pass


def build_run(root, loss, mining, batch_size, seed=0):
    """Everything train.py builds for an epoch on `root`: the loader (data seed 0), model, objective, optimiser,
    schedule, step and RandomState, the generators first seeded with `seed`."""
    seed_all(seed)
    faces = FaceFolder(root, make_transform(SIZE, train=True, pixels=True))
    loader, sources = train_loader_for(faces, batch_rows(loss, mining), batch_size, 2, seed=0, log=quiet)
    parts, step = training_parts(loss, mining, len(faces.classes), len(loader))
    return SimpleNamespace(loader=loader, sources=sources, parts=parts, step=step,
                           randomness=RandomState("cpu", loader.generator))


def run_epoch(built, run, stop, step=None, epoch=1):
    """train_one_epoch as train.py calls it (set_epoch, training mode), with `step` in place of the built one."""
    for source in built.sources:
        source.set_epoch(epoch)
    built.parts[0].train()
    return train_one_epoch(step or built.step, built.loader, epoch, run, stop, built.randomness, progress=False)


class Watched:
    """A TrainingStep that records its losses and stats, and calls `before(call number)` before each step."""

    def __init__(self, step, before=None):
        self.step, self.before, self.losses, self.stats = step, before, [], []
        self.device, self.stat = step.device, step.stat

    def __call__(self, batch):
        if self.before:
            self.before(len(self.losses) + 1)
        loss, stats, embeddings = self.step(batch)
        self.losses.append(loss.item())
        self.stats.append(stats[self.stat])
        return loss, stats, embeddings


def signal_at(stop, call, signum=signal.SIGINT):
    return lambda number: stop.handle(signum, None) if number == call else None


@pytest.mark.parametrize("path", PATHS)
def test_an_epoch_returns_its_train_stats(train_root, path):
    loss, mining, batch_size = PATHS[path]
    built = build_run(train_root, loss, mining, batch_size)
    assert len(built.loader) == 4
    watched, run = Watched(built.step), RunState(step=7, train_seconds=1.0)
    train_stats = run_epoch(built, run, StopSignals(), watched)
    stat = built.step.stat
    assert set(train_stats) == {"train_loss", f"train_{stat}", "epoch_seconds", "images", "images_per_second"}
    assert len(watched.losses) == 4 and run.step == 11 and run.train_seconds > 1.0
    assert train_stats["train_loss"] == pytest.approx(np.mean(watched.losses))
    assert train_stats[f"train_{stat}"] == pytest.approx(np.mean(watched.stats))
    images_per_batch = {"pk_arcface": 4, "random_triplets": 12, "random_pairs": 16}[path]
    assert train_stats["images"] == 4 * images_per_batch
    assert train_stats["images_per_second"] > 0 and train_stats["epoch_seconds"] >= 0


@pytest.mark.parametrize("path", ["pk_arcface", "random_triplets"])
def test_a_stop_signal_raises_stop_requested_after_its_step(train_root, path):
    loss, mining, batch_size = PATHS[path]
    built = build_run(train_root, loss, mining, batch_size)
    stop = StopSignals()
    watched, run = Watched(built.step, signal_at(stop, 2)), RunState()
    epoch_start = built.randomness.capture()
    with pytest.raises(StopRequested) as info:
        run_epoch(built, run, stop, watched, epoch=3)
    position = info.value.position
    assert (position["epoch"], position["batches"], run.step, len(watched.losses)) == (3, 2, 2, 2)
    assert position["loss_total"] == pytest.approx(sum(watched.losses))
    assert position["second_total"] == pytest.approx(sum(watched.stats))
    assert torch.equal(position["rng"]["torch"], epoch_start["torch"])  # the generators as the epoch began
    assert position["rng"]["python"] == epoch_start["python"]


def test_a_signal_in_the_last_step_lets_the_epoch_end(train_root):
    built = build_run(train_root, *PATHS["pk_arcface"])
    stop = StopSignals()
    train_stats = run_epoch(built, RunState(), stop, Watched(built.step, signal_at(stop, 4, signal.SIGTERM)))
    assert train_stats["images"] == 16 and stop.signum == signal.SIGTERM


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stopped_after", [1, 3])
def test_an_epoch_resumed_mid_way_ends_with_the_weights_of_an_uninterrupted_one(train_root, tmp_path, path,
                                                                                 stopped_after):
    # epoch 2: the loader's shuffling generator, too, must come back to where that epoch began
    loss, mining, batch_size = PATHS[path]
    whole = build_run(train_root, loss, mining, batch_size)
    whole_run = RunState()
    run_epoch(whole, whole_run, StopSignals(), epoch=1)
    expected = run_epoch(whole, whole_run, StopSignals(), epoch=2)
    expected_weights = weights(*whole.parts[:2])

    first = build_run(train_root, loss, mining, batch_size)
    stop, run = StopSignals(), RunState()
    run_epoch(first, run, stop, epoch=1)
    with pytest.raises(StopRequested) as info:
        run_epoch(first, run, stop, Watched(first.step, signal_at(stop, stopped_after)), epoch=2)
    unfinished = same_weights(weights(*first.parts[:2]), expected_weights)
    assert not unfinished
    run.rng, run.position = first.randomness.capture(), info.value.position  # as train.py saves last.pth
    model, objective, optimizer, schedule, scaler = first.parts
    saver = Checkpointer(str(tmp_path), model, objective, {}, [], SIZE)
    assert saver.save("last.pth", 1, {}, training_state(run, optimizer, schedule, scaler, 1))

    resumed = build_run(train_root, loss, mining, batch_size, seed=123)  # a new process, other generator states
    resumed_run = resume_training(load_checkpoint(saver.path("last.pth")), resumed.parts, resumed.randomness, 1,
                                  saver.path("tb_model.pth"))
    train_stats = run_epoch(resumed, resumed_run, StopSignals(), epoch=2)
    bit_for_bit = same_weights(weights(*resumed.parts[:2]), expected_weights)
    assert bit_for_bit
    assert train_stats["train_loss"] == expected["train_loss"]
    assert train_stats[f"train_{objective.stat}"] == expected[f"train_{objective.stat}"]
    assert resumed_run.step == whole_run.step == 8 and resumed_run.position is None
    assert train_stats["images"] == expected["images"] * (4 - stopped_after) // 4  # those of the steps trained here


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_raises_non_finite(train_root, bad):
    built = build_run(train_root, *PATHS["pk_arcface"])
    calls = []

    class Diverging(Watched):
        def __call__(self, batch):
            loss, stats, embeddings = super().__call__(batch)
            calls.append(1)
            return (torch.tensor(bad) if len(calls) == 2 else loss), stats, embeddings

    run = RunState()
    with pytest.raises(NonFinite):
        run_epoch(built, run, StopSignals(), Diverging(built.step))
    assert len(calls) == 2 and run.step == 1  # stopped at the step that diverged, which does not count


# -----------------------------------------------------------------------------
# stop signals and agreement between processes

def test_the_first_signal_asks_to_stop_and_a_second_exits(capfd):
    stop = StopSignals(announce="stopping after this step")
    stop.handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT and stop.name == "SIGINT"
    assert "stopping after this step" in capfd.readouterr().err
    with pytest.raises(SystemExit) as info:
        stop.handle(signal.SIGTERM, None)
    assert info.value.code == 128 + signal.SIGTERM


def test_under_torchrun_a_second_signal_is_ignored():
    stop = StopSignals(distributed=True)
    stop.handle(signal.SIGTERM, None)
    stop.handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"


def test_a_signal_that_comes_during_an_agreement_waits_for_the_next():
    stop = StopSignals(distributed=True)
    stop.signum = signal.SIGTERM  # arrived while the processes agreed on 0
    assert stop.settle(0) == 0 and stop.signum == signal.SIGTERM  # all go on alike; it is not lost
    assert stop.settle(signal.SIGTERM) == signal.SIGTERM
    other = StopSignals(distributed=True)  # the process that got none takes the agreed one
    assert other.settle(signal.SIGINT) == signal.SIGINT and other.signum == signal.SIGINT


def test_installed_handlers_catch_a_real_signal():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = StopSignals().install()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes of the main thread
            if stop.signum:
                break
        assert stop.signum == signal.SIGTERM
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                pass
        assert info.value.code == 128 + signal.SIGINT
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_worker_signals_leave_ctrl_c_to_the_main_process():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, lambda *_: None)
        worker_signals(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_agreed_outside_a_distributed_run_returns_the_flags():
    assert agreed((signal.SIGINT, False), "cpu", False) == [signal.SIGINT, False]
    assert agreed([0, True], "cpu", False) == [0, True]


def test_poisoned_sees_a_non_finite_weight_or_running_statistic():
    model, objective = tiny_model(), build_objective("arcface", embedding_dim=EMBEDDING, num_classes=3)
    assert not poisoned(model, objective)
    with torch.no_grad():
        objective.weight[0, 0] = float("nan")  # ArcFace's centres
    assert poisoned(model, objective) and not poisoned(model)
    model.backbone[1].running_var[0] = float("inf")
    assert poisoned(model)
    clean = tiny_model()
    with torch.no_grad():
        clean.head[0].weight[0, 0] = float("nan")
    assert poisoned(clean)


# -----------------------------------------------------------------------------
# evaluation

@pytest.fixture(scope="module")
def valid_root(tmp_path_factory):
    """Probes: 2 new images of the 4 training identities and of a fifth one that is not in the gallery."""
    root = tmp_path_factory.mktemp("valid")
    for i in range(5):
        for j in range(2):
            write_image(os.path.join(root, f"p{i}", f"{j}.png"), seed=1000 + 10 * i + j)
    return str(root)


@pytest.mark.parametrize("loss,mining", [("arcface", "none"), ("triplet", "none"), ("triplet", "batch_hard"),
                                         ("contrastive", "none"), ("pair_bce", "none"), ("pair_bce", "batch_all")])
def test_evaluate_gives_identification_loss_and_triplet_accuracy(train_root, valid_root, loss, mining):
    transform = make_transform(SIZE, train=False, pixels=True)
    gallery, probes = FaceFolder(train_root, transform), FaceFolder(valid_root, transform)
    rng = np.random.default_rng(0)
    valid_rows = dict(triplets=draw_triplets(probes.targets, probes.by_label, rng))
    valid_rows["pairs"] = draw_pairs(probes.targets, probes.by_label, rng)
    seed_all(0)
    model = tiny_model()
    objective = build_objective(loss, mining=mining, embedding_dim=EMBEDDING, num_classes=len(gallery.classes))
    gallery_loader, probe_loader = DataLoader(gallery, batch_size=5), DataLoader(probes, batch_size=3)
    result = evaluate(model, objective, gallery_loader, probe_loader, gallery.classes, valid_rows, "cpu",
                      nullcontext())
    assert objective.training  # back to training mode

    gallery_emb, gallery_labels = embed(model, DataLoader(gallery, batch_size=64), "cpu", nullcontext())
    probe_emb, probe_labels = embed(model, DataLoader(probes, batch_size=64), "cpu", nullcontext())
    direct = identification_accuracy(gallery_emb, gallery_labels, gallery.classes, probe_emb, probe_labels,
                                     probes.classes)["accuracy"]
    assert 0 <= result["valid_identification"] <= 1
    assert result["valid_identification"] == pytest.approx(direct)
    assert result["valid_triplet_accuracy"] == pytest.approx(triplet_accuracy(probe_emb, valid_rows["triplets"]))
    assert math.isfinite(result["valid_loss"])
    objective.eval()
    if objective.rows is None:  # the probes of training identities (not p4)
        known = relabel(probe_labels, probes.classes, gallery.classes)
        assert (known < 0).sum() == 2
        direct_loss = objective(probe_emb[known >= 0], known[known >= 0])[0].item()
    else:
        rows = torch.as_tensor(valid_rows[objective.rows][:, :3 if objective.rows == "triplets" else 2])
        direct_loss = objective(probe_emb, probe_labels, rows)[0].item()
    assert result["valid_loss"] == pytest.approx(direct_loss, rel=1e-5, abs=1e-6)
    pair_keys = {"valid_pair_precision", "valid_pair_recall", "valid_pair_f1"}
    if loss == "pair_bce":
        rows = valid_rows["pairs"]
        with torch.no_grad():
            decided = (objective.logits(probe_emb[rows[:, 0]], probe_emb[rows[:, 1]]) > 0).numpy()
        for key, value in pair_decisions(rows[:, 2] == 1, decided).items():
            assert result[f"valid_pair_{key}"] == pytest.approx(value) and 0 <= value <= 1
    else:
        assert not pair_keys & result.keys()


def test_evaluate_without_known_probes_has_no_arcface_loss(train_root, valid_root):
    transform = make_transform(SIZE, train=False, pixels=True)
    gallery, probes = FaceFolder(train_root, transform), FaceFolder(valid_root, transform)
    rows = dict(triplets=np.zeros((0, 3), dtype=np.int64), pairs=np.zeros((0, 3), dtype=np.int64))
    objective = build_objective("arcface", embedding_dim=EMBEDDING, num_classes=2)
    result = evaluate(tiny_model(), objective, DataLoader(gallery, batch_size=8), DataLoader(probes, batch_size=8),
                      ["nobody", "none"], rows, "cpu", nullcontext())
    assert math.isnan(result["valid_loss"]) and math.isnan(result["valid_triplet_accuracy"])
    assert 0 <= result["valid_identification"] <= 1


def test_valid_loss_of_partial_fc_in_one_process_is_the_margin_softmax_and_of_sharded_centres_skipped():
    torch.manual_seed(0)
    embeddings, labels, classes = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), ["p0", "p1", "p2"]
    full = build_objective("arcface", embedding_dim=4, num_classes=3).eval()
    single = build_partial_fc("arcface", embedding_dim=4, num_classes=3, partial_fc=0.4).eval()
    with torch.no_grad():
        single.margin.weight.copy_(full.weight)
    expected = valid_objective(full, embeddings, labels, classes, classes, {})["valid_loss"]
    assert valid_objective(single, embeddings, labels, classes, classes, {})["valid_loss"] == pytest.approx(expected)
    # process 0 of 2 evaluating alone holds half the centres: no loss, and no collective that would wait forever
    sharded = build_partial_fc("arcface", embedding_dim=4, num_classes=3, partial_fc=1.0, rank=0, world_size=2)
    assert valid_objective(sharded.eval(), embeddings, labels, classes, classes, {}) == {}


# -----------------------------------------------------------------------------
# the end of a run

def test_shut_down_stops_persistent_workers(train_root):
    faces = FaceFolder(train_root, make_transform(SIZE, train=False, pixels=True))
    loader = DataLoader(faces, batch_size=4, num_workers=1, persistent_workers=True, worker_init_fn=worker_signals)
    idle = DataLoader(faces, batch_size=4)  # never iterated: nothing to stop
    for _ in loader:
        pass
    workers = list(loader._iterator._workers)
    assert workers and all(w.is_alive() for w in workers)
    shut_down([loader, idle])
    assert not any(w.is_alive() for w in workers)
    assert not set(w.pid for w in workers) & {child.pid for child in multiprocessing.active_children()}
    assert loader._iterator is None


# -----------------------------------------------------------------------------
# what a run prints

def test_epoch_summary_has_the_training_and_evaluation_metrics_it_was_given():
    train_stats = dict(train_loss=0.5, train_accuracy=0.25)
    metrics = dict(valid_loss=0.75, valid_triplet_accuracy=0.5, valid_identification=0.875)
    untrained = epoch_summary(0, 3, {}, metrics, "accuracy", 0.0, True).split(" | ")
    assert untrained == ["epoch 0/3", "train loss -", "valid loss 0.7500", "valid triplets 50.0%",
                         "valid top-1 87.50%", "0s", "best"]
    trained = epoch_summary(2, 3, train_stats, None, "accuracy", 12.4, False).split(" | ")
    assert trained == ["epoch 2/3", "train loss 0.5000", "accuracy 25%", "12s"]  # an epoch without evaluation
    with_f1 = epoch_summary(1, 3, train_stats, dict(metrics, valid_pair_f1=0.5), "accuracy", 1, False)
    assert "valid pair F1 0.500" in with_f1.split(" | ")
    unmeasured = dict(metrics, valid_loss=float("nan"), valid_triplet_accuracy=float("nan"))  # one image a person
    assert epoch_summary(1, 3, train_stats, unmeasured, "accuracy", 1, False).split(" | ") == [
        "epoch 1/3", "train loss 0.5000", "accuracy 25%", "valid top-1 87.50%", "1s"]


@pytest.mark.parametrize("verbosity", [0, 1, 2])
def test_describe_prints_as_much_as_verbosity_asks(verbosity, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    objective = build_objective("arcface", embedding_dim=3, num_classes=2)
    optimizer = build_optimizer("adam", list(model.parameters()) + list(objective.parameters()), 1e-3, 0.0)
    describe(model, objective, optimizer, "onecycle", verbosity)
    out = capsys.readouterr().out
    assert ("Sequential(" in out) == (verbosity >= 1) and ("schedule: onecycle" in out) == (verbosity >= 2)
    describe(model, objective, optimizer, "onecycle", 3)
    counts = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and "trainable" in line]
    assert counts == ["  0: 15 parameters, 15 trainable", "  loss: 6 parameters, 6 trainable"]


# -----------------------------------------------------------------------------
# training health

def test_collapse_is_detected_after_patience_steps_and_only_then():
    alike = torch.ones(16, 8) + 1e-4 * torch.randn(16, 8)
    spread_out = F.normalize(torch.randn(256, 8), dim=1)
    assert embedding_spread(alike) < 1e-3 and embedding_spread(spread_out) > 0.9
    detector = CollapseDetector(margin=0.2, patience=3)
    assert [detector.update(0.2, alike) for _ in range(5)] == [False, False, True, False, False]
    detector = CollapseDetector(margin=0.2, patience=3)
    flags = [detector.update(0.2, alike), detector.update(0.2, spread_out), detector.update(0.2, alike),
             detector.update(0.05, alike), detector.update(0.2, alike)]
    assert not any(flags)  # interrupted by a spread batch and by a loss away from the margin


@pytest.mark.parametrize("loss, mining", [("pair_bce", "batch_all"), ("triplet", "none")])
def test_on_the_cpu_the_same_batch_gives_the_same_gradient_bit_for_bit(loss, mining):
    """The pair classifier's every pair of a batch, and 128 random triplets, gather embeddings many times, whose
    backward the CPU's threads otherwise sum in varying order: train.py's kernels make a seed give one set of
    weights."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)  # (the one_thread fixture gives the threads back afterwards)
    try:
        deterministic_kernels("cpu")
        torch.manual_seed(0)
        objective = build_objective(loss, mining=mining, embedding_dim=128)
        embeddings, labels = F.normalize(torch.randn(128, 128), dim=1), torch.arange(32).repeat_interleave(4)
        rows = torch.randint(0, 128, (128, 3)) if objective.rows else None
        gradients = []
        for _ in range(20):
            leaf = embeddings.clone().requires_grad_()
            objective(leaf, labels, rows)[0].backward()
            gradients.append(leaf.grad)
        assert all(torch.equal(gradients[0], gradient) for gradient in gradients)
    finally:
        torch.use_deterministic_algorithms(was)
