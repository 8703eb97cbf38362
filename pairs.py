"""Verification inputs: LFW-style pairs files (read_pairs_file) and insightface's pickled .bin verification sets
(read_verification_bin, and read_verification_bins for the --val_bins of train.py and test.py)."""
import codecs
import os
import pickle
import re

import numpy as np

from configurator import ConfigError
from data_utils import IMAGE_EXTENSIONS, DatasetError
from evaluation import verifiable


class _VerificationUnpickler(pickle.Unpickler):
    """Unpickling that builds plain values only: bytes, lists, tuples, bools (and ints, floats, strings), none of
    which needs a global. The one global admitted is _codecs.encode, the way protocol-2 pickles store bytes; any
    other (a class to build, a function to call: how a pickle runs code) is refused."""

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise DatasetError(f"refused: it would load {module}.{name}; a verification set holds only image bytes and "
                           f"booleans, and a pickle naming anything else can run code")

    def persistent_load(self, pid):  # (the default's refusal is a message of two lines)
        raise DatasetError(f"refused: it holds a persistent id ({str(pid)[:40]!r}), which only the program that "
                           f"wrote it can resolve; a verification set holds only image bytes and booleans")


def read_verification_bin(path):
    """(images: list of 2N encoded images as bytes, same: (N,) bool numpy array) of an insightface verification
    set (lfw.bin, cfp_fp.bin, agedb_30.bin): a pickled (list of JPEG bytes, list of is-same bools), two images per
    pair. Read without running code (_VerificationUnpickler). Raises DatasetError for anything else."""
    try:
        with open(path, "rb") as f:
            loaded = _VerificationUnpickler(f, encoding="bytes").load()
    except DatasetError as err:
        raise DatasetError(f"{path}: {err}") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as err:
        raise DatasetError(f"{path}: not a readable verification set ({type(err).__name__}: {err})") from None
    images, same = loaded if isinstance(loaded, (tuple, list)) and len(loaded) == 2 else (None, None)
    if not (isinstance(images, (list, tuple)) and isinstance(same, (list, tuple))
            and all(isinstance(i, (bytes, bytearray)) for i in images)
            and all(isinstance(s, bool) for s in same) and len(images) == 2 * len(same) and same):
        raise DatasetError(f"{path}: not a verification set: expected (a list of 2N image bytes, a list of N "
                           f"booleans)")
    return [bytes(i) for i in images], np.array(same, dtype=bool)


def read_verification_bins(val_bins, data_dir):
    """{name: read_verification_bin's (images, same)} of the insightface verification sets of `val_bins` (the
    --val_bins of train.py and test.py): comma-separated names of data_dir's sets (lfw: data_dir/lfw.bin) or paths
    of .bin files, each named by its file's stem; {} for "". Raises ConfigError naming val_bins for a set that is
    missing, unreadable, named twice, or has too few pairs to measure (evaluation.verifiable)."""
    bins = {}
    for entry in filter(None, (part.strip() for part in val_bins.split(","))):
        path = entry if entry.endswith(".bin") else os.path.join(data_dir, f"{entry}.bin")
        name = os.path.basename(path)[:-len(".bin")]
        if name in bins:
            raise ConfigError("val_bins", f"two sets named {name!r}: name each set once")
        if not os.path.isfile(path):
            raise ConfigError("val_bins", f"{path}: no such file (a name NAME stands for data_dir/NAME.bin)")
        try:
            bins[name] = read_verification_bin(path)
        except DatasetError as err:
            raise ConfigError("val_bins", str(err)) from None
        if not verifiable(bins[name][1]):
            raise ConfigError("val_bins", f"{path}: {len(bins[name][1])} pairs, {int(bins[name][1].sum())} of one "
                                          f"person: verification needs 4 pairs or more, of both kinds")
    return bins


