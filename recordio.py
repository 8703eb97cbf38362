"""insightface's MXNet RecordIO face data (train.rec, train.idx, property), read and written without mxnet.

The file format is dmlc-core's recordio: each record is a little-endian uint32 magic 0xced7230a, a uint32 whose upper
3 bits are a continuation flag and lower 29 bits a length, that many bytes, and zero padding to a multiple of 4. A
payload holding the magic at a 4-byte-aligned position is stored in parts split there (flag 1 first, 2 middle, 3
last; 0 a whole record), so that a reader can find record starts by the magic; the reader puts the magic back between
the parts. The .idx beside is text, "key<TAB>offset" a line.

A payload is MXNet's image record: struct '<IfQQ' (flag, label, id, id2); with flag > 0, `flag` float32 labels follow
(and the header's label is unused); then the encoded image (JPEG or PNG).

insightface's layout: record 0 has no image and the labels [a, b]; keys 1..a-1 are the images, keys a..b-1 one record
per identity whose labels are the [first, end) keys of its images. A file whose record 0 is an image uses every key as
an image. `property` beside holds "num_classes,height,width".
"""
import contextlib
import io
import os
import struct
import tempfile
import warnings

import numpy as np
from data_utils import UNREADABLE_IMAGE, DatasetError, LabelledImages, load_image, some_names
from files import FILE_MODE, atomic_write

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
PART = struct.Struct("<II")  # magic, cflag << 29 | length
LENGTH_MASK = (1 << 29) - 1
HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2


class RecordError(DatasetError):
    """A record that cannot be read: bad magic, truncated, broken parts, an unknown key."""


def index_path(rec_path):
    """The .idx that goes with `rec_path` (train.rec -> train.idx)."""
    return os.path.splitext(rec_path)[0] + ".idx"


# -----------------------------------------------------------------------------
# payloads

def pack_payload(label, image, id=0, id2=0):
    """An image record's payload. `label`: a number (kept in the header, flag 0) or a sequence of numbers (flag =
    their count, stored as float32 after the header), as MXNet's recordio.pack; `image`: the encoded image bytes."""
    if np.ndim(label) == 0:
        return HEADER.pack(0, float(label), id, id2) + bytes(image)
    labels = np.asarray(label, dtype="<f4").ravel()
    return HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(image)


def unpack_payload(payload):
    """(header dict(flag, label, id, id2), labels tuple, image bytes) of a payload: the labels are the header's one
    label (flag 0) or the `flag` float32 labels after it. Raises RecordError when the payload is shorter than its
    header says."""
    if len(payload) < HEADER.size:
        raise RecordError(f"record of {len(payload)} bytes, shorter than its {HEADER.size}-byte header")
    flag, label, id, id2 = HEADER.unpack_from(payload)
    end = HEADER.size + 4 * flag
    if len(payload) < end:
        raise RecordError(f"record of {len(payload)} bytes, shorter than its header and {flag} labels")
    labels = (label,) if flag == 0 else tuple(np.frombuffer(payload, "<f4", flag, HEADER.size).tolist())
    return dict(flag=flag, label=label, id=id, id2=id2), labels, bytes(payload[end:])


# -----------------------------------------------------------------------------
# writing

def _split_at_magic(payload):
    """`payload` cut where the magic stands at a 4-byte-aligned position (the magic itself dropped), as dmlc-core's
    writer does; one part when it stands nowhere."""
    parts, start, i = [], 0, payload.find(MAGIC_BYTES)
    while i >= 0:
        if i % 4 == 0:
            parts.append(payload[start:i])
            start = i + 4
        i = payload.find(MAGIC_BYTES, i + 1)
    return parts + [payload[start:]]


