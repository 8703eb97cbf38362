"""The embedding network (a backbone of the table BACKBONES + an embedding head) and the choice of device. Rebuilding
a network from a checkpoint is checkpoint.py's; face networks trained elsewhere, and the references a network is
measured against, are pretrained.py's."""
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from data_utils import IMAGENET_MEAN, IMAGENET_STD

IRESNET_BLOCKS = dict(iresnet18=(2, 2, 2, 2), iresnet34=(3, 4, 6, 3), iresnet50=(3, 4, 14, 3),
                      iresnet100=(3, 13, 30, 3))  # blocks per stage, as insightface's
HEADS = ("mlp", "linear", "fc_bn")


class PretrainedUnavailable(RuntimeError):
    """ImageNet weights were asked for but cannot be had (no network and nothing in the torch cache)."""


def select_device(name="auto", amp=True, local_rank=None):
    """The one place that decides CPU vs CUDA: (device, autocast context, float16 grad scaling needed).
    'auto' picks CUDA when available. In a distributed run, 'auto' and 'cuda' mean the GPU of the process's
    `local_rank`. Autocast runs in bfloat16 where the GPU supports it, else float16; on the CPU there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but CUDA is not available here; use --device=cpu")
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    if not name.startswith("cuda") or not amp:
        return name, nullcontext(), False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return name, torch.autocast("cuda", dtype=dtype), dtype == torch.float16


def imagenet_state_dict(backbone):
    """torchvision's default ImageNet weights for `backbone`, through its weights API and download cache."""
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), or a bad download
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise PretrainedUnavailable(
            f"could not get ImageNet weights for {backbone} ({err}). Train from random initialisation with "
            f"--pretrained=False, or download {weights.url} and put it at {cached}") from None


class SmallCNN(nn.Sequential):
    """A small CNN for small grayscale face datasets, where an ImageNet-sized backbone overfits: 4 blocks of
    Conv3x3 -> BatchNorm -> LeakyReLU(0.1) -> MaxPool2 -> Dropout2d, then global average pooling.
    (N, 3, H, W) with H, W >= 32 -> (N, out_features); grayscale images come in as 3 equal channels."""

    def __init__(self, channels=(32, 64, 128, 256), dropout=0.1):
        layers = []
        for in_channels, out_channels in zip((3, *channels[:-1]), channels):
            # no conv bias: the BatchNorm right after it has its own
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                       nn.LeakyReLU(0.1, inplace=True), nn.MaxPool2d(2), nn.Dropout2d(dropout)]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = channels[-1]


class IBasicBlock(nn.Module):
    """insightface's improved residual block: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (with the stride) -> BN,
    added to the input (through a strided 1x1 conv and BN where the shape changes). zero_init_residual starts the
    last BN at zero, so that the block begins as the identity."""

    def __init__(self, inplanes, planes, stride=1, zero_init_residual=False):
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(inplanes), nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes),
            nn.PReLU(planes), nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes))
        if zero_init_residual:
            nn.init.zeros_(self.branch[-1].weight)
        self.shortcut = nn.Identity() if stride == 1 and inplanes == planes else nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


class IResNet(nn.Sequential):
    """insightface's IResNet body for 112x112 aligned faces: conv3x3 -> BN -> PReLU at full size, four stages of
    IBasicBlocks (64, 128, 256, 512 channels; `blocks` per stage), each halving the size (112 -> 7), then BN,
    flatten and dropout: 512 x 7 x 7 features (other input sizes are pooled to 7 x 7 first). Its embedding layer,
    FC -> BN, is EmbeddingNet's 'fc_bn' head. No ImageNet weights exist for it."""

    def __init__(self, blocks, dropout=0.0, zero_init_residual=False):
        layers, inplanes = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)], 64
        for planes, count in zip((64, 128, 256, 512), blocks):
            for i in range(count):
                layers.append(IBasicBlock(inplanes, planes, 2 if i == 0 else 1, zero_init_residual))
                inplanes = planes
        super().__init__(*layers, nn.BatchNorm2d(512), nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Dropout(dropout))
        self.out_features = 512 * 7 * 7


def conv_bn(in_channels, out_channels, kernel=1, stride=1, groups=1, prelu=True, padding=None):
    """Conv (no bias; padded to keep the size but for the stride, by default) -> BatchNorm [-> PReLU]:
    MobileFaceNet's unit, without PReLU where it ends a linear bottleneck."""
    padding = kernel // 2 if padding is None else padding
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, *[nn.PReLU(out_channels)] * prelu)


