"""The CUDA benchmarks: the training step on random tensors in each setting (gpu_step), train.py on real images with
each number of DataLoader workers against it (gpu_pipeline), test.py's embedding pass (gpu_embedding), and train.py
on insightface records (gpu_records)."""
import os
import runpy
import time

import torch

from benchmarks.pipeline import bare_train_speed, embedding_speeds, steady_speed
from benchmarks.publish import Table, cell
from benchmarks.runs import ROOT, read_json, run
from data_utils import as_hw
from recordio import read_property

GPU_SETTINGS = (  # --gpu: (label, amp, channels_last, compile, read_loss) of the training step on random tensors
    ("float32", False, False, False, False),
    ("AMP (bfloat16)", True, False, False, False),
    ("AMP + channels_last", True, True, False, False),
    ("AMP + channels_last, the loss read every step (.item())", True, True, False, True),
    ("AMP + channels_last + compile", True, True, True, False),
)
RECORDS_RECIPE = "configs/ms1m_iresnet50.py"  # --gpu_rec: the field's standard recipe, on insightface-layout data


def repeat_train_images(data_dir, out, times):
    """A view of the split `data_dir` (symbolic links) whose train/ holds each photo `times` times under other names,
    so that a GPU trains full batches of 256 for more than one step an epoch; valid/ is the same."""
    for person in sorted(os.listdir(os.path.join(data_dir, "train"))):
        folder = os.path.join(out, "train", person)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(os.path.join(data_dir, "train", person)):
            for copy in range(times):
                link = os.path.join(folder, f"{copy}_{name}")
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(os.path.join(data_dir, "train", person, name)), link)
    if not os.path.lexists(os.path.join(out, "valid")):
        os.symlink(os.path.abspath(os.path.join(data_dir, "valid")), os.path.join(out, "valid"))
    return out


def gpu_tables(data_dir, work, workers, batch=256, size=(224, 224), seconds=10.0):
    """The CUDA benchmarks, a table at a time (a generator): images/s of the default network's training step (ResNet50
    + mlp head) at `size` on random tensors in each of GPU_SETTINGS; train.py on real images (the AT&T training
    photos, each 16 times, P x K batches of 32 x 8 = `batch`, AMP + channels_last) with each number of DataLoader
    `workers`, against the step on random tensors with the same settings; test.py's embedding pass of the last
    run's model."""
    network = dict(backbone="resnet50", embedding_dim=128, head="mlp", hidden_dim=512)
    speeds = {}
    for label, amp, channels_last, compile, read_loss in GPU_SETTINGS:
        speeds[label] = bare_train_speed(network, size, batch, seconds, "cuda", amp, channels_last, compile, read_loss)
        print(f"training step, {label}: {speeds[label]:.0f} images/s", flush=True)
    yield Table("gpu_step", f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}: "
                            f"ResNet50 + mlp head at {size[0]}x{size[1]}, batches of {batch}, train.py's step (ArcFace "
                            f"loss, fused Adam) on random tensors",
                ["setting", "images/s"], [[label, cell(speed)] for label, speed in speeds.items()])
    repeated = repeat_train_images(data_dir, os.path.join(work, "att_7_1_2_x16"), 16)
    table, checkpoint = gpu_pipeline(repeated, work, workers, batch, size, speeds["AMP + channels_last"])
    yield table
    yield gpu_embedding(checkpoint, repeated, workers)


