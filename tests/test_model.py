import os
from urllib.error import URLError

import pytest
import torch
import torchvision

from model import (CheckpointError, EmbeddingNet, PretrainedUnavailable, load_checkpoint, model_from_checkpoint,
                   select_device)


@pytest.mark.parametrize("head,dim", [("mlp", 128), ("linear", 64), ("mlp", 108)])
def test_embeddings_have_the_asked_size_unit_norm_and_gradients(head, dim):
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18", embedding_dim=dim, head=head)
    images = torch.randn(4, 3, 64, 56)
    out = model(images)
    assert out.shape == (4, dim)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    out[:, 0].sum().backward()
    first_conv = model.backbone.conv1.weight.grad
    assert first_conv is not None and torch.isfinite(first_conv).all() and first_conv.abs().sum() > 0


def test_mlp_head_is_linear_bn_relu_linear_on_resnet50_features():
    model = EmbeddingNet()  # the default: resnet50, 512 hidden, 128 out
    layers = list(model.head)
    assert [type(m).__name__ for m in layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (layers[0].in_features, layers[0].out_features, layers[3].out_features) == (2048, 512, 128)
    assert model.config == dict(backbone="resnet50", embedding_dim=128, head="mlp", hidden_dim=512)


def test_unknown_backbone_and_head_are_errors():
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'"):
        EmbeddingNet("resnet7")
    with pytest.raises(ValueError, match="unknown head"):
        EmbeddingNet("resnet18", head="deep")


def test_pretrained_weights_without_network_fail_with_advice(monkeypatch):
    def offline(self, *args, **kwargs):
        raise URLError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(PretrainedUnavailable, match="--pretrained=False") as info:
        EmbeddingNet("resnet18", pretrained=True)
    assert "resnet18-" in str(info.value) and "checkpoints" in str(info.value)


def test_cpu_device_has_no_autocast():
    device, autocast, scaling = select_device("cpu", amp=True)
    assert device == "cpu" and not isinstance(autocast, torch.autocast) and not scaling
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


# -----------------------------------------------------------------------------
# checkpoints

def save(tmp_path, model, name="model.pth"):
    path = tmp_path / name
    torch.save(dict(model=model.state_dict(), model_config=model.config, image_size=[32, 32]), path)
    return str(path)


def test_checkpoint_round_trip_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingNet("resnet18", embedding_dim=32, head="linear").eval()
    path = save(tmp_path, model)
    rebuilt = model_from_checkpoint(load_checkpoint(path), path).eval()
    assert rebuilt.config == model.config
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images), rtol=0, atol=0)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "notes.pth").write_text("just some text")
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(str(tmp_path / "notes.pth"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint written by train.py"):
        load_checkpoint(str(tmp_path / "other.pth"))


class Payload:
    """Pickles to a call that writes a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def test_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = str(tmp_path / "ran")
    torch.save(dict(model={}, model_config={}, trap=Payload(marker)), tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(str(tmp_path / "evil.pth"))
    assert not os.path.exists(marker)


def test_weights_of_another_architecture_are_an_error_naming_the_config(tmp_path):
    model = EmbeddingNet("resnet18", embedding_dim=32)
    state = dict(model=model.state_dict(), model_config=dict(model.config, backbone="resnet34"))
    torch.save(state, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="resnet34"):
        model_from_checkpoint(load_checkpoint(str(tmp_path / "mixed.pth")), "mixed.pth")
    state["model_config"] = dict(model.config, embedding_dim=64)
    torch.save(state, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(load_checkpoint(str(tmp_path / "mixed.pth")), "mixed.pth")
