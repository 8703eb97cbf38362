import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_image(path, seed=0, size=(24, 20), mode="L"):
    """A random image file at `path` (format from the extension)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_faces(root, identities=3, images=4, ext=".png"):
    """ROOT/p<i>/<j><ext>: a small identity-folder dataset of random images."""
    for i in range(identities):
        for j in range(images):
            write_image(os.path.join(root, f"p{i}", f"{j}{ext}"), seed=100 * i + j)
    return root


def write_teacher(folder, seed=0, size=(16, 16)):
    """A checkpoint of EmbeddingNet("smallcnn", 8, "linear") with the weights of `seed`, for photos of `size`, as
    Checkpointer writes one: a teacher for --teacher. Its path."""
    from checkpoint import Checkpointer  # (the project's modules: importable once ROOT is on the path)
    from losses import NoObjective
    from model import EmbeddingNet
    torch.manual_seed(seed)
    saver = Checkpointer(str(folder), EmbeddingNet("smallcnn", 8, "linear"), NoObjective(), {}, [], size)
    assert saver.save("teacher.pth", 0, {})
    return saver.path("teacher.pth")


def write_verification_bin(path, pairs):
    """An insightface verification set at `path` (a pickled (image bytes, two a pair; is-same flags)), of `pairs`
    [(image a, image b, same)], each image bytes or the path of an image file (stored byte for byte)."""
    def raw(image):
        return image if isinstance(image, bytes) else open(image, "rb").read()
    with open(path, "wb") as f:
        pickle.dump(([raw(image) for a, b, _ in pairs for image in (a, b)], [bool(same) for *_, same in pairs]), f)
    return path


def insightface_accuracy(embeddings, same):
    """insightface's .bin accuracy (arcface_torch's eval/verification.py, calculate_roc) written out, the reference
    its metric is checked against: images 2k and 2k + 1 a pair; their embeddings normalised (float64); the squared
    L2 distance of each pair; scikit-learn's KFold(10) unshuffled; per fold, the threshold of np.arange(0, 4, 0.01)
    whose 'same iff distance < t' is most accurate on the other nine (the first of ties), its accuracy on the
    fold; the mean of the ten."""
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import normalize
    unit = normalize(np.asarray(embeddings, dtype=np.float64))
    distances, same = np.sum((unit[0::2] - unit[1::2]) ** 2, axis=1), np.asarray(same, dtype=bool)
    thresholds = np.arange(0, 4, 0.01)

    def accuracy(threshold, pairs):
        decided = distances[pairs] < threshold
        return float(np.sum(decided & same[pairs]) + np.sum(~decided & ~same[pairs])) / len(pairs)
    accuracies = []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(len(same))):
        best = int(np.argmax([accuracy(t, train) for t in thresholds]))
        accuracies.append(accuracy(thresholds[best], test))
    return float(np.mean(accuracies))


def run_script(*args, cwd=ROOT, check=True, timeout=600):
    """Run a repository script (or `-m module`) in a subprocess; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONWARNINGS="default"))
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def att_faces():
    """The AT&T faces (FACE_DATA=path/to/att_faces) as an absolute path (CI gives a relative one, and tests link to
    it from other folders), or a skip that says how to enable the test."""
    path = os.environ.get("FACE_DATA")
    if not path:
        pytest.skip("FACE_DATA is not set: point it at att_faces (s1..s40) to run the real-data tests")
    if not os.path.isdir(os.path.join(path, "s1")):
        pytest.fail(f"FACE_DATA={path} has no s1/ identity folder")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def lfw_faces():
    """The images/ folder of LFW (LFW_DATA=path/to/lfw, holding images/<Name>/<Name>_NNNN.jpg) as an absolute
    path, or a skip that says how to enable the test."""
    path = os.environ.get("LFW_DATA")
    if not path:
        pytest.skip("LFW_DATA is not set: point it at the LFW folder (images/<Name>/...) to run the LFW tests")
    if not os.path.isdir(os.path.join(path, "images", "Aaron_Peirsol")):
        pytest.fail(f"LFW_DATA={path} has no images/Aaron_Peirsol/ identity folder")
    return os.path.abspath(os.path.join(path, "images"))


@pytest.fixture(scope="session")
def att_subset(att_faces, tmp_path_factory):
    """Six AT&T identities (symlinked, nothing copied) split 8/2 into train/ and valid/."""
    raw = tmp_path_factory.mktemp("att_raw")
    for name in ("s1", "s2", "s3", "s4", "s5", "s6"):
        os.symlink(os.path.abspath(os.path.join(att_faces, name)), raw / name)
    prepared = tmp_path_factory.mktemp("att_subset")
    from prepare import split_dataset  # below the sys.path line above, as the tests' imports are
    split_dataset(str(raw), str(prepared), valid=0.2, seed=0, log=lambda *_: None)
    return prepared


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread a test: the suite runs in two processes on small machines, and for tiny tensors a pool
    of threads costs more than it brings (many times more on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
