"""checkpoint.py: loading a checkpoint safely, rebuilding its network, the rules of --resume, the run's state, the
random generators' state, and saving (what each file holds, when it is written, a failed save)."""
import os
import random
from contextlib import nullcontext

import torch.distributed as dist
import torch.multiprocessing as mp

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from checkpoint import (CheckpointError, Checkpointer, RandomState, RunState, ShardedCentres, load_checkpoint,
                        model_from_checkpoint, resume_config, resume_training, training_state)
from configurator import ConfigError
from engine import TrainingStep, build_optimizer, build_schedule
from losses import build_objective
from model import EmbeddingNet
from partial_fc import build_partial_fc, partial_fc_shard

CLASSES = ["p0", "p1", "p2"]
# a few of train.py's constants with their defaults: what resume_config compares a resumed run's flags against
DEFAULTS = dict(resume="", out_dir="out", data_dir="data/att_faces", epochs=30, num_workers=-1, lr=2e-3,
                loss="arcface", backbone="resnet50", embedding_dim=128, seed=0)
BASE_KEYS = {"model", "loss_state", "epoch", "metrics", "model_config", "image_size", "classes", "config",
             "alignment"}
TRAINING_KEYS = {"optimizer", "scheduler", "scaler", "world_size", "step", "history", "best", "train_seconds", "rng",
                 "position"}


def assert_same(a, b, where="state"):
    """Nested dicts, lists and tuples of tensors and plain values are equal, tensors bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def tiny_parts(seed=0, scaler=None, **sharding):
    """(model, objective, optimizer, schedule, scaler) of a tiny arcface run, as train.py builds them; `sharding`:
    build_partial_fc's partial_fc, rank and world_size."""
    torch.manual_seed(seed)
    model = EmbeddingNet("smallcnn", 16, "mlp", 32)
    build = build_partial_fc if sharding.get("partial_fc") else build_objective
    objective = build("arcface", embedding_dim=16, num_classes=len(CLASSES), **sharding)
    optimizer = build_optimizer("adam", [*model.parameters(), *objective.parameters()], 1e-3, 0.0)
    schedule = build_schedule("onecycle", optimizer, steps_per_epoch=2, epochs=3)
    return model, objective, optimizer, schedule, scaler or torch.amp.GradScaler("cuda", enabled=False)


def run_state(trained, position=None):
    """A RunState after evaluated epochs 0..`trained` (the best: the last), its generators captured."""
    history = [dict(epoch=e, step=2 * e, valid_identification=0.1 * e) for e in range(trained + 1)]
    return RunState(step=2 * trained, history=history, best=history[-1], train_seconds=1.5,
                    rng=RandomState("cpu").capture(), position=position)


def write_last(folder, config, trained, position=None):
    """<folder>/last.pth of a run with `config` that evaluated epochs 0..`trained`; returns its path."""
    model, objective, optimizer, schedule, scaler = tiny_parts()
    saver = Checkpointer(str(folder), model, objective, config, CLASSES, (32, 32))
    run = run_state(trained, position)
    assert saver.save("last.pth", trained, dict(valid_identification=0.5),
                      training_state(run, optimizer, schedule, scaler, 1))
    return saver.path("last.pth")


# -----------------------------------------------------------------------------
# rebuilding the network a checkpoint describes

def save_model(tmp_path, model, name="model.pth"):
    path = tmp_path / name
    torch.save(dict(model=model.state_dict(), model_config=model.config, image_size=[32, 32]), path)
    return str(path)


def test_checkpoint_round_trip_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18", embedding_dim=32, head="linear").eval()
    path = save_model(tmp_path, model)
    rebuilt = model_from_checkpoint(load_checkpoint(path), path).eval()
    assert rebuilt.config == model.config
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images), rtol=0, atol=0)


