"""pretrained.py: insightface's backbone.pth read as a checkpoint (its key names, its input convention), starting a
network from another's weights (init_weights), refused files, the fc_bn head's fixed BatchNorm scale, MobileFaceNet,
ONNX face models (OnnxFace and its side file), dlib's face descriptor network read into torch and the references
load_face_network names. Tiny networks and images, one IResNet18 file shared by the tests that read it."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from checkpoint import CheckpointError
from configurator import ConfigError
from data_utils import IMAGENET_MEAN, IMAGENET_STD
from align import face_model_file
from model import DlibBlock, EmbeddingNet
from inference import export_onnx
from pretrained import (DLIB_DESCRIPTOR, DLIB_NETWORK, OnnxFace, init_weights, load_face_network, onnx_pixel_norm,
                        write_onnx_side)

# insightface's IBasicBlock part names of this repository's model.IBasicBlock parts (the straight inverse mapping)
BLOCK_NAMES = {"branch.0": "bn1", "branch.1": "conv1", "branch.2": "bn2", "branch.3": "prelu", "branch.4": "conv2",
               "branch.5": "bn3", "shortcut.0": "downsample.0", "shortcut.1": "downsample.1"}
IRESNET18 = (2, 2, 2, 2)


def imagenet(x):
    """[0, 1] images (N, 3, H, W) normalised as make_transform does."""
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def insightface_names(state, blocks=IRESNET18):
    """The state dict of an EmbeddingNet(iresnet, ..., "fc_bn") under insightface's IResNet key names."""
    renamed = {}
    for key, value in state.items():
        *path, leaf = key.split(".")
        if path[0] == "head":
            name = ("fc", "features")[int(path[1])]
        else:
            index = int(path[1])
            if index < 3:
                name = ("conv1", "bn1", "prelu")[index]
            elif index == 3 + sum(blocks):
                name = "bn2"
            else:
                block, stage = index - 3, 0
                while block >= blocks[stage]:
                    block, stage = block - blocks[stage], stage + 1
                name = f"layer{stage + 1}.{block}.{BLOCK_NAMES['.'.join(path[2:])]}"
        renamed[f"{name}.{leaf}"] = value
    assert len(renamed) == len(state)  # (no two keys on one name)
    return renamed


def randomise(model):
    """Random weights, BatchNorm statistics and PReLU slopes, so that a misplaced tensor shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.1 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
                module.weight.copy_(0.5 + torch.rand_like(module.weight))
                module.bias.copy_(0.1 * torch.randn_like(module.bias))
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(0.1 + 0.3 * torch.rand_like(module.weight))
    return model


@pytest.fixture(scope="module")
def insightface(tmp_path_factory):
    """(an EmbeddingNet("iresnet18", 512, "fc_bn") with random weights and statistics in eval mode, the path of its
    state dict saved under insightface's key names as backbone.pth, that state dict)."""
    torch.manual_seed(0)
    model = randomise(EmbeddingNet("iresnet18", 512, "fc_bn")).eval()
    state = insightface_names(model.state_dict())
    path = str(tmp_path_factory.mktemp("insightface") / "backbone.pth")
    torch.save(state, path)
    return model, path, state


@torch.no_grad()
def insightface_output(model, x):
    """The network run as insightface runs it: [0, 1] images as (x - 0.5) / 0.5, the embedding normalised."""
    return F.normalize(model.head(model.backbone((x - 0.5) / 0.5)), dim=1)


# -----------------------------------------------------------------------------
# insightface's backbone.pth

def test_insightface_backbone_loads_as_the_same_network_with_its_input_convention(insightface, tmp_path):
    """backbone.pth (as saved, and as DDP saves it: module. prefix, here without BatchNorm counters as older saves)
    loads as the network it was saved from, fed insightface's (x - 0.5) / 0.5 from ImageNet-normalised images; its
    state says 112x112 faces, insightface's normalisation and 112 alignment."""
    original, path, state = insightface
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64)  # (any size: IResNet pools to 7x7; small is quick)
    expected = insightface_output(original, x)
    ddp = str(tmp_path / "ddp.pth")
    torch.save({f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}, ddp)
    for file in (path, ddp):
        model, loaded = load_face_network(file)
        assert not model.training
        assert loaded["model_config"]["backbone"] == "iresnet18"
        assert loaded["model_config"]["input_norm"] == [[0.5] * 3, [0.5] * 3]
        assert loaded["image_size"] == [112, 112] and loaded["alignment"]["size"] == 112
        with torch.no_grad():
            out = model(imagenet(x))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    with torch.no_grad():  # (the input convention matters: the network fed ImageNet's normalisation differs)
        assert not torch.allclose(F.normalize(original.head(original.backbone(imagenet(x))), dim=1), expected,
                                  atol=1e-3)


