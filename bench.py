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
already on the device, timed here right after the run with the same thread count; so the bare speed includes
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
import os
import shlex
import shutil
import sys
import tempfile

import torch

from align import ALIGNMENT_FILE
from benchmarks import gpu, recipes, sharded, students
from benchmarks.publish import provenance, publish, replace_section
from benchmarks.runs import read_text
from data_utils import DatasetError
from prepare import bin_dataset, split_dataset

TABLES = ("att_recipes", "att_pipeline", "gpu_step", "gpu_pipeline", "gpu_embedding", "gpu_records", "sharded_centres",
          "pk_sampler", "student_speed")


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


def int_list(text):
    return [int(n) for n in text.split(",")]


def parse_args(argv):
    """bench.py's flags, checked (an error exits naming the flag)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--att_dir", default=os.environ.get("FACE_DATA", "../shared/data/att_faces"))
    parser.add_argument("--recipes", default=",".join(recipes.DEFAULT_RECIPES),
                        help="comma-separated: " + ", ".join(recipes.RECIPES))
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
    unknown = [n for n in args.recipes.split(",") if n not in recipes.RECIPES]
    if unknown:
        sys.exit(f"error: --recipes: unknown recipe {unknown[0]!r}; choose from {', '.join(recipes.RECIPES)}")
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
            tables = [students.student_table(args.students.split(","), args.photos)]
        except (ValueError, DatasetError) as err:  # a CheckpointError is a ValueError
            sys.exit(f"error: --students: {err}")
    elif args.sharded:
        tables = [sharded.sharded_table(work, args.sharded, bin_dataset), sharded.sampler_table(args.sharded)]
    elif args.gpu_rec:
        tables = [gpu.gpu_records(args.gpu_rec, work, args.gpu_workers)]
    elif args.gpu:
        tables = gpu.gpu_tables(data_dir, work, args.gpu_workers)
    else:
        names = args.recipes.split(",")
        extra = [*(recipes.QUICK if args.quick else ())] + shlex.split(args.train_flags)
        rows = recipes.run_recipes(names, 1 if args.quick else args.seeds, extra, data_dir, work,
                                   1.0 if args.quick else 4.0)
        means = {name: recipes.recipe_means(rows, name) for name in names}
        tables = recipes.recipe_tables(means, recipes.recipes_caption(args, recipes.pixel_metrics(data_dir, work)))
        lines = recipes.speedups(means)
    for table in tables:
        publish(table, args.docs, note)
    print("\n".join(lines + [f"runs kept in {work}" if args.keep else ""]))
    if not args.keep:  # (a failed run exits before this: its logs stay for a look)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
