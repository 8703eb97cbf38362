"""Face networks trained elsewhere, usable wherever a checkpoint of train.py is: insightface's IResNet
`backbone.pth`, ONNX face models (insightface's w600k_r50.onnx and the like), dlib's face descriptor (as dlib runs
it, and its network read into torch: dlib_resnet); raw pixels,
the reference any network has to beat; and starting a network from another's weights (--init_from).

Each is a module from image batches (N, 3, H, W), normalised as make_transform does (ImageNet statistics), to
L2-normalised embeddings (N, D), with a `state` that says what test.py, predict.py and a teacher need to know:
image_size, alignment (how its faces must be cut; None: as they come), classes (none for networks from
elsewhere), epoch and a one-line `network` description.
"""
import json
import os
import re

import numpy as np
import torch

from align import PASSES, AlignmentUnavailable, FaceAligner, alignment_record, face_model_file, import_dlib, main_face
from checkpoint import CheckpointError, is_checkpoint, model_from_checkpoint, read_weights
from configurator import ConfigError
from data_utils import IMAGENET_MEAN, IMAGENET_STD, denormalize
from files import save_json
from model import IRESNET_BLOCKS, Affine, Embedder, EmbeddingNet

INSIGHTFACE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # (x / 255 - 0.5) / 0.5 of RGB pixels
ONNX_PIXEL_NORM = (127.5, 127.5)  # insightface's ONNX models: (pixel - 127.5) / 127.5, RGB
REFERENCES = ("pixels", "dlib")  # what --checkpoint names instead of a file
DLIB_DESCRIPTOR = "dlib_face_recognition_resnet_model_v1.dat"  # of face-recognition-models
DLIB_NETWORK = "dlib_resnet"  # what --checkpoint, --init_from and --teacher name for DLIB_DESCRIPTOR's network
NAMED_NETWORKS = (*REFERENCES, DLIB_NETWORK)  # named instead of a file
# insightface's IBasicBlock parts -> this repository's IBasicBlock (model.IBasicBlock)
BLOCK_PARTS = {"bn1": "branch.0", "conv1": "branch.1", "bn2": "branch.2", "prelu": "branch.3", "conv2": "branch.4",
               "bn3": "branch.5", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
STEM_PARTS = {"conv1": "backbone.0", "bn1": "backbone.1", "prelu": "backbone.2", "fc": "head.0", "features": "head.1"}


# -----------------------------------------------------------------------------
# insightface's backbone.pth

def is_insightface(state):
    """Whether a state dict is in insightface's IResNet key names (its backbone.pth)."""
    return isinstance(state, dict) and {"conv1.weight", "layer1.0.conv1.weight", "fc.weight",
                                        "features.weight"} <= state.keys()


def insightface_blocks(state):
    """The blocks per stage of an insightface IResNet state dict, from its layerS.B. keys."""
    counts = [0, 0, 0, 0]
    for key in state:
        found = re.match(r"layer([1-4])\.(\d+)\.", key)
        if found:
            stage = int(found.group(1)) - 1
            counts[stage] = max(counts[stage], int(found.group(2)) + 1)
    return tuple(counts)


def insightface_key(key, blocks):
    """This repository's key for insightface's `key` of an IResNet with `blocks`, or None for a key it has not."""
    found = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)\.([a-z_]+)", key)
    if found:
        stage, block, part, leaf = int(found.group(1)) - 1, int(found.group(2)), found.group(3), found.group(4)
        if part not in BLOCK_PARTS:
            return None
        return f"backbone.{3 + sum(blocks[:stage]) + block}.{BLOCK_PARTS[part]}.{leaf}"
    part, _, leaf = key.rpartition(".")
    if part == "bn2":  # the BatchNorm after the last stage
        return f"backbone.{3 + sum(blocks)}.{leaf}"
    return f"{STEM_PARTS[part]}.{leaf}" if part in STEM_PARTS else None


