"""prepare.py: splitting identity folders, fetching AT&T through a stand-in for scikit-learn's download, and the
command line, all in-process on small image trees written into tmp_path."""
import os
import re
from urllib.error import URLError

import numpy as np
import pytest
from PIL import Image

import prepare
from conftest import make_faces, write_image
from data_utils import DatasetError
from evaluation import bin_pairs
from pairs import read_verification_bin
from prepare import ensure_att, fetch_att, split_dataset


def quiet(*_):
    pass


def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def exit_status(err):
    """The process exit status of a SystemExit (sys.exit(message) exits with 1)."""
    return 0 if err.code is None else err.code if isinstance(err.code, int) else 1


@pytest.fixture
def olivetti(monkeypatch):
    """scikit-learn's Olivetti download replaced by 40 random 64x64 images of 4 people."""
    import sklearn.datasets
    from sklearn.utils import Bunch
    rng = np.random.default_rng(0)
    fake = Bunch(images=rng.random((40, 64, 64)).astype(np.float32), target=np.repeat(np.arange(4), 10))
    monkeypatch.setattr(sklearn.datasets, "fetch_olivetti_faces", lambda *a, **k: fake)


@pytest.fixture
def offline(monkeypatch):
    """scikit-learn's Olivetti download failing as it does without a network."""
    import sklearn.datasets

    def fail(*args, **kwargs):
        raise URLError("Name or service not known")
    monkeypatch.setattr(sklearn.datasets, "fetch_olivetti_faces", fail)


# -----------------------------------------------------------------------------
# split

def test_split_is_per_identity_deterministic_and_leaves_source_alone(tmp_path):
    src = make_faces(tmp_path / "src", identities=3, images=10)
    write_image(tmp_path / "src" / "p0" / "distortion" / "0_blur.png")
    before = listing(src)
    counts = split_dataset(str(src), str(tmp_path / "a"), valid=0.2, seed=1, log=quiet)
    split_dataset(str(src), str(tmp_path / "b"), valid=0.2, seed=1, log=quiet)
    split_dataset(str(src), str(tmp_path / "c"), valid=0.2, seed=2, log=quiet)
    assert listing(src) == before
    assert counts == {"train": 25, "valid": 6}
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert listing(tmp_path / "a") != listing(tmp_path / "c")
    for person in ("p0", "p1", "p2"):
        assert len(os.listdir(tmp_path / "a" / "valid" / person)) == 2
    assert os.path.isfile(tmp_path / "a" / "train" / "p0" / "distortion" / "0_blur.png")
    train = set(os.listdir(tmp_path / "a" / "train" / "p1"))
    assert not train & set(os.listdir(tmp_path / "a" / "valid" / "p1"))


def test_split_with_test_fraction_and_image_count_filters(tmp_path):
    src = tmp_path / "src"
    for person, count in (("few", 3), ("mid", 20), ("many", 40)):
        for j in range(count):
            write_image(src / person / f"{j}.png", seed=j)
    lines = []
    counts = split_dataset(str(src), str(tmp_path / "out"), valid=0.1, test=0.1, min_images=5, max_images=30,
                           log=lines.append)
    assert counts == {"train": 16, "valid": 2, "test": 2}
    for split in ("train", "valid", "test"):
        assert os.listdir(tmp_path / "out" / split) == ["mid"]
    skipped = [line for line in lines if re.search(r"\b(few|many)\b", line)]  # the log names who was left out
    assert len(skipped) == 2


def test_small_identity_goes_to_every_split_it_can(tmp_path):
    src = make_faces(tmp_path / "src", identities=2, images=2)
    split_dataset(str(src), str(tmp_path / "out"), valid=0.1, log=quiet)
    for person in ("p0", "p1"):  # 10% of 2 rounds to 0, yet each identity keeps one valid image
        assert len(os.listdir(tmp_path / "out" / "valid" / person)) == 1
        assert len(os.listdir(tmp_path / "out" / "train" / person)) == 1


def test_identity_too_small_for_every_split_stays_in_train(tmp_path):
    src = make_faces(tmp_path / "src", identities=2, images=2)
    counts = split_dataset(str(src), str(tmp_path / "out"), valid=0.3, test=0.3, log=quiet)
    assert counts == {"train": 4, "valid": 0, "test": 0}


