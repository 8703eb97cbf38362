"""pairs: read_pairs_file (LFW-style pairs.txt files, on small files and image trees written into tmp_path),
read_verification_bin (insightface's pickled .bin verification sets, read without running code) and
read_verification_bins (the sets of --val_bins, refused in one line naming it)."""
import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from configurator import ConfigError
from conftest import run_script, write_image, write_verification_bin
from data_utils import DatasetError
from pairs import read_pairs_file, read_verification_bin, read_verification_bins

ATT_PAIRS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "att_pairs.txt")


@pytest.fixture
def lfw(tmp_path):
    """An LFW-like tree: ROOT/<name>/<name>_<i:04d>.jpg for two people with three images each."""
    root = tmp_path / "lfw"
    for name in ("Ann_Lee", "Bob_Ray"):
        for i in (1, 2, 3):
            write_image(root / name / f"{name}_{i:04d}.jpg", seed=i, mode="RGB")
    return root


def write(tmp_path, text):
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    return path


def test_header_sets_and_both_line_kinds(tmp_path, lfw):
    text = "2\t1\n" "Ann_Lee\t1\t2\n" "Ann_Lee\t1\tBob_Ray\t3\n" "Bob_Ray 2 3\n" "Bob_Ray 1 Ann_Lee 3\n"
    result = read_pairs_file(write(tmp_path, text), lfw)
    assert result["folds"] == 2 and result["fold_ids"] == [0, 0, 1, 1] and result["missing"] == []
    assert [same for _, _, same in result["pairs"]] == [True, False, True, False]
    a, b, _ = result["pairs"][1]
    assert a == os.path.join(lfw, "Ann_Lee", "Ann_Lee_0001.jpg")
    assert b == os.path.join(lfw, "Bob_Ray", "Bob_Ray_0003.jpg")


def test_single_number_header_and_no_header(tmp_path, lfw):
    one_set = read_pairs_file(write(tmp_path, "1\nAnn_Lee 1 3\nBob_Ray 1 Ann_Lee 2\n"), lfw)
    assert one_set["folds"] == 1 and one_set["fold_ids"] == [0, 0]
    free = read_pairs_file(write(tmp_path, "Bob_Ray 1 Ann_Lee 2\nAnn_Lee 1 3\nAnn_Lee 2 3\n\n"), lfw)
    assert free["folds"] == 1 and free["fold_ids"] == [0, 0, 0]
    assert [same for _, _, same in free["pairs"]] == [False, True, True]


def test_missing_images_are_listed_and_their_pairs_left_out(tmp_path, lfw):
    result = read_pairs_file(write(tmp_path, "Ann_Lee 1 9\nBob_Ray 1 2\nCid_Moe 1 Ann_Lee 1\n"), lfw,
                             extensions=(".jpg",))
    assert len(result["pairs"]) == 1 and result["pairs"][0][2] is True
    assert result["missing"] == [(1, os.path.join(lfw, "Ann_Lee", "Ann_Lee_0009.jpg")),
                                 (3, os.path.join(lfw, "Cid_Moe", "Cid_Moe_0001.jpg"))]
    assert result["fold_ids"] == [0]


def test_first_existing_extension_in_the_order_given(tmp_path, lfw):
    write_image(lfw / "Ann_Lee" / "Ann_Lee_0001.png", seed=9)
    path = write(tmp_path, "Ann_Lee 1 2\n")
    assert read_pairs_file(path, lfw, extensions=(".png", ".jpg"))["pairs"][0][0].endswith("Ann_Lee_0001.png")
    assert read_pairs_file(path, lfw, extensions=(".jpg", ".png"))["pairs"][0][0].endswith("Ann_Lee_0001.jpg")
    several = read_pairs_file(write(tmp_path, "Ann_Lee 7 1\n"), lfw)
    assert several["missing"] == [(1, os.path.join(lfw, "Ann_Lee", "Ann_Lee_0007.*"))]


