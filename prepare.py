"""Dataset preparation: raw identity folders in, a prepared dataset (DST/train, DST/valid, optionally DST/test,
each with one folder per identity) out. The source is only read.

    python prepare.py split SRC DST [--valid=0.2] [--test=0.0] [--unseen=0.0] [--valid_people=0.0]
                                    [--min_images=0] [--max_images=0] [--identity_depth=1] [--seed=0] [--force]
    python prepare.py fetch-att DST [--seed=0] [--force]
    python prepare.py align SRC DST [--size=112] [--missing=skip|centre] [--upsample=0] [--passes=hog,hog_up,cnn]
    python prepare.py pack FOLDER OUT.rec      # insightface's train.rec/.idx/property (recordio.py)
    python prepare.py bin FOLDER OUT.bin [--pairs=6000] [--seed=0]   # an insightface verification set

`split` copies SRC's images per identity, so that every identity with images enough appears in every split, and
can hold people out whole (DST/unseen: people never trained on; --valid_people: people to choose a checkpoint on);
`fetch-att` downloads the AT&T (ORL) faces through scikit-learn and splits them 7/1/2; `align` detects the face
each photo is of, retrying a miss with slower detectors, and warps it onto the five-point template (align.py),
keeping SRC's folders and file names, listing in DST/align_report.tsv which detector found each face and what it
could not align, and going on where a stopped run left off. The functions serve other scripts too: train.py calls
ensure_att to fetch AT&T on a first run without data. `pack` and `bin` write the insightface layout: a training set
of records, and verification pairs of people held out (say DST/valid of `split --valid_people`) that train.py
--val_bins chooses its checkpoint on.
"""
import argparse
import io
import os
import pickle
import shutil
import sys
import tempfile
import warnings
import zlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from align import (ALIGNMENT_FILE, PASSES, AlignmentUnavailable, FaceAligner, alignment_record, centre_crop,
                   read_alignment)
from data_utils import UNREADABLE_IMAGE, DatasetError, find_images, identity_folders, load_image, some_names
from evaluation import verification_pairs
from figures import save_alignment_grid
from files import atomic_write, save_json
from recordio import RecordWriter, index_path, pack_payload

TRAIN_ONLY_FOLDER = "distortion"  # extra copies of training images: never held out by `split`


# -----------------------------------------------------------------------------
# split