class RecordWriter:
    """Writes a .rec and its .idx (default: beside, same stem) under temporary names and renames them into place,
    synced, on close(); a `with` block that raises leaves the old files (if any) untouched and no temporary ones."""

    def __init__(self, rec_path, idx_path=None):
        self.paths = (rec_path, idx_path or index_path(rec_path))
        self._temps, files = [], []
        try:
            for path, mode in zip(self.paths, ("wb", "w")):
                folder = os.path.dirname(os.path.abspath(path))
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
                self._temps.append(tmp)
                os.chmod(tmp, FILE_MODE)  # mkstemp's file is private (0600)
                files.append(os.fdopen(fd, mode, encoding=None if "b" in mode else "ascii"))
        except BaseException:
            for f in files:
                f.close()
            self._remove_temps()
            raise
        self._rec, self._idx = files
        self._keys = set()

    def write(self, key, payload):
        """Append the record `payload` (bytes) under `key`, a non-negative int not written before."""
        key = int(key)
        if key < 0 or key in self._keys:
            raise ValueError(f"record key {key}: keys must be distinct non-negative integers")
        parts = _split_at_magic(bytes(payload))
        if max(len(p) for p in parts) > LENGTH_MASK:
            raise ValueError(f"record {key}: a part of {max(len(p) for p in parts)} bytes exceeds the 29-bit length")
        offset = self._rec.tell()
        flags = [0] if len(parts) == 1 else [1] + [2] * (len(parts) - 2) + [3]
        for cflag, part in zip(flags, parts):
            self._rec.write(PART.pack(MAGIC, cflag << 29 | len(part)) + part + b"\0" * (-len(part) % 4))
        self._idx.write(f"{key}\t{offset}\n")
        self._keys.add(key)

    def close(self):
        """Sync both files and rename them into place (the .rec first: an .idx never lists records its .rec lacks)."""
        for f in (self._rec, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, path in zip(self._temps, self.paths):
            os.replace(tmp, path)
        self._temps = []

    def abort(self):
        """Drop what was written: the temporary files go, the targets stay as they were."""
        self._rec.close()
        self._idx.close()
        self._remove_temps()

    def _remove_temps(self):
        for tmp in self._temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._temps = []

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            self.close()
        else:
            self.abort()


# -----------------------------------------------------------------------------
# reading

def read_index(idx_path):
    """{key: offset} of an .idx file ("key<TAB>offset" lines, integer keys). Raises RecordError naming the line for
    a malformed one."""
    index = {}
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                key, offset = map(int, fields)
            except ValueError:
                raise RecordError(f"{idx_path}, line {number}: expected 'key<TAB>offset' integers, got "
                                  f"{line.strip()!r}") from None
            index[key] = offset
    return index


def _parts(f, path):
    """(cflag, length) of each part of the record at `f`'s position; after each, the caller reads or skips the
    `length` data bytes and their padding. Raises RecordError for a bad magic, a short part header or parts out of
    order."""
    first = True
    while True:
        where = f.tell()
        head = f.read(PART.size)
        if len(head) < PART.size:
            raise RecordError(f"{path}: truncated record at offset {where}")
        magic, lrec = PART.unpack(head)
        if magic != MAGIC:
            raise RecordError(f"{path}: no record at offset {where} (magic {magic:#010x}): the file is corrupt or its "
                              f"index does not match it")
        cflag, length = lrec >> 29, lrec & LENGTH_MASK
        if cflag > 3 or (cflag in (0, 1)) != first:
            raise RecordError(f"{path}: broken multi-part record at offset {where} (continuation flag {cflag})")
        yield cflag, length
        if cflag in (0, 3):
            return
        first = False


def _read_record(f, path):
    """The payload of the record at `f`'s position, its parts joined by the magic they were split at."""
    parts = []
    for _, length in _parts(f, path):
        data = f.read(length)
        if len(data) < length:
            raise RecordError(f"{path}: truncated record ending at offset {f.tell()}, {length - len(data)} bytes short")
        parts.append(data)
        f.seek(-length % 4, os.SEEK_CUR)
    return MAGIC_BYTES.join(parts)


def _read_header(f, path, size):
    """(header, labels, image size in bytes) of the record at `f`'s position in a file of `size` bytes, as
    unpack_payload's, reading only the header and labels (the image is checked to lie within the file, not read);
    `f` is left at the next record. Raises RecordError when they cannot be read."""
    start = f.tell()
    cflag, length = next(_parts(f, path))
    if cflag != 0:  # split at a magic, perhaps inside the header: join the parts
        f.seek(start)
        header, labels, image = unpack_payload(_read_record(f, path))
        return header, labels, len(image)
    end = f.tell() + length
    if end > size:
        raise RecordError(f"{path}: truncated record at offset {start}")
    data = f.read(min(length, HEADER.size))
    if len(data) == HEADER.size:
        data += f.read(min(length - HEADER.size, 4 * HEADER.unpack(data)[0]))
    header, labels, _ = unpack_payload(data)
    f.seek(end + -length % 4)
    return header, labels, length - len(data)


def scan_index(rec_path, log=print):
    """({key: offset}, whether every record was read) of `rec_path` rebuilt by walking its records, for a .rec
    without its .idx. Stops at the first record that cannot be read, logging where. A record's key is the id in
    its header, as insightface's writers (RecBuilder, face2rec) and prepare.py pack set it: their header record 0
    comes after the images and identity records, so the file order is not the keys' order. Where ids repeat
    (writers that leave them 0), the keys are numbered in file order, which is right for a file of images only
    and for one that begins with its header record; any other file is refused (RecordError): its keys cannot be
    told."""
    records, size, whole = [], os.path.getsize(rec_path), True
    with open(rec_path, "rb") as f:
        while f.tell() < size:
            offset = f.tell()
            try:
                header, _, image = _read_header(f, rec_path, size)
            except RecordError as err:
                log(f"{err}; indexed the {len(records)} records before it")
                whole = False
                break
            records.append((header["id"], offset, header["flag"] >= 2 and not image))
    ids = [key for key, _, _ in records]
    if len(set(ids)) == len(ids):
        return {key: offset for key, offset, _ in records}, whole
    if records[0][2] or not any(bare for _, _, bare in records):  # the header record first, or images only
        return {key: offset for key, (_, offset, _) in enumerate(records)}, whole
    raise RecordError(f"{rec_path}: its {index_path(rec_path)} is missing and its records' keys cannot be told (their "
                      f"headers' ids repeat, and its header record is not the first): restore the .idx")


def write_index(idx_path, index):
    """Write {key: offset} as an .idx file, atomically, its lines in the records' order."""
    lines = [f"{key}\t{offset}\n" for key, offset in sorted(index.items(), key=lambda item: item[1])]
    atomic_write(idx_path, lambda f: f.writelines(lines), mode="w")


class RecordReader:
    """Random access to the records of a .rec through its .idx (default: beside, same stem). A missing .idx is
    rebuilt by scan_index, with a message through `log`, and written beside the .rec, so that the walk runs once;
    not when the walk stopped short (a file cut off, perhaps still being copied), whose index would outlive it. The
    file is opened on first use in each process, so that DataLoader workers forked after the parent read do not
    share its file position."""

    def __init__(self, rec_path, idx_path=None, log=print):
        self._file, self._pid = None, None
        if not os.path.isfile(rec_path):
            raise RecordError(f"{rec_path}: no such file")
        self.path, idx_path = rec_path, idx_path or index_path(rec_path)
        if os.path.isfile(idx_path):
            self.index = read_index(idx_path)
            return
        log(f"{idx_path} not found: indexing {rec_path} by walking its records")
        self.index, whole = scan_index(rec_path, log)
        if whole:
            with contextlib.suppress(OSError):  # a read-only folder: walk again next time
                write_index(idx_path, self.index)

    def keys(self):
        return sorted(self.index)

    def _seek(self, key):
        """The process's file handle, at the start of record `key`."""
        if key not in self.index:
            raise RecordError(f"{self.path}: no record with key {key}")
        if self._pid != os.getpid():
            self.close()  # a forked copy of the parent's handle: closing it here leaves the parent's open
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(self.index[key])
        return self._file

    def read(self, key):
        """The payload of record `key` (bytes). Raises RecordError when it cannot be read."""
        return _read_record(self._seek(key), self.path)

    def read_header(self, key):
        """(header, labels, image size in bytes) of record `key`, as _read_header's. Raises RecordError when they
        cannot be read."""
        f = self._seek(key)
        return _read_header(f, self.path, os.fstat(f.fileno()).st_size)

    def close(self):
        if self._file is not None:
            self._file.close()
        self._file, self._pid = None, None

    __del__ = close

    def __getstate__(self):  # a spawned worker gets the index, not the handle (which cannot be pickled anyway)
        return dict(self.__dict__, _file=None, _pid=None)


# -----------------------------------------------------------------------------
# dataset

def read_property(folder):
    """(num_classes, height, width) from `folder`/property, or None when there is none or it is malformed."""
    try:
        with open(os.path.join(folder, "property"), encoding="ascii") as f:
            values = tuple(int(v) for v in f.read().strip().split(","))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return values if len(values) == 3 else None


class RecordFaces(LabelledImages):
    """Labelled images of an insightface-style ROOT/NAME.rec (and NAME.idx, optional `property`). Yields (image,
    label) as FaceFolder does (LabelledImages, whose cache() keeps the decoded images in memory when asked): `classes`
    are the record labels as strings, in label order, and `targets` index them.

    Labels are read from the record headers once and cached in ROOT/NAME.labels.npz, valid while the .rec and .idx
    keep their size and modification time. Records whose header cannot be read (bad magic, truncated) are left out;
    an image that fails to decode later is replaced by another image of the same identity. Either way it is warned
    about and kept in `skipped` as "PATH.rec#KEY". `ranges` holds the identity records' [first, end) image keys, by
    label (None without insightface's header record). Without a readable header record (a file in insightface's
    layout, whose header comes last, cut short) every whole record with an image is an image, and the identity
    records are left out; what is lost so, or unreadable among the identity records, is warned about and kept in
    `lost`, one line each.
    """

    unit = "record"

    def __init__(self, root, transform=None, name="train", log=print):
        if not os.path.isdir(root):
            raise DatasetError(f"{root}: no such folder")
        self.root, self.transform, self.skipped, self.lost = root, transform, [], []
        self.rec_path = self.source = os.path.join(root, f"{name}.rec")
        self.reader = RecordReader(self.rec_path, log=log)
        self.property = read_property(root)
        cache = os.path.join(root, f"{name}.labels.npz")
        stamp = self._stamp()
        labels = self._cached(cache, stamp)
        if labels is None:
            labels = self._read_labels()
            with contextlib.suppress(OSError):  # a read-only folder: read the headers again next time
                atomic_write(cache, lambda f: np.savez(f, stamp=stamp, keys=labels[0], labels=labels[1],
                                                       ranges=labels[2], skipped=np.array(self.skipped, dtype=str),
                                                       lost=np.array(self.lost, dtype=str)))
        keys, values, ranges = labels
        if not len(keys):
            raise DatasetError(f"{self.rec_path}: no readable image records")
        self.keys = keys.tolist()
        self.ranges = None if ranges.size == 0 else [tuple(r) for r in ranges.tolist()]
        label_values, targets = np.unique(values, return_inverse=True)
        self.classes = [str(v) for v in label_values.tolist()]
        self._label_items(targets.tolist())
        self.samples = [(self.record_name(key), label) for key, label in zip(self.keys, self.targets)]
        if self.skipped:
            warnings.warn(f"{self.rec_path}: skipped {len(self.skipped)} unreadable record(s): "
                          + some_names(self.skipped))
        for line in self.lost:
            warnings.warn(line)

    def _stamp(self):
        """What the labels cache is valid for: size and modification time of the .rec and the .idx (-1: none)."""
        stats = [os.stat(p) if os.path.isfile(p) else None for p in (self.rec_path, index_path(self.rec_path))]
        return np.array([v for s in stats for v in ((s.st_size, s.st_mtime_ns) if s else (-1, -1))], dtype=np.int64)

    def _cached(self, cache, stamp):
        """(keys, labels, ranges) from the cache when it was written for these files (its skipped records and lost
        ones restored into `skipped` and `lost`), else None."""
        try:
            with np.load(cache) as saved:
                if not np.array_equal(saved["stamp"], stamp):
                    return None
                self.skipped, self.lost = saved["skipped"].tolist(), saved["lost"].tolist()
                return saved["keys"], saved["labels"], saved["ranges"]
        except (OSError, ValueError, KeyError):  # none yet, or unreadable: read the headers
            return None

    def _read_labels(self):
        """(image keys, their integer labels, identity ranges (n, 2) or (0, 2)) from the record headers: with
        insightface's header record [a, b], images 1..a-1 and identities a..b-1; else every record with an image."""
        header = self._header()
        if header is None:
            return (*self._labels_of(self.reader.keys()), np.empty((0, 2), np.int64))
        first_identity, end = header
        ranges = [self._identity_range(key) for key in range(first_identity, end)]
        keys, values = self._labels_of([k for k in range(1, first_identity) if k in self.reader.index])
        return keys, values, np.array(ranges, np.int64).reshape(-1, 2)

    def _header(self):
        """(a, b) of insightface's header record 0, or None: no record 0, one that is an image, or one that cannot
        be read (which _labels_of then reports as an unreadable record, and its identity records as records without
        an image)."""
        try:
            header, labels, image = unpack_payload(self.reader.read(0))
        except RecordError:
            return None
        return (int(labels[0]), int(labels[1])) if header["flag"] >= 2 and not image else None

    def _identity_range(self, key):
        """[first, end) image keys of identity record `key`; [-1, -1] when it cannot be read (noted in `lost`)."""
        try:
            return [int(v) for v in self.reader.read_header(key)[1][:2]]
        except RecordError as err:
            self.lost.append(f"{self.rec_path}: identity record {key} cannot be read ({err}): its image range is "
                             f"unknown")
            return [-1, -1]

    def _labels_of(self, keys):
        """(keys, integer labels) of the records of `keys` that hold an image. Unreadable ones are added to
        `skipped`; records without an image (insightface's identity records, once its header record is lost) are
        left out, noted in `lost`."""
        kept, values, bare = [], [], []
        for key in keys:
            try:
                _, labels, image = self.reader.read_header(key)
            except RecordError as err:
                self._skip(self.record_name(key), err)
                continue
            if image:
                kept.append(key)
                values.append(int(labels[0]))
            else:
                bare.append(str(key))
        if bare:
            self.lost.append(f"{self.rec_path}: left out {len(bare)} record(s) without an image, keys "
                             f"{some_names(bare)}: insightface's identity records, their image ranges lost with the "
                             f"header record 0")
        return np.array(kept, np.int64), np.array(values, np.int64)

    def record_name(self, key):
        """How `skipped` and `samples` name the record `key`: "PATH.rec#KEY"."""
        return f"{self.rec_path}#{key}"

    def image_bytes(self, index):
        """The encoded image of item `index`, as stored. Raises RecordError when its record cannot be read."""
        return unpack_payload(self.reader.read(self.keys[index]))[2]

    def read(self, index):
        """The image of item `index`, decoded as load_image does. Raises RecordError or UNREADABLE_IMAGE's errors."""
        return self._decode(self.keys[index])

    def _decode(self, key):
        return load_image(io.BytesIO(unpack_payload(self.reader.read(key))[2]))

    def why_unreadable(self, name):
        """What reading the skipped record `name` ("PATH.rec#KEY") says now."""
        try:
            self._decode(int(name.rpartition("#")[2]))
        except (RecordError, *UNREADABLE_IMAGE) as err:
            return f"{type(err).__name__}: {err}"
        return "readable now"
