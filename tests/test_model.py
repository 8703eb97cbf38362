from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import model as model_module
from model import EmbeddingNet, PretrainedUnavailable, select_device
from pretrained import PixelBaseline


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
# vgg16, alexnet, smallcnn and freezing

@pytest.fixture(scope="module")
def built():
    """EmbeddingNet(backbone, 24, freeze_backbone=...) built once per module: vgg16 alone has 138M parameters.
    Tests that train one compare against their own snapshot, so what earlier tests did to it does not matter."""
    cache = {}

    def get(backbone, freeze_backbone=False):
        if (backbone, freeze_backbone) not in cache:
            torch.manual_seed(0)
            cache[backbone, freeze_backbone] = EmbeddingNet(backbone, 24, freeze_backbone=freeze_backbone)
        return cache[backbone, freeze_backbone]
    return get


def first_conv(model):
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("backbone,size,features", [("smallcnn", (48, 40), 256), ("smallcnn", (32, 32), 256),
                                                    ("alexnet", (64, 64), 4096), ("vgg16", (64, 64), 4096)])
def test_other_backbones_give_unit_embeddings_and_gradients_reach_the_first_conv(built, backbone, size, features):
    model = built(backbone).train()
    model.zero_grad(set_to_none=True)
    assert model.head[0].in_features == features
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    out[:, 0].sum().backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_vgg16_and_alexnet_keep_their_fully_connected_layers_without_the_imagenet_classifier(built):
    for backbone in ("vgg16", "alexnet"):
        linears = [m for m in built(backbone).backbone.classifier if isinstance(m, nn.Linear)]
        assert [layer.out_features for layer in linears] == [4096, 4096]


def test_alexnet_loads_imagenet_weights_through_imagenet_state_dict(monkeypatch):
    # stands in for the download: torchvision's full alexnet state (with the 1000-class layer) set to 0.5
    asked = []

    def fake_imagenet_state_dict(backbone):
        asked.append(backbone)
        return {k: torch.full_like(v, 0.5) for k, v in torchvision.models.alexnet().state_dict().items()}
    monkeypatch.setattr(model_module, "imagenet_state_dict", fake_imagenet_state_dict)
    model = EmbeddingNet("alexnet", 16, pretrained=True, zero_init_residual=True)  # the latter is ResNet-only
    assert asked == ["alexnet"]
    assert (model.backbone.features[0].weight == 0.5).all() and (model.backbone.classifier[4].bias == 0.5).all()


def test_smallcnn_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="no ImageNet weights for smallcnn"):
        EmbeddingNet("smallcnn", pretrained=True)


def is_batchnorm(module):
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("backbone,size", [("resnet18", (32, 32)), ("smallcnn", (48, 40)), ("alexnet", (64, 64)),
                                           ("vgg16", (64, 64))])
def test_frozen_backbone_keeps_its_weights_and_batchnorm_statistics_while_the_head_trains(built, backbone, size):
    model = built(backbone, freeze_backbone=True)
    keeps_classifier = backbone in ("vgg16", "alexnet")
    frozen = model.backbone.features if keeps_classifier else model.backbone
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith("head.")
                or (keeps_classifier and n.startswith("backbone.classifier."))}
    assert trainable == expected and any(n.startswith("head.") for n in trainable)
    assert keeps_classifier == any(n.startswith("backbone.") for n in trainable)

    model.eval().train()  # train() is where BatchNorm layers would go back to training mode
    assert all(not m.training for m in frozen.modules() if is_batchnorm(m))
    assert model.head.training and model.head[1].training
    frozen_before = {k: v.clone() for k, v in frozen.state_dict().items()}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    head_statistics_before = model.head[1].running_mean.clone()

    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(1)
    loss = (model(torch.randn(4, 3, *size)) - torch.randn(4, 24)).pow(2).sum()
    loss.backward()
    optimizer.step()

    assert all(p.grad is None for p in frozen.parameters())
    for key, value in frozen.state_dict().items():  # weights and BatchNorm running_mean/var/num_batches_tracked
        assert torch.equal(value, frozen_before[key]), key
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])}
    assert "head.0.weight" in changed and "head.3.weight" in changed
    if keeps_classifier:  # the kept 4096 -> 4096 layer trains
        last_linear = [n for n, m in model.backbone.classifier.named_children() if isinstance(m, nn.Linear)][-1]
        assert f"backbone.classifier.{last_linear}.weight" in changed
    # the head's own BatchNorm is not frozen: it did update, so the step ran in training mode
    assert not torch.equal(model.head[1].running_mean, head_statistics_before)