def split_dataset(src, dst, valid=0.2, test=0.0, min_images=0, max_images=0, seed=0, force=False,
                  identity_depth=1, unseen=0.0, valid_people=0.0, log=print):
    """Copy an identity-folder dataset into DST/train, DST/valid (and DST/test when test > 0), per identity,
    so that every identity with images enough appears in every split. Images below a `distortion/` folder
    stay in train. Identities with fewer than `min_images` or more than `max_images` (when > 0) images are
    left out. The same seed gives the same split; SRC is only read.

    People held out whole, never in DST/train: a share `unseen` of the identities goes to DST/unseen, a dataset
    of the same shape (its train/ the gallery, its valid/ and test/ the probes) for measuring people never trained
    on; a share `valid_people` goes to DST/valid with all its images, for train.py to choose its checkpoint on
    people it does not train on. Their distortion/ copies, training images, are left out.
    Returns {split: image count}, the unseen dataset's splits as "unseen/train" and so on."""
    _check_split(src, dst, valid, test, force, unseen, valid_people)
    held = {"valid": valid, **({"test": test} if test > 0 else {})}
    counts, skipped, short, kept = dict.fromkeys(["train", *held], 0), [], [], {}
    for name, folder in identity_folders(src, identity_depth).items():
        files = [os.path.relpath(p, folder) for p in find_images(folder)]
        pool = [f for f in files if TRAIN_ONLY_FOLDER not in f.split(os.sep)[:-1]]
        reason = _left_out(len(pool), min_images, max_images)
        if reason:
            skipped.append(f"{name} ({reason})")
        else:
            kept[name] = (folder, files, pool)
    if not kept:
        raise DatasetError(f"{src}: no identity folder with images passed the filters"
                           + (f" (skipped: {'; '.join(skipped)})" if skipped else ""))
    people = _held_out_people(sorted(kept), unseen, valid_people, seed)
    for name, (folder, files, pool) in kept.items():
        role = people.get(name, "trained")
        if role == "valid people":
            assignment, files = dict.fromkeys(pool, "valid"), pool
        else:
            assignment = {}
            if len(pool) > len(held):
                assignment = _held_out(pool, held, np.random.default_rng([seed, zlib.crc32(name.encode())]))
            elif role == "trained":  # too few images for one in every split: all in train
                short.append(name)
        if role == "unseen":
            files = pool
        for f in files:
            split = ("unseen/" if role == "unseen" else "") + assignment.get(f, "train")
            target = os.path.join(dst, split, name, f)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(folder, f), target)
            counts[split] = counts.get(split, 0) + 1
    if os.path.isfile(os.path.join(src, ALIGNMENT_FILE)):  # aligned photos stay known as such
        for folder in [dst] + ([os.path.join(dst, "unseen")] if "unseen" in people.values() else []):
            shutil.copy2(os.path.join(src, ALIGNMENT_FILE), os.path.join(folder, ALIGNMENT_FILE))
    roles = [people.get(name, "trained") for name in kept]
    log(f"split {src} -> {dst} (seed {seed}, valid {valid}, test {test}"
        + (f", unseen {unseen}, valid people {valid_people}" if unseen or valid_people else "") + ")")
    log(f"  identities: {len(kept)} kept"
        + (f" ({', '.join(f'{roles.count(r)} {r}' for r in PEOPLE_ROLES)})" if people else "")
        + f", {len(skipped)} skipped")
    log("  images: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    if short:
        log(f"  {len(short)} identities too small to appear in every split (all in train): {some_names(short)}")
    for line in skipped:
        log(f"  skipped {line}")
    return counts


PEOPLE_ROLES = ("trained", "valid people", "unseen")


def _held_out_people(names, unseen, valid_people, seed):
    """{name: "unseen" | "valid people"} for the identities held out whole: shares of `names` (sorted) drawn with
    `seed`, each share rounded and at least one identity when above 0; at least one identity is left to train."""
    order = [names[i] for i in np.random.default_rng([seed, len(names)]).permutation(len(names))]
    wanted = [(role, max(int(len(names) * share + 0.5), 1) if share > 0 else 0)
              for role, share in (("unseen", unseen), ("valid people", valid_people))]
    if sum(count for _, count in wanted) >= len(names):
        raise DatasetError(f"--unseen={unseen} and --valid_people={valid_people} hold out all {len(names)} "
                           f"identities: none would be left to train on")
    people, start = {}, 0
    for role, count in wanted:
        people.update(dict.fromkeys(order[start:start + count], role))
        start += count
    return people


def _check_split(src, dst, valid, test, force, unseen=0.0, valid_people=0.0):
    """Raise DatasetError for arguments split_dataset cannot use; with `force`, empty DST's split folders."""
    if not os.path.isdir(src):
        raise DatasetError(f"{src}: no such folder")
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise DatasetError(f"--valid={valid} and --test={test} must be fractions in [0, 1) that sum below 1")
    if not (0 <= unseen < 1 and 0 <= valid_people < 1):
        raise DatasetError(f"--unseen={unseen} and --valid_people={valid_people} must be fractions in [0, 1)")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src + os.sep):
        raise DatasetError(f"{dst} lies inside {src}; the source must stay untouched")
    if os.path.isdir(dst) and os.listdir(dst):
        if not force:
            raise DatasetError(f"{dst} is not empty; choose another folder or pass --force to replace "
                               f"its train/valid/test folders")
        for name in ("train", "valid", "test", "unseen"):
            shutil.rmtree(os.path.join(dst, name), ignore_errors=True)


def _left_out(count, min_images, max_images):
    """Why split_dataset leaves out an identity of `count` images (not below a distortion folder), or None."""
    if not count:
        return "no images"
    if count < min_images or (max_images and count > max_images):
        return f"{count} images, outside --min_images={min_images} --max_images={max_images}"
    return None