@pytest.mark.parametrize("text,line", [
    ("Ann_Lee 1\n", 1),  # a first line of one or two fields is the header, and this one is not a valid header
    ("Ann_Lee 1 2\nAnn_Lee 1 2 Bob_Ray 3\n", 2),  # five fields
    ("Ann_Lee 1 two\n", 1),  # an index that is not a number
    ("Ann_Lee 1 2\nAnn_Lee -1 Bob_Ray 2\n", 2),  # a negative index
    ("1 x\nAnn_Lee 1 2\nAnn_Lee 1 Bob_Ray 2\n", 1),  # a header that is not numbers
    ("0\nAnn_Lee 1 2\nAnn_Lee 1 Bob_Ray 2\n", 1),  # a header of no pairs
    ("2 1\nAnn_Lee 1 2\nAnn_Lee 1 Bob_Ray 2\n", 1),  # a header that announces more lines than there are
    ("1\nAnn_Lee 1 2\nAnn_Lee 1 Bob_Ray 2\nBob_Ray 1 2\n", 4),  # ... or fewer: the first line too many
    ("1\nAnn_Lee 1 Bob_Ray 2\nAnn_Lee 1 2\n", 2),  # the header's layout: same-person pairs first
    ("1 2\nAnn_Lee 1 2\nAnn_Lee 1 Bob_Ray 2\nBob_Ray 1 2\nBob_Ray 1 Ann_Lee 2\n", 3),  # N of each kind
])
def test_malformed_files_name_the_line(tmp_path, lfw, text, line):
    with pytest.raises(DatasetError) as info:
        read_pairs_file(write(tmp_path, text), lfw)
    assert str(info.value).startswith(f"{tmp_path / 'pairs.txt'}, line {line}: ")


@pytest.mark.parametrize("name", ["..", "../lfw_outside", "/etc", "Ann_Lee/../../x", "a\\b"])
def test_names_that_leave_the_root_are_refused(tmp_path, lfw, name):
    with pytest.raises(DatasetError) as info:
        read_pairs_file(write(tmp_path, f"Ann_Lee 1 2\n{name} 1 Ann_Lee 2\n"), lfw)
    assert str(info.value).startswith(f"{tmp_path / 'pairs.txt'}, line 2: ")


def test_identity_folders_linked_in_from_elsewhere_are_followed(tmp_path, lfw):
    elsewhere = tmp_path / "second_half"  # an LFW assembled from two halves: the root links the other's folders
    write_image(elsewhere / "Eve" / "Eve_0001.jpg", seed=3)
    write_image(elsewhere / "Eve" / "Eve_0002.jpg", seed=4)
    os.symlink(elsewhere / "Eve", lfw / "Eve")
    result = read_pairs_file(write(tmp_path, "Eve 1 2\nAnn_Lee 1 Eve 2\n"), lfw)
    assert result["missing"] == [] and [same for *_, same in result["pairs"]] == [True, False]
    assert result["pairs"][0][:2] == (str(lfw / "Eve" / "Eve_0001.jpg"), str(lfw / "Eve" / "Eve_0002.jpg"))


@pytest.mark.parametrize("name_format", ["../../{name}_{index:04d}", "/tmp/{name}_{index:04d}"])
def test_a_name_format_that_leads_outside_the_root_is_refused(tmp_path, lfw, name_format):
    with pytest.raises(DatasetError) as info:
        read_pairs_file(write(tmp_path, "Ann_Lee 1 2\n"), lfw, name_format=name_format)
    assert str(info.value).startswith(f"{tmp_path / 'pairs.txt'}, line 1: ")


def test_unreadable_or_empty_files_and_a_missing_root_name_the_path(tmp_path, lfw):
    (tmp_path / "latin1.txt").write_bytes("Ren\xe9 1 2\n".encode("latin-1"))
    for path in (tmp_path / "none.txt", tmp_path / "latin1.txt", write(tmp_path, "\n\n")):
        with pytest.raises(DatasetError) as info:
            read_pairs_file(path, lfw)
        assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(DatasetError) as info:
        read_pairs_file(write(tmp_path, "Ann_Lee 1 2\n"), tmp_path / "nowhere")
    assert str(info.value).startswith(f"{tmp_path / 'nowhere'}: ")


def test_att_pairs_file_finds_every_image(att_faces):
    result = read_pairs_file(ATT_PAIRS, att_faces, extensions=(".pgm",), name_format="{index}")
    assert result["missing"] == [] and len(result["pairs"]) == 40 and result["folds"] == 2
    assert result["fold_ids"] == [0] * 20 + [1] * 20
    same = [s for _, _, s in result["pairs"]]
    assert same == ([True] * 10 + [False] * 10) * 2
    names = {os.path.basename(os.path.dirname(p)) for a, b, _ in result["pairs"] for p in (a, b)}
    assert names <= {f"s{k}" for k in range(1, 11)}
    assert all(os.path.basename(a) != os.path.basename(b) for a, b, s in result["pairs"] if s)


def test_lfw_pairs_file_of_one_set_finds_every_image(lfw_faces):
    """LFW's own pairsDevTrain.txt: a header of one number (one set of 1,100 same-person then 1,100
    different-people pairs), tab-separated, every image present below images/."""
    result = read_pairs_file(os.path.join(os.path.dirname(lfw_faces), "pairsDevTrain.txt"), lfw_faces)
    assert result["missing"] == [] and result["folds"] == 1 and set(result["fold_ids"]) == {0}
    assert [s for _, _, s in result["pairs"]] == [True] * 1100 + [False] * 1100
    first = result["pairs"][0]
    assert [os.path.basename(p) for p in first[:2]] == ["Aaron_Peirsol_0001.jpg", "Aaron_Peirsol_0002.jpg"]