def gpu_pipeline(data_dir, work, workers, batch, size, reference):
    """(the gpu_pipeline table: train.py on `data_dir` with each number of `workers` against `reference` images/s,
    the last run's best checkpoint)."""
    flags = [f"--image_size={size[0]},{size[1]}", f"--batch_size={batch}", "--images_per_identity=8",
             "--channels_last=True", "--epochs=4", "--eval_every=4"]
    rows = []
    for count in workers:
        out = os.path.join(work, f"gpu_workers{count}")
        started = time.perf_counter()
        peak = run(["train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *flags, f"--num_workers={count}"],
                   out + "_train.log")
        history = read_json(out, "history.json")
        speed = steady_speed(history)
        print(f"train.py, num_workers={count}: {speed:.0f} images/s", flush=True)
        rows.append([count, cell(speed), cell(speed / reference, " %", 0, 100), cell(history[-1]["train_seconds"]),
                     cell(sum(h["valid_seconds"] + h["save_seconds"] for h in history)),
                     cell(time.perf_counter() - started), cell(peak)])
    title = (f"train.py on real images (the training photos x16, {' '.join(flags)}), against the step on random "
             f"tensors with AMP + channels_last ({reference:.0f} images/s); run s: the whole process, from its start")
    header = ["num_workers", "train.py images/s", "ratio", "training s", "evaluating + saving s", "run s", "peak MiB"]
    return Table("gpu_pipeline", title, header, rows), os.path.join(out, "tb_model.pth")


def gpu_records(rec_dir, work, workers, epochs=6, seconds=10.0):
    """The gpu_records table: images/s of RECORDS_RECIPE's training step (its network, image size and batch) on
    random tensors in float32 and with AMP + channels_last, then of train.py with that recipe on the insightface-
    layout folder `rec_dir` (train.rec, checkpoint chosen on its .bin sets) through the whole pipeline (records read
    and decoded by the DataLoader `workers` each epoch, --cache_images=false), against the AMP step."""
    recipe = runpy.run_path(os.path.join(ROOT, RECORDS_RECIPE))
    network = {k: recipe[k] for k in ("backbone", "embedding_dim", "head")}
    size, batch = as_hw(recipe["image_size"]), recipe["batch_size"]
    classes = read_property(rec_dir)
    bare = {label: bare_train_speed(network, size, batch, seconds, "cuda", amp, amp, num_classes=classes[0] if classes
                                    else 1000) for label, amp in (("float32", False), ("AMP + channels_last", True))}
    rows = [[f"the step on random tensors, {label}", cell(speed), ""] for label, speed in bare.items()]
    bins = ",".join(sorted(os.path.splitext(n)[0] for n in os.listdir(rec_dir) if n.endswith(".bin")))
    for count in workers:
        out = os.path.join(work, f"records_workers{count}")
        run(["train.py", RECORDS_RECIPE, f"--data_dir={rec_dir}", f"--val_bins={bins}", f"--out_dir={out}",
             f"--epochs={epochs}", f"--eval_every={epochs}", "--cache_images=false", f"--num_workers={count}"],
            out + "_train.log")
        speed = steady_speed(read_json(out, "history.json"))
        print(f"train.py on the records, num_workers={count}: {speed:.0f} images/s", flush=True)
        rows.append([f"train.py on the records, num_workers={count}", cell(speed),
                     cell(speed / bare["AMP + channels_last"], " %", 0, 100)])
    title = (f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}: {RECORDS_RECIPE} "
             f"({network['backbone']} + {network['head']} -> {network['embedding_dim']}-d at {size[0]}x{size[1]}, "
             f"batches of {batch}) on {rec_dir} ({classes[0] if classes else '?'} identities)")
    return Table("gpu_records", title, ["what trains", "images/s", "against the AMP step"], rows)


def gpu_embedding(checkpoint, data_dir, workers):
    """The gpu_embedding table: test.py's embedding pass over `data_dir` without and with each number of
    DataLoader `workers`, against bare inference."""
    rows = []
    for count in (0, *workers):
        speeds = embedding_speeds(checkpoint, data_dir, passes=1, device="cuda", num_workers=count)
        rows.append([count, cell(speeds["test_speed"]), cell(speeds["bare_test_speed"]),
                     cell(speeds["test_speed"] / speeds["bare_test_speed"], " %", 0, 100)])
    title = (f"test.py's embedding pass over the photos x16 ({speeds['images']:,} files, batches of 64, the last "
             f"run's model), against bare inference")
    return Table("gpu_embedding", title, ["num_workers", "test.py images/s", "bare inference images/s", "ratio"], rows)
