"""Face detection and five-point alignment: the face a photo is of, warped by a similarity transform onto the
112x112 template that ArcFace-trained models use (insightface's `arcface_dst`), scaled for other sizes.

The detector is dlib's HOG frontal-face detector (no weight file), retried on a miss, when asked, with one more
upsampling and then with dlib's CNN (MMOD) detector; the CNN's weights and the 68-point shape predictor of the
landmarks come with the face-recognition-models package (pip, no download at run time). The five points are the
centres of the eyes, the nose tip and the mouth corners. Measurements that chose them: docs/alignment.md.
"""
import importlib.util
import json
import os

import numpy as np
from PIL import Image
from torchvision import transforms as T

# left eye, right eye, nose tip, left and right mouth corner (as seen in the image) on the 112x112 template
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                         [70.7299, 92.2041]])
# the 68-point model's indices of each of the five points (averaged)
FIVE_OF_68 = (tuple(range(36, 42)), tuple(range(42, 48)), (30,), (48,), (54,))
MIN_FACE = 40  # pixels: a smaller detected face is too small to align
ALIGNMENT_FILE = "alignment.json"  # in an aligned dataset's folder: how its images were aligned


class AlignmentUnavailable(RuntimeError):
    """dlib or the face-recognition-models package is missing."""


def template(size=112):
    """The five template points for a `size` x `size` crop (the 112 template scaled)."""
    return TEMPLATE_112 * (size / 112.0)


def similarity_transform(source, target):
    """The 2x3 matrix of the similarity (rotation, uniform scale, translation) that maps the (N, 2) points
    `source` onto `target` with the least squared error (Umeyama 1991)."""
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    mean_s, mean_t = source.mean(axis=0), target.mean(axis=0)
    s, t = source - mean_s, target - mean_t
    u, singular, vt = np.linalg.svd(t.T @ s / len(source))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = (singular * np.diag(sign)).sum() / s.var(axis=0).sum()
    return np.hstack([scale * rotation, (mean_t - scale * rotation @ mean_s)[:, None]])


def warp(image, points, size=112):
    """The `size` x `size` crop of the PIL `image` whose five `points` land on the template's."""
    matrix = np.vstack([similarity_transform(points, template(size)), [0, 0, 1]])
    inverse = np.linalg.inv(matrix)[:2].ravel()  # PIL maps each output pixel back into the input
    return image.transform((size, size), Image.Transform.AFFINE, tuple(inverse), resample=Image.Resampling.BILINEAR)


