"""Benchmark the training recipes on the AT&T faces: accuracy, time to accuracy, pipeline efficiency, memory.

    python bench.py                         # default, fast CPU and resnet50_triplet recipes, 3 seeds each
    python bench.py --recipes=default --seeds=1
    python bench.py --quick                 # a reduced run (two epochs on six people), under a minute
    python bench.py --recipes=default --seeds=1 --train_flags="--eval_every=2"   # flags for every train.py run
    python bench.py --gpu                   # CUDA: ResNet50 at 224x224 training steps, train.py on real images

The raw AT&T folder (s1..s40) comes from --att_dir or the FACE_DATA environment variable; it is split 8/2 per
person (`split --valid=0.2 --seed=0`) into a temporary folder. Each run is `train.py` in a subprocess; its
history gives the training seconds (evaluation excluded) at which the valid top-1 first reached 90 %, 97.5 %
and 98.5 %, and `test.py` gives the top-1 of the saved best model. Peak memory is the resident set's high-water
mark of the training process.

Pipeline efficiency: the images/s of train.py's real training steps (loading, augmentation, forward, loss and
mining, backward, optimiser; from its history, the first epoch left out as warm-up) against the bare network's
forward + backward on random tensors of the same batch shape, timed here right after the run with the same
thread count; test.py's embedding pass (reading and decoding the files included) against bare inference, the two
timed batch by batch in alternation. And the share of each epoch spent on
validation and on saving (checkpoints, history, curves).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from data_utils import FaceFolder, as_hw, make_transform
from evaluation import device_batch
from losses import ArcFaceLoss
from model import EmbeddingNet, load_checkpoint, model_from_checkpoint, select_device

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
QUICK = ["--epochs=2", "--backbone=resnet18", "--image_size=48,40"]
GPU_SETTINGS = (  # --gpu: (label, amp, channels_last, compile, read_loss) of the training step on random tensors
    ("float32", False, False, False, False),
    ("AMP (bfloat16)", True, False, False, False),
    ("AMP + channels_last", True, True, False, False),
    ("AMP + channels_last, the loss read every step (.item())", True, True, False, True),
    ("AMP + channels_last + compile", True, True, True, False),
)


def peak_rss_mib(pid):
    """The process's resident-set high-water mark so far (Linux), in MiB; None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None


