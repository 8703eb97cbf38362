"""The embedding network (a torchvision backbone + an embedding head) and checkpoint loading."""
import os
import pickle
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HEADS = ("mlp", "linear")


class PretrainedUnavailable(RuntimeError):
    """ImageNet weights were asked for but cannot be had (no network and nothing in the torch cache)."""


class CheckpointError(ValueError):
    """A file that is missing, not a checkpoint of this repository, or does not fit its model."""


def select_device(name="auto", amp=True):
    """The one place that decides CPU vs CUDA: (device, autocast context, float16 grad scaling needed).
    'auto' picks CUDA when available. Autocast runs in bfloat16 where the GPU supports it, else float16;
    on the CPU there is none."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={name} but CUDA is not available here; use --device=cpu")
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


class EmbeddingNet(nn.Module):
    """Image batch (N, 3, H, W) -> L2-normalised embeddings (N, embedding_dim).

    backbone: a torchvision ResNet with its classifier removed. head: 'mlp' is
    Linear(features -> hidden_dim) -> BatchNorm -> ReLU -> Linear(hidden_dim -> embedding_dim);
    'linear' is a single Linear(features -> embedding_dim). `config` holds what rebuilds the network.
    zero_init_residual starts the last BatchNorm of every residual branch at zero, so that each block begins
    as the identity (an initialisation only; ImageNet weights replace it).
    """

    def __init__(self, backbone="resnet50", embedding_dim=128, head="mlp", hidden_dim=512, pretrained=False,
                 zero_init_residual=False):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        if embedding_dim < 1 or hidden_dim < 1:
            raise ValueError(f"embedding_dim and hidden_dim must be positive, got {embedding_dim}, {hidden_dim}")
        self.config = dict(backbone=backbone, embedding_dim=embedding_dim, head=head, hidden_dim=hidden_dim)
        self.backbone = torchvision.models.get_model(backbone, weights=None, zero_init_residual=zero_init_residual)
        if pretrained:
            self.backbone.load_state_dict(imagenet_state_dict(backbone))
        features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        if head == "mlp":
            self.head = nn.Sequential(nn.Linear(features, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                      nn.ReLU(inplace=True), nn.Linear(hidden_dim, embedding_dim))
        else:
            self.head = nn.Linear(features, embedding_dim)

    def forward(self, images):
        return F.normalize(self.head(self.backbone(images)), dim=1)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by train.py, read with weights_only=True: plain values and tensors only, so
    loading it can never run code. Raises CheckpointError with the reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file (train one with: python train.py)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise CheckpointError(f"{path}: refused: it holds Python objects other than tensors and plain "
                                  f"values, which could run code when loaded") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({str(err).splitlines()[0]})") from None
    except Exception as err:  # torch.load's errors on arbitrary bytes vary (KeyError, EOFError, RuntimeError...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]})") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_config"} <= checkpoint.keys():
        raise CheckpointError(f"{path}: not a checkpoint written by train.py (no 'model' and 'model_config')")
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """Rebuild the network a checkpoint describes and load its weights."""
    config = checkpoint["model_config"]
    try:
        model = EmbeddingNet(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its model config {config} cannot be built: {err}") from None
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the network its config describes ({config}): "
                              f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
                              ) from None
    return model