class Bottleneck(nn.Module):
    """MobileFaceNet's inverted residual: 1x1 expansion to `width` channels, 3x3 depthwise (with the stride),
    linear 1x1 projection to `out_channels`; added to its input where the shape stays."""

    def __init__(self, in_channels, out_channels, width, stride=1):
        super().__init__()
        self.branch = nn.Sequential(conv_bn(in_channels, width), conv_bn(width, width, 3, stride, groups=width),
                                    conv_bn(width, out_channels, prelu=False))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        return x + self.branch(x) if self.residual else self.branch(x)


class MobileFaceNet(nn.Sequential):
    """insightface's MobileFaceNet ('mbf': Chen et al. 2018 at twice the width) for 112x112 aligned faces, a
    network a CPU trains and runs: a strided 3x3 conv and a depthwise 3x3 at 64 * `scale` channels, then inverted
    residual stages (`blocks` after the first, strided, block of each; expansion widths 128, 256, 256), 112 -> 7,
    a 1x1 conv to 512 channels and the global depthwise 7x7 conv (GDC): 512 features. Its embedding layer,
    FC -> BN, is EmbeddingNet's 'fc_bn' head. Other input sizes are pooled to 7 x 7 before the GDC."""

    def __init__(self, blocks=(4, 6, 2), scale=2):
        low, high = 64 * scale, 128 * scale
        layers = [conv_bn(3, low, 3, 2), conv_bn(low, low, 3, groups=64)]
        for in_channels, out_channels, first_width, width, count in ((low, low, 128, 128, blocks[0]),
                                                                      (low, high, 256, 256, blocks[1]),
                                                                      (high, high, 512, 256, blocks[2])):
            layers.append(Bottleneck(in_channels, out_channels, first_width, stride=2))
            layers += [Bottleneck(out_channels, out_channels, width) for _ in range(count)]
        super().__init__(*layers, conv_bn(high, 512), nn.AdaptiveAvgPool2d(7),
                         conv_bn(512, 512, 7, groups=512, prelu=False, padding=0), nn.Flatten())
        self.out_features = 512


class Affine(nn.Module):
    """A learnt per-channel scale and shift, y = weight * x + bias: what dlib keeps of a BatchNorm once trained (its
    `affine` layer). Unlike a BatchNorm it behaves alike in training and evaluation, so that fine-tuning starts
    from the network as dlib ran it."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class DlibBlock(nn.Module):
    """dlib's residual block: conv3x3 (with the stride; unpadded where strided, as dlib's) -> affine -> ReLU ->
    conv3x3 -> affine, added to the input (2x2 average-pooled where strided), then ReLU. Where the two differ in
    channels or size, the smaller is zero-padded at the end, as dlib's add_prev does."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(inplanes, planes, 3, stride, 1 if stride == 1 else 0), Affine(planes),
                                    nn.ReLU(inplace=True), nn.Conv2d(planes, planes, 3, 1, 1), Affine(planes))
        self.shortcut = nn.AvgPool2d(2) if stride > 1 else nn.Identity()

    def forward(self, x):
        branch, shortcut = self.branch(x), self.shortcut(x)
        size = [max(a, b) for a, b in zip(branch.shape[1:], shortcut.shape[1:])]
        return F.relu(pad_to(branch, size) + pad_to(shortcut, size))


def pad_to(x, size):
    """x (N, C, H, W) zero-padded at the end of its channels, rows and columns to `size` (C, H, W)."""
    channels, height, width = size
    if tuple(x.shape[1:]) == (channels, height, width):
        return x
    return F.pad(x, (0, width - x.shape[3], 0, height - x.shape[2], 0, channels - x.shape[1]))


# dlib's face descriptor network (dlib_face_recognition_resnet_model_v1): (in, out channels, stride) of its blocks
DLIB_BLOCKS = ((32, 32, 1),) * 3 + ((32, 64, 2),) + ((64, 64, 1),) * 3 + ((64, 128, 2),) + ((128, 128, 1),) * 2 + (
    (128, 256, 2),) + ((256, 256, 1),) * 2 + ((256, 256, 2),)