def read_pairs_file(path, root, extensions=IMAGE_EXTENSIONS, name_format="{name}_{index:04d}"):
    """The verification pairs of an LFW-style pairs.txt, with their images below `root`.

    Format: an optional header line "N" or "S N" (S sets, each of N same-person pairs then N different-people
    pairs; "N" is one set), then one pair a line: "name i j" (images i and j of one person) or
    "name1 i name2 j" (two people). Image i of `name` is ROOT/<name>/<name_format>.<ext> with the first
    extension of `extensions` that exists (in the order given; a set in sorted order); LFW's default name
    format gives Aaron_Peirsol/Aaron_Peirsol_0001.jpg, AT&T's faces use name_format="{index}" (s1/1.pgm).

    Returns dict(pairs=[(path_a, path_b, same: bool)], fold_ids=[set index of each pair, 0..S-1; all 0
    without a header], folds=S (1 without a header), missing=[(line number, path)]). A pair with a missing
    image is left out of `pairs` and its image listed in `missing` (ROOT/<name>/<stem>.* when several
    extensions were tried). Raises DatasetError naming the file and line for a malformed line, header counts
    that do not match the lines, and a name whose image would lie outside `root` once its path is
    written out (../, absolute paths, path separators); identity folders that are symlinks are followed (an LFW
    assembled from two halves).
    """
    if not os.path.isdir(os.path.realpath(root)):
        raise DatasetError(f"{root}: no such folder")
    lines = _pair_lines(path)
    folds, per_set = _pairs_header(path, lines)
    order = sorted(extensions) if isinstance(extensions, (set, frozenset)) else list(extensions)
    pairs, fold_ids, missing = [], [], []
    for position, (number, fields) in enumerate(lines):
        where = f"{path}, line {number}"
        *images, same = _pair_fields(where, fields)
        if per_set and same != (position % (2 * per_set) < per_set):
            raise DatasetError(f"{where}: expected a {'same-person' if not same else 'different-people'} pair here: "
                               f"each set of the header's layout is {per_set} same-person lines, then {per_set} "
                               f"different")
        found = [_pair_image(where, name, index, root, order, name_format) for name, index in images]
        missing += [(number, wanted) for image, wanted in found if image is None]
        if all(image for image, _ in found):
            pairs.append((found[0][0], found[1][0], same))
            fold_ids.append(position // (2 * per_set) if per_set else 0)
    return dict(pairs=pairs, fold_ids=fold_ids, folds=folds, missing=missing)


def _pair_lines(path):
    """The non-blank lines of a pairs file as (line number, fields)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(number, line.split()) for number, line in enumerate(f, 1) if line.strip()]
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the pairs file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a text pairs file (not UTF-8)") from None
    if not lines:
        raise DatasetError(f"{path}: no pairs in the file")
    return lines


def _pairs_header(path, lines):
    """(sets S, same-person pairs per set N) from a header line "N" or "S N", which is taken off `lines` after
    checking that the pair lines number S * 2N; (1, None) when the first line is a pair, not a header."""
    if len(lines[0][1]) not in (1, 2):
        return 1, None
    number, header = lines.pop(0)
    if not all(re.fullmatch(r"[0-9]+", v) for v in header) or int(header[-1]) < 1 or int(header[0]) < 1:
        raise DatasetError(f"{path}, line {number}: header {' '.join(header)!r} is not 'N' or 'S N' "
                           f"(positive integers)")
    folds, per_set = (1, int(header[0])) if len(header) == 1 else map(int, header)
    expected = folds * 2 * per_set
    if len(lines) != expected:
        where = lines[expected][0] if len(lines) > expected else number  # the first line too many, or the header
        raise DatasetError(f"{path}, line {where}: the header announces {folds} set(s) of {per_set} same + "
                           f"{per_set} different pairs ({expected} lines), the file has {len(lines)} pair lines")
    return folds, per_set


def _pair_fields(where, fields):
    """((name, index), (name, index), same person) from a pair line's fields: "name i j" or "name1 i name2 j"."""
    if len(fields) == 3:
        return (fields[0], fields[1]), (fields[0], fields[2]), True
    if len(fields) == 4:
        return (fields[0], fields[1]), (fields[2], fields[3]), False
    raise DatasetError(f"{where}: expected 'name i j' or 'name1 i name2 j', got {len(fields)} fields")


def _pair_image(where, name, index, root, order, name_format):
    """(path, None) for image `index` of `name`: ROOT/<name>/<name_format>.<ext> with the first extension of `order`
    that exists; (None, what was looked for) when there is none. Raises DatasetError for an index that is not a
    number and for a name (or `name_format`) whose image path leads outside `root` as written: symlinks below `root`
    are followed, a user's linked folders being theirs."""
    if not re.fullmatch(r"[0-9]+", index):
        raise DatasetError(f"{where}: image index {index!r} is not a non-negative integer")
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise DatasetError(f"{where}: name {name!r} is not a folder name below {root} (no path separators, no ..)")
    stem = os.path.join(root, name, name_format.format(name=name, index=int(index)))
    if not os.path.abspath(stem).startswith(os.path.abspath(root) + os.sep):
        raise DatasetError(f"{where}: image {stem} lies outside {root}")
    found = next((stem + ext for ext in order if os.path.isfile(stem + ext)), None)
    return found, None if found else stem + (order[0] if len(order) == 1 else ".*")