def test_init_weights_takes_backbone_head_and_input_norm_from_backbone_pth(insightface):
    """A fresh iresnet18 with the same 512-d fc_bn head takes the backbone and the head and the input
    normalisation, and embeds as the original network does."""
    original, path, _ = insightface
    torch.manual_seed(2)
    model = EmbeddingNet("iresnet18", 512, "fc_bn")
    assert init_weights(model, path) == ("backbone", "head")
    assert model.config["input_norm"] == [[0.5] * 3, [0.5] * 3]
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(imagenet(x))
    torch.testing.assert_close(out, insightface_output(original, x), atol=1e-5, rtol=0)


def test_init_weights_into_another_head_takes_only_the_backbone(insightface):
    """A 128-d head keeps its fresh weights; the backbone is the file's, and the input normalisation too."""
    original, path, _ = insightface
    torch.manual_seed(3)
    model = EmbeddingNet("iresnet18", 128, "fc_bn")
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert init_weights(model, path) == ("backbone",)
    assert model.config["input_norm"] == [[0.5] * 3, [0.5] * 3]
    for key, value in original.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, fresh_head[key]), key


def test_init_weights_refuses_another_backbone_and_an_onnx_model(insightface, tmp_path):
    """Into a resnet18: CheckpointError naming the backbone flag to use; from an .onnx file: CheckpointError."""
    _, path, _ = insightface
    with pytest.raises(CheckpointError) as info:
        init_weights(EmbeddingNet("resnet18", 128, "linear"), path)
    assert "--backbone=iresnet18" in str(info.value)
    onnx = tmp_path / "face.onnx"
    onnx.write_bytes(b"not used")
    with pytest.raises(CheckpointError):
        init_weights(EmbeddingNet("iresnet18", 512, "fc_bn"), str(onnx))


class Payload:
    """Pickles to a call that writes a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_files_that_are_no_face_network_are_refused(insightface, tmp_path):
    """A text file, half of backbone.pth, torchvision's resnet18, an IResNet of a depth that does not exist and
    a pickle that would run code: each a CheckpointError (a ValueError), the code never run."""
    _, path, state = insightface
    text = tmp_path / "notes.pth"
    text.write_text("not a network\n")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[:len(data) // 2])
    resnet = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    shallow = str(tmp_path / "shallow.pth")  # blocks (1, 2, 2, 2): no iresnet
    torch.save({k: v for k, v in state.items() if not k.startswith("layer1.1.")}, shallow)
    marker = str(tmp_path / "ran")
    evil = str(tmp_path / "evil.pth")
    torch.save(dict(model={}, model_config={}, trap=Payload(marker)), evil)
    for bad in (str(text), str(truncated), resnet, shallow, evil):
        with pytest.raises(CheckpointError) as info:
            load_face_network(bad)
        assert isinstance(info.value, ValueError)
    assert not os.path.exists(marker)


# -----------------------------------------------------------------------------
# the fc_bn head and MobileFaceNet

def test_fc_bn_head_keeps_its_batchnorm_scale_at_one_while_the_rest_trains():
    """The head's BatchNorm weight has requires_grad False and stays 1 through an AdamW step with weight decay;
    the first conv, the head's Linear and the BatchNorm's shift move."""
    torch.manual_seed(0)
    model = EmbeddingNet("smallcnn", 8, "fc_bn")
    scale = model.head[1].weight
    assert not scale.requires_grad and torch.equal(scale, torch.ones(8))
    assert all(p.requires_grad for p in model.parameters() if p is not scale)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(torch.randn(4, 3, 32, 32))[:, 0].sum().backward()
    optimizer.step()
    assert torch.equal(model.head[1].weight, torch.ones(8))
    for name in ("backbone.0.weight", "head.0.weight", "head.0.bias", "head.1.bias"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name]), name


def test_mobilefacenet_embeds_unit_vectors_and_trains_from_the_first_conv():
    """(2, 3, 112, 112) and (2, 3, 64, 64) -> (2, 512) unit vectors; the first conv gets gradients."""
    torch.manual_seed(0)
    model = EmbeddingNet("mobilefacenet", 512, "fc_bn")
    for size in (112, 64):
        out = model(torch.randn(2, 3, size, size))
        assert out.shape == (2, 512)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    out[:, 0].sum().backward()
    first_conv = model.backbone[0][0].weight
    assert isinstance(model.backbone[0][0], nn.Conv2d) and first_conv.shape == (128, 3, 3, 3)
    assert first_conv.grad is not None and torch.isfinite(first_conv.grad).all() and first_conv.grad.abs().sum() > 0


def test_mobilefacenet_has_the_parameters_of_insightface_mbf_plus_the_head_bias():
    """insightface's get_mbf(False, 512) holds 2,059,520 parameters (counted layer by layer: stem 3x3 conv and
    grouped 3x3 at 128, DepthWise blocks 1+4 at 128, 1+6 to 256, 1+2 at 256, 1x1 to 512, GDC 7x7 depthwise,
    Linear 512x512 without bias, BatchNorm1d); this head's Linear adds a 512 bias."""
    def conv_block(cin, cout, kernel=1, groups=1, prelu=True):  # conv (no bias) + BN [+ PReLU]
        return cin // groups * cout * kernel * kernel + 2 * cout + cout * prelu

    def depthwise(cin, cout, width):
        return conv_block(cin, width) + conv_block(width, width, 3, width) + conv_block(width, cout, prelu=False)

    mbf = (conv_block(3, 128, 3) + conv_block(128, 128, 3, 64)
           + depthwise(128, 128, 128) + 4 * depthwise(128, 128, 128)
           + depthwise(128, 256, 256) + 6 * depthwise(256, 256, 256)
           + depthwise(256, 256, 512) + 2 * depthwise(256, 256, 256)
           + conv_block(256, 512) + conv_block(512, 512, 7, 512, prelu=False) + 512 * 512 + 2 * 512)
    assert mbf == 2_059_520
    model = EmbeddingNet("mobilefacenet", 512, "fc_bn")
    assert sum(p.numel() for p in model.parameters()) == 2_059_520 + 512


