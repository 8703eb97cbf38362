"""PartialFC's sharded centres at scale on the CPU: train.py under torchrun on a synthetic insightface .rec of many
identities (sharded_centres), and the seconds the P x K sampler takes to draw an epoch's batches (pk_sampler)."""
import contextlib
import io
import math
import os
import re
import signal
import sys
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.publish import Table, cell
from benchmarks.runs import peak_rss_mib, read_text, run
from checkpoint import load_checkpoint
from recordio import RecordFaces, RecordWriter, pack_payload
from sampling import PKBatchSampler

# --sharded: train.py's settings (a small network, the field's 512-d embedding, K = 2: the two photos of each
# identity; SGD: one momentum per centre, as insightface trains), and the runs: (processes, --partial_fc)
SHARDED_FLAGS = ("--device=cpu", "--backbone=smallcnn", "--head=linear", "--embedding_dim=512", "--image_size=32",
                 "--images_per_identity=2", "--optimizer=sgd", "--epochs=1", "--cache_images=false")
SHARDED_RUNS = ((2, 1.0), (2, 0.1), (1, 0.0))
MS1MV3_SHAPE = (93_431, 5_179_510)  # identities, images


def synthetic_records(folder, identities, bin_dataset, images=2, size=16, patterns=64, seed=0):
    """`folder` as an insightface-style dataset of `identities` people with `images` photos each: train.rec and
    train.idx (every key an image, labelled with its person), the photos a few distinct `patterns` of grey noise
    (size x size JPEGs, encoded once and shared round: 100,000 people take about 60 MB), and check.bin, 40
    verification pairs among 20 people of such photos (written by `bin_dataset`: prepare.bin_dataset, passed in, as
    modules do not import the scripts). The labels are read back once (RecordFaces caches them beside the .rec), so
    that train.py's processes do not each read every header."""
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
    `batch` images, stopped `seconds` after its training began (StopAfter). Returns its metrics: the centres'
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


def sharded_table(work, identities, bin_dataset, seconds=20.0, runs=SHARDED_RUNS, batch=256):
    """The sharded_centres table: each of `runs` ((processes, --partial_fc)) on a synthetic .rec of `identities`
    people (built in `work`; `bin_dataset`: prepare.bin_dataset, see synthetic_records), global batches of `batch`
    images, stopped `seconds` after training began."""
    started = time.perf_counter()
    data_dir = synthetic_records(os.path.join(work, f"records_{identities}"), identities, bin_dataset)
    print(f"{identities:,} identities packed in {time.perf_counter() - started:.0f} s: "
          f"{os.path.getsize(os.path.join(data_dir, 'train.rec')) / 1e6:.0f} MB", flush=True)
    rows = []
    for processes, rate in runs:
        metrics = sharded_run(data_dir, os.path.join(work, f"sharded_{processes}x{rate:g}"), processes, rate, batch,
                              seconds)
        print(f"{processes} process(es), --partial_fc={rate:g}: {metrics['steps']} steps", flush=True)
        rows.append([f"{identities:,}", processes, f"{rate:g}" if rate else "0 (unsharded)",
                     cell(metrics["per_process"], digits=1), cell(metrics["unsharded"], digits=1), metrics["steps"],
                     cell(metrics["step_seconds"], digits=2), " / ".join(cell(p) for p in metrics["peaks"]),
                     cell(metrics["last_mb"], digits=1)])
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