def from_insightface(state, path):
    """A checkpoint of this repository from insightface's IResNet state dict (its backbone.pth): the same
    network to the last weight, renamed; insightface's input normalisation and 112x112 five-point alignment
    recorded, so that every later use prepares faces alike. Raises CheckpointError for an IResNet of another
    depth or a key it cannot place."""
    blocks = insightface_blocks(state)
    name = next((n for n, b in IRESNET_BLOCKS.items() if b == blocks), None)
    if name is None:
        raise CheckpointError(f"{path}: an insightface IResNet of {blocks} blocks per stage, none of "
                              f"{', '.join(IRESNET_BLOCKS)}")
    renamed = {}
    for key, value in state.items():
        ours = insightface_key(key, blocks)
        if ours is None:
            raise CheckpointError(f"{path}: {key!r} is not a weight of insightface's {name}")
        renamed[ours] = value
    for key in [k for k in renamed if k.endswith(".running_mean")]:  # (older saves lack the BatchNorm counters)
        renamed.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.tensor(0))
    config = dict(backbone=name, embedding_dim=int(state["fc.weight"].shape[0]), head="fc_bn", hidden_dim=512,
                  input_norm=[list(v) for v in INSIGHTFACE_NORM])
    return dict(model=renamed, model_config=config, image_size=[112, 112], classes=[], epoch=None, metrics={},
                config={}, alignment=alignment_record(112, PASSES),
                network=f"insightface {name} ({os.path.basename(path)})")


# -----------------------------------------------------------------------------
# dlib's face descriptor network

class DlibStream:
    """A reader of dlib's serialisation (dlib/serialize.h) from `pos` of `data`: an integer is a byte whose low
    four bits count the little-endian bytes that follow and whose high bit is the sign; a string its length and
    bytes; a float its mantissa and exponent as integers; a tensor (version 2) four dimensions and float32s."""

    def __init__(self, data, pos, path):
        self.data, self.pos, self.path = data, pos, path

    def take(self, count):
        if self.pos + count > len(self.data):
            raise CheckpointError(f"{self.path}: truncated (a dlib network file ends at byte {len(self.data)})")
        self.pos += count
        return self.data[self.pos - count:self.pos]

    def int(self):
        head = self.take(1)[0]
        value = int.from_bytes(self.take(head & 0x0F), "little")
        return -value if head & 0x80 else value

    def string(self):
        return self.take(self.int()).decode("latin-1")

    def real(self):
        mantissa = self.int()
        return mantissa * 2.0 ** self.int()

    def tensor(self):
        """A tensor's values, flat (float32)."""
        if self.int() != 2:
            raise CheckpointError(f"{self.path}: a dlib tensor of an unknown version at byte {self.pos}")
        count = int(np.prod([self.int() for _ in range(4)]))
        return np.frombuffer(self.take(4 * count), "<f4").copy()

    def shape(self):
        """An alias tensor's (N, K, rows, columns): where a layer's weights lie in its parameters."""
        self.int()
        return [self.int() for _ in range(4)]


# a record of a layer with weights (or of the input) in dlib's file: its version string, length first
DLIB_RECORD = re.compile(rb"\x01\x05(con_4)|\x01\x07(affine_)|\x01\x04(fc_2)|\x01\x15(input_rgb_image_sized)")


def read_dlib_layers(path):
    """The input means, conv layers (weight, bias, stride, padding), affine layers (scale, shift) and final FC
    weight (out, in) of a dlib network file, in forward order (dlib writes the input first). Only these records
    are read; the layers without weights are implied by the architecture, whose shapes from_dlib checks."""
    with open(path, "rb") as f:
        data = f.read()
    head = DlibStream(data, 0, path)
    if not (data[:1] == b"\x01" and head.int() >= 0 and head.string().startswith("loss_")):
        raise CheckpointError(f"{path}: not a dlib network file")
    layers = dict(means=None, convs=[], affines=[], fc=None)
    for found in DLIB_RECORD.finditer(data):
        stream = DlibStream(data, found.end(), path)
        if found.group(1):
            params, filters = stream.tensor(), [stream.int() for _ in range(7)]
            weights = stream.shape()
            size = int(np.prod(weights))
            layers["convs"].append((params[:size].reshape(weights), params[size:size + weights[0]], filters[3],
                                    filters[5]))
        elif found.group(2):
            params, channels = stream.tensor(), stream.shape()[1]
            layers["affines"].append((params[:channels], params[channels:2 * channels]))
        elif found.group(3):
            outputs, inputs, params = stream.int(), stream.int(), stream.tensor()
            layers["fc"] = params.reshape(-1, outputs)[:inputs].T
        else:
            layers["means"] = [stream.real() for _ in range(3)]
    return layers