def _held_out(pool, held, rng):
    """{file: split} for the files of one identity's `pool` that the splits of `held` ({split: fraction}) hold
    out, drawn with `rng`: the fraction rounded, at least one per split with a fraction > 0, and at least one file
    left for training. The pool must have more files than `held` has splits."""
    pool = [pool[i] for i in rng.permutation(len(pool))]
    counts = {s: max(int(len(pool) * f + 0.5), 1 if f > 0 else 0) for s, f in held.items()}
    while sum(counts.values()) >= len(pool):  # keep at least one for training
        largest = max(counts, key=counts.get)
        counts[largest] -= 1
    assignment, start = {}, 0
    for split, count in counts.items():
        assignment.update({f: split for f in pool[start:start + count]})
        start += count
    return assignment


# -----------------------------------------------------------------------------
# AT&T faces

def fetch_att(dst, seed=0, force=False, log=print):
    """The AT&T (ORL) faces through scikit-learn's Olivetti copy (400 images, 64x64, cached by scikit-learn),
    written as identity folders s1..s40 and split 7/1/2 into DST/train, DST/valid (which chooses train.py's best
    epoch) and DST/test (which test.py reports). Raises DatasetError, in one line that says how to use a local copy
    instead, when the download fails."""
    from sklearn.datasets import fetch_olivetti_faces
    try:
        with warnings.catch_warnings():  # its retry warnings; the failure is reported below in one line
            warnings.simplefilter("ignore")
            faces = fetch_olivetti_faces(n_retries=1)
    except OSError as err:
        reason = " ".join(str(err).split())
        raise DatasetError(f"could not download the AT&T (Olivetti) faces ({reason}); with a local copy of att_faces "
                           f"run: python prepare.py split /path/to/att_faces {dst} --valid=0.1 --test=0.2") from None
    with tempfile.TemporaryDirectory() as raw:
        count = {}
        for image, target in zip(faces.images, faces.target):
            person = f"s{int(target) + 1}"
            count[person] = count.get(person, 0) + 1
            os.makedirs(os.path.join(raw, person), exist_ok=True)
            pixels = np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(os.path.join(raw, person, f"{count[person]}.pgm"))
        return split_dataset(raw, dst, valid=0.1, test=0.2, seed=seed, force=force, log=log)


def ensure_att(data_dir, log=print):
    """Make `data_dir` a prepared dataset if it is none yet: a `data_dir/train` folder is used as it is;
    without one, the AT&T faces are fetched through scikit-learn and split 7/1/2 (seed 0) into `data_dir`.
    Raises fetch_att's one-line DatasetError when offline."""
    if os.path.isdir(os.path.join(data_dir, "train")):
        return
    log(f"{data_dir}/train not found: fetching the AT&T faces through scikit-learn")
    fetch_att(data_dir, seed=0, log=log)


# -----------------------------------------------------------------------------
# alignment

ALIGN_REPORT, ALIGN_GRID = "align_report.tsv", "align_examples.png"


def align_dataset(src, dst, size=112, missing="skip", upsample=0, passes=PASSES, log=print):
    """Align every image below SRC's identity folders (nested ones and distortion/ included) into DST, the same
    relative paths and file names: the main face of each photo (align.FaceAligner, its detection `passes` tried in
    turn until one finds a face), `size` x `size`. A photo without a usable face (none found, too small, unreadable,
    a decompression bomb) is left out, or with missing="centre" kept as its centre crop when it can be read.
    DST/align_report.tsv lists every photo: path, the pass that found its face (or none), and what went wrong (none
    found, too small, unreadable, several faces). Images already in DST are passed over, so a stopped run goes on.
    DST/align_examples.png shows the first photos aligned by this run beside their boxes and points. Returns the
    counts (aligned, several, missed, centre, done before, and the faces each pass found)."""
    if missing not in ("skip", "centre"):
        raise DatasetError(f"--missing={missing!r}: choose skip or centre")
    if not os.path.isdir(src):
        raise DatasetError(f"{src}: no such folder")
    try:
        aligner = FaceAligner(upsample, passes)
    except ValueError as err:
        raise DatasetError(f"--passes={','.join(passes)}: {err}") from None
    report = _read_report(os.path.join(dst, ALIGN_REPORT))
    counts = dict.fromkeys(("aligned", "several", "missed", "centre", "done before", *aligner.passes), 0)
    jobs = [(path, os.path.join(dst, name, os.path.relpath(path, folder)))
            for name, folder in identity_folders(src).items() for path in find_images(folder)]
    bar, examples = tqdm(jobs, desc="aligning", unit="image", dynamic_ncols=True), []
    try:
        for path, target in bar:
            if os.path.exists(target):
                counts["done before"] += 1
                continue
            keys, found_by, notes = _align_one(aligner, path, target, size, missing, examples)
            for key in keys:
                counts[key] += 1
            report[os.path.relpath(path, src)] = f"{found_by or 'none'}\t{'; '.join(notes)}"
            bar.set_postfix({**{name: counts[name] for name in aligner.passes}, "missed": counts["missed"]},
                            refresh=False)
    finally:
        if examples:
            save_alignment_grid(examples, os.path.join(dst, ALIGN_GRID))
        save_json(alignment_record(size, aligner.passes, upsample), os.path.join(dst, ALIGNMENT_FILE))
        atomic_write(os.path.join(dst, ALIGN_REPORT), lambda f: f.writelines(
            f"{path}\t{line}\n" for path, line in sorted(report.items())), mode="w")
    log(f"aligned {counts['aligned']} photos ({counts['several']} of several faces: the largest near the centre), "
        f"missed {counts['missed']} ({counts['centre']} kept as centre crops), {counts['done before']} aligned "
        f"before; faces found by " + ", ".join(f"{name} {counts[name]}" for name in aligner.passes)
        + f"; each photo's pass and the misses are listed in {os.path.join(dst, ALIGN_REPORT)}")
    return counts