class DlibResNet(nn.Sequential):
    """The ResNet of dlib's face descriptor (29 conv layers, 150x150 face chips; its weights: pretrained.from_dlib):
    an unpadded conv7x7 stride 2 -> affine -> ReLU -> max pool 3x3 stride 2, 14 DlibBlocks (32 to 256 channels),
    global average pooling: 256 features. Its embedding layer, a Linear to 128 without bias, is EmbeddingNet's
    'linear' head (its bias zero). Images of at least 103x103."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 32, 7, 2, 0), Affine(32), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                         *[DlibBlock(*block) for block in DLIB_BLOCKS], nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = 256


def torchvision_body(name, pretrained=False, zero_init_residual=False):
    """torchvision's network `name` (with its ImageNet weights when `pretrained`) without its ImageNet classifier,
    and the size of the feature vector it outputs."""
    # zero_init_residual is an argument of torchvision's ResNet only: the others have no residual branches
    options = dict(zero_init_residual=zero_init_residual) if name.startswith("resnet") else {}
    network = torchvision.models.get_model(name, weights=None, **options)
    if pretrained:
        network.load_state_dict(imagenet_state_dict(name))
    # the ImageNet classifier is the model's last Linear (ResNet: fc; VGG, AlexNet: classifier[-1]); removing only
    # it keeps VGG's and AlexNet's 4096-wide fully connected layers, so its input size is the feature size
    classifier_name, classifier = [(n, m) for n, m in network.named_modules() if isinstance(m, nn.Linear)][-1]
    network.set_submodule(classifier_name, nn.Identity())
    return network, classifier.in_features


@dataclass(frozen=True)
class Backbone:
    """An entry of BACKBONES. body(pretrained, zero_init_residual): the network without a classifier, and the size
    of the feature vector it outputs. imagenet: torchvision has ImageNet weights for it (pretrained=True). frozen:
    the submodule that freeze_backbone freezes ("": the whole network). min_size: the smallest image height and
    width it takes."""

    body: Callable[[bool, bool], tuple]
    imagenet: bool = False
    frozen: str = ""
    min_size: int = 1


def torchvision_backbone(name, frozen=""):
    return Backbone(partial(torchvision_body, name), imagenet=True, frozen=frozen)


def face_backbone(make, min_size=1):
    """The entry of a network of this file, `make(zero_init_residual)` (which has `out_features`): no ImageNet
    weights exist for it."""
    def body(pretrained, zero_init_residual):
        network = make(zero_init_residual=zero_init_residual)
        return network, network.out_features
    return Backbone(body, min_size=min_size)


BACKBONES = {
    **{name: torchvision_backbone(name) for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{name: face_backbone(partial(IResNet, blocks)) for name, blocks in IRESNET_BLOCKS.items()},
    "mobilefacenet": face_backbone(lambda zero_init_residual: MobileFaceNet()),
    # (below 103 pixels, its last strided conv, unpadded as dlib's, would get less than its 3x3)
    "dlib_resnet": face_backbone(lambda zero_init_residual: DlibResNet(), min_size=103),
    # freezing keeps their fully connected layers trainable: frozen ImageNet features + a trainable classifier
    "vgg16": torchvision_backbone("vgg16", frozen="features"),
    "alexnet": torchvision_backbone("alexnet", frozen="features"),
    "smallcnn": face_backbone(lambda zero_init_residual: SmallCNN()),
}


def build_backbone(name, pretrained=False, zero_init_residual=False):
    """The backbone `name` (of BACKBONES) without its ImageNet classifier, and the size of the feature vector it
    outputs."""
    entry = BACKBONES[name]
    if pretrained and not entry.imagenet:
        raise ValueError(f"there are no ImageNet weights for {name}; use pretrained=False (or --init_from)")
    return entry.body(pretrained, zero_init_residual)


class Embedder(nn.Module):
    """A network whose embedding is its `unnormalised` output L2-normalised. The flip test adds the unnormalised
    embeddings of an image and of its mirror image before normalising, as insightface's evaluation does."""

    def forward(self, images):
        return F.normalize(self.unnormalised(images), dim=1)


