"""recordio.py and `prepare.py pack`: insightface's RecordIO face data, written and read in-process on tiny images
in tmp_path."""
import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import prepare
from align import ALIGNMENT_FILE, alignment_record, read_alignment
import recordio
from conftest import make_faces, write_image
from data_utils import DatasetError, FaceFolder, make_transform
from files import save_json
from prepare import split_dataset
from recordio import (MAGIC, MAGIC_BYTES, RecordError, RecordFaces, RecordReader, RecordWriter, pack_payload,
                      read_index, scan_index, unpack_payload)
from sampling import train_loader_for


def quiet(*_):
    pass


def png(seed=0, size=(12, 10)):
    """A small PNG image's bytes."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_parts(rec_path):
    """[(offset, cflag, length)] of every part in a .rec, walked from the start."""
    data, parts, offset = Path(rec_path).read_bytes(), [], 0
    while offset < len(data):
        magic, lrec = struct.unpack_from("<II", data, offset)
        assert magic == MAGIC
        parts.append((offset, lrec >> 29, lrec & ((1 << 29) - 1)))
        offset += 8 + (lrec & ((1 << 29) - 1)) + -(lrec & ((1 << 29) - 1)) % 4
    return parts


def write_plain(folder, payloads):
    """folder/train.rec and .idx holding `payloads` under keys 0.. (no insightface header record)."""
    os.makedirs(folder, exist_ok=True)
    with RecordWriter(os.path.join(folder, "train.rec")) as writer:
        for key, payload in enumerate(payloads):
            writer.write(key, payload)
    return os.path.join(folder, "train.rec")


@pytest.fixture
def packed(tmp_path):
    """(identity folders of 3 x 4 PNG images, the folder holding train.rec packed from them)."""
    src = make_faces(tmp_path / "faces", identities=3, images=4)
    prepare.pack_dataset(str(src), str(tmp_path / "rec" / "train.rec"), log=quiet)
    return src, tmp_path / "rec"


# -----------------------------------------------------------------------------
# payloads and the file format

def test_payload_round_trip_with_one_label_and_several():
    image = png()
    header, labels, data = unpack_payload(pack_payload(7, image, id=3, id2=4))
    assert (header["flag"], header["label"], header["id"], header["id2"]) == (0, 7.0, 3, 4)
    assert labels == (7.0,) and data == image
    header, labels, data = unpack_payload(pack_payload([5, 9, 2.5], image))
    assert header["flag"] == 3 and labels == (5.0, 9.0, 2.5) and data == image
    header, labels, data = unpack_payload(pack_payload([1, 2], b""))
    assert labels == (1.0, 2.0) and data == b""
    with pytest.raises(RecordError):
        unpack_payload(pack_payload([1, 2, 3], b"")[:-4])


def test_payload_with_the_magic_is_split_into_parts_and_joined_on_read(tmp_path):
    # the magic at aligned positions 24 and 32 of the payload (after the 24-byte header), and once unaligned
    image = MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"xy" + MAGIC_BYTES + b"tail!"
    payload = pack_payload(1, image)
    rec = write_plain(tmp_path, [pack_payload(0, b"first"), payload, pack_payload(2, b"last")])
    parts = raw_parts(rec)
    assert [cflag for _, cflag, _ in parts] == [0, 1, 2, 3, 0]
    assert [length for _, _, length in parts[1:4]] == [24, 4, len(payload) - 36]
    reader = RecordReader(rec)
    assert reader.read(1) == payload
    assert unpack_payload(reader.read(1))[2] == image
    assert reader.read_header(1)[1] == (1.0,)
    assert unpack_payload(reader.read(2))[2] == b"last"
    assert read_index(tmp_path / "train.idx") == {0: 0, 1: parts[1][0], 2: parts[4][0]}


def test_magic_at_the_payload_start_and_end_gives_empty_parts(tmp_path):
    payload = MAGIC_BYTES + b"mid." + MAGIC_BYTES
    rec = write_plain(tmp_path, [payload])
    assert [(cflag, length) for _, cflag, length in raw_parts(rec)] == [(1, 0), (2, 4), (3, 0)]
    assert RecordReader(rec).read(0) == payload


def test_read_index_and_scan_index_agree(packed):
    _, folder = packed
    index = read_index(folder / "train.idx")
    assert scan_index(str(folder / "train.rec")) == (index, True)  # every record read
    assert sorted(index) == list(range(len(index))) and len(index) == 1 + 12 + 3
    assert list(index.values()) == sorted(index.values())


def test_missing_index_is_rebuilt_with_a_message_and_written_once(packed):
    _, folder = packed
    expected = (folder / "train.idx").read_text()
    os.remove(folder / "train.idx")
    lines = []
    reader = RecordReader(str(folder / "train.rec"), log=lines.append)
    assert reader.index == read_index(folder / "train.idx") and len(lines) == 1 and "train.idx" in lines[0]
    assert (folder / "train.idx").read_text() == expected  # written as the writer wrote it
    RecordReader(str(folder / "train.rec"), log=lines.append)
    assert len(lines) == 1  # the second reader reads it: no walk
    faces = RecordFaces(str(folder), log=quiet)
    assert len(faces) == 12


def write_insightface_order(folder):
    """folder/train.rec and .idx in the order of insightface's writers (RecBuilder, face2rec): images 1-4 (labels
    0, 0, 1, 1), identity records 5 -> [1, 3] and 6 -> [3, 5], then the header record 0 -> [5, 7], each record's
    key in its header's id. Returns the .rec's path."""
    os.makedirs(folder, exist_ok=True)
    with RecordWriter(os.path.join(folder, "train.rec")) as writer:
        for key, label in zip(range(1, 5), (0, 0, 1, 1)):
            writer.write(key, pack_payload(label, png(key), id=key))
        for key, first in ((5, 1), (6, 3)):
            writer.write(key, pack_payload([first, first + 2], b"", id=key))
        writer.write(0, pack_payload([5, 7], b"", id=0))
    return os.path.join(folder, "train.rec")


def test_a_missing_index_of_insightfaces_record_order_is_rebuilt_from_the_header_ids(tmp_path):
    rec = write_insightface_order(tmp_path)
    written = read_index(tmp_path / "train.idx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        indexed = RecordFaces(str(tmp_path))
    os.remove(tmp_path / "train.idx")
    os.remove(tmp_path / "train.labels.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt = RecordFaces(str(tmp_path), log=quiet)
    assert read_index(tmp_path / "train.idx") == rebuilt.reader.index == written
    for faces in (indexed, rebuilt):
        assert faces.keys == [1, 2, 3, 4] and faces.classes == ["0", "1"] and faces.targets == [0, 0, 1, 1]
        assert faces.ranges == [(1, 3), (3, 5)] and faces.image_bytes(2) == png(3)
    assert os.path.isfile(rec)


def test_a_missing_index_whose_keys_cannot_be_told_is_refused(tmp_path):
    # ids all 0 (a writer that leaves them), and the header record after the images: file order is not key order
    write_plain(tmp_path, [pack_payload(label, png(label)) for label in (0, 1)] + [pack_payload([1, 3], b"")])
    os.remove(tmp_path / "train.idx")
    with pytest.raises(RecordError):
        RecordFaces(str(tmp_path), log=quiet)
    assert not (tmp_path / "train.idx").exists()


def test_a_missing_index_of_a_file_numbered_in_file_order_is_rebuilt_in_file_order(tmp_path):
    # ids repeat, but the header record comes first (prepare.py pack's order, whose identity records had their
    # label as id): the keys are the file order
    with RecordWriter(str(tmp_path / "train.rec")) as writer:
        writer.write(0, pack_payload([3, 5], b""))
        for key, label in ((1, 0), (2, 1)):
            writer.write(key, pack_payload(label, png(key), id=key))
        for key, label in ((3, 0), (4, 1)):
            writer.write(key, pack_payload([label + 1, label + 2], b"", id=label))
    written = read_index(tmp_path / "train.idx")
    os.remove(tmp_path / "train.idx")
    faces = RecordFaces(str(tmp_path), log=quiet)
    assert faces.reader.index == written and faces.targets == [0, 1] and faces.ranges == [(1, 2), (2, 3)]


def test_malformed_index_and_unknown_key_raise_record_errors(tmp_path):
    rec = write_plain(tmp_path, [pack_payload(0, b"x")])
    with pytest.raises(RecordError):
        RecordReader(rec).read(5)
    (tmp_path / "train.idx").write_text("0\tzero\n")
    with pytest.raises(RecordError):
        RecordReader(rec)
    assert issubclass(RecordError, DatasetError)


def test_writer_leaves_nothing_behind_when_aborted(tmp_path):
    rec = write_plain(tmp_path, [pack_payload(0, b"old")])
    with pytest.raises(RuntimeError):
        with RecordWriter(rec) as writer:
            writer.write(0, pack_payload(1, b"new"))
            raise RuntimeError("stop")
    assert sorted(os.listdir(tmp_path)) == ["train.idx", "train.rec"]
    assert unpack_payload(RecordReader(rec).read(0))[2] == b"old"
    with RecordWriter(str(tmp_path / "other.rec")) as writer:
        writer.write(0, b"")
        with pytest.raises(ValueError):
            writer.write(0, b"")


# -----------------------------------------------------------------------------
# pack and RecordFaces

def test_pack_then_record_faces_matches_the_folder(packed):
    src, folder = packed
    faces, files = RecordFaces(str(folder)), FaceFolder(str(src))
    assert faces.classes == ["0", "1", "2"] and len(files.classes) == 3
    assert faces.targets == files.targets and faces.by_label == files.by_label
    for i, (path, _) in enumerate(files.samples):
        assert faces.image_bytes(i) == Path(path).read_bytes()
        image, label = faces[i]
        assert label == files.targets[i]
        assert np.array_equal(np.asarray(image), np.asarray(files.load(i)))
    assert faces.property == (3, 20, 24) and (folder / "property").read_text() == "3,20,24\n"
    assert faces.skipped == [] and faces.single_image_identities() == []


def test_pack_writes_the_insightface_header_and_identity_ranges(packed):
    _, folder = packed
    reader = RecordReader(str(folder / "train.rec"))
    header, labels, image = unpack_payload(reader.read(0))
    assert header["flag"] == 2 and labels == (13.0, 16.0) and image == b""
    ranges = [tuple(int(v) for v in reader.read_header(key)[1]) for key in range(13, 16)]
    assert ranges == [(1, 5), (5, 9), (9, 13)]
    assert all(reader.read_header(key)[0]["id"] == key for key in reader.keys())  # a lost .idx can be rebuilt
    assert [unpack_payload(reader.read(key))[1] for key in (1, 5, 12)] == [(0.0,), (1.0,), (2.0,)]
    faces = RecordFaces(str(folder))
    assert faces.ranges == ranges and faces.keys == list(range(1, 13))


def test_pack_stores_other_formats_as_png_and_leaves_unreadable_files_out(tmp_path):
    src = tmp_path / "faces"
    write_image(src / "a" / "1.pgm", seed=1)
    write_image(src / "a" / "2.jpg", seed=2, mode="RGB")
    write_image(src / "b" / "1.png", seed=3)
    (src / "b" / "2.png").write_bytes(b"not an image")
    lines = []
    count, identities, unreadable = prepare.pack_dataset(str(src), str(tmp_path / "out" / "train.rec"),
                                                         log=lines.append)
    assert (count, identities, unreadable) == (3, 2, [str(src / "b" / "2.png")])
    assert len(lines) == 1 and "2.png" in lines[0]
    faces = RecordFaces(str(tmp_path / "out"))
    assert faces.targets == [0, 0, 1]
    assert faces.image_bytes(0).startswith(b"\x89PNG")
    assert faces.image_bytes(1) == (src / "a" / "2.jpg").read_bytes()
    assert np.array_equal(np.asarray(faces.load(0)), np.asarray(Image.open(src / "a" / "1.pgm")))


def test_pack_command(tmp_path, capsys):
    src = make_faces(tmp_path / "faces", identities=2, images=3)
    prepare.main(["pack", str(src), str(tmp_path / "out" / "faces.rec")])
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and str(tmp_path / "out" / "faces.rec") in printed  # the summary line
    assert sorted(os.listdir(tmp_path / "out")) == ["faces.idx", "faces.rec", "property"]
    assert read_alignment(str(tmp_path / "out")) is None  # unaligned faces: no alignment record
    aligned = tmp_path / "aligned"
    split_dataset(str(src), str(aligned), log=lambda line: None)
    save_json(alignment_record(112), str(aligned / ALIGNMENT_FILE))  # as prepare.py align, then split, leave it
    prepare.main(["pack", str(aligned / "train"), str(tmp_path / "rec" / "train.rec")])
    assert read_alignment(str(tmp_path / "rec")) == alignment_record(112)  # train.py on the records records it
    faces = RecordFaces(str(tmp_path / "out"), name="faces")
    assert faces.targets == [0, 0, 0, 1, 1, 1]
    with pytest.raises(SystemExit):
        prepare.main(["pack", str(tmp_path / "none"), str(tmp_path / "x.rec")])


def test_file_without_header_uses_every_key_as_an_image(tmp_path):
    rec = write_plain(tmp_path, [pack_payload(label, png(seed)) for seed, label in enumerate([4, 4, 9, 2, 9])])
    faces = RecordFaces(str(tmp_path))
    assert faces.classes == ["2", "4", "9"] and faces.targets == [1, 1, 2, 0, 2]
    assert faces.keys == [0, 1, 2, 3, 4] and faces.ranges is None and faces.property is None
    assert faces.image_bytes(3) == png(3)
    # several labels a record (flag 2, an image after them): the first is the identity, as insightface reads it
    write_plain(tmp_path / "multi", [pack_payload([label, 0.5], png(label)) for label in (3, 1, 3)])
    assert RecordFaces(str(tmp_path / "multi")).targets == [1, 0, 1]
    assert os.path.isfile(rec)


# -----------------------------------------------------------------------------
# damage

def test_truncated_rec_is_reported_and_its_last_record_skipped(tmp_path):
    rec = write_plain(tmp_path, [pack_payload(label, png(seed)) for seed, label in enumerate([0, 0, 1, 1])])
    with open(rec, "r+b") as f:
        f.truncate(os.path.getsize(rec) - 10)
    with pytest.warns(UserWarning):
        faces = RecordFaces(str(tmp_path))
    assert faces.keys == [0, 1, 2] and faces.targets == [0, 0, 1]
    assert faces.skipped == [f"{rec}#3"]
    assert faces[2][1] == 1 and faces[2][0].size == (12, 10)
    os.remove(tmp_path / "train.idx")  # the scan stops before the truncated record, with a message
    lines = []
    assert sorted(RecordReader(rec, log=lines.append).index) == [0, 1, 2] and len(lines) == 2


@pytest.mark.parametrize("index", ["kept", "missing"])
def test_a_cut_file_in_insightfaces_order_keeps_every_whole_image_and_says_what_was_lost(tmp_path, index):
    rec = write_insightface_order(tmp_path)
    offsets = read_index(tmp_path / "train.idx")
    with open(rec, "r+b") as f:
        f.truncate(offsets[0] + 10)  # the header record 0, written last, cut
    if index == "missing":
        os.remove(tmp_path / "train.idx")
    lines = []
    with pytest.warns(UserWarning):
        faces = RecordFaces(str(tmp_path), log=lines.append)
    assert faces.keys == [1, 2, 3, 4] and faces.classes == ["0", "1"] and faces.targets == [0, 0, 1, 1]
    assert faces.ranges is None and len(faces.lost) == 1  # the identity records 5 and 6, left out
    if index == "missing":  # the walk says where it stopped, and writes no index of the cut file
        assert len(lines) == 2 and str(offsets[0]) in lines[1] and not (tmp_path / "train.idx").exists()
    else:
        assert faces.skipped == [f"{rec}#0"]
    with pytest.warns(UserWarning):  # said again from the labels cache
        assert RecordFaces(str(tmp_path), log=quiet).lost == faces.lost


def test_a_file_in_insightfaces_order_cut_inside_an_image_keeps_the_images_before_it(tmp_path):
    rec = write_insightface_order(tmp_path)
    with open(rec, "r+b") as f:
        f.truncate(read_index(tmp_path / "train.idx")[4] + 30)
    os.remove(tmp_path / "train.idx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the walk stopped before anything but images
        faces = RecordFaces(str(tmp_path), log=quiet)
    assert faces.keys == [1, 2, 3] and faces.targets == [0, 0, 1] and faces.lost == []


def test_bad_magic_in_the_middle_is_reported_and_skipped(packed):
    src, folder = packed
    offset = read_index(folder / "train.idx")[6]
    rec = folder / "train.rec"
    data = bytearray(rec.read_bytes())
    data[offset:offset + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    with pytest.warns(UserWarning):
        faces = RecordFaces(str(folder))
    assert len(faces) == 11 and 6 not in faces.keys and faces.skipped == [f"{rec}#6"]
    assert faces.targets == FaceFolder(str(src)).targets[:5] + FaceFolder(str(src)).targets[6:]
    with pytest.raises(RecordError):
        faces.reader.read(6)
    assert all(faces[i][1] == faces.targets[i] for i in range(len(faces)))


def test_undecodable_image_is_replaced_by_another_of_its_identity(tmp_path):
    write_plain(tmp_path, [pack_payload(0, png(1)), pack_payload(0, b"not an image"), pack_payload(1, png(2))])
    faces = RecordFaces(str(tmp_path))
    assert len(faces) == 3
    with pytest.warns(UserWarning):
        image, label = faces[1]
    assert label == 0 and np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(png(1)))))
    assert faces.skipped == [f"{tmp_path / 'train.rec'}#1"]


def test_a_corrupt_header_record_keeps_the_images_and_says_what_was_lost(packed):
    src, folder = packed
    rec = folder / "train.rec"
    rec.write_bytes(b"\0" * 8 + rec.read_bytes()[8:])
    with pytest.warns(UserWarning):
        faces = RecordFaces(str(folder))
    assert faces.keys == list(range(1, 13)) and faces.targets == FaceFolder(str(src)).targets
    assert faces.ranges is None and faces.skipped == [f"{rec}#0"]
    assert len(faces.lost) == 1 and "13, 14, 15" in faces.lost[0]  # the identity records, left out


# -----------------------------------------------------------------------------
# labels cache

def test_labels_cache_is_reused_and_invalidated_when_the_rec_changes(packed, monkeypatch):
    _, folder = packed
    first = RecordFaces(str(folder))
    assert os.path.isfile(folder / "train.labels.npz")

    def fail(*args):
        raise AssertionError("read a header: the cache was not used")
    with monkeypatch.context() as patch:
        patch.setattr(RecordReader, "read_header", fail)
        again = RecordFaces(str(folder))
    assert (again.keys, again.targets, again.classes, again.ranges) == \
        (first.keys, first.targets, first.classes, first.ranges)
    rec = write_plain(folder, [pack_payload(label, png(label)) for label in (5, 6, 6)])
    os.utime(rec, ns=(1, 1))  # a different modification time even on a coarse clock
    changed = RecordFaces(str(folder))
    assert changed.classes == ["5", "6"] and changed.targets == [0, 1, 1]


def test_labels_cache_keeps_the_skipped_records(packed):
    _, folder = packed
    rec = folder / "train.rec"
    data = bytearray(rec.read_bytes())
    offset = read_index(folder / "train.idx")[2]
    data[offset:offset + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skipped = RecordFaces(str(folder)).skipped
    with pytest.warns(UserWarning):
        assert RecordFaces(str(folder)).skipped == skipped == [f"{rec}#2"]


# -----------------------------------------------------------------------------
# loading

def test_record_faces_in_p_x_k_batches(packed):
    _, folder = packed
    faces = RecordFaces(str(folder), make_transform(16, train=True, pixels=True))
    loader, sources = train_loader_for(faces, None, batch_size=4, images_per_identity=2, log=quiet)
    batches = list(loader)
    assert sorted(i for batch in sources[0] for i in batch) == list(range(12))
    assert len(batches) == len(sources[0]) == 3  # 12 images in groups of K=2, P=2 a batch
    for images, labels in batches:
        assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
        assert sorted(np.unique(labels.numpy(), return_counts=True)[1].tolist()) == [2, 2]  # 2 people, 2 each


class Pids(Dataset):
    """Item i of RecordFaces `faces`, with the process that loaded it and the process the reader's handle is of."""

    def __init__(self, faces):
        self.faces = faces

    def __len__(self):
        return len(self.faces)

    def __getitem__(self, index):
        image, label = self.faces[index]
        return int(np.asarray(image).sum()), label, os.getpid(), self.faces.reader._pid