def _align_one(aligner, path, target, size, missing, examples, shown=6):
    """(count keys, the pass that found a face or None, notes for the report) of aligning the photo at `path` into
    `target`; the first `shown` aligned photos are added to `examples` (save_alignment_grid's)."""
    try:
        image = load_image(path)
    except UNREADABLE_IMAGE as err:
        return ["missed"], None, [f"unreadable: {type(err).__name__}: {err}"]
    aligned, faces, main, found_by = aligner.align(image, size)
    keys, notes = [found_by] if found_by else [], []
    if len(faces) > 1:
        keys.append("several")
        notes.append(f"{len(faces)} faces: aligned the largest near the centre")
    if aligned is None:
        keys.append("missed")
        notes.append("no face found" if not faces else "the face is too small")
        if missing == "centre":
            aligned = centre_crop(image, size)
            keys.append("centre")
    else:
        keys.append("aligned")
        if len(examples) < shown:
            examples.append((os.path.basename(path), image, faces, main, aligned))
    if aligned is not None:
        _save_image(aligned, target)
    return keys, found_by, notes


def _save_image(image, path):
    """`image` at `path` in the format of its extension, atomically (a stopped run leaves no half image)."""
    kind = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    if path.lower().endswith(".pgm"):  # (load_image gives 'L' or 'RGB'; a PGM holds grey levels only)
        image = image.convert("L")
    atomic_write(path, lambda f: image.save(f, format=kind, **({"quality": 95} if kind == "JPEG" else {})))


def _read_report(path):
    """{relative path: the rest of its line} of an existing alignment report (none: empty)."""
    try:
        with open(path, encoding="utf-8") as f:
            return dict(line.rstrip("\n").split("\t", 1) for line in f if "\t" in line)
    except FileNotFoundError:
        return {}


# -----------------------------------------------------------------------------
# RecordIO

RAW_FORMATS = ("JPEG", "PNG")  # what insightface's readers decode: stored as they are, anything else as PNG


