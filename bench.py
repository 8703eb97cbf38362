"""Benchmark the training recipes on the AT&T faces: accuracy, time to accuracy, pipeline efficiency, memory.

    python bench.py                         # default, fast CPU and resnet50_triplet recipes, 3 seeds each
    python bench.py --recipes=default --seeds=1
    python bench.py --quick                 # a reduced run (two epochs on six people), under a minute
    python bench.py --recipes=default --seeds=1 --train_flags="--eval_every=2"   # flags for every train.py run
    python bench.py --gpu                   # CUDA: ResNet50 at 224x224 training steps, train.py on real images
    python bench.py --gpu_rec=data/faces    # CUDA: IResNet-50 on insightface records (train.rec, *.bin)
    python bench.py --sharded=100000        # CPU: PartialFC's sharded centres of 100,000 identities under torchrun
    python bench.py --students=out/student/tb_model.pth --photos=data/lfw/unseen/test   # embedding against dlib's
    python bench.py --docs=docs/results.md  # also write the tables into that file

The raw AT&T folder (s1..s40) comes from --att_dir or the FACE_DATA environment variable; it is split 7/1/2 per
person (prepare.split_dataset, valid 0.1, test 0.2, seed 0) into a temporary folder. Each run is `train.py` in a
subprocess, which chooses its best epoch on the 40 valid images; its history gives the training seconds (evaluation
excluded) at which the valid top-1 first reached 90 %, 97.5 % and 98.5 %, and `test.py` gives the top-1 of the
saved best model on the 80 test images, which chose nothing. Peak memory is the resident set's high-water
mark of the training process.

Pipeline efficiency: the images/s of train.py's real training steps (loading, augmentation, forward, loss and
mining, backward, optimiser; from its history, the first epoch left out as warm-up) against the same whole step
(engine.TrainingStep: forward, ArcFace loss, backward, Adam update) on random tensors of the same batch shape
already on the device, timed here right after the run with the same thread count; so the bare figure includes
the loss and the optimiser update. test.py's embedding pass (reading and decoding the files included) against the
same inference.embed_batch on random tensors, the two timed batch by batch in alternation. And the share of each
epoch spent on validation and on saving (checkpoints, history, curves).

Sharded centres (--sharded=N): a synthetic insightface .rec of N identities (two tiny JPEGs each) trained for a few
steps by train.py with its ArcFace centres sharded (--partial_fc) over two torchrun processes on the CPU (gloo), and
in one process unsharded; each run is stopped by a SIGTERM some seconds after its training began, which saves
last.pth with the whole centres gathered. The table gives each run's centre memory per process (train.py's startup
line), its steps, seconds a step, peak resident memory per process and last.pth's size. With it, the seconds the
P x K sampler takes to draw an epoch's batches at 100,000 identities and at MS1MV3's shape (labels only).

Students (--students=SPEC[,SPEC]): the seconds a face network (a checkpoint, insightface's backbone.pth, an ONNX
model: pretrained.load_face_network's) takes to embed the aligned photos of --photos, against dlib's descriptor on
the same photos, decoded and resized beforehand for each: batch by batch in alternation, so that the machine's load
falls on all alike.

Each table is printed in markdown. With --docs=PATH it is also written into PATH between the lines
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (a pair missing from the file is appended under a `## NAME`
heading), with the command, the date and the machine beneath it. Tables: att_recipes, att_pipeline, and with
--gpu gpu_step, gpu_pipeline, gpu_embedding, with --gpu_rec gpu_records, with --sharded sharded_centres and
pk_sampler, with --students student_speed.
"""
import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import re
import runpy
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from align import ALIGNMENT_FILE
from checkpoint import load_checkpoint
from data_utils import DatasetError, FaceFolder, PKBatchSampler, as_hw, make_transform
from engine import TrainingStep, build_optimizer, build_schedule
from files import atomic_write
from inference import embed_batch
from losses import build_objective
from model import EmbeddingNet, model_from_checkpoint, select_device
from prepare import bin_dataset, split_dataset
from pretrained import load_face_network
from recordio import RecordFaces, RecordWriter, pack_payload, read_property

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPES = {  # name: train.py arguments
    "default": [],
    "fast_cpu": ["configs/att_fast_cpu.py"],
    "resnet50_triplet": ["configs/resnet50_triplet.py"],
    "resnet50_distortion": ["configs/resnet50_distortion.py"],
    "siamese_contrastive": ["configs/siamese_contrastive.py"],
    "facenet_online": ["configs/facenet_online.py"],
    # AT&T has no ID photos (image 1 of each person stands in) and ImageNet weights cannot be had offline
    "passport_vgg16": ["configs/passport_vgg16.py", "--pretrained=False", "--anchor_pattern=1.pgm"],
    "pair_classifier": ["configs/pair_classifier.py"],
}
DEFAULT_RECIPES = ("default", "fast_cpu", "resnet50_triplet")
THRESHOLDS = (0.90, 0.975, 0.985)
QUICK = ("--epochs=2", "--backbone=resnet18", "--image_size=48,40")
GPU_SETTINGS = (  # --gpu: (label, amp, channels_last, compile, read_loss) of the training step on random tensors
    ("float32", False, False, False, False),
    ("AMP (bfloat16)", True, False, False, False),
    ("AMP + channels_last", True, True, False, False),
    ("AMP + channels_last, the loss read every step (.item())", True, True, False, True),
    ("AMP + channels_last + compile", True, True, True, False),
)
TABLES = ("att_recipes", "att_pipeline", "gpu_step", "gpu_pipeline", "gpu_embedding", "gpu_records", "sharded_centres",
          "pk_sampler", "student_speed")