def test_split_rejects_bad_arguments(tmp_path):
    src = make_faces(tmp_path / "src", identities=2, images=5)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "missing"))):
        split_dataset(str(tmp_path / "missing"), str(tmp_path / "x"))
    with pytest.raises(DatasetError, match="--valid"):
        split_dataset(str(src), str(tmp_path / "x"), valid=0.6, test=0.5)
    with pytest.raises(DatasetError, match=re.escape(str(src / "out"))):
        split_dataset(str(src), str(src / "out"))
    with pytest.raises(DatasetError, match=re.escape(str(src))):
        split_dataset(str(src), str(tmp_path / "x"), min_images=50)
    assert not (src / "out").exists() and not (tmp_path / "x").exists()


# -----------------------------------------------------------------------------
# AT&T

def test_fetch_att_writes_identity_folders_from_the_olivetti_array(tmp_path, olivetti):
    counts = fetch_att(str(tmp_path / "att"), log=quiet)
    assert counts == {"train": 28, "valid": 4, "test": 8}
    assert sorted(os.listdir(tmp_path / "att" / "valid")) == sorted(os.listdir(tmp_path / "att" / "test")) == [
        "s1", "s2", "s3", "s4"]
    image = Image.open(next((tmp_path / "att" / "train" / "s2").iterdir()))
    assert image.size == (64, 64) and image.mode == "L"


def test_fetch_att_offline_fails_in_one_line_naming_the_local_way(tmp_path, offline):
    with pytest.raises(DatasetError) as info:
        fetch_att(str(tmp_path / "att"), log=quiet)
    assert "\n" not in str(info.value) and "prepare.py split" in str(info.value)
    assert not (tmp_path / "att").exists()


def test_ensure_att_leaves_an_existing_dataset_alone(tmp_path, offline):
    write_image(tmp_path / "data" / "train" / "ann" / "1.png")
    before = listing(tmp_path / "data")
    ensure_att(str(tmp_path / "data"), log=quiet)  # offline: it did not try to download
    assert listing(tmp_path / "data") == before


def test_ensure_att_fetches_a_missing_dataset(tmp_path, olivetti):
    ensure_att(str(tmp_path / "data"), log=quiet)
    assert sorted(os.listdir(tmp_path / "data")) == ["test", "train", "valid"]
    assert [len(listing(tmp_path / "data" / split)) for split in ("train", "valid", "test")] == [28, 4, 8]
    before = listing(tmp_path / "data")
    ensure_att(str(tmp_path / "data"), log=quiet)  # a second run finds it
    assert listing(tmp_path / "data") == before


def test_ensure_att_offline_fails_in_one_line_naming_the_local_way(tmp_path, offline):
    with pytest.raises(DatasetError) as info:
        ensure_att(str(tmp_path / "data"), log=quiet)
    assert "\n" not in str(info.value) and "prepare.py split" in str(info.value)
    assert str(tmp_path / "data") in str(info.value)


# -----------------------------------------------------------------------------
# command line

def test_split_command_passes_every_flag(tmp_path, capsys):
    src = tmp_path / "src"
    for group, person, count in (("g1", "few", 3), ("g1", "mid", 20), ("g2", "many", 40)):
        for j in range(count):
            write_image(src / group / person / f"{j}.png", seed=j)
    prepare.main(["split", str(src), str(tmp_path / "cli"), "--valid=0.1", "--test=0.1", "--min_images=5",
                  "--max_images=30", "--identity_depth=2", "--seed=3"])
    assert str(tmp_path / "cli") in capsys.readouterr().out
    split_dataset(str(src), str(tmp_path / "direct"), valid=0.1, test=0.1, min_images=5, max_images=30,
                  identity_depth=2, seed=3, log=quiet)
    assert listing(tmp_path / "cli") == listing(tmp_path / "direct")
    assert os.listdir(tmp_path / "cli" / "test") == ["g1"] and os.listdir(tmp_path / "cli" / "test" / "g1") == ["mid"]


def test_split_command_refuses_a_non_empty_destination_unless_forced(tmp_path, capsys):
    src = make_faces(tmp_path / "src", identities=2, images=5)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        prepare.main(["split", str(src), str(tmp_path / "dst")])
    assert exit_status(info.value) == 1 and "--force" in str(info.value.code)
    assert listing(tmp_path / "dst") == ["keep.txt"]
    prepare.main(["split", str(src), str(tmp_path / "dst"), "--force"])
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"
    assert len(listing(tmp_path / "dst" / "train")) == 8


@pytest.mark.parametrize("argv", [[], ["split", "only-src"], ["split", "a", "b", "--valid=half"], ["fetch-att"],
                                  ["split", "a", "b", "--vali=0.1"], ["align", "a"]])
def test_bad_command_lines_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        prepare.main(argv)
    assert exit_status(info.value) == 2