def pack_dataset(src, out_rec, log=print):
    """Pack SRC's identity folders (one level, in FaceFolder's order, which gives the labels 0, 1, ...) into OUT.rec,
    OUT.idx and OUT.rec's folder's `property`, in insightface's layout: record 0 the header [a, b], records 1..a-1
    the images (their identity's label, JPEG and PNG files byte for byte, other formats as PNG), records a..b-1 one
    per identity with the [first, end) keys of its images; property "identities,height,width" of the first image;
    SRC's alignment record (prepare.py align's), so that networks trained on the records know their faces aligned.
    Files Pillow cannot decode are listed and left out. Returns (images, identities, unreadable paths)."""
    if not os.path.isdir(src):
        raise DatasetError(f"{src}: no such folder")
    # two passes, so that record 0 can name the key ranges before the images: check every image, then write
    kept, unreadable, size = [], [], None
    for name, folder in identity_folders(src).items():
        paths = []
        for path in find_images(folder):
            try:
                with Image.open(path) as img:
                    raw = img.format in RAW_FORMATS
                image = load_image(path)  # decoded through, so that a truncated file is caught here
            except UNREADABLE_IMAGE:
                unreadable.append(path)
                continue
            paths.append((path, raw))
            size = size or image.size
        if paths:
            kept.append(paths)
    if not kept:
        raise DatasetError(f"{src}: no readable images in identity folders (expected {src}/<identity>/<image>)")
    count = sum(len(paths) for paths in kept)
    first_identity = count + 1
    with RecordWriter(out_rec) as writer:
        writer.write(0, pack_payload([first_identity, first_identity + len(kept)], b""))
        key = 1
        for label, paths in enumerate(kept):
            for path, raw in paths:
                writer.write(key, pack_payload(label, _encoded(path, raw), id=key))
                key += 1
        start = 1
        for label, paths in enumerate(kept):
            key = first_identity + label  # its header's id too, as insightface's writers: a lost .idx is rebuilt
            writer.write(key, pack_payload([start, start + len(paths)], b"", id=key))
            start += len(paths)
    folder = os.path.dirname(os.path.abspath(out_rec))
    atomic_write(os.path.join(folder, "property"), lambda f: f.write(f"{len(kept)},{size[1]},{size[0]}\n"), mode="w")
    alignment = read_alignment(src)
    if alignment:
        save_json(alignment, os.path.join(folder, ALIGNMENT_FILE))
    log(f"packed {count} images of {len(kept)} identities from {src} into {out_rec} and {index_path(out_rec)}; "
        f"{len(unreadable)} unreadable left out" + (f": {some_names(unreadable)}" if unreadable else ""))
    return count, len(kept), unreadable