RECORDS_RECIPE = "configs/ms1m_iresnet50.py"  # --gpu_rec: the field's standard recipe, on insightface-layout data
# --sharded: train.py's settings (a small network, the field's 512-d embedding, K = 2: the two photos of each
# identity; SGD: one momentum per centre, as insightface trains), and the runs: (processes, --partial_fc)
SHARDED_FLAGS = ("--device=cpu", "--backbone=smallcnn", "--head=linear", "--embedding_dim=512", "--image_size=32",
                 "--images_per_identity=2", "--optimizer=sgd", "--epochs=1", "--cache_images=false")
SHARDED_RUNS = ((2, 1.0), (2, 0.1), (1, 0.0))
MS1MV3_SHAPE = (93_431, 5_179_510)  # identities, images
# a table of the results: `name` (its markers in --docs), `title` (the line above it), column titles, rows of cells
Table = namedtuple("Table", "name title header rows")


# -----------------------------------------------------------------------------
# running the scripts

def peak_rss_mib(pid):
    """The process's resident-set high-water mark so far (Linux), in MiB; None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def run(args, log_path, watch=None, check=True):
    """Run a repository script (or `-m module`), its output to `log_path`; returns the peak resident memory in MiB.
    `watch(process)` is called twice a second while it runs; with `check`, an exit status other than 0 ends the
    bench."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
        peak = None
        while proc.poll() is None:
            peak = max(filter(None, [peak, peak_rss_mib(proc.pid)]), default=None)
            if watch:
                watch(proc)
            time.sleep(0.5)
    if check and proc.returncode != 0:
        sys.exit(f"error: {' '.join(args)} failed (exit {proc.returncode}); see {log_path}")
    return peak