def from_dlib(path):
    """A checkpoint of this repository from dlib's face descriptor network file (face-recognition-models'
    dlib_face_recognition_resnet_model_v1.dat): model.DlibResNet with its weights and dlib's input normalisation
    ((pixel - mean) / 256); the same function as dlib's on its 150x150 chips. Faces are cut as the repository
    aligns them and resized to 150x150: its own figures on them are measured, not dlib's. Raises CheckpointError
    for a file of another network."""
    layers = read_dlib_layers(path)
    model = EmbeddingNet("dlib_resnet", 128, "linear")
    convs = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    affines = [m for m in model.backbone.modules() if isinstance(m, Affine)]
    found = ([(tuple(w.shape), stride, pad) for w, _, stride, pad in layers["convs"]],
             [len(scale) for scale, _ in layers["affines"]], layers["fc"] is not None and layers["fc"].shape)
    wanted = ([(tuple(m.weight.shape), m.stride[0], m.padding[0]) for m in convs], [len(m.weight) for m in affines],
              tuple(model.head.weight.shape))
    if found != wanted or layers["means"] is None:
        raise CheckpointError(f"{path}: a dlib network, but not the face descriptor's ResNet")
    with torch.no_grad():
        for module, (weight, bias, _, _) in zip(convs, layers["convs"]):
            module.weight.copy_(torch.from_numpy(weight))
            module.bias.copy_(torch.from_numpy(bias))
        for module, (scale, shift) in zip(affines, layers["affines"]):
            module.weight.copy_(torch.from_numpy(scale))
            module.bias.copy_(torch.from_numpy(shift))
        model.head.weight.copy_(torch.from_numpy(layers["fc"]))
        model.head.bias.zero_()
    model.set_input_norm([[m / 255 for m in layers["means"]], [256 / 255] * 3])
    return dict(model=model.state_dict(), model_config=model.config, image_size=[150, 150], classes=[], epoch=None,
                metrics={}, config={}, alignment=alignment_record(112, PASSES),
                network=f"dlib's face descriptor network ({os.path.basename(path)}) in torch")


def load_network_file(path):
    """A checkpoint of train.py, or one made from insightface's backbone.pth (from_insightface) or from dlib's
    face descriptor network (DLIB_NETWORK or its file: from_dlib). Raises CheckpointError for anything else."""
    if path == DLIB_NETWORK:
        try:
            path = face_model_file(DLIB_DESCRIPTOR)
        except AlignmentUnavailable as err:
            raise CheckpointError(str(err)) from None
    if os.path.isfile(path) and path.endswith(".dat"):
        return from_dlib(path)
    state = read_weights(path)
    if is_checkpoint(state):
        return state
    if isinstance(state, dict):  # (DistributedDataParallel's saves prefix every key with module.)
        plain = {str(k).removeprefix("module."): v for k, v in state.items()}
        if is_insightface(plain):
            return from_insightface(plain, path)
    raise CheckpointError(f"{path}: neither a checkpoint of train.py nor insightface's IResNet backbone.pth "
                          f"(a state dict of another architecture?)")