def test_weights_of_another_architecture_are_an_error_naming_the_config(tmp_path):
    model = EmbeddingNet("resnet18", embedding_dim=32)
    state = dict(model=model.state_dict(), model_config=dict(model.config, backbone="resnet34"))
    torch.save(state, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="resnet34"):  # the config it names
        model_from_checkpoint(load_checkpoint(str(tmp_path / "mixed.pth")), "mixed.pth")
    state["model_config"] = dict(model.config, embedding_dim=64)
    torch.save(state, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="'embedding_dim': 64"):
        model_from_checkpoint(load_checkpoint(str(tmp_path / "mixed.pth")), "mixed.pth")


def test_smallcnn_checkpoint_round_trip_keeps_weights_and_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingNet("smallcnn", embedding_dim=16, head="mlp", hidden_dim=32).train()
    model(torch.randn(4, 3, 48, 40))  # moves the BatchNorm running statistics away from their initial values
    model.eval()
    path = save_model(tmp_path, model)
    rebuilt = model_from_checkpoint(load_checkpoint(path), path).eval()
    assert rebuilt.config == model.config
    assert torch.equal(rebuilt.backbone[1].running_mean, model.backbone[1].running_mean)
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# load_checkpoint

def test_missing_and_foreign_files_are_refused(tmp_path):
    for name in ("missing.pth", "notes.pth", "other.pth", "list.pth"):
        path = str(tmp_path / name)
        if name == "notes.pth":
            (tmp_path / name).write_text("just some text")
        elif name == "other.pth":
            torch.save({"weights": torch.zeros(2)}, path)
        elif name == "list.pth":
            torch.save([torch.zeros(2)], path)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert path in str(info.value)


def test_a_checkpoint_of_this_repository_loads_with_its_tensors(tmp_path):
    model = EmbeddingNet("smallcnn", 16, "linear")
    torch.save(dict(model=model.state_dict(), model_config=model.config), tmp_path / "model.pth")
    checkpoint = load_checkpoint(str(tmp_path / "model.pth"))
    assert checkpoint["model_config"] == model.config
    assert_same(checkpoint["model"], model.state_dict())