def test_freezing_changes_neither_the_config_nor_the_checkpoint_keys():
    frozen = EmbeddingNet("smallcnn", 16, head="linear", freeze_backbone=True)
    plain = EmbeddingNet("smallcnn", 16, head="linear")
    assert frozen.config == plain.config == dict(backbone="smallcnn", embedding_dim=16, head="linear", hidden_dim=512)
    assert list(frozen.state_dict()) == list(plain.state_dict())
    assert not any(is_batchnorm(m) and m.training for m in frozen.backbone.modules())
    assert all(m.training for m in plain.backbone.modules())


# -----------------------------------------------------------------------------
# IResNet, insightface's face backbone

@pytest.mark.parametrize("name,parameters", [("iresnet50", 43.59e6), ("iresnet100", 65.16e6)])
def test_iresnet_has_the_size_of_insightfaces_with_its_512_d_embedding_layer(name, parameters):
    network = EmbeddingNet(name, embedding_dim=512, head="fc_bn")
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(parameters, rel=1e-3)  # 43.6 M, 65.2 M
    blocks = [m for m in network.backbone if isinstance(m, model_module.IBasicBlock)]
    assert len(blocks) == sum(model_module.IRESNET_BLOCKS[name])
    fc, bn = network.head
    assert (fc.in_features, fc.out_features, bn.num_features) == (512 * 7 * 7, 512, 512)


def test_iresnet_block_order_strides_on_its_second_conv_and_halves_four_times():
    block = model_module.IBasicBlock(64, 128, stride=2)
    kinds = [type(m) for m in block.branch]
    assert kinds == [nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d, nn.PReLU, nn.Conv2d, nn.BatchNorm2d]
    assert block.branch[1].stride == (1, 1) and block.branch[4].stride == (2, 2)
    assert block(torch.randn(2, 64, 16, 16)).shape == (2, 128, 8, 8)
    body = EmbeddingNet("iresnet18", embedding_dim=32, head="fc_bn").backbone
    sizes = []
    for layer in body:
        if isinstance(layer, model_module.IBasicBlock):
            layer.register_forward_hook(lambda _, __, out: sizes.append(out.shape[-1]))
    body.eval()(torch.randn(1, 3, 112, 112))
    assert sorted(set(sizes), reverse=True) == [56, 28, 14, 7]


def test_iresnet_embeds_any_size_with_gradients_and_zero_init_starts_blocks_as_the_identity():
    torch.manual_seed(0)
    network = EmbeddingNet("iresnet18", embedding_dim=32, head="fc_bn", zero_init_residual=True)
    for size in ((112, 112), (64, 56)):
        out = network(torch.randn(3, 3, *size))
        assert out.shape == (3, 32)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    out.sum().backward()
    assert network.backbone[0].weight.grad.abs().sum() > 0
    same = [m for m in network.backbone if isinstance(m, model_module.IBasicBlock)][1].eval()
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(same(x), x)  # identity shortcut + a branch that starts at zero
    with pytest.raises(ValueError):
        EmbeddingNet("iresnet18", pretrained=True)


def test_pixel_baseline_pairs_score_the_correlation_of_their_grey_levels():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 8, 6)
    baseline = PixelBaseline((8, 6))
    embeddings = baseline(images)
    assert embeddings.shape == (3, 48) and baseline.config["embedding_dim"] == 48
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3))
    grey = images.mean(1).flatten(1).numpy()
    assert np.allclose((embeddings @ embeddings.T).numpy(), np.corrcoef(grey), atol=1e-5)
    # brighter and of more contrast, a photo still embeds alike
    assert torch.allclose(baseline(2 * images + 0.5), embeddings, atol=1e-5)
