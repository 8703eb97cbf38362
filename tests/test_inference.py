"""Embedding passes: batches reach the device channels_last (uint8 pixels normalised on arrival), and a model's
embeddings of loader batches and of image files match a plain forward."""
import pytest
import torch

import inference
from conftest import write_image
from data_utils import load_image, make_transform, normalize
from model import Embedder, EmbeddingNet

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("backbone", ["resnet18", "smallcnn", "alexnet"])
def test_embed_feeds_channels_last_and_matches_a_plain_forward(backbone):
    torch.manual_seed(0)
    model = EmbeddingNet(backbone, embedding_dim=16, hidden_dim=32).train()
    images, labels = torch.randn(6, 3, 64, 64), torch.tensor([0, 0, 1, 1, 2, 2])
    formats = []
    model.register_forward_pre_hook(lambda _, args: formats.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    embeddings, embedded_labels = inference.embed(model, loader, "cpu", NO_AUTOCAST)
    assert formats == [True, True] and not model.training
    with torch.no_grad():
        reference = model(images)  # (NCHW; in eval mode now)
    assert embeddings.shape == (6, 16) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, reference, atol=1e-5, rtol=1e-5)
    assert embedded_labels.tolist() == labels.tolist()


class Ramp(Embedder):
    """An 'embedding network' whose unnormalised output is the pixels weighed more to the right: an image whose
    content lies left embeds shorter than its mirror image."""

    def unnormalised(self, images):
        return (images * torch.linspace(1, 4, images.shape[3])).flatten(1)


def test_the_flip_test_adds_the_unnormalised_mirror_image_and_makes_a_photo_and_its_mirror_embed_alike():
    torch.manual_seed(0)
    model = Ramp()
    images = torch.randn(3, 3, 8, 6) * torch.tensor([1.0, 1, 1, 0.2, 0.2, 0.2])  # the content on the left
    flipped = inference.embed_batch(model, images, "cpu", NO_AUTOCAST, flip=True)
    raw, mirror = model.unnormalised(images), model.unnormalised(images.flip(3))
    torch.testing.assert_close(flipped, torch.nn.functional.normalize(raw + mirror, dim=1))  # insightface's
    unit_sum = torch.nn.functional.normalize(model(images) + model(images.flip(3)), dim=1)
    assert not torch.allclose(flipped, unit_sum, atol=1e-2)  # not the sum of the two unit embeddings
    assert torch.allclose(flipped.norm(dim=1), torch.ones(3))
    mirrored = inference.embed_batch(model, images.flip(3), "cpu", NO_AUTOCAST, flip=True)
    torch.testing.assert_close(mirrored, flipped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(inference.embed_batch(model, images.flip(3), "cpu", NO_AUTOCAST),
                              inference.embed_batch(model, images, "cpu", NO_AUTOCAST), atol=1e-3)


def test_the_networks_unnormalised_output_is_the_heads_and_their_embedding_its_normalised_form():
    torch.manual_seed(0)
    network, images = EmbeddingNet("smallcnn", embedding_dim=16, hidden_dim=32).eval(), torch.randn(2, 3, 32, 28)
    with torch.no_grad():
        torch.testing.assert_close(network.unnormalised(images), network.head(network.backbone(images)))
        torch.testing.assert_close(network(images), torch.nn.functional.normalize(network.unnormalised(images)))


def test_uint8_batches_are_normalised_on_arrival_and_float_ones_pass_as_they_are():
    pixels = torch.randint(0, 256, (2, 3, 8, 6), dtype=torch.uint8)
    arrived = inference.device_batch(pixels, "cpu")
    assert arrived.dtype == torch.float32 and arrived.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(arrived, normalize(pixels))
    floats = torch.randn(2, 3, 8, 6)
    assert torch.equal(inference.device_batch(floats, "cpu"), floats)


def test_embed_files_skips_unreadable_files_and_keeps_the_order(tmp_path, capsys):
    torch.manual_seed(0)
    model = EmbeddingNet("smallcnn", embedding_dim=8, hidden_dim=16)
    paths = [str(write_image(tmp_path / f"{i}.png", seed=i)) for i in range(4)]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths.insert(2, str(broken))
    transform = make_transform(32, train=False)
    embeddings, kept = inference.embed_files(model, paths, transform, "cpu", NO_AUTOCAST, batch_size=2)
    assert kept == [0, 1, 3, 4]
    assert str(broken) in capsys.readouterr().err
    with torch.no_grad():
        reference = model.eval()(torch.stack([transform(load_image(paths[i])) for i in kept]))
    torch.testing.assert_close(embeddings, reference, atol=1e-5, rtol=1e-5)
    assert inference.embed_files(model, [str(broken)], transform, "cpu", NO_AUTOCAST) == (None, [])