def read_json(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def read_text(path):
    """The text of the file at `path`; "" when there is none."""
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def measure(name, extra, seed, data_dir, work, bare_seconds=4.0):
    """One run of recipe `name` with `seed` (train.py, then test.py on its best model, in subprocesses) and the
    figures of the tables: from their output files, and the bare step and embedding pass timed here."""
    out = os.path.join(work, f"{name}_seed{seed}")
    checkpoint = os.path.join(out, "tb_model.pth")
    peak = run(["train.py", *RECIPES[name], f"--data_dir={data_dir}", f"--out_dir={out}", f"--seed={seed}", *extra],
               out + "_train.log")
    run(["test.py", f"--checkpoint={checkpoint}"], out + "_test.log")
    history, results, config = (read_json(out, f) for f in ("history.json", "results.json", "config.json"))
    evaluated = [h for h in history if h.get("valid_identification") is not None]  # (train.py's eval_every)
    # (train.py's accuracies are float32 means: 72/80 reads 0.89999998)
    reached = {t: next((h["train_seconds"] for h in evaluated if h["valid_identification"] >= t - 1e-6), None)
               for t in THRESHOLDS}
    trained = [h for h in history if h["epoch"] > 0]
    epoch_time = [h["epoch_seconds"] + h["valid_seconds"] + h["save_seconds"] for h in trained]
    network = {k: config[k] for k in ("backbone", "embedding_dim", "head", "hidden_dim")}
    batch = round(sum(h["images"] for h in trained) / (trained[-1]["step"] - history[0]["step"]))
    return dict(recipe=name, seed=seed, top1=results["identification"]["accuracy"],
                f1=((results.get("verification") or {}).get("pair_classifier") or {}).get("f1"),
                seconds=history[-1]["train_seconds"], peak_mib=peak,
                untrained=history[0]["valid_identification"], reached=reached,
                best_epoch=max(evaluated, key=lambda h: h["valid_identification"])["epoch"],
                train_speed=steady_speed(history),
                bare_train_speed=None if config["freeze_backbone"] else bare_train_speed(
                    network, config["image_size"], batch, bare_seconds, config["device"], config["amp"],
                    config["channels_last"], config["compile"]),
                **embedding_speeds(checkpoint, data_dir, device=config["device"]),
                valid_share=statistics.mean(h["valid_seconds"] / t for h, t in zip(trained, epoch_time)),
                save_share=statistics.mean(h["save_seconds"] / t for h, t in zip(trained, epoch_time)))


def steady_speed(history):
    """The median images/s of train.py's training epochs, the first left out: it warms up (allocations, thread
    pools, cuDNN's kernel timing, DataLoader workers starting)."""
    trained = [h for h in history if h["epoch"] > 0]
    return statistics.median(h["images_per_second"] for h in trained[1:] or trained)


# -----------------------------------------------------------------------------
# the bare figures: what train.py and test.py do, on random tensors

def bare_train_speed(model_config, image_size, batch, seconds=4.0, device="cpu", amp=False, channels_last=False,
                     compile=False, read_loss=False, num_classes=40):
    """Images/s of train.py's whole training step (engine.TrainingStep: forward, ArcFace loss in float32 over
    `num_classes` identities, backward, fused Adam update, schedule) of EmbeddingNet(**model_config) on random
    uint8 images (batch, 3, *image_size) already on `device`, normalised by the step as in training, and random
    labels. With train.py's autocast (`amp`), memory format and compiler options; with `read_loss` the loss read on
    the CPU after each step, as train.py does (on a GPU the CPU then waits for the step to finish before it queues
    the next). Two warm-up steps (and the compilation), then steps until `seconds` have passed (at least three)."""
    torch.manual_seed(0)
    device, autocast, fp16_scaling = select_device(device, amp)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = EmbeddingNet(**model_config).to(device, memory_format=memory_format).train()
    objective = build_objective("arcface", embedding_dim=model_config["embedding_dim"], num_classes=num_classes)
    objective = objective.to(device)
    optimizer = build_optimizer("adam", [*model.parameters(), *objective.parameters()], lr=2e-3, weight_decay=0.0)
    # train.py's default schedule (the learning rate does not change the cost of a step)
    scheduler = build_schedule("onecycle", optimizer, steps_per_epoch=1000, epochs=1)
    scaler = torch.amp.GradScaler("cuda", enabled=fp16_scaling)
    step = TrainingStep(torch.compile(model) if compile else model, objective, optimizer, scheduler, scaler, device,
                        autocast, memory_format)
    images = torch.randint(0, 256, (batch, 3, *as_hw(image_size)), dtype=torch.uint8, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    torch.backends.cudnn.benchmark = device.startswith("cuda")  # as train.py: time the kernels for fixed shapes

    def one_step():
        loss = step((images, labels))[0]
        if read_loss:
            loss.item()
    for _ in range(2):
        one_step()
    synchronize()
    count, started = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - started < seconds:
        one_step()
        count += 1
    synchronize()  # the GPU runs behind: the time counts until its last step is done
    return count * batch / (time.perf_counter() - started)


@torch.inference_mode()
def embedding_speeds(checkpoint, data_dir, passes=2, device="cpu", amp=True, num_workers=0):
    """Images/s of test.py's embedding pass over data_dir's train/ and valid/ (its transform, FaceFolder and
    DataLoader: files read, decoded and transformed, then inference.embed_batch in batches of 64, on `device` with
    test.py's autocast; with `num_workers` DataLoader workers), and of embed_batch on random uint8 tensors of each
    batch's shape already on the device. Without workers, timed in pairs, a bare batch right after each real one,
    so that a change in the machine's load falls on both alike (unpaired runs on 2 cores move the ratio by 15-20
    points); with workers, the bare batches after the real passes. Returns test_speed, bare_test_speed, images."""
    device, autocast, _ = select_device(device, amp)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).to(device).eval()
    transform = make_transform(state["image_size"], train=False, pixels=True)
    loaders = [DataLoader(FaceFolder(os.path.join(data_dir, part), transform), batch_size=64, num_workers=num_workers,
                          pin_memory=device.startswith("cuda")) for part in ("train", "valid")]
    noise = torch.randint(0, 256, (64, 3, *as_hw(state["image_size"])), dtype=torch.uint8, device=device)
    embed_batch(model, noise[:2], device, autocast)  # warm-up: allocations, thread pool
    real = bare = 0.0
    sizes = []
    for _ in range(passes):
        for loader in loaders:
            started = time.perf_counter()  # each real batch's time includes reading it
            for batch, _labels in loader:
                embed_batch(model, batch, device, autocast)  # (.cpu(): it waits for the device)
                sizes.append(len(batch))
                middle = time.perf_counter()
                if not num_workers:
                    embed_batch(model, noise[:len(batch)], device, autocast)
                    bare += time.perf_counter() - middle
                real += middle - started
                started = time.perf_counter()
    if num_workers:  # workers load while the main process infers: a bare batch in between would lend them its time
        started = time.perf_counter()
        for size in sizes:
            embed_batch(model, noise[:size], device, autocast)
        bare = time.perf_counter() - started
    return dict(test_speed=sum(sizes) / real, bare_test_speed=sum(sizes) / bare, images=sum(sizes))


# -----------------------------------------------------------------------------
# the AT&T recipes

def prepare_data(att_dir, work, quick=False):
    """The AT&T identity folders of `att_dir` (with `quick`, the first six) linked into work/raw, with the
    alignment record of aligned photos, and split 7/1/2 per person into work/att_7_1_2, once (a kept folder is
    reused). Returns the split folder."""
    raw, data_dir = os.path.join(work, "raw"), os.path.join(work, "att_7_1_2")
    if os.path.isdir(data_dir):
        return data_dir
    os.makedirs(raw, exist_ok=True)
    people = sorted(os.listdir(att_dir))
    for person in people[:6] if quick else people:
        if os.path.isdir(os.path.join(att_dir, person)) and not os.path.exists(os.path.join(raw, person)):
            os.symlink(os.path.abspath(os.path.join(att_dir, person)), os.path.join(raw, person))
    if os.path.isfile(os.path.join(att_dir, ALIGNMENT_FILE)):  # photos of prepare.py align: the runs say so
        shutil.copyfile(os.path.join(att_dir, ALIGNMENT_FILE), os.path.join(raw, ALIGNMENT_FILE))
    partial = data_dir + ".partial"  # renamed when complete: an interrupted split is never reused
    with open(os.path.join(work, "split.log"), "w") as log:
        split_dataset(raw, partial, valid=0.1, test=0.2, seed=0, force=True, log=lambda line: print(line, file=log))
    os.rename(partial, data_dir)
    return data_dir


def pixel_figures(data_dir, work, size=(56, 46)):
    """(identification top-1, retrieval precision@1) of raw pixels at `size` (AT&T's 112x92 halved) on the split
    `data_dir`, by test.py --checkpoint=pixels: the figures a trained network has to beat on the same images."""
    out = os.path.join(work, "pixels")
    run(["test.py", "--checkpoint=pixels", f"--data_dir={data_dir}", f"--pixel_size={size[0]},{size[1]}",
         f"--out_dir={out}"], out + "_test.log")
    results = read_json(out, "results.json")
    return results["identification"]["accuracy"], results["retrieval"]["precision_at_1"]


def run_recipes(names, seeds, extra, data_dir, work, bare_seconds):
    """measure's figures of every recipe of `names` with seeds 0..seeds-1, a line printed after each run."""
    rows = []
    for name in names:
        for seed in range(seeds):
            rows.append(measure(name, extra, seed, data_dir, work, bare_seconds))
            print(f"{name} seed {seed}: top-1 {100 * rows[-1]['top1']:.2f}% in {rows[-1]['seconds']:.0f}s", flush=True)
    return rows


def mean(values):
    """The mean, or None when a value is missing (e.g. a seed that never reached a threshold)."""
    values = list(values)
    return None if None in values else statistics.mean(values)


def cell(value, unit="", digits=0, scale=1):
    """A table cell: `value` times `scale` with `digits` decimals and `unit`, or - when it is missing."""
    return "-" if value is None else f"{scale * value:.{digits}f}{unit}"


def recipe_means(rows, name):
    """The mean over the seeds of each figure of recipe `name`; `reached` per threshold."""
    runs = [r for r in rows if r["recipe"] == name]
    keys = [k for k in runs[0] if k not in ("recipe", "seed", "reached")]
    return dict({k: mean(r[k] for r in runs) for k in keys}, reached={t: mean(r["reached"][t] for r in runs)
                                                                       for t in THRESHOLDS})


def recipe_tables(means, caption):
    """The att_recipes and att_pipeline tables of the recipes' `means` ({name: recipe_means})."""
    accuracy = [[name, cell(m["top1"], " %", 2, 100), cell(m["f1"], digits=3), cell(m["untrained"], " %", 2, 100),
                 *(cell(m["reached"][t], " s") for t in THRESHOLDS), cell(m["seconds"]), cell(m["peak_mib"])]
                for name, m in means.items()]
    pipeline = [[name, cell(m["train_speed"], digits=1), cell(m["bare_train_speed"]),
                 cell(m["bare_train_speed"] and m["train_speed"] / m["bare_train_speed"], " %", 0, 100),
                 cell(m["test_speed"], digits=1), cell(m["bare_test_speed"], digits=1),
                 cell(m["test_speed"] / m["bare_test_speed"], " %", 0, 100), cell(m["valid_share"], " %", 1, 100),
                 cell(m["save_share"], " %", 1, 100)] for name, m in means.items()]
    efficiency = ("Pipeline efficiency (images/s; bare: train.py's whole step, loss and optimiser update included, "
                  "and test.py's inference, on random tensors of the same batch shape)")
    return [Table("att_recipes", caption, ["recipe", "top-1 (test.py)", "pair F1", "untrained", "s to 90 %",
                                           "s to 97.5 %", "s to 98.5 %", "train s", "peak MiB"], accuracy),
            Table("att_pipeline", efficiency, ["recipe", "train.py steps", "bare training step", "ratio",
                                               "test.py embedding", "bare inference", "ratio",
                                               "validation share of an epoch", "saving share"], pipeline)]


def speedups(means, reference="resnet50_triplet"):
    """Lines comparing each recipe's time to 90 % with the `reference` recipe's (when both ran)."""
    if reference not in means:
        return []
    ref = means[reference]["reached"][0.90]
    return [f"time to 90 %: {name} is {ref / m['reached'][0.90]:.1f}x faster than {reference}" if ref else
            f"time to 90 %: {reference} never reaches 90 %; {name} takes {m['reached'][0.90]:.0f} s"
            for name, m in means.items() if name != reference and m["reached"][0.90]]


# -----------------------------------------------------------------------------
# --gpu

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
    """The CUDA figures, a table at a time (a generator): images/s of the default network's training step (ResNet50
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
    recipe = runpy.run_path(os.path.join(HERE, RECORDS_RECIPE))
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


# -----------------------------------------------------------------------------
# --students: embedding speed against dlib's descriptor, on the CPU

def student_table(specs, folder, batches=4, batch=32):
    """The student_speed table: each network of `specs` and dlib's descriptor embedding the same first
    batches x batch photos of `folder` (identity folders of aligned faces), each photo decoded and resized for each
    network beforehand, timed batch by batch in alternation."""
    faces = FaceFolder(folder)
    count = min(len(faces), batches * batch)
    networks = {spec: load_face_network(spec) for spec in ["dlib", *specs]}
    inputs = {spec: torch.stack([make_transform(state["image_size"], train=False, pixels=True)(faces.read(i))
                                 for i in range(count)]) for spec, (_, state) in networks.items()}
    seconds = dict.fromkeys(networks, 0.0)
    for start in range(0, count, batch):
        for spec, (model, _) in networks.items():
            started = time.perf_counter()
            embed_batch(model, inputs[spec][start:start + batch], "cpu", contextlib.nullcontext())
            seconds[spec] += time.perf_counter() - started
    rows = [[state.get("network", spec), "x".join(map(str, state["image_size"])), cell(1000 * seconds[spec] / count,
             "", 1), cell(count / seconds[spec]), cell(seconds["dlib"] / seconds[spec], " x", 1)]
            for spec, (_, state) in networks.items()]
    title = (f"Embedding {count} aligned photos of {folder} on {os.cpu_count()} CPU cores (torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads), batches of {batch}, decoding excluded")
    return Table("student_speed", title, ["network", "input", "ms/photo", "photos/s", "faster than dlib"], rows)


# -----------------------------------------------------------------------------
# --sharded: PartialFC's centres at scale, on the CPU

def synthetic_records(folder, identities, images=2, size=16, patterns=64, seed=0):
    """`folder` as an insightface-style dataset of `identities` people with `images` photos each: train.rec and
    train.idx (every key an image, labelled with its person), the photos a few distinct `patterns` of grey noise
    (size x size JPEGs, encoded once and shared round: 100,000 people take about 60 MB), and check.bin, 40
    verification pairs among 20 people of such photos (prepare.bin_dataset). The labels are read back once
    (RecordFaces caches them beside the .rec), so that train.py's processes do not each read every header."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(patterns):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buffer, "JPEG", quality=50,
                                                                                  optimize=True)
        encoded.append(buffer.getvalue())
    with RecordWriter(os.path.join(folder, "train.rec")) as writer:
        for key in range(identities * images):
            writer.write(key, pack_payload(key // images, encoded[key % patterns], id=key))
    faces = os.path.join(folder, "pairs_faces")
    for key in range(20 * images):
        os.makedirs(os.path.join(faces, str(key // images)), exist_ok=True)
        with open(os.path.join(faces, str(key // images), f"{key % images}.jpg"), "wb") as f:
            f.write(encoded[key % patterns])
    bin_dataset(faces, os.path.join(folder, "check.bin"), pairs=40, seed=seed, log=lambda line: None)
    RecordFaces(folder, log=lambda line: None)
    return folder


def trainers(launcher):
    """{rank: pid} of torchrun's train.py processes (the children of the launcher's pid; Linux /proc)."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as environ:
                variables = environ.read().split(b"\0")
        except (OSError, ValueError):  # gone, or not ours
            continue
        rank = next((v[5:] for v in variables if v.startswith(b"RANK=")), None)
        if parent == launcher and rank is not None:
            ranks[int(rank)] = int(pid)
    return ranks


class StopAfter:
    """run()'s watch of train.py in `processes` processes (under torchrun when more than one): each one's peak
    resident memory (`peaks`, MiB by rank), and a SIGTERM to process 0 `seconds` after training began (epoch 0,
    the untrained network, evaluated and saved: history.json exists in `out`). The processes then stop together
    after the step they are in, process 0 saving last.pth with every process's share of the centres."""

    def __init__(self, out, seconds, processes):
        self.history, self.seconds, self.processes = os.path.join(out, "history.json"), seconds, processes
        self.peaks, self.stop_at = {}, None

    def __call__(self, proc):
        ranks = trainers(proc.pid) if self.processes > 1 else {0: proc.pid}
        for rank, pid in ranks.items():
            self.peaks[rank] = max(filter(None, [self.peaks.get(rank), peak_rss_mib(pid)]), default=None)
        if self.stop_at is None and os.path.exists(self.history):
            self.stop_at = time.monotonic() + self.seconds
        if self.stop_at is not None and time.monotonic() >= self.stop_at and 0 in ranks:
            with contextlib.suppress(ProcessLookupError):  # (it ended meanwhile: its epoch was done)
                os.kill(ranks[0], signal.SIGTERM)
            self.stop_at = math.inf


def sharded_run(data_dir, out, processes, rate, batch, seconds):
    """train.py on the synthetic `data_dir` in `processes` processes with --partial_fc=`rate` and a global batch of
    `batch` images, stopped `seconds` after its training began (StopAfter). Returns its figures: the centres'
    MB per process (the startup line's; one process holds them all) and unsharded, steps trained, seconds a step,
    peak MiB per process (by rank) and last.pth's MB."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    args = [*launcher, "train.py", f"--data_dir={data_dir}", "--val_bins=check", f"--out_dir={out}",
            f"--batch_size={batch // processes}", f"--partial_fc={rate}", *SHARDED_FLAGS]
    watch = StopAfter(out, seconds, processes)
    run(args, out + "_train.log", watch, check=False)  # (a stopped run exits with 143, torchrun then with 1)
    last = os.path.join(out, "last.pth")
    state = load_checkpoint(last) if os.path.exists(last) else {}
    if not state.get("step"):
        sys.exit(f"error: --sharded: {' '.join(args)} trained no step; see {out}_train.log")
    centres = max(state["loss_state"].values(), key=torch.numel)  # whole, however many processes held them
    unsharded = centres.numel() * centres.element_size() / 1e6
    line = re.search(r"([\d,.]+) MB per process of", read_text(out + "_train.log"))
    return dict(per_process=float(line[1].replace(",", "")) if line else unsharded, unsharded=unsharded,
                steps=state["step"], step_seconds=state["train_seconds"] / state["step"],
                peaks=[watch.peaks.get(rank) for rank in range(processes)], last_mb=os.path.getsize(last) / 1e6)


def sharded_table(work, identities, seconds=20.0, runs=SHARDED_RUNS, batch=256):
    """The sharded_centres table: each of `runs` ((processes, --partial_fc)) on a synthetic .rec of `identities`
    people (built in `work`), global batches of `batch` images, stopped `seconds` after training began."""
    started = time.perf_counter()
    data_dir = synthetic_records(os.path.join(work, f"records_{identities}"), identities)
    print(f"{identities:,} identities packed in {time.perf_counter() - started:.0f} s: "
          f"{os.path.getsize(os.path.join(data_dir, 'train.rec')) / 1e6:.0f} MB", flush=True)
    rows = []
    for processes, rate in runs:
        figures = sharded_run(data_dir, os.path.join(work, f"sharded_{processes}x{rate:g}"), processes, rate, batch,
                              seconds)
        print(f"{processes} process(es), --partial_fc={rate:g}: {figures['steps']} steps", flush=True)
        rows.append([f"{identities:,}", processes, f"{rate:g}" if rate else "0 (unsharded)",
                     cell(figures["per_process"], digits=1), cell(figures["unsharded"], digits=1), figures["steps"],
                     cell(figures["step_seconds"], digits=2), " / ".join(cell(p) for p in figures["peaks"]),
                     cell(figures["last_mb"], digits=1)])
    title = (f"ArcFace centres of {identities:,} identities x 512 (float32) on {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}: train.py {' '.join(SHARDED_FLAGS)}, global batches of {batch} images (the batch "
             f"size per process is {batch} / processes; one thread in each of torchrun's, "
             f"{torch.get_num_threads()} in a single one), stopped by a SIGTERM {seconds:g} s after training began")
    header = ["identities", "processes", "--partial_fc", "centres MB per process", "unsharded MB", "steps",
              "s/step", "peak MiB per process", "last.pth MB"]
    return Table("sharded_centres", title, header, rows)


def shape_labels(identities, images, seed=0):
    """A label per image for `images` images of `identities` people, their counts spread as a log-normal's (each
    person at least one): a stand-in for a real dataset's labels."""
    weights = np.random.default_rng(seed).lognormal(0.0, 0.75, identities)
    counts = 1 + np.floor(weights / weights.sum() * (images - identities)).astype(np.int64)
    counts[:images - counts.sum()] += 1  # (what the rounding down left)
    return np.repeat(np.arange(identities), counts)


def sampler_table(identities):
    """The pk_sampler table: the seconds PKBatchSampler takes to draw an epoch's batches (set_epoch) for
    `identities` people of two photos each in sharded_table's batches (two processes of 64 x 2), and for MS1MV3's
    shape (shape_labels) in the MS1M recipe's (one process of 32 x 4). Every process draws the whole global batch."""
    rows = []
    for labels, p, k, processes in ((np.repeat(np.arange(identities), 2), 64, 2, 2),
                                    (shape_labels(*MS1MV3_SHAPE), 32, 4, 1)):
        sampler = PKBatchSampler(labels, p, k, world_size=processes)
        started = time.perf_counter()
        sampler.set_epoch(1)
        rows.append([f"{labels.max() + 1:,}", f"{len(labels):,}", f"{p} x {k}", processes, f"{len(sampler):,}",
                     cell(time.perf_counter() - started, digits=2)])
    return Table("pk_sampler", "P x K batches: the seconds an epoch's draw takes (PKBatchSampler.set_epoch, in this "
                               "process)", ["identities", "images", "P x K", "processes", "batches", "s"], rows)


# -----------------------------------------------------------------------------
# tables: printed, and written into the documentation

def markdown_table(header, rows):
    """A markdown table of the column titles `header` and `rows` (lists of cells as long as it); a | in a cell is
    escaped."""
    lines = [[str(c).replace("|", "\\|") for c in cells] for cells in (header, *rows)]
    return "\n".join(["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(cells) + " |" for cells in lines[1:])])


def replace_section(text, name, body):
    """`text` with what lies between the lines `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` replaced by
    `body`; without those markers, `text` with a `## NAME` section holding them and `body` appended. Raises
    ValueError for an opening marker without its closing one."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    before, found, after = text.partition(start)
    if not found:
        return (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"## {name}\n\n{block}\n"
    if end not in after:
        raise ValueError(f"{start} has no closing {end}")
    return before + block + after.split(end, 1)[1]


def provenance(argv, gpu=False):
    """The line beneath a table in the documentation: the command, the date and the machine (the CPU model, cores,
    torch version; with `gpu` the GPU)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass  # not Linux: platform's name stands
    machine = [cpu, f"{os.cpu_count()} CPU cores", f"torch {torch.__version__}",
               *([torch.cuda.get_device_name()] if gpu else [])]
    return f"`{shlex.join(['python', 'bench.py', *argv])}` on {datetime.date.today()}: {', '.join(machine)}"


def publish(table, docs="", note=""):
    """Print `table` (its title, then the markdown) and, with `docs`, write it with `note` beneath into that file
    in place of its section (atomically; a missing file is created)."""
    text = f"{table.title}\n\n{markdown_table(table.header, table.rows)}"
    print(f"\n{text}", flush=True)
    if docs:
        new = replace_section(read_text(docs), table.name, f"{text}\n\n{note}")
        atomic_write(docs, lambda f: f.write(new), mode="w")


# -----------------------------------------------------------------------------

def int_list(text):
    return [int(n) for n in text.split(",")]


def parse_args(argv):
    """bench.py's flags, checked (an error exits naming the flag)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--att_dir", default=os.environ.get("FACE_DATA", "../shared/data/att_faces"))
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="two epochs of ResNet18 on six people, one seed")
    parser.add_argument("--keep", help="keep the runs in this folder instead of a temporary one")
    parser.add_argument("--train_flags", default="", help="train.py flags added to every run (after the recipe's)")
    parser.add_argument("--gpu", action="store_true", help="the CUDA figures instead: ResNet50 at 224x224 on random "
                                                           "tensors and train.py on real images")
    parser.add_argument("--gpu_rec", default="", help="--gpu: IResNet-50 (configs/ms1m_iresnet50.py) on this "
                        "insightface-layout folder (train.rec and .bin sets) instead of ResNet50 on AT&T")
    parser.add_argument("--gpu_workers", default="4,8,12", type=int_list,
                        help="--gpu: train.py's num_workers to try, comma-separated")
    parser.add_argument("--sharded", default=0, type=int, help="the CPU figures of PartialFC instead: a synthetic "
                        ".rec of this many identities trained under torchrun with sharded centres, and the P x K "
                        "sampler's epoch at that scale and MS1MV3's")
    parser.add_argument("--students", default="", help="the CPU embedding speed of these face networks (comma-"
                        "separated checkpoints, backbone.pth or .onnx files) against dlib's descriptor instead")
    parser.add_argument("--photos", default="data/lfw/unseen/test", help="--students: identity folders of aligned "
                        "photos to embed")
    parser.add_argument("--docs", default="", help="also write the tables into this markdown file, between markers")
    args = parser.parse_args(argv)
    unknown = [n for n in args.recipes.split(",") if n not in RECIPES]
    if unknown:
        sys.exit(f"error: --recipes: unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    if args.sharded and (args.sharded < 4 or args.gpu or args.gpu_rec):
        sys.exit(f"error: --sharded={args.sharded}: give 4 identities or more (P x K batches of two processes), "
                 f"without --gpu or --gpu_rec")
    if args.students and not os.path.isdir(args.photos):
        sys.exit(f"error: --photos: {args.photos} is no folder of identity folders")
    if not args.sharded and not args.students and not os.path.isdir(os.path.join(args.att_dir, "s1")):
        sys.exit(f"error: {args.att_dir} is not the AT&T folder (s1..s40); pass --att_dir or set FACE_DATA")
    if args.gpu_rec and not os.path.isfile(os.path.join(args.gpu_rec, "train.rec")):
        sys.exit(f"error: --gpu_rec: {args.gpu_rec} holds no train.rec (prepare.py pack FOLDER DIR/train.rec)")
    args.gpu = args.gpu or bool(args.gpu_rec)
    if args.gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu needs a CUDA GPU, and torch.cuda.is_available() is False here")
    try:  # checked now rather than after an hour of runs
        docs = read_text(args.docs) if args.docs else ""
        for name in TABLES:
            replace_section(docs, name, "")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        sys.exit(f"error: --docs={args.docs}: {err}; fix the file or choose another")
    return args


def recipes_caption(args, pixels):
    """The line above the att_recipes table: the conditions of the runs, and `pixels` (pixel_figures') beside."""
    start = "from the network of --init_from" if "--init_from" in args.train_flags else "random initialisation"
    return (f"AT&T faces, 7/1/2 split (top-1 on the 80 test images, which chose nothing), {start}, "
            f"{os.cpu_count()} CPU cores"
            + (" (quick: 2 epochs, ResNet18, 6 people)" if args.quick else f", mean of {args.seeds} seed(s)")
            + (f", train.py {args.train_flags}" if args.train_flags else "")
            + f". Raw pixels on the same images, no training: top-1 {100 * pixels[0]:.2f} %, the nearest gallery photo "
              f"of the probe's person {100 * pixels[1]:.2f} %")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    note = provenance(argv, args.gpu)
    work = args.keep or tempfile.mkdtemp(prefix="bench_")
    os.makedirs(work, exist_ok=True)
    try:
        data_dir = (None if args.gpu_rec or args.sharded or args.students else
                    prepare_data(args.att_dir, work, args.quick))
    except DatasetError as err:
        sys.exit(f"error: --att_dir: {err}")
    lines = []
    if args.students:
        try:
            tables = [student_table(args.students.split(","), args.photos)]
        except (ValueError, DatasetError) as err:  # a CheckpointError is a ValueError
            sys.exit(f"error: --students: {err}")
    elif args.sharded:
        tables = [sharded_table(work, args.sharded), sampler_table(args.sharded)]
    elif args.gpu_rec:
        tables = [gpu_records(args.gpu_rec, work, args.gpu_workers)]
    elif args.gpu:
        tables = gpu_tables(data_dir, work, args.gpu_workers)
    else:
        names = args.recipes.split(",")
        rows = run_recipes(names, 1 if args.quick else args.seeds, [*(QUICK if args.quick else ())]
                           + shlex.split(args.train_flags), data_dir, work, 1.0 if args.quick else 4.0)
        means = {name: recipe_means(rows, name) for name in names}
        tables = recipe_tables(means, recipes_caption(args, pixel_figures(data_dir, work)))
        lines = speedups(means)
    for table in tables:
        publish(table, args.docs, note)
    print("\n".join(lines + [f"runs kept in {work}" if args.keep else ""]))
    if not args.keep:  # (a failed run exits before this: its logs stay for a look)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