def init_weights(model, path):
    """Start `model` (an EmbeddingNet) from the network of the checkpoint (or insightface backbone.pth) at `path`:
    not its objective, optimiser or schedule; its input normalisation too. The backbones must be of one kind; the
    head is taken when it has the same layers and shapes and otherwise keeps its fresh weights (another embedding
    size or head). Returns the parts taken: ("backbone", "head") or ("backbone",). Raises CheckpointError."""
    if path.endswith(".onnx") or path in REFERENCES:
        raise CheckpointError(f"{path}: a network of another runtime cannot be trained further; it can teach one "
                              f"(--teacher={path})")
    state = load_network_file(path)
    theirs, ours = state["model_config"].get("backbone"), model.config["backbone"]
    if theirs != ours:
        raise CheckpointError(f"{path} holds a {theirs} network and this run builds a {ours}: "
                              f"use --backbone={theirs}, or another checkpoint")
    parts = {name: {k.split(".", 1)[1]: v for k, v in state["model"].items() if k.startswith(name + ".")}
             for name in ("backbone", "head")}
    try:
        model.backbone.load_state_dict(parts["backbone"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its {theirs} weights do not fit ({str(err).splitlines()[0]})") from None
    model.set_input_norm(state["model_config"].get("input_norm"))
    own = model.head.state_dict()
    if own.keys() != parts["head"].keys() or any(own[k].shape != parts["head"][k].shape for k in own):
        return ("backbone",)
    model.head.load_state_dict(parts["head"])
    return ("backbone", "head")


# -----------------------------------------------------------------------------
# ONNX face models

def onnx_side_file(path):
    """The side file that says how an ONNX model's input is prepared: MODEL.onnx.json."""
    return path + ".json"


def read_onnx_side(path):
    """The side file's settings (input_mean, input_std in 0-255 pixel units, image_size, alignment), {} when
    there is none. Raises CheckpointError for one that is not a JSON object."""
    try:
        with open(onnx_side_file(path)) as f:
            side = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{onnx_side_file(path)}: not readable JSON ({err})") from None
    if not isinstance(side, dict):
        raise CheckpointError(f"{onnx_side_file(path)}: expected a JSON object of input_mean, input_std, ...")
    return side


def onnx_pixel_norm(text, spec):
    """(mean, std) of 0-255 pixels for the ONNX model `spec` from "MEAN,STD" or three means then three stds (RGB);
    None for "". Raises ConfigError (a ValueError) naming --onnx_norm for other text, a std not above 0, or a
    `spec` that is not an ONNX model."""
    if not text:
        return None
    if not str(spec).endswith(".onnx"):
        raise ConfigError("onnx_norm", f"normalises an ONNX model's input; {spec or 'no model'} is not one "
                                       f"(MODEL.onnx)")
    try:
        numbers = [float(number) for number in str(text).split(",")]
    except ValueError:
        numbers = []
    half = len(numbers) // 2
    if len(numbers) not in (2, 6) or not all(np.isfinite(numbers)) or min(numbers[half:]) <= 0:
        raise ConfigError("onnx_norm", f"is MEAN,STD or three means and three stds (RGB), 0-255 pixel units "
                                       f"(insightface's: 127.5,127.5), not {text!r}")
    return (numbers[0], numbers[1]) if half == 1 else (numbers[:3], numbers[3:])


class OnnxFace(Embedder):
    """An ONNX face model run with onnxruntime on the CPU: input (N, 3, H, W) RGB pixels normalised as
    (pixel - input_mean) / input_std (0-255 units; insightface's 127.5 and 127.5 unless `pixel_norm` or the model's
    side file MODEL.onnx.json says otherwise), output (N, D), L2-normalised here. Its image size is the model's own
    (a model of free size takes `image_size`). Nothing to train."""

    def __init__(self, path, pixel_norm=None, image_size=None):
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise CheckpointError(f"{path}: running ONNX models needs onnxruntime: pip install onnxruntime") from None
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such ONNX model file")
        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for every kind of bad file
            raise CheckpointError(f"{path}: not a readable ONNX model ({(str(err).splitlines() or [''])[0]})"
                                  ) from None
        side = read_onnx_side(path)
        self.image_size = self.input_size(path, side.get("image_size") or image_size)
        mean, std = pixel_norm or (side.get("input_mean", ONNX_PIXEL_NORM[0]), side.get("input_std",
                                                                                        ONNX_PIXEL_NORM[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).expand(3).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).expand(3).reshape(1, 3, 1, 1))
        self.alignment = side.get("alignment", alignment_record(112, PASSES))
        self.classes = side.get("classes", [])
        self.input_name = self.session.get_inputs()[0].name
        dim = self.session.get_outputs()[0].shape[-1]
        self.config = dict(backbone="onnx", embedding_dim=dim if isinstance(dim, int) else None)

    def input_size(self, path, wanted):
        """(H, W) of the model's input; the model's own where it fixes one. Raises CheckpointError for an input
        that is not (N, 3, H, W), or a `wanted` size other than the model's."""
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 4 or shape[1] != 3:
            raise CheckpointError(f"{path}: its input is {shape}; a face model takes (N, 3, H, W) images")
        own = tuple(shape[2:]) if all(isinstance(n, int) for n in shape[2:]) else None
        wanted = tuple(wanted) if wanted else None
        if own and wanted and own != wanted:
            raise CheckpointError(f"{path}: the model takes {own[0]}x{own[1]} images, not {wanted[0]}x{wanted[1]}")
        if not own and not wanted:
            raise CheckpointError(f"{path}: the model does not fix its image size: give it in its side file "
                                  f"{onnx_side_file(path)} as \"image_size\": [H, W]")
        return own or wanted

    def unnormalised(self, images):
        pixels = denormalize(images) * 255
        inputs = ((pixels - self.mean) / self.std).numpy().astype(np.float32)
        embeddings = torch.from_numpy(np.asarray(self.session.run(None, {self.input_name: inputs})[0]))
        return embeddings.float().flatten(1).to(images.device)


def write_onnx_side(path, image_size, alignment, classes=()):
    """The side file of an ONNX model exported from this repository: its input is normalised with ImageNet
    statistics, so that another runtime (and OnnxFace) prepares images as the network was trained; and the people
    it was trained on, so that test.py states the same protocol as for its checkpoint."""
    save_json(dict(input_mean=[255 * m for m in IMAGENET_MEAN], input_std=[255 * s for s in IMAGENET_STD],
                   image_size=list(image_size), alignment=alignment, classes=list(classes)), onnx_side_file(path))


# -----------------------------------------------------------------------------
# references: raw pixels and dlib's descriptor

class PixelBaseline(Embedder):
    """The reference a trained network has to beat: a photo's grey levels as its embedding. Image batch (N, 3, H, W),
    normalised as the networks' input -> (N, H * W): the mean of the three channels, less the photo's own mean
    brightness, L2-normalised (so a pair's cosine similarity is the correlation of its pixels). Nothing to train."""

    def __init__(self, image_size):
        super().__init__()
        height, width = image_size
        self.config = dict(backbone="pixels", embedding_dim=height * width)

    def unnormalised(self, images):
        grey = images.mean(1).flatten(1)
        return grey - grey.mean(1, keepdim=True)


class DlibReference(Embedder):
    """The reference of a face network trained elsewhere on millions of photos: dlib's ResNet face descriptor, which
    face-recognition-models installs. Image batch (N, 3, H, W), normalised as the networks' input -> (N, 128): per
    image, the main face dlib's detector finds (with `upsample`; the whole image when none), its 68 landmarks,
    dlib's own 150x150 face chip of them and the chip's descriptor, L2-normalised. Runs on the CPU, one image at a
    time; a GPU batch comes back to its device. Nothing to train."""

    def __init__(self, upsample=1):
        super().__init__()
        self.dlib = import_dlib()
        self.aligner = FaceAligner(upsample)
        self.encoder = self.dlib.face_recognition_model_v1(face_model_file(DLIB_DESCRIPTOR))
        self.config = dict(backbone="dlib", embedding_dim=128)

    def descriptor(self, pixels):
        """dlib's descriptor (128,) of one uint8 (H, W, 3) image's main face."""
        height, width = pixels.shape[:2]
        rects = list(self.aligner.detector(pixels, self.aligner.upsample))
        boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
        rect = rects[main_face(boxes, width, height)] if rects else self.dlib.rectangle(0, 0, width - 1, height - 1)
        chip = self.dlib.get_face_chip(pixels, self.aligner.predictor(pixels, rect), size=150, padding=0.25)
        return np.asarray(self.encoder.compute_face_descriptor(chip), dtype=np.float32)

    def unnormalised(self, images):
        pixels = (denormalize(images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        described = np.stack([self.descriptor(np.ascontiguousarray(image)) for image in pixels])
        return torch.from_numpy(described).to(images.device)


def network_identity(spec):
    """How results name the network `spec`: its name for one named instead of a file (REFERENCES, DLIB_NETWORK),
    else its file's absolute path."""
    return spec if spec in NAMED_NETWORKS else os.path.abspath(spec)


def network_file(spec):
    """The file whose bytes make the network `spec`: dlib's descriptor model for "dlib" and DLIB_NETWORK, else
    `spec` ("pixels" has none)."""
    return face_model_file(DLIB_DESCRIPTOR) if spec in ("dlib", DLIB_NETWORK) else spec


def results_folder(spec):
    """Where test.py writes its results for the network `spec` (and predict.py reads its thresholds): out/<name>
    for a network named instead of a file, else the file's folder."""
    return os.path.join("out", spec) if spec in NAMED_NETWORKS else os.path.dirname(os.path.abspath(spec))


def load_face_network(spec, image_size=None, pixel_norm=None):
    """(the network `spec` names, in eval mode; its state, as module doc says): "pixels" (at `image_size`), "dlib"
    (photos at `image_size`, 112 by default), "dlib_resnet" (dlib's network in torch), an ONNX model (MODEL.onnx;
    `pixel_norm` (mean, std) of 0-255 pixels over its side file's and insightface's), or a checkpoint of train.py
    or insightface's backbone.pth. Raises CheckpointError (a ValueError) for what cannot be loaded."""
    if spec == "pixels":
        if image_size is None:
            raise CheckpointError("raw pixels need an image size")
        return PixelBaseline(image_size).eval(), dict(image_size=list(image_size), alignment=None, classes=[],
                                                      epoch=None, network=f"raw pixels at {image_size[0]}x"
                                                                          f"{image_size[1]}, no network")
    if spec == "dlib":
        size = list(image_size or (112, 112))
        return DlibReference().eval(), dict(image_size=size, alignment=None, classes=[], epoch=None,
                                            network=f"dlib's face descriptor, photos at {size[0]}x{size[1]}")
    if spec.endswith(".onnx"):
        model = OnnxFace(spec, pixel_norm, image_size).eval()
        return model, dict(image_size=list(model.image_size), alignment=model.alignment, classes=model.classes,
                           epoch=None,
                           network=f"ONNX model {os.path.basename(spec)}, {model.config['embedding_dim']}-d",
                           pixel_norm=[model.mean.flatten().tolist(), model.std.flatten().tolist()])
    state = load_network_file(spec)
    return model_from_checkpoint(state, spec).eval(), state