class Payload:
    """Pickles to a call that writes a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = str(tmp_path / "ran")
    torch.save(dict(model={}, model_config={}, trap=Payload(marker)), tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path / "evil.pth"))
    assert not os.path.exists(marker)


# -----------------------------------------------------------------------------
# resume_config

def test_a_flag_that_would_change_the_run_is_a_config_error_naming_it(tmp_path):
    path = write_last(tmp_path, DEFAULTS, trained=1)
    for flag, value in (("lr", 0.1), ("backbone", "resnet18"), ("seed", 7)):
        with pytest.raises(ConfigError) as info:
            resume_config(dict(DEFAULTS, **{flag: value}), DEFAULTS, path, "out")
        assert info.value.flag == flag


def test_a_flag_repeating_the_runs_own_value_is_no_conflict(tmp_path):
    path = write_last(tmp_path, dict(DEFAULTS, lr=0.1), trained=1)
    resumed, _ = resume_config(dict(DEFAULTS, lr=0.1), DEFAULTS, path, "out")
    assert resumed["lr"] == 0.1


def test_resumable_flags_are_taken(tmp_path):
    path = write_last(tmp_path, dict(DEFAULTS, epochs=5, num_workers=0), trained=2)
    elsewhere = str(tmp_path / "elsewhere")
    resumed, checkpoint = resume_config(dict(DEFAULTS, epochs=9, num_workers=2, out_dir=elsewhere), DEFAULTS, path,
                                        elsewhere)
    assert (resumed["epochs"], resumed["num_workers"], resumed["out_dir"]) == (9, 2, elsewhere)
    assert resumed["resume"] == path and checkpoint["epoch"] == 2


def test_a_flag_equal_to_its_default_keeps_the_runs_value(tmp_path):
    run_config = dict(DEFAULTS, lr=0.1, backbone="resnet18", epochs=5, num_workers=3)
    path = write_last(tmp_path / "run", run_config, trained=2)
    resumed, _ = resume_config(dict(DEFAULTS), DEFAULTS, path, "out")
    assert resumed == dict(run_config, out_dir=str(tmp_path / "run"), resume=path)


def test_out_dir_becomes_the_checkpoints_folder_and_last_resolves_in_out_dir(tmp_path):
    folder = str(tmp_path / "run1")
    path = write_last(tmp_path / "run1", dict(DEFAULTS, epochs=5), trained=1)
    resumed, _ = resume_config(dict(DEFAULTS), DEFAULTS, path, "out")
    assert resumed["out_dir"] == folder
    resumed, checkpoint = resume_config(dict(DEFAULTS, out_dir=folder), DEFAULTS, "last", folder)
    assert resumed["resume"] == os.path.join(folder, "last.pth") and resumed["out_dir"] == folder
    assert checkpoint["epoch"] == 1
    with pytest.raises(CheckpointError):
        resume_config(dict(DEFAULTS), DEFAULTS, "last", str(tmp_path / "empty"))


def test_a_constant_newer_than_the_checkpoint_keeps_its_value(tmp_path):
    path = write_last(tmp_path, dict(DEFAULTS, epochs=5), trained=1)
    resumed, _ = resume_config(dict(DEFAULTS, sync_bn=True), dict(DEFAULTS, sync_bn=False), path, "out")
    assert resumed["sync_bn"] is True


def test_a_run_resumes_in_its_arcface_form(tmp_path):
    defaults = dict(DEFAULTS, arcface_form="paper")
    path = write_last(tmp_path / "torch", dict(defaults, arcface_form="arcface_torch"), trained=1)
    resumed, _ = resume_config(dict(defaults), defaults, path, "out")
    assert resumed["arcface_form"] == "arcface_torch"
    with pytest.raises(ConfigError) as info:  # not in RESUMABLE: it shapes the optimisation
        resume_config(dict(defaults, arcface_form="other"), defaults, path, "out")
    assert info.value.flag == "arcface_form"
    older = write_last(tmp_path / "older", DEFAULTS, trained=1)  # saved before the flag: it trained in the paper's
    assert resume_config(dict(defaults), defaults, older, "out")[0]["arcface_form"] == "paper"


def test_a_checkpoint_without_training_state_cannot_be_resumed(tmp_path):
    model, objective, *_ = tiny_parts()
    saver = Checkpointer(str(tmp_path), model, objective, dict(DEFAULTS), CLASSES, (32, 32))
    assert saver.save("tb_model.pth", 1, dict(valid_identification=0.5))
    with pytest.raises(CheckpointError):
        resume_config(dict(DEFAULTS), DEFAULTS, saver.path("tb_model.pth"), "out")


def test_a_run_that_trained_all_its_epochs_resumes_only_with_more(tmp_path):
    path = write_last(tmp_path, dict(DEFAULTS, epochs=3), trained=3)
    with pytest.raises(ConfigError) as info:
        resume_config(dict(DEFAULTS), DEFAULTS, path, "out")
    assert info.value.flag == "epochs"
    with pytest.raises(ConfigError) as info:
        resume_config(dict(DEFAULTS, epochs=2), DEFAULTS, path, "out")
    assert info.value.flag == "epochs"
    resumed, _ = resume_config(dict(DEFAULTS, epochs=4), DEFAULTS, path, "out")
    assert resumed["epochs"] == 4


def test_a_run_stopped_in_its_last_epoch_resumes_without_more_epochs(tmp_path):
    position = dict(epoch=3, batches=1, loss_total=0.5, second_total=0.25, rng=RandomState("cpu").capture())
    path = write_last(tmp_path, dict(DEFAULTS, epochs=3), trained=2, position=position)
    resumed, checkpoint = resume_config(dict(DEFAULTS), DEFAULTS, path, "out")
    assert resumed["epochs"] == 3 and checkpoint["position"]["batches"] == 1


# -----------------------------------------------------------------------------
# RunState

def test_run_state_round_trips_through_a_weights_only_file(tmp_path):
    position = dict(epoch=3, batches=2, loss_total=1.25, second_total=0.5, rng=RandomState("cpu").capture())
    run = run_state(trained=2, position=position)
    torch.save(run.state_dict(), tmp_path / "run.pth")
    loaded = RunState.from_checkpoint(torch.load(tmp_path / "run.pth", weights_only=True))
    assert_same(loaded.state_dict(), run.state_dict())


def test_next_epoch_fresh_after_an_epoch_and_mid_epoch():
    assert RunState().next_epoch() == 0
    assert RunState(history=[dict(epoch=0)]).next_epoch() == 1
    assert RunState(history=[dict(epoch=0), dict(epoch=4)]).next_epoch() == 5  # eval_every > 1: epochs skipped
    mid = RunState(history=[dict(epoch=0), dict(epoch=4)], position=dict(epoch=5, batches=3))
    assert mid.next_epoch() == 5


def test_improved_only_by_a_strictly_better_metric():
    assert RunState().improved(dict(valid_identification=0.0))
    run = RunState(best=dict(valid_identification=0.5, valid_loss=1.0))
    assert run.improved(dict(valid_identification=0.6))
    assert not run.improved(dict(valid_identification=0.5))
    assert not run.improved(dict(valid_identification=0.4))
    assert run.improved(dict(valid_loss=2.0), key="valid_loss")


def test_a_tie_is_broken_by_a_lower_loss_where_asked():
    """With tie="valid_loss": an equal metric and a lower loss improve; an equal or higher loss, a missing or NaN
    one, or a lower metric whatever its loss, do not. Without tie, an equal metric never improves."""
    run = RunState(best=dict(valid_identification=0.5, valid_loss=1.0))
    assert run.improved(dict(valid_identification=0.5, valid_loss=0.9), tie="valid_loss")
    assert not run.improved(dict(valid_identification=0.5, valid_loss=0.9))
    for loss in (1.0, 1.1, float("nan")):
        assert not run.improved(dict(valid_identification=0.5, valid_loss=loss), tie="valid_loss")
    assert not run.improved(dict(valid_identification=0.5), tie="valid_loss")
    assert not run.improved(dict(valid_identification=0.4, valid_loss=0.1), tie="valid_loss")
    assert not RunState(best=dict(valid_identification=0.5)).improved(dict(valid_identification=0.5, valid_loss=0.1),
                                                                      tie="valid_loss")


# -----------------------------------------------------------------------------
# RandomState

def draws(generator):
    """Numbers from every generator RandomState keeps: Python's, NumPy's, torch's, and a shuffling DataLoader's
    `generator` (None: torch's)."""
    shuffled = [int(i) for batch in DataLoader(range(10), batch_size=5, shuffle=True, generator=generator)
                for i in batch]
    return [random.random(), np.random.rand(3).tolist(), torch.rand(3), shuffled]


def test_random_state_restores_every_generator(tmp_path):
    generator = torch.Generator().manual_seed(5)
    randomness = RandomState("cpu", generator)
    state = randomness.capture()
    first = draws(generator)
    for number, moved_on in zip(first, draws(generator)):  # each generator moved on: restoring it matters
        with pytest.raises(AssertionError):
            assert_same(moved_on, number)
    randomness.restore(state)
    assert_same(draws(generator), first)

    torch.save(state, tmp_path / "rng.pth")
    loaded = torch.load(tmp_path / "rng.pth", weights_only=True)
    draws(generator)
    randomness.restore(loaded)
    assert_same(draws(generator), first)
    randomness.restore(dict(ranks=[loaded]))  # as a distributed run gathers them: process 0's
    assert_same(draws(generator), first)


def test_random_state_without_a_loader_generator_leaves_one_alone():
    state = RandomState("cpu").capture()
    assert state["loader"] is None and state["cuda"] is None
    generator = torch.Generator().manual_seed(1)
    before = generator.get_state()
    RandomState("cpu", generator).restore(state)
    assert torch.equal(generator.get_state(), before)


# -----------------------------------------------------------------------------
# Checkpointer

def test_save_writes_a_weights_only_checkpoint_with_the_documented_keys(tmp_path):
    model, objective, optimizer, schedule, scaler = tiny_parts()
    config = dict(DEFAULTS, epochs=5)
    saver = Checkpointer(str(tmp_path), model, objective, config, CLASSES, (32, 28))
    metrics = dict(valid_identification=0.75, valid_loss=0.5)
    assert saver.save("plain.pth", 3, metrics)
    run = run_state(trained=3, position=dict(epoch=4, batches=1, loss_total=0.5, second_total=0.0,
                                             rng=RandomState("cpu").capture()))
    assert saver.save("full.pth", 3, metrics, training_state(run, optimizer, schedule, scaler, 2))

    plain = torch.load(saver.path("plain.pth"), weights_only=True)
    full = torch.load(saver.path("full.pth"), weights_only=True)
    assert plain.keys() == BASE_KEYS and full.keys() == BASE_KEYS | TRAINING_KEYS
    for saved in (plain, full):
        assert_same(saved["model"], model.state_dict())
        assert_same(saved["loss_state"], objective.state_dict())
        assert (saved["epoch"], saved["metrics"], saved["classes"], saved["config"]) == (3, metrics, CLASSES, config)
        assert (saved["model_config"], saved["image_size"], saved["alignment"]) == (model.config, [32, 28], None)
    aligned = Checkpointer(str(tmp_path), model, objective, config, CLASSES, (32, 28), dict(size=112))
    assert aligned.save("aligned.pth", 3, metrics) and load_checkpoint(aligned.path("aligned.pth"))["alignment"] == \
        dict(size=112)
    assert_same(full["optimizer"], optimizer.state_dict())
    assert_same(full["scheduler"], schedule.state_dict())
    assert full["world_size"] == 2
    assert_same(RunState.from_checkpoint(full).state_dict(), run.state_dict())
    assert load_checkpoint(saver.path("full.pth"))["epoch"] == 3


@pytest.mark.parametrize("blocked", ["file_is_a_folder", "folder_is_a_file"])
def test_a_failed_save_returns_false_and_warns_without_raising(tmp_path, capsys, blocked):
    model, objective, *_ = tiny_parts()
    out_dir = tmp_path / "out"
    if blocked == "file_is_a_folder":
        (out_dir / "last.pth").mkdir(parents=True)
    else:
        out_dir.write_text("a file where the folder should be")
    saver = Checkpointer(str(out_dir), model, objective, dict(DEFAULTS), CLASSES, (32, 32))
    assert saver.save("last.pth", 1, {}) is False
    assert saver.path("last.pth") in capsys.readouterr().err
    if blocked == "file_is_a_folder":
        assert os.listdir(out_dir) == ["last.pth"]  # no temporary file left behind
        assert os.path.isdir(out_dir / "last.pth")


def test_save_epoch_writes_the_best_last_and_every_nth(tmp_path):
    model, objective, optimizer, schedule, scaler = tiny_parts()
    saver = Checkpointer(str(tmp_path), model, objective, dict(DEFAULTS), CLASSES, (32, 32))
    run = RunState(rng=RandomState("cpu").capture())
    best_epochs = (0, 1, 3)
    for epoch in range(5):
        run.history.append(dict(epoch=epoch, valid_identification=0.1 * epoch))
        if epoch in best_epochs:
            run.best = run.history[-1]
        metrics = dict(valid_identification=0.1 * epoch)
        assert saver.save_epoch(run, epoch, metrics, training_state(run, optimizer, schedule, scaler, 1), save_every=2)
        assert load_checkpoint(saver.path("tb_model.pth"))["epoch"] == max(e for e in best_epochs if e <= epoch)
        last = load_checkpoint(saver.path("last.pth"))
        assert last["epoch"] == epoch and "rng" in last
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("epoch_")) == ["epoch_2.pth", "epoch_4.pth"]
    for name in ("tb_model.pth", "epoch_2.pth", "epoch_4.pth"):
        assert load_checkpoint(saver.path(name)).keys() == BASE_KEYS
    assert load_checkpoint(saver.path("epoch_4.pth"))["epoch"] == 4