@pytest.mark.parametrize("passes", ["hog,fast", "hog,hog", ""])
def test_align_refuses_unknown_or_repeated_passes_in_one_line_naming_the_flag(passes, tmp_path):
    src = make_faces(tmp_path / "src", identities=1, images=1)
    with pytest.raises(SystemExit) as info:
        prepare.main(["align", str(src), str(tmp_path / "dst"), f"--passes={passes}"])
    assert exit_status(info.value) == 1 and str(info.value.code).startswith(f"error: --passes={passes}: ")
    assert "\n" not in str(info.value.code) and not (tmp_path / "dst").exists()


def test_fetch_att_command(tmp_path, olivetti, capsys):
    prepare.main(["fetch-att", str(tmp_path / "att"), "--seed=1"])
    seed1 = listing(tmp_path / "att")
    assert len(listing(tmp_path / "att" / "valid")) == 4 and len(listing(tmp_path / "att" / "test")) == 8
    with pytest.raises(SystemExit) as info:
        prepare.main(["fetch-att", str(tmp_path / "att")])  # not empty now
    assert exit_status(info.value) == 1 and "--force" in str(info.value.code)
    prepare.main(["fetch-att", str(tmp_path / "att"), "--force"])
    fetch_att(str(tmp_path / "seed0"), log=quiet)
    assert listing(tmp_path / "att") == listing(tmp_path / "seed0") != seed1  # --force redid it, default seed


def test_fetch_att_command_offline_exits_1_with_one_line(tmp_path, offline, capsys):
    with pytest.raises(SystemExit) as info:
        prepare.main(["fetch-att", str(tmp_path / "att")])
    assert exit_status(info.value) == 1
    assert "\n" not in str(info.value.code) and "prepare.py split" in str(info.value.code)


def test_bin_writes_balanced_folds_of_pairs_that_read_back_as_the_source_images(tmp_path):
    src = make_faces(tmp_path / "held_out", identities=6, images=5, ext=".jpg")
    os.makedirs(src / "one")
    write_image(str(src / "one" / "0.jpg"), seed=999)  # a person of one photo: in different pairs only
    (src / "p0" / "broken.jpg").write_bytes(b"not an image")
    count, same = prepare.bin_dataset(str(src), str(tmp_path / "v.bin"), pairs=40, seed=0, log=lambda line: None)
    images, issame = read_verification_bin(str(tmp_path / "v.bin"))
    assert len(images) == 2 * count == 80 and len(issame) == count and sum(issame) == same == 20
    by_bytes = {(src / p / n).read_bytes(): p for p in os.listdir(src) for n in os.listdir(src / p) if n[0] != "b"}
    people = [by_bytes[image] for image in images]  # every image is a source file, byte for byte
    assert [people[2 * k] == people[2 * k + 1] for k in range(count)] == list(issame)
    assert all(sum(fold) == 2 for fold in np.array_split(np.array(issame), 10))  # each tenth: 2 same, 2 different
    folds = bin_pairs(issame)[1]  # the folds test.py and train.py score it in
    assert [int(np.sum(issame[folds == f])) for f in range(10)] == [2] * 10
    again = prepare.bin_dataset(str(src), str(tmp_path / "w.bin"), pairs=40, seed=0, log=lambda line: None)
    assert again == (count, same) and (tmp_path / "w.bin").read_bytes() == (tmp_path / "v.bin").read_bytes()
    # 46 pairs asked: 20 of each kind, so that insightface's ten contiguous folds are equal and balanced
    count, same = prepare.bin_dataset(str(src), str(tmp_path / "x.bin"), pairs=46, seed=0, log=lambda line: None)
    issame = read_verification_bin(str(tmp_path / "x.bin"))[1]
    assert (count, same) == (40, 20) and [int(np.sum(issame[bin_pairs(issame)[1] == f])) for f in range(10)] == [2] * 10


def test_bin_refuses_folders_without_pairs_of_both_kinds(tmp_path, capsys):
    single = make_faces(tmp_path / "single", identities=3, images=1)
    with pytest.raises(DatasetError):
        prepare.bin_dataset(str(single), str(tmp_path / "v.bin"), log=lambda line: None)
    with pytest.raises(DatasetError):
        prepare.bin_dataset(str(tmp_path / "nonesuch"), str(tmp_path / "v.bin"), log=lambda line: None)
    with pytest.raises(SystemExit) as exit:
        prepare.main(["bin", str(single), str(tmp_path / "v.bin")])
    assert exit.value.code.startswith("error: ") and not (tmp_path / "v.bin").exists()
    with pytest.raises(SystemExit) as exit:
        prepare.main(["bin", str(single), str(tmp_path / "v.bin"), "--pairs=4"])
    assert exit.value.code == 2 and "--pairs" in capsys.readouterr().err