def centre_crop(image, size=112):
    """The largest centred square of `image`, resized to `size`: the stand-in for a photo without a face."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)


def main_face(boxes, width, height):
    """Index of the face a photo is of: the largest, discounted by its distance from the centre (a face half the
    frame's diagonal away counts half its area). `boxes` are (left, top, right, bottom)."""
    centre = np.array([width, height]) / 2
    diagonal = np.hypot(width, height)

    def score(box):
        left, top, right, bottom = box
        offset = np.hypot(*(np.array([left + right, top + bottom]) / 2 - centre)) / diagonal
        return (right - left) * (bottom - top) * (1 - offset)
    return max(range(len(boxes)), key=lambda i: score(boxes[i]))


def import_dlib():
    """The dlib module, or AlignmentUnavailable saying how to install it."""
    try:
        import dlib
    except ImportError:
        raise AlignmentUnavailable("face alignment needs dlib: pip install -r requirements.txt "
                                   "(dlib-bin, face-recognition-models)") from None
    return dlib


def face_model_file(name):
    """The path of one of the model files that face-recognition-models installs, or AlignmentUnavailable."""
    spec = importlib.util.find_spec("face_recognition_models")  # (its __init__ needs pkg_resources: not run)
    path = spec and os.path.join(spec.submodule_search_locations[0], "models", name)
    if not path or not os.path.isfile(path):
        raise AlignmentUnavailable(f"{name} of face-recognition-models is missing: pip install -r requirements.txt")
    return path


# the detection passes, fastest first: HOG at the aligner's upsampling; HOG upsampled once more (faces down to about
# 40 pixels); dlib's CNN at the aligner's upsampling, 25 times slower than HOG on LFW (noisy, dark or turned faces that
# HOG misses, though not small ones: without upsampling it misses most faces under about 60 pixels)
PASSES = ("hog", "hog_up", "cnn")


class FaceAligner:
    """Finds the faces of a photo and their five points. `passes` (of PASSES) are tried in turn, each only when the
    ones before found no face, so that only the misses pay for the slower ones. `upsample` enlarges the photo that
    many times before detection (hog_up: once more), for faces smaller than about 80 pixels (slower)."""

    def __init__(self, upsample=0, passes=("hog",)):
        if not passes or len(set(passes)) < len(passes) or set(passes) - set(PASSES):
            raise ValueError(f"choose among {', '.join(PASSES)}, each at most once")
        dlib = import_dlib()
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(face_model_file("shape_predictor_68_face_landmarks.dat"))
        self.cnn = dlib.cnn_face_detection_model_v1(face_model_file("mmod_human_face_detector.dat")) \
            if "cnn" in passes else None
        self.upsample, self.passes = upsample, tuple(passes)

    @classmethod
    def as_recorded(cls, alignment):
        """The aligner that finds faces as the alignment record `alignment` says its photos' were found, so that
        photos aligned for a network meet it as its training photos did (a record older than the passes: HOG)."""
        return cls(alignment.get("upsample", 0), alignment.get("passes", ("hog",)))

    def rectangles(self, pixels, name):
        """dlib rectangles of the faces that pass `name` finds in the uint8 (H, W, 3) `pixels`."""
        if name == "cnn":  # mmod_rectangles: the box is .rect (beside a .confidence)
            return [found.rect for found in self.cnn(pixels, self.upsample)]
        return list(self.detector(pixels, self.upsample + (name == "hog_up")))

    def detect(self, image):
        """(the first pass that found a face in the PIL `image`, or None; [(box (left, top, right, bottom), five
        points (5, 2))] of every face it found)."""
        pixels = np.asarray(image.convert("RGB"))
        for name in self.passes:
            rects = self.rectangles(pixels, name)
            if rects:
                return name, [((r.left(), r.top(), r.right(), r.bottom()), self.five_points(pixels, r)) for r in rects]
        return None, []

    def five_points(self, pixels, rect):
        """The five points (5, 2) of the face in the dlib rectangle `rect`, from its 68 landmarks."""
        marks = np.array([[p.x, p.y] for p in self.predictor(pixels, rect).parts()], dtype=np.float64)
        return np.array([marks[list(group)].mean(axis=0) for group in FIVE_OF_68])

    def faces(self, image):
        """[(box (left, top, right, bottom), five points (5, 2))] of every face in the PIL `image`."""
        return self.detect(image)[1]

    def align(self, image, size=112):
        """(the aligned `size` x `size` crop or None, the faces found, the index of the main one or None, the pass
        that found them or None). A face smaller than MIN_FACE pixels is not aligned."""
        found_by, found = self.detect(image)
        if not found:
            return None, found, None, found_by
        main = main_face([box for box, _ in found], *image.size)
        left, top, right, bottom = found[main][0]
        if min(right - left, bottom - top) < MIN_FACE:
            return None, found, main, found_by
        image = image if image.mode in ("L", "RGB") else image.convert("RGB")
        return warp(image, found[main][1], size), found, main, found_by


class MainFace:
    """A transform step: a photo's main face aligned (`size` x `size`), or its centre crop when none is found."""

    def __init__(self, aligner, size=112):
        self.aligner, self.size = aligner, size

    def __call__(self, image):
        aligned = self.aligner.align(image, self.size)[0]
        return aligned if aligned is not None else centre_crop(image, self.size)


def aligned_as_trained(transform, aligner, size, folder):
    """The transform of the photos of `folder` for a network trained on faces aligned at `size`: `transform` after
    aligning each photo's main face with `aligner` (MainFace), unless prepare.py align wrote `folder`
    (read_alignment). Without an aligner (a network trained on unaligned photos), `transform` itself."""
    if aligner is None or read_alignment(folder):
        return transform
    return T.Compose([MainFace(aligner, size), transform])


def photo_faces(image, aligner=None, size=112):
    """[(box (left, top, right, bottom) or None, PIL image)] of the faces to embed in a photo: with an `aligner`,
    every face found, each aligned (none: []); without, the whole photo (box None), for networks trained on
    unaligned crops."""
    if aligner is None:
        return [(None, image)]
    image = image if image.mode in ("L", "RGB") else image.convert("RGB")
    return [(box, warp(image, points, size)) for box, points in aligner.faces(image)]


def alignment_record(size, passes=("hog",), upsample=0):
    """What an aligned dataset's ALIGNMENT_FILE says, and a checkpoint trained on it keeps."""
    return dict(template="arcface 5-point", size=size, detector="dlib + 68 landmarks", passes=list(passes),
                upsample=upsample)


def read_alignment(folder):
    """The alignment record of a dataset `folder` or of the folder above it (an aligned set split into
    train/valid keeps it at its top), None for unaligned data."""
    for place in (folder, os.path.dirname(os.path.abspath(folder))):
        try:
            with open(os.path.join(place, ALIGNMENT_FILE)) as f:
                return json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None