def test_save_epoch_without_save_every_and_a_failed_last_save(tmp_path, capsys):
    model, objective, optimizer, schedule, scaler = tiny_parts()
    saver = Checkpointer(str(tmp_path), model, objective, dict(DEFAULTS), CLASSES, (32, 32))
    run = RunState(history=[dict(epoch=2, valid_identification=0.5)], rng=RandomState("cpu").capture())
    os.mkdir(saver.path("last.pth"))
    training = training_state(run, optimizer, schedule, scaler, 1)
    assert saver.save_epoch(run, 2, {}, training, save_every=0) is False
    assert saver.path("last.pth") in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["last.pth"]  # run.best is not this epoch: no tb_model.pth, and no epoch_2.pth


def train_steps(parts, steps=2):
    """A few optimiser steps of the tiny parts on random labelled batches, so that every state has moved."""
    model, objective, optimizer, schedule, scaler = parts
    step = TrainingStep(model, objective, optimizer, schedule, scaler, "cpu", nullcontext(), stat=objective.stat)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
        step((images, torch.tensor([0, 0, 1, 1, 2, 2])))


def saved_run(tmp_path, parts, run, world_size=1):
    """The checkpoint of last.pth saved from `parts` and `run` (read back as a resumed run reads it)."""
    model, objective, optimizer, schedule, scaler = parts
    saver = Checkpointer(str(tmp_path), model, objective, dict(DEFAULTS), CLASSES, (32, 32))
    assert saver.save("last.pth", 1, {}, training_state(run, optimizer, schedule, scaler, world_size))
    return load_checkpoint(saver.path("last.pth"))