def run(args, log_path):
    """Run a repository script, its output to `log_path`; returns the peak resident memory in MiB."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
        peak = None
        while proc.poll() is None:
            peak = max(filter(None, [peak, peak_rss_mib(proc.pid)]), default=None)
            time.sleep(0.5)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(args)} failed (exit {proc.returncode}); see {log_path}")
    return peak


def measure(name, extra, seed, data_dir, work, bare_seconds=4.0):
    out = os.path.join(work, f"{name}_seed{seed}")
    peak = run(["train.py", *RECIPES[name], f"--data_dir={data_dir}", f"--out_dir={out}", f"--seed={seed}", *extra],
               out + "_train.log")
    run(["test.py", f"--checkpoint={os.path.join(out, 'tb_model.pth')}"], out + "_test.log")
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    top1 = results["identification"]["accuracy"]
    f1 = ((results.get("verification") or {}).get("pair_classifier") or {}).get("f1")
    evaluated = [h for h in history if h.get("valid_identification") is not None]  # (train.py's eval_every)
    # (train.py's accuracies are float32 means: 72/80 reads 0.89999998)
    reached = {t: next((h["train_seconds"] for h in evaluated if h["valid_identification"] >= t - 1e-6), None)
               for t in THRESHOLDS}
    trained = [h for h in history if h["epoch"] > 0]
    epoch_time = [h["epoch_seconds"] + h["valid_seconds"] + h["save_seconds"] for h in trained]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    network = {k: config[k] for k in ("backbone", "embedding_dim", "head", "hidden_dim")}
    batch = round(sum(h["images"] for h in trained) / (trained[-1]["step"] - history[0]["step"]))
    return dict(recipe=name, seed=seed, top1=top1, f1=f1, seconds=history[-1]["train_seconds"], peak_mib=peak,
                untrained=history[0]["valid_identification"], reached=reached,
                best_epoch=max(evaluated, key=lambda h: h["valid_identification"])["epoch"],
                train_speed=steady_speed(history),
                bare_train_speed=None if config["freeze_backbone"] else bare_train_speed(
                    network, config["image_size"], batch, bare_seconds, config["device"], config["amp"],
                    config["channels_last"], config["compile"]),
                **embedding_speeds(os.path.join(out, "tb_model.pth"), data_dir, device=config["device"]),
                valid_share=statistics.mean(h["valid_seconds"] / t for h, t in zip(trained, epoch_time)),
                save_share=statistics.mean(h["save_seconds"] / t for h, t in zip(trained, epoch_time)))


def bare_train_speed(model_config, image_size, batch, seconds=4.0, device="cpu", amp=False, channels_last=False,
                     compile=False, step=False, read_loss=False):
    """Images/s of the network alone on random tensors of (batch, 3, *image_size): forward + backward, and with
    `step`, the whole of train.py's step around them (ArcFace loss in float32 on random labels of 40 identities,
    fused Adam update), and with `read_loss` the loss read on the CPU after each step, as train.py does (on a GPU
    the CPU then waits for the step to finish before it queues the next). On `device` with train.py's autocast,
    memory format and compiler options. Two warm-up batches (and the compilation), then batches until `seconds` have
    passed (at least three)."""
    torch.manual_seed(0)
    device, autocast, _ = select_device(device, amp)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = EmbeddingNet(**model_config).to(device, memory_format=memory_format).train()
    network = torch.compile(model) if compile else model
    images = torch.randn(batch, 3, *image_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 40, (batch,), device=device)
    criterion = ArcFaceLoss(model_config["embedding_dim"], 40).to(device)
    opt = torch.optim.Adam(list(model.parameters()) + list(criterion.parameters()), fused=True)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    torch.backends.cudnn.benchmark = device.startswith("cuda")  # as train.py: time the kernels for fixed shapes

    def one_batch():
        opt.zero_grad(set_to_none=True)
        with autocast:
            embeddings = network(images).float()
        loss = criterion(embeddings, labels)[0] if step else embeddings.sum()
        loss.backward()
        if step:
            opt.step()
        if read_loss:
            loss.item()
    for _ in range(2):
        one_batch()
    synchronize()
    count, started = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - started < seconds:
        one_batch()
        count += 1
    synchronize()  # the GPU runs behind: the time counts until its last batch is done
    return count * batch / (time.perf_counter() - started)


@torch.inference_mode()
def embedding_speeds(checkpoint, data_dir, passes=2, device="cpu", amp=True, num_workers=0):
    """Images/s of test.py's embedding pass (its transform, FaceFolder and DataLoader: files read, decoded and
    transformed, then inference in batches of 64 in channels_last, on `device` with test.py's autocast; with
    `num_workers` DataLoader workers) over train/ and valid/, and of bare inference on random tensors of each
    batch's shape. Without workers, timed in pairs, a bare batch right after each real one, so that a change in the
    machine's load falls on both alike (unpaired runs on 2 cores move the ratio by 15-20 points); with workers, the
    bare batches after the real passes."""
    device, autocast, _ = select_device(device, amp)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state, checkpoint).to(device).eval()
    transform = make_transform(state["image_size"], train=False, pixels=True)
    loaders = [DataLoader(FaceFolder(os.path.join(data_dir, part), transform), batch_size=64, num_workers=num_workers,
                          pin_memory=device.startswith("cuda")) for part in ("train", "valid")]
    noise = torch.randn(64, 3, *as_hw(state["image_size"]), device=device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

    def infer(batch):
        with autocast:
            model(device_batch(batch, device))
        synchronize()
    infer(noise[:2])  # warm-up: allocations, thread pool
    real = bare = 0.0
    sizes = []
    for _ in range(passes):
        for loader in loaders:
            started = time.perf_counter()  # each real batch's time includes reading it
            for batch, _labels in loader:
                infer(batch)
                sizes.append(len(batch))
                middle = time.perf_counter()
                if not num_workers:
                    infer(noise[:len(batch)])
                    bare += time.perf_counter() - middle
                real += middle - started
                started = time.perf_counter()
    if num_workers:  # workers load while the main process infers: a bare batch in between would lend them its time
        started = time.perf_counter()
        for size in sizes:
            infer(noise[:size])
        bare = time.perf_counter() - started
    return dict(test_speed=sum(sizes) / real, bare_test_speed=sum(sizes) / bare)


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


def gpu_figures(data_dir, work, workers, batch=256, size=(224, 224), seconds=10.0):
    """The CUDA figures: images/s of the default network's training step (ResNet50 + mlp head) at `size` on random
    tensors in each of GPU_SETTINGS, then train.py on real images (the AT&T training photos, each 16 times, P x K
    batches of 32 x 8 = `batch`, AMP + channels_last) with each number of DataLoader `workers`, against the step on
    random tensors with the same settings, and test.py's embedding pass of the last run's model. Prints tables."""
    network = dict(backbone="resnet50", embedding_dim=128, head="mlp", hidden_dim=512)
    print(f"\n{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}: ResNet50 + "
          f"mlp head at {size[0]}x{size[1]}, batches of {batch}, train.py's step (ArcFace loss, fused Adam) on "
          f"random tensors")
    print("| setting | images/s |\n|---|---|")
    synthetic = {}
    for label, amp, channels_last, compile, read_loss in GPU_SETTINGS:
        synthetic[label] = bare_train_speed(network, size, batch, seconds, "cuda", amp, channels_last, compile,
                                            step=True, read_loss=read_loss)
        print(f"| {label} | {synthetic[label]:.0f} |", flush=True)
    repeated = repeat_train_images(data_dir, os.path.join(work, "att_8_2_x16"), 16)
    flags = [f"--image_size={size[0]},{size[1]}", f"--batch_size={batch}", "--images_per_identity=8",
             "--channels_last=True", "--epochs=4", "--eval_every=4"]
    reference = synthetic["AMP + channels_last"]
    print(f"\ntrain.py on real images (the training photos x16, {' '.join(flags)}), against the step on random "
          f"tensors with AMP + channels_last ({reference:.0f} images/s); run s: the whole process, from its start")
    print("| num_workers | train.py images/s | ratio | training s | evaluating + saving s | run s | peak MiB |\n"
          "|---|---|---|---|---|---|---|")
    for count in workers:
        out = os.path.join(work, f"gpu_workers{count}")
        started = time.perf_counter()
        peak = run(["train.py", f"--data_dir={repeated}", f"--out_dir={out}", *flags, f"--num_workers={count}"],
                   out + "_train.log")
        with open(os.path.join(out, "history.json")) as f:
            history = json.load(f)
        speed = steady_speed(history)
        print(f"| {count} | {speed:.0f} | {100 * speed / reference:.0f} % | {history[-1]['train_seconds']:.0f} | "
              f"{sum(h['valid_seconds'] + h['save_seconds'] for h in history):.0f} | "
              f"{time.perf_counter() - started:.0f} | {cell(peak)} |", flush=True)
    print(f"\ntest.py's embedding pass over the photos x16 (5,200 files, batches of 64, the last run's model), against "
          f"bare inference")
    print("| num_workers | test.py images/s | bare inference images/s | ratio |\n|---|---|---|---|")
    for count in (0, *workers):
        speeds = embedding_speeds(os.path.join(out, "tb_model.pth"), repeated, passes=1, device="cuda",
                                  num_workers=count)
        print(f"| {count} | {speeds['test_speed']:.0f} | {speeds['bare_test_speed']:.0f} | "
              f"{100 * speeds['test_speed'] / speeds['bare_test_speed']:.0f} % |", flush=True)


def steady_speed(history):
    """The median images/s of train.py's training epochs, the first left out: it warms up (allocations, thread
    pools, cuDNN's kernel timing, DataLoader workers starting)."""
    trained = [h for h in history if h["epoch"] > 0]
    return statistics.median(h["images_per_second"] for h in trained[1:] or trained)