def bin_dataset(src, out_bin, pairs=6000, seed=0, log=print):
    """Write an insightface verification set OUT.bin (a pickled (image bytes, two a pair; is-same flags), read by
    pairs.read_verification_bin) of up to `pairs` pairs among the images of SRC's identity folders: half of
    them of the same person, drawn with `seed` (evaluation.verification_pairs), ordered so that each tenth of the
    file (insightface's ten folds of consecutive pairs) holds a tenth of each kind (from ten pairs of each kind on,
    their number is a multiple of ten, so that the folds are equal). Images are stored as
    pack_dataset stores them. Returns (pairs written, same pairs)."""
    images, labels, unreadable = [], [], []
    for label, folder in enumerate(identity_folders(src).values() if os.path.isdir(src) else ()):
        for path in find_images(folder):
            try:
                with Image.open(path) as img:
                    raw = img.format in RAW_FORMATS
                load_image(path)
            except UNREADABLE_IMAGE:
                unreadable.append(path)
                continue
            images.append((path, raw))
            labels.append(label)
    rng = np.random.default_rng(seed)
    rows = verification_pairs(np.array(labels, dtype=np.int64), rng, max_same=pairs // 2)
    same, different = rows[rows[:, 2] == 1], rows[rows[:, 2] == 0]
    if not len(same) or not len(different):
        raise DatasetError(f"{src}: verification pairs need an identity folder with two readable images and two "
                           f"identities (expected {src}/<identity>/<image>)")
    kept = min(len(same), len(different))  # as many of each kind, in tens where there are ten: equal folds
    kept = kept - kept % 10 if kept >= 10 else kept
    same, different = rng.permutation(same)[:kept], rng.permutation(different)[:kept]
    folds = [np.concatenate(chunks) for chunks in zip(np.array_split(same, 10), np.array_split(different, 10))]
    rows = np.concatenate(folds)
    encoded = {}
    for i in np.unique(rows[:, :2]):
        encoded[i] = _encoded(*images[i])
    content = ([encoded[i] for a, b, _ in rows for i in (a, b)], [bool(flag) for flag in rows[:, 2]])
    atomic_write(out_bin, lambda f: pickle.dump(content, f, protocol=4))
    log(f"wrote {len(rows)} pairs ({len(same)} of the same person) of {len(set(labels))} identities from {src} into "
        f"{out_bin}; {len(unreadable)} unreadable left out" + (f": {some_names(unreadable)}" if unreadable else ""))
    return len(rows), len(same)


def _encoded(path, raw):
    """The bytes to store for the image at `path`: the file's own when `raw`, else its pixels as PNG."""
    if raw:
        with open(path, "rb") as f:
            return f.read()
    buffer = io.BytesIO()
    load_image(path).save(buffer, format="PNG")
    return buffer.getvalue()


# -----------------------------------------------------------------------------
# command line

def _add_align_command(commands):
    """The `align` command and its flags, added to the argparse `commands`."""
    align = commands.add_parser("align", help="detect and align the face of every photo of SRC into DST",
                                allow_abbrev=False)
    align.add_argument("src")
    align.add_argument("dst")
    align.add_argument("--size", type=int, default=112, help="side of the aligned crops, pixels")
    align.add_argument("--missing", default="skip", choices=("skip", "centre"),
                       help="a photo without a usable face: leave it out, or keep its centre crop")
    align.add_argument("--upsample", type=int, default=0, help="enlarge photos N times to find small faces (slower)")
    align.add_argument("--passes", type=lambda text: tuple(text.split(",")), default=PASSES,
                       help="detectors tried in turn, each on the photos the ones before found no face in: hog (at "
                            "--upsample), hog_up (upsampled once more), cnn (dlib's MMOD CNN at --upsample, slowest); "
                            "default: hog,hog_up,cnn")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare face datasets.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="copy SRC into DST/train, DST/valid (and DST/test) per identity",
                                allow_abbrev=False)
    split.add_argument("src")
    split.add_argument("dst")
    split.add_argument("--valid", type=float, default=0.2, help="fraction of each identity's images")
    split.add_argument("--test", type=float, default=0.0, help="fraction of each identity's images")
    split.add_argument("--unseen", type=float, default=0.0,
                       help="fraction of the identities held out whole into DST/unseen (people never trained on)")
    split.add_argument("--valid_people", type=float, default=0.0,
                       help="fraction of the identities held out whole into DST/valid (to choose the checkpoint on)")
    split.add_argument("--min_images", type=int, default=0, help="leave out identities with fewer images")
    split.add_argument("--max_images", type=int, default=0, help="leave out identities with more (0: no limit)")
    split.add_argument("--identity_depth", type=int, default=1, help="folder level of the identities")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--force", action="store_true", help="replace DST's train/valid/test/unseen folders")
    fetch = commands.add_parser("fetch-att", help="download AT&T faces (via scikit-learn) and split them 7/1/2",
                                allow_abbrev=False)
    fetch.add_argument("dst")
    fetch.add_argument("--seed", type=int, default=0)
    fetch.add_argument("--force", action="store_true", help="replace DST's train/valid/test folders")
    _add_align_command(commands)
    pack = commands.add_parser("pack", help="pack identity folders into insightface's train.rec/.idx/property",
                               allow_abbrev=False)
    pack.add_argument("src", help="identity folders of aligned images")
    pack.add_argument("out", help="the .rec to write; its .idx and property are written beside")
    pairs = commands.add_parser("bin", help="write an insightface verification set (.bin) of pairs among the "
                                "images of identity folders", allow_abbrev=False)
    pairs.add_argument("src", help="identity folders of aligned images (people held out of training)")
    pairs.add_argument("out", help="the .bin to write")
    pairs.add_argument("--pairs", type=int, default=6000, help="at most this many pairs, half of the same person")
    pairs.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "bin" and args.pairs < 20:
        parser.error("--pairs: at least 20 (ten folds of both kinds)")
    try:
        if args.command == "split":
            split_dataset(args.src, args.dst, args.valid, args.test, args.min_images, args.max_images,
                          args.seed, args.force, args.identity_depth, args.unseen, args.valid_people)
        elif args.command == "align":
            align_dataset(args.src, args.dst, args.size, args.missing, args.upsample, args.passes)
        elif args.command == "pack":
            pack_dataset(args.src, args.out)
        elif args.command == "bin":
            bin_dataset(args.src, args.out, args.pairs, args.seed)
        else:
            fetch_att(args.dst, args.seed, args.force)
    except (DatasetError, AlignmentUnavailable) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