def test_resume_training_loads_every_state_and_the_generators_back(tmp_path):
    parts = tiny_parts(seed=0, scaler=torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7))
    train_steps(parts[:4] + (torch.amp.GradScaler("cuda", enabled=False),))
    run = run_state(trained=1)
    expected = draws(None)  # what the generators give from the state last.pth holds
    checkpoint = saved_run(tmp_path, parts, run)
    (tmp_path / "tb_model.pth").write_bytes(b"")  # the best epoch's file is there: run.best stays

    fresh = tiny_parts(seed=1, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(AssertionError):  # built anew, nothing yet equals the saved state
        assert_same(fresh[0].state_dict(), parts[0].state_dict())
    restored = resume_training(checkpoint, fresh, RandomState("cpu"), 1, str(tmp_path / "tb_model.pth"))
    assert_same(draws(None), expected)  # the generators are back where last.pth captured them
    for built, saved in zip(fresh, parts):
        assert_same(built.state_dict(), saved.state_dict(), type(built).__name__)
    assert_same(restored.state_dict(), run.state_dict())


def test_resume_training_forgets_the_best_epoch_whose_file_is_gone(tmp_path):
    checkpoint = saved_run(tmp_path, tiny_parts(), run_state(trained=2))
    run = resume_training(checkpoint, tiny_parts(), RandomState("cpu"), 1, str(tmp_path / "tb_model.pth"))
    assert run.best is None and run.next_epoch() == 3


def test_resume_training_keeps_the_scaler_of_a_run_saved_without_loss_scaling(tmp_path):
    checkpoint = saved_run(tmp_path, tiny_parts(), run_state(trained=0))
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    resume_training(checkpoint, tiny_parts()[:4] + (scaler,), RandomState("cpu"), 1, str(tmp_path / "none"))
    assert scaler.state_dict()["scale"] == 64.0


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_training_with_another_number_of_processes(tmp_path):
    seed_all(1)
    checkpoint = saved_run(tmp_path, tiny_parts(), run_state(trained=1), world_size=2)
    parts, said = tiny_parts(), []
    seed_all(0)
    reference = draws(None)
    for world_size, restored in ((1, False), (2, True)):
        seed_all(0)
        resume_training(checkpoint, parts, RandomState("cpu"), world_size, str(tmp_path / "none"), log=said.append)
        if restored:
            with pytest.raises(AssertionError):
                assert_same(draws(None), reference)
        else:  # the random augmentation starts anew: the generators are left as they were
            assert_same(draws(None), reference)
    assert len(said) == 1

    position = dict(epoch=2, batches=1, loss_total=0.5, second_total=0.0, rng=RandomState("cpu").capture())
    checkpoint = saved_run(tmp_path, parts, run_state(trained=1, position=position), world_size=2)
    with pytest.raises(CheckpointError):
        resume_training(checkpoint, parts, RandomState("cpu"), 1, str(tmp_path / "none"), log=said.append)


# -----------------------------------------------------------------------------
# PartialFC's centres: saved whole, resumed in shares

CENTRE_STATE = ["exp_avg", "exp_avg_sq", "weight"]  # local()'s names under Adam


def stepped(parts, seed=0):
    """`parts` after one optimiser step on random gradients, the same for the network of every process, so that
    the optimiser holds a state of every parameter."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = parts[2]
    for parameter in (p for group in optimizer.param_groups for p in group["params"]):
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    optimizer.step()
    return parts


def test_sharded_centres_of_two_processes_save_whole_and_resume_in_any_number_of_shares(tmp_path):
    """The two processes of a run faked in one: their shares gathered as process 0 gathers them, saved, and given
    back to runs of 1, 2 and 3 processes."""
    shares = [stepped(tiny_parts(seed=0, partial_fc=0.5, rank=rank, world_size=2)) for rank in range(2)]
    centres = ShardedCentres(shares[0][1], shares[0][2])
    local = [ShardedCentres(objective, optimizer).local() for _, objective, optimizer, *_ in shares]
    assert sorted(local[0]) == CENTRE_STATE and [len(rows["weight"]) for rows in local] == [1, 2]
    whole = centres.whole({name: [rows[name] for rows in local] for name in CENTRE_STATE})
    model, _, optimizer, schedule, scaler = shares[0]
    saver = Checkpointer(str(tmp_path), model, shares[0][1], dict(DEFAULTS, partial_fc=0.5), CLASSES, (32, 32),
                         centres=centres)
    saver.save_epoch(run_state(trained=1), 1, {}, training_state(run_state(trained=1), optimizer, schedule, scaler,
                                                                 2), whole=whole)
    checkpoint, best = load_checkpoint(saver.path("last.pth")), load_checkpoint(saver.path("tb_model.pth"))
    assert_same(best["loss_state"], checkpoint["loss_state"])
    unsharded = tiny_parts()[1]  # the layout of the unsharded margin softmax's
    unsharded.load_state_dict(checkpoint["loss_state"])
    saved = dict(checkpoint["optimizer"]["state"][centres.index], weight=checkpoint["loss_state"]["weight"])
    for name in CENTRE_STATE:
        assert torch.equal(saved[name], torch.cat([rows[name] for rows in local])), name

    for world_size in (1, 2, 3):
        for rank in range(world_size):
            fresh = tiny_parts(seed=1, partial_fc=0.5, rank=rank, world_size=world_size)
            resume_training(checkpoint, fresh, RandomState("cpu"), world_size, str(tmp_path / "tb_model.pth"),
                            log=lambda *_: None, centres=ShardedCentres(fresh[1], fresh[2]))
            start, end = partial_fc_shard(len(CLASSES), rank, world_size)
            rows = ShardedCentres(fresh[1], fresh[2]).local()
            for name in CENTRE_STATE:
                assert torch.equal(rows[name], saved[name][start:end]), name
            if world_size == 2:  # the very state that process had
                for built, had in zip(fresh[:3], shares[rank][:3]):
                    assert_same(built.state_dict(), had.state_dict(), type(built).__name__)


def test_sharded_centres_of_one_process_are_the_whole_layer_and_no_collective_is_needed(tmp_path):
    parts = stepped(tiny_parts(partial_fc=0.5))
    centres = ShardedCentres(parts[1], parts[2])
    whole = centres.gather()  # no process group: nothing to gather from
    assert_same(whole["loss_state"], dict(weight=parts[1].margin.weight.detach()))
    assert_same(whole["optimizer"], parts[2].state_dict())
    assert whole["loss_state"]["weight"].data_ptr() != parts[1].margin.weight.data_ptr()  # a copy, not the live one
    assert Checkpointer(str(tmp_path), *parts[:2], DEFAULTS, CLASSES, (32, 32)).gather() is None  # not sharded


def initial_centres():
    torch.manual_seed(1)
    return build_objective("arcface", embedding_dim=6, num_classes=5).weight.detach()


def training_batches():
    """Two global batches of 16 images (3 x 2 x 2 floats) of the 5 classes; each process of two takes one half."""
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 3, 2, 2, generator=generator), torch.randint(0, 5, (16,), generator=generator))
            for _ in range(2)]


def sgd_training(network, objective, gather):
    """(TrainingStep, optimiser) as train.py makes them: the insightface recipe's SGD with weight decay."""
    optimizer = build_optimizer("sgd", [*network.parameters(), *objective.parameters()], 0.5, 5e-4)
    schedule = build_schedule("step", optimizer, steps_per_epoch=10, epochs=1)
    return TrainingStep(network, objective, optimizer, schedule, torch.amp.GradScaler("cuda", enabled=False), "cpu",
                        nullcontext(), gather=gather, stat=objective.stat), optimizer


def tiny_network():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))