# -----------------------------------------------------------------------------
# insightface .bin verification sets

def jpeg(seed):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


class RunsCode:
    """What a malicious pickle holds: an object whose unpickling calls a function (here one that writes a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_verification_set_reads_as_image_bytes_and_booleans(tmp_path, protocol):
    images, same = [jpeg(i) for i in range(4)], [True, False]
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((images, same), protocol=protocol))
    read_images, read_same = read_verification_bin(str(path))
    assert read_images == images and read_same.dtype == bool and read_same.tolist() == same
    assert Image.open(io.BytesIO(read_images[3])).size == (12, 12)


class PersistentIds(pickle.Pickler):
    """A pickler that stores the number 5 as a persistent id, which only its own unpickler could resolve."""

    def persistent_id(self, obj):
        return "image-5" if obj == 5 else None


@pytest.mark.parametrize("payload", ["code", "numpy", "shape", "count", "not_bool", "empty", "junk", "missing",
                                     "persistent_id"])
def test_anything_but_bytes_and_booleans_is_refused_in_one_line_without_running_code(tmp_path, payload):
    marker = tmp_path / "ran"
    contents = dict(code=([jpeg(0), jpeg(1)], [True], RunsCode(str(marker))),
                    numpy=([jpeg(0), jpeg(1)], np.array([True])),
                    shape=([jpeg(0), jpeg(1)], [True], [False]),
                    count=([jpeg(0), jpeg(1), jpeg(2)], [True]),
                    not_bool=([jpeg(0), jpeg(1)], [1]),
                    empty=([], []))
    path = tmp_path / "set.bin"
    if payload == "junk":
        path.write_bytes(b"not a pickle at all")
    elif payload == "persistent_id":
        with open(path, "wb") as f:
            PersistentIds(f, protocol=4).dump(([jpeg(0), 5], [True]))
    elif payload != "missing":
        path.write_bytes(pickle.dumps(contents[payload], protocol=4))
    with pytest.raises(DatasetError) as info:
        read_verification_bin(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()  # the pickle's call never ran


# -----------------------------------------------------------------------------
# --val_bins: read once, refused in one line naming it

def test_val_bins_are_names_in_data_dir_or_paths(tmp_path):
    pairs = [(jpeg(1), jpeg(1), True), (jpeg(2), jpeg(3), False)] * 2
    write_verification_bin(tmp_path / "lfw.bin", pairs)
    write_verification_bin(tmp_path / "elsewhere.bin", pairs[:3] + [(jpeg(4), jpeg(4), True)])
    bins = read_verification_bins(f"lfw, {tmp_path / 'elsewhere.bin'}", str(tmp_path))
    assert list(bins) == ["lfw", "elsewhere"]
    images, same = bins["lfw"]
    assert images[:2] == [jpeg(1), jpeg(1)] and same.tolist() == [True, False, True, False]
    assert read_verification_bins("", str(tmp_path)) == {}


@pytest.mark.parametrize("case", ["missing", "not_a_set", "twice", "too_few", "one_kind"])
def test_a_bad_val_bins_entry_is_refused_naming_val_bins(tmp_path, case):
    pairs = [(jpeg(1), jpeg(1), True), (jpeg(2), jpeg(3), False)] * 2
    write_verification_bin(tmp_path / "lfw.bin", pairs)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    write_verification_bin(tmp_path / "few.bin", pairs[:3])
    write_verification_bin(tmp_path / "same.bin", [(jpeg(1), jpeg(1), True)] * 4)
    entry = dict(missing="cfp_fp", not_a_set="junk", twice=f"lfw,{tmp_path / 'lfw.bin'}", too_few="few",
                 one_kind="same")[case]
    with pytest.raises(ConfigError) as info:
        read_verification_bins(entry, str(tmp_path))
    assert info.value.flag == "val_bins"


@pytest.mark.e2e
def test_test_py_refuses_a_bin_holding_a_persistent_id_in_one_line_naming_val_bins(tmp_path):
    with open(tmp_path / "crafted.bin", "wb") as f:
        PersistentIds(f, protocol=4).dump(([jpeg(1), 5] * 2, [True, False]))
    proc = run_script("test.py", "--checkpoint=pixels", f"--data_dir={tmp_path}", "--val_bins=crafted", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(errors) == 1 and "--val_bins" in errors[0], proc.stderr