# -----------------------------------------------------------------------------
# ONNX face models

class Features(nn.Module):
    """A small face network of insightface's ONNX convention: (N, channels, size, size) pixels as
    (pixel - 127.5) / 127.5 -> unnormalised (N, 16) features."""

    def __init__(self, channels=3, size=112):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 5, stride=4, padding=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * (size // 4) ** 2, 16)

    def forward(self, images):
        return self.fc(torch.relu(self.bn(self.conv(images))).flatten(1))


def export(module, shape, path):
    """`module` in eval mode as an ONNX file of dynamic batch size, input (N, *shape), as inference.export_onnx
    writes one."""
    pytest.importorskip("onnxscript")
    program = torch.onnx.export(module.eval(), (torch.zeros(2, *shape),), dynamo=True, verbose=False,
                                input_names=["images"], output_names=["embeddings"],
                                dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    with open(path, "wb") as f:
        f.write(program.model_proto.SerializeToString())
    return path


@pytest.fixture(scope="module")
def onnx_face(tmp_path_factory):
    """(a Features network with random weights and statistics, the path of its ONNX export, 112x112 RGB)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    module = randomise(Features()).eval()
    return module, export(module, (3, 112, 112), str(tmp_path_factory.mktemp("onnx") / "face.onnx"))


def onnx_copy(onnx_face, folder, side=None):
    """A copy of the ONNX model in `folder`, with the side file `side` (a dict) when given."""
    path = str(folder / "face.onnx")
    shutil.copy(onnx_face[1], path)
    if side is not None:
        with open(path + ".json", "w") as f:
            json.dump(side, f)
    return path


@torch.no_grad()
def pixel_reference(module, x, mean=127.5, std=127.5):
    """The module's normalised output on [0, 1] images as 0-255 pixels, (pixel - mean) / std per channel."""
    mean, std = (torch.tensor(v, dtype=torch.float32).expand(3).view(1, 3, 1, 1) for v in (mean, std))
    return F.normalize(module((x * 255 - mean) / std), dim=1)


def test_onnx_face_model_embeds_with_insightface_pixel_convention(onnx_face):
    """OnnxFace on ImageNet-normalised images equals the network's normalised output on (pixel - 127.5) / 127.5;
    load_face_network's state has the model's 112x112 size and 112 alignment."""
    module, path = onnx_face
    torch.manual_seed(1)
    x = torch.rand(3, 3, 112, 112)
    model, state = load_face_network(path)
    assert isinstance(model, OnnxFace) and model.config["embedding_dim"] == 16
    assert state["image_size"] == [112, 112] and state["alignment"]["size"] == 112
    out = model(imagenet(x))
    assert out.shape == (3, 16)
    torch.testing.assert_close(out, pixel_reference(module, x), atol=1e-5, rtol=0)


def test_onnx_side_file_normalisation_is_honoured_and_an_explicit_pixel_norm_wins(onnx_face, tmp_path):
    """A side file's input_mean and input_std replace insightface's; pixel_norm given to load_face_network
    replaces the side file's."""
    module, _ = onnx_face
    mean, std = [100.0, 120.0, 140.0], [40.0, 50.0, 60.0]
    path = onnx_copy(onnx_face, tmp_path, dict(input_mean=mean, input_std=std))
    torch.manual_seed(2)
    x = torch.rand(2, 3, 112, 112)
    side = pixel_reference(module, x, mean, std)
    assert not torch.allclose(side, pixel_reference(module, x), atol=1e-3)  # (the normalisation shows)
    torch.testing.assert_close(OnnxFace(path)(imagenet(x)), side, atol=1e-5, rtol=0)
    model, _ = load_face_network(path, pixel_norm=(127.5, 127.5))
    torch.testing.assert_close(model(imagenet(x)), pixel_reference(module, x), atol=1e-5, rtol=0)


def test_onnx_norm_reads_one_mean_and_std_or_one_per_channel():
    """--onnx_norm: "MEAN,STD" or three means then three stds; empty: None (the side file's); with a model that is
    not ONNX, or other text, a ConfigError naming the flag."""
    assert onnx_pixel_norm("", "face.onnx") is None and onnx_pixel_norm("", "dlib") is None
    assert onnx_pixel_norm("127.5,128", "face.onnx") == (127.5, 128.0)
    assert onnx_pixel_norm("1,2,3,4,5,6", "face.onnx") == ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    for text, spec in [("127.5,127.5", "dlib"), ("127.5,127.5", "out/tb_model.pth"), ("1,2,3", "face.onnx"),
                       ("1,2,3,4,5,0", "face.onnx"), ("127.5;127.5", "face.onnx"), ("inf,1", "face.onnx")]:
        with pytest.raises(ConfigError) as info:
            onnx_pixel_norm(text, spec)
        assert info.value.flag == "onnx_norm"


def test_onnx_side_file_of_another_size_than_the_model_is_refused(onnx_face, tmp_path):
    """image_size [96, 96] in the side file of a model fixed at 112x112: CheckpointError."""
    path = onnx_copy(onnx_face, tmp_path, dict(image_size=[96, 96]))
    with pytest.raises(CheckpointError):
        load_face_network(path)


def test_onnx_models_of_other_inputs_and_truncated_files_are_refused(onnx_face, tmp_path):
    """A model taking (N, 1, 64, 64) and the first half of a valid .onnx file: each a CheckpointError."""
    torch.manual_seed(3)
    grey = export(Features(channels=1, size=64), (1, 64, 64), str(tmp_path / "grey.onnx"))
    data = open(onnx_face[1], "rb").read()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[:len(data) // 2])
    for bad in (grey, str(truncated)):
        with pytest.raises(CheckpointError):
            load_face_network(bad)


# -----------------------------------------------------------------------------
# the references

def test_pixels_reference_has_the_given_size_and_needs_one():
    """"pixels" at (8, 6): (N, 48) unit vectors, the state's image_size [8, 6] and a description; without a size,
    CheckpointError."""
    model, state = load_face_network("pixels", (8, 6))
    assert state["image_size"] == [8, 6] and state["alignment"] is None and state["classes"] == []
    assert isinstance(state["network"], str) and state["network"]
    out = model(torch.randn(2, 3, 8, 6))
    assert out.shape == (2, 48)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    with pytest.raises(CheckpointError):
        load_face_network("pixels")


def test_dlib_reference_state_has_its_photo_size():
    """"dlib" without a size: 112x112 photos, unaligned (dlib aligns its own), 128-d, with a description."""
    pytest.importorskip("dlib")
    model, state = load_face_network("dlib")
    assert state["image_size"] == [112, 112] and state["alignment"] is None and state["classes"] == []
    assert isinstance(state["network"], str) and state["network"] and model.config["embedding_dim"] == 128


# -----------------------------------------------------------------------------
# dlib's face descriptor network in torch

@pytest.fixture(scope="module")
def dlib_network():
    """(dlib's face_recognition_model_v1, the path of its network file, load_face_network("dlib_resnet"))."""
    dlib = pytest.importorskip("dlib")
    path = face_model_file(DLIB_DESCRIPTOR)
    return dlib.face_recognition_model_v1(path), path, load_face_network(DLIB_NETWORK)


def chips(att_faces):
    """150x150 uint8 RGB chips: two AT&T faces (grey) and two colour ones (a colour ramp with noise, and noise),
    so that a swapped channel order shows."""
    faces = [np.asarray(Image.open(os.path.join(att_faces, person, "1.pgm")).convert("RGB").resize((150, 150)))
             for person in ("s1", "s2")]
    rng = np.random.default_rng(0)
    ramp = np.stack([*np.meshgrid(np.linspace(0, 255, 150), np.linspace(255, 0, 150)), np.full((150, 150), 90.0)], 2)
    coloured = np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8)
    return faces + [coloured, rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)]


def test_dlib_network_in_torch_embeds_chips_as_dlib_does(dlib_network, att_faces):
    """Each chip, normalised as make_transform does, gives dlib's own descriptor of it (compute_face_descriptor of a
    150x150 chip) normalised, within 1e-5; the checkpoint says 150x150, the repository's 112x112 alignment, 128-d,
    dlib's input normalisation ((pixel - mean) / 256)."""
    encoder, _, (model, state) = dlib_network
    images = chips(att_faces)
    wanted = torch.stack([F.normalize(torch.tensor(list(encoder.compute_face_descriptor(chip))), dim=0)
                          for chip in images]).float()
    x = imagenet(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad():
        torch.testing.assert_close(model(x), wanted, atol=1e-5, rtol=0)
    assert state["image_size"] == [150, 150] and state["alignment"]["size"] == 112 and state["classes"] == []
    assert model.config["backbone"] == "dlib_resnet" and model.config["embedding_dim"] == 128
    mean, std = model.config["input_norm"]
    assert mean == pytest.approx([122.782 / 255, 117.001 / 255, 104.298 / 255], abs=1e-6)
    assert std == pytest.approx([256 / 255] * 3)


def test_dlib_network_starts_a_run_and_trains_as_it_runs(dlib_network):
    """init_weights from "dlib_resnet" takes backbone, head and input normalisation: the same outputs; in training
    mode too (its affine layers are not BatchNorms), and every weight gets a gradient."""
    _, _, (reference, _) = dlib_network
    model = EmbeddingNet("dlib_resnet", 128, "linear")
    assert init_weights(model, DLIB_NETWORK) == ("backbone", "head")
    x = torch.randn(2, 3, 150, 150)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x))
    out = model.train()(x)
    torch.testing.assert_close(out.detach(), reference(x))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_dlib_block_adds_as_dlib_add_prev_where_shapes_differ():
    """A strided block on 8x8: its branch gives 3x3 (unpadded strided conv) of 64 channels, the average-pooled
    input 4x4 of 32; the sum is 64 x 4 x 4, each part zero-padded at the end, then ReLU."""
    torch.manual_seed(0)
    block = DlibBlock(32, 64, 2).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        branch, pooled = block.branch(x), F.avg_pool2d(x, 2)
        wanted = torch.zeros(2, 64, 4, 4)
        wanted[:, :, :3, :3] += branch
        wanted[:, :32] += pooled
        assert branch.shape == (2, 64, 3, 3)
        torch.testing.assert_close(block(x), wanted.clamp(min=0))