def sharded_training_worker(rank, world_size, init_file, out):
    """train.py's way under torchrun: the network DistributedDataParallel, PartialFC (sample rate 1) not."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    network = torch.nn.parallel.DistributedDataParallel(tiny_network())
    objective = build_partial_fc("arcface", embedding_dim=6, num_classes=5, partial_fc=1.0, rank=rank,
                                world_size=world_size)
    with torch.no_grad():
        objective.margin.weight.copy_(initial_centres()[objective.start:objective.end])
    step, optimizer = sgd_training(network, objective, gather=True)
    mine = slice(rank * 8, (rank + 1) * 8)
    for images, labels in training_batches():
        step((images[mine], labels[mine]))
    whole = ShardedCentres(objective, optimizer).gather()
    torch.save(dict(network=network.module.state_dict(), whole=whole), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_at_sample_rate_1_train_the_weights_of_the_unsharded_margin_softmax(tmp_path):
    """Two steps of two processes, each holding half the centres, give the network, the centres and their momentum
    of one process training the unsharded ArcFace on the global batches; process 0 gathers them whole."""
    mp.spawn(sharded_training_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    network, objective = tiny_network(), build_objective("arcface", embedding_dim=6, num_classes=5)
    with torch.no_grad():
        objective.weight.copy_(initial_centres())
    step, optimizer = sgd_training(network, objective, gather=False)
    for batch in training_batches():
        step(batch)
    assert not torch.allclose(objective.weight, initial_centres(), atol=1e-3)  # the comparison means something
    gathered, other = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert other["whole"] is None
    for name, value in network.state_dict().items():
        torch.testing.assert_close(gathered["network"][name], value, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(gathered["whole"]["loss_state"]["weight"], objective.weight.detach(), atol=1e-5,
                               rtol=1e-5)
    index = len(list(network.parameters()))  # the centres follow the network's parameters
    torch.testing.assert_close(gathered["whole"]["optimizer"]["state"][index]["momentum_buffer"],
                               optimizer.state[objective.weight]["momentum_buffer"], atol=1e-5, rtol=1e-5)