def test_each_dataloader_worker_reads_through_its_own_handle(packed):
    _, folder = packed
    faces = RecordFaces(str(folder))
    expected = [(int(np.asarray(faces[i][0]).sum()), faces.targets[i]) for i in range(len(faces))]
    parent_handle = faces.reader._file
    assert faces.reader._pid == os.getpid()
    loader = DataLoader(Pids(faces), batch_size=2, num_workers=2)
    items = [item for batch in loader for item in zip(*(column.tolist() for column in batch))]
    assert [(total, label) for total, label, _, _ in items] == expected
    workers = {pid for _, _, pid, _ in items}
    assert len(workers) == 2 and os.getpid() not in workers
    assert all(pid == handle_pid for _, _, pid, handle_pid in items)
    assert faces.reader._file is parent_handle and not parent_handle.closed
    faces.reader.close()
    assert parent_handle.closed


def test_record_reader_survives_pickling(packed):
    import pickle
    _, folder = packed
    reader = RecordReader(str(folder / "train.rec"))
    payload = reader.read(3)
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.read(3) == payload and copy._file is not reader._file


def test_no_image_records_is_a_dataset_error(tmp_path):
    write_plain(tmp_path, [pack_payload([1, 1], b"")])
    with pytest.raises(DatasetError):
        RecordFaces(str(tmp_path))
    with pytest.raises(DatasetError):
        RecordFaces(str(tmp_path / "none"))
    assert recordio.index_path("a/train.rec") == "a/train.idx"
