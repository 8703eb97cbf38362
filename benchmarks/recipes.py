"""The AT&T recipes: each recipe trained by train.py with each seed on the 7/1/2 split and tested by test.py, raw
pixels' accuracy on the same split, and their tables (att_recipes, att_pipeline) and speed-ups."""
import os
import statistics

from benchmarks.pipeline import bare_train_speed, embedding_speeds, steady_speed
from benchmarks.publish import Table, cell
from benchmarks.runs import read_json, run

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


def measure(name, extra, seed, data_dir, work, bare_seconds=4.0):
    """One run of recipe `name` with `seed` (train.py, then test.py on its best model, in subprocesses) and the
    metrics of the tables: from their output files, and the bare step and embedding pass timed here."""
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


def pixel_metrics(data_dir, work, size=(56, 46)):
    """(identification top-1, retrieval precision@1) of raw pixels at `size` (AT&T's 112x92 halved) on the split
    `data_dir`, by test.py --checkpoint=pixels: the accuracies a trained network has to beat on the same images."""
    out = os.path.join(work, "pixels")
    run(["test.py", "--checkpoint=pixels", f"--data_dir={data_dir}", f"--pixel_size={size[0]},{size[1]}",
         f"--out_dir={out}"], out + "_test.log")
    results = read_json(out, "results.json")
    return results["identification"]["accuracy"], results["retrieval"]["precision_at_1"]


def run_recipes(names, seeds, extra, data_dir, work, bare_seconds):
    """measure's metrics of every recipe of `names` with seeds 0..seeds-1, a line printed after each run."""
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


def recipe_means(rows, name):
    """The mean over the seeds of each metric of recipe `name`; `reached` per threshold."""
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


def recipes_caption(args, pixels):
    """The line above the att_recipes table: the conditions of the runs, and `pixels` (pixel_metrics') beside."""
    start = "from the network of --init_from" if "--init_from" in args.train_flags else "random initialisation"
    return (f"AT&T faces, 7/1/2 split (top-1 on the 80 test images, which chose nothing), {start}, "
            f"{os.cpu_count()} CPU cores"
            + (" (quick: 2 epochs, ResNet18, 6 people)" if args.quick else f", mean of {args.seeds} seed(s)")
            + (f", train.py {args.train_flags}" if args.train_flags else "")
            + f". Raw pixels on the same images, no training: top-1 {100 * pixels[0]:.2f} %, the nearest gallery photo "
              f"of the probe's person {100 * pixels[1]:.2f} %")