def test_dlib_network_files_of_other_networks_are_refused(dlib_network, tmp_path):
    """Half of dlib's file (truncated), dlib's CNN face detector (a dlib network of another architecture), its
    landmark model (no network) and a text file named .dat: each a CheckpointError, as --init_from and --teacher
    say it."""
    _, path, _ = dlib_network
    data = open(path, "rb").read()
    truncated = tmp_path / "half.dat"
    truncated.write_bytes(data[:len(data) // 2])
    text = tmp_path / "notes.dat"
    text.write_text("not a network\n")
    for bad in (str(truncated), face_model_file("mmod_human_face_detector.dat"),
                face_model_file("shape_predictor_5_face_landmarks.dat"), str(text)):
        with pytest.raises(CheckpointError):
            load_face_network(bad)
    with pytest.raises(CheckpointError):
        init_weights(EmbeddingNet("dlib_resnet", 128, "linear"), str(truncated))


def test_dlib_network_exports_to_onnx_that_embeds_alike(dlib_network, tmp_path):
    """dlib's network in torch, exported as predict.py --export=onnx does (its side file too), read back as an ONNX
    face model: the same embeddings within 1e-4 for images of random pixels, a batch of a size it was not exported
    with."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, _, (model, state) = dlib_network
    path = str(tmp_path / "dlib_resnet.onnx")
    export_onnx(model, state["image_size"], path)
    write_onnx_side(path, state["image_size"], state["alignment"])
    onnx, onnx_state = load_face_network(path)
    x = imagenet(torch.rand(3, 3, 150, 150))  # (pixels of an image: far beyond, float error grows past 1e-4)
    with torch.no_grad():
        torch.testing.assert_close(onnx(x), model(x), atol=1e-4, rtol=0)
    assert onnx_state["image_size"] == [150, 150] and onnx_state["alignment"] == state["alignment"]