def mean(values):
    """The mean, or None when a value is missing (e.g. a seed that never reached a threshold)."""
    values = list(values)
    return None if None in values else statistics.mean(values)


def cell(value, unit=""):
    return "-" if value is None else f"{value:.0f}{unit}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--att_dir", default=os.environ.get("FACE_DATA", "../shared/data/att_faces"))
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="two epochs of ResNet18 on six people, one seed")
    parser.add_argument("--keep", help="keep the runs in this folder instead of a temporary one")
    parser.add_argument("--train_flags", default="", help="train.py flags added to every run (after the recipe's)")
    parser.add_argument("--gpu", action="store_true",
                        help="the CUDA figures instead: ResNet50 at 224x224 on random tensors and train.py on real images")
    parser.add_argument("--gpu_workers", default="4,8,12", help="--gpu: train.py's num_workers to try, comma-separated")
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"error: unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    if not os.path.isdir(os.path.join(args.att_dir, "s1")):
        sys.exit(f"error: {args.att_dir} is not the AT&T folder (s1..s40); pass --att_dir or set FACE_DATA")
    if args.gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu needs a CUDA GPU, and torch.cuda.is_available() is False here")
    seeds = 1 if args.quick else args.seeds
    work = args.keep or tempfile.mkdtemp(prefix="bench_")
    raw = os.path.join(work, "raw")
    os.makedirs(raw, exist_ok=True)
    people = sorted(os.listdir(args.att_dir))
    for person in people[:6] if args.quick else people:
        if os.path.isdir(os.path.join(args.att_dir, person)) and not os.path.exists(os.path.join(raw, person)):
            os.symlink(os.path.abspath(os.path.join(args.att_dir, person)), os.path.join(raw, person))
    data_dir = os.path.join(work, "att_8_2")
    if not os.path.isdir(data_dir):
        run(["data_utils.py", "split", raw, data_dir, "--valid=0.2", "--seed=0"], os.path.join(work, "split.log"))
    if args.gpu:
        gpu_figures(data_dir, work, [int(w) for w in args.gpu_workers.split(",")])
        return
    extra = (QUICK if args.quick else []) + shlex.split(args.train_flags)
    rows = []
    for name in names:
        for seed in range(seeds):
            rows.append(measure(name, extra, seed, data_dir, work, 1.0 if args.quick else 4.0))
            r = rows[-1]
            print(f"{name} seed {seed}: top-1 {100 * r['top1']:.2f}% in {r['seconds']:.0f}s", flush=True)

    print(f"\nAT&T faces, 8/2 split, random initialisation, {os.cpu_count()} CPU cores"
          + (" (quick: 2 epochs, ResNet18, 6 people)" if args.quick else f", mean of {seeds} seed(s)")
          + (f", train.py {args.train_flags}" if args.train_flags else ""))
    head = "| recipe | top-1 (test.py) | pair F1 | untrained | s to 90 % | s to 97.5 % | s to 98.5 % | train s | peak MiB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    means = {}
    for name in names:
        runs = [r for r in rows if r["recipe"] == name]
        reached = {t: mean(r["reached"][t] for r in runs) for t in THRESHOLDS}
        means[name] = reached
        f1 = mean(r["f1"] for r in runs)
        print(f"| {name} | {100 * mean(r['top1'] for r in runs):.2f} % | {'-' if f1 is None else f'{f1:.3f}'} | "
              f"{100 * mean(r['untrained'] for r in runs):.2f} % | "
              + " | ".join(cell(reached[t], " s") for t in THRESHOLDS)
              + f" | {mean(r['seconds'] for r in runs):.0f} | {cell(mean(r['peak_mib'] for r in runs))} |")
    print("\nPipeline efficiency (images/s; bare: the network alone on random tensors, same batch shape)")
    head = ("| recipe | train.py steps | bare forward+backward | ratio | test.py embedding | bare inference | ratio "
            "| validation share of an epoch | saving share |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in names:
        runs = [r for r in rows if r["recipe"] == name]
        speed = {key: mean(r[key] for r in runs) for key in ("train_speed", "bare_train_speed", "test_speed",
                                                              "bare_test_speed", "valid_share", "save_share")}
        train_ratio = speed["bare_train_speed"] and speed["train_speed"] / speed["bare_train_speed"]
        print(f"| {name} | {speed['train_speed']:.1f} | {cell(speed['bare_train_speed'])} | "
              + ("-" if train_ratio is None else f"{100 * train_ratio:.0f} %")
              + f" | {speed['test_speed']:.1f} | {speed['bare_test_speed']:.1f} | "
              f"{100 * speed['test_speed'] / speed['bare_test_speed']:.0f} % | {100 * speed['valid_share']:.1f} % | "
              f"{100 * speed['save_share']:.1f} % |")
    reference = means.get("resnet50_triplet", {}).get(0.90)
    for name in names:
        if name != "resnet50_triplet" and reference and means[name][0.90]:
            print(f"time to 90 %: {name} is {reference / means[name][0.90]:.1f}x faster than resnet50_triplet")
        elif name != "resnet50_triplet" and "resnet50_triplet" in means and means[name][0.90]:
            print(f"time to 90 %: resnet50_triplet never reaches 90 %; {name} takes {means[name][0.90]:.0f} s")
    print(f"runs kept in {work}" if args.keep else "")


if __name__ == "__main__":
    main()