class EmbeddingNet(Embedder):
    """Image batch (N, 3, H, W) -> L2-normalised embeddings (N, embedding_dim).

    backbone: a torchvision ResNet without its classifier (2048 features for resnet50 and deeper, 512 below);
    vgg16 or alexnet without their last Linear, so their fully connected 4096-wide layers stay (they use
    adaptive pooling, so 64x64 images work); or 'smallcnn' (SmallCNN, 256 features, no ImageNet weights) for
    small grayscale datasets; or insightface's IResNet (iresnet18 to iresnet100, 512 x 7 x 7 features) and
    MobileFaceNet (512 features) for 112x112 aligned faces; or dlib's face descriptor network (dlib_resnet, 256
    features; its weights from dlib's file, pretrained.from_dlib). head: 'mlp' is Linear(features -> hidden_dim) ->
    BatchNorm -> ReLU -> Linear(hidden_dim -> embedding_dim); 'linear' is a single Linear(features ->
    embedding_dim); 'fc_bn' is Linear(features -> embedding_dim) -> BatchNorm with its scale fixed at 1,
    insightface's embedding layer.
    `config` holds what rebuilds the architecture; the training options below are not part of it.
    zero_init_residual (ResNets only; ignored by the others) starts the last BatchNorm of every residual branch at
    zero, so that each block begins as the identity (an initialisation only; ImageNet weights replace it).
    input_norm: the network's own input normalisation (set_input_norm), for weights trained elsewhere.
    freeze_backbone stops training the backbone: its parameters get requires_grad=False and its BatchNorm layers
    stay in eval mode through model.train(), so their running statistics do not move. vgg16 and alexnet freeze
    only their convolutional `features`: their fully connected layers stay trainable (frozen ImageNet features +
    a trainable classifier). The head always trains.
    """

    def __init__(self, backbone="resnet50", embedding_dim=128, head="mlp", hidden_dim=512, pretrained=False,
                 zero_init_residual=False, freeze_backbone=False, input_norm=None):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        if embedding_dim < 1 or hidden_dim < 1:
            raise ValueError(f"embedding_dim and hidden_dim must be positive, got {embedding_dim}, {hidden_dim}")
        self.config = dict(backbone=backbone, embedding_dim=embedding_dim, head=head, hidden_dim=hidden_dim)
        self.set_input_norm(input_norm)
        self.backbone, features = build_backbone(backbone, pretrained, zero_init_residual)
        if head == "mlp":
            self.head = nn.Sequential(nn.Linear(features, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                      nn.ReLU(inplace=True), nn.Linear(hidden_dim, embedding_dim))
        elif head == "fc_bn":  # insightface's embedding layer, whose BatchNorm scale stays 1 (it learns a shift)
            self.head = nn.Sequential(nn.Linear(features, embedding_dim), nn.BatchNorm1d(embedding_dim))
            self.head[1].weight.requires_grad_(False)
        else:
            self.head = nn.Linear(features, embedding_dim)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.frozen_part().requires_grad_(False)
            self.train()

    def frozen_part(self):
        """The part of the backbone that freeze_backbone freezes, its BACKBONES entry's `frozen`: the
        convolutional features of vgg16 and alexnet, the whole of the others. (A method, not an attribute: a
        module attribute would add its weights to the state dict a second time.)"""
        return self.backbone.get_submodule(BACKBONES[self.config["backbone"]].frozen)

    def train(self, mode=True):
        """nn.Module.train, except that a frozen backbone's BatchNorm layers stay in eval mode: in training mode
        they would normalise with batch statistics and overwrite the running statistics they were frozen with."""
        super().train(mode)
        if self.freeze_backbone:
            for module in self.frozen_part().modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def set_input_norm(self, input_norm):
        """The network's own input normalisation: (mean, std) per RGB channel of [0, 1] pixels, as the network was
        trained with (insightface's: 0.5, 0.5); None: ImageNet's, which every input arrives in (make_transform's).
        Kept in `config`, so that every later use of a checkpoint normalises alike."""
        self.config.pop("input_norm", None)
        scale, shift = torch.ones(3), torch.zeros(3)
        if input_norm is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32).expand(3) for v in input_norm)
            scale, shift = torch.tensor(IMAGENET_STD) / std, (torch.tensor(IMAGENET_MEAN) - mean) / std
            self.config["input_norm"] = [mean.tolist(), std.tolist()]
        # not saved with the weights: the config rebuilds them
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)

    def unnormalised(self, images):
        if "input_norm" in self.config:
            images = torch.addcmul(self.input_shift, images, self.input_scale)
        return self.head(self.backbone(images))
