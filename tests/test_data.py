"""data_utils: scanning and decoding images, transforms, the folder datasets and their cache; on small image trees
written into tmp_path."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_faces, write_image
from data_utils import (IMAGENET_MEAN, IMAGENET_STD, DatasetError, FaceFolder, denormalize, load_rgb, make_transform,
                        normalize)


# -----------------------------------------------------------------------------
# scanning

def test_scan_includes_nested_distortion_and_ignores_other_files(tmp_path):
    write_image(tmp_path / "alice" / "1.jpg")
    write_image(tmp_path / "alice" / "distortion" / "1_blur.PNG")  # nested and upper-case extension
    write_image(tmp_path / "alice" / "distortion" / "deeper" / "1_noise.Jpeg")
    write_image(tmp_path / "bob" / "a.pgm")
    write_image(tmp_path / "bob" / ".hidden.png")  # hidden file
    write_image(tmp_path / ".cache" / "x.png")  # hidden identity folder
    (tmp_path / "bob" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "bob" / "README").write_text("not an image")
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    faces = FaceFolder(str(tmp_path))
    assert faces.classes == ["alice", "bob"]
    names = sorted(os.path.relpath(p, tmp_path) for p, _ in faces.samples)
    assert names == sorted(["alice/1.jpg", "alice/distortion/1_blur.PNG",
                            "alice/distortion/deeper/1_noise.Jpeg", "bob/a.pgm"])
    assert faces.targets == [0, 0, 0, 1]
    assert faces.skipped == []


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "CMYK", "LA"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    ext = ".jpg" if mode == "CMYK" else ".png"
    path = write_image(tmp_path / f"img{ext}", mode=mode)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (24, 20)
    tensor = make_transform(32, train=False)(image)
    assert tensor.shape == (3, 32, 32)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_uint8_pixels_normalised_later_equal_the_normalised_transform(tmp_path, mode):
    """train.py's batches travel as uint8 and are normalised on the device: the same numbers, bit for bit."""
    image = load_rgb(write_image(tmp_path / "img.png", mode=mode))
    pixels = make_transform((32, 28), train=False, pixels=True)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 28)
    expected = make_transform((32, 28), train=False)(image)
    assert torch.equal(normalize(torch.stack([pixels, pixels])), torch.stack([expected, expected]))
    assert torch.allclose(denormalize(expected[None]) * 255, pixels.float(), atol=1e-3)


def test_normalize_is_the_imagenet_multiply_add_bit_for_bit():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 4, 1)  # every value, batched: (2, 3, 4, 256)
    scale = 1 / (255 * torch.tensor(IMAGENET_STD).view(3, 1, 1))
    shift = -255 * torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * scale
    out = normalize(pixels)
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    assert torch.equal(out, torch.addcmul(shift, pixels.float(), scale))
    assert torch.equal(normalize(pixels[0]), out[0])  # one image as a batch of one
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out, (pixels.float() / 255 - mean) / std, atol=1e-5)  # ToTensor, then Normalize


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (4, 3, 3)
    assert list(rgb[0, :, 0]) == [0, 127, 255]


def test_rgba_transparent_pixels_become_black(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., :3] = 200  # white-ish colour under full transparency
    Image.fromarray(pixels, "RGBA").save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).max() == 0


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nope"))):
        FaceFolder(str(tmp_path / "nope"))
    (tmp_path / "empty" / "person").mkdir(parents=True)
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "empty"))):
        FaceFolder(str(tmp_path / "empty"))


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    make_faces(tmp_path, identities=2, images=3)
    (tmp_path / "p0" / "empty.jpg").write_bytes(b"")
    (tmp_path / "p0" / "text.jpg").write_text("this is not a jpeg")
    with pytest.warns(UserWarning) as record:
        faces = FaceFolder(str(tmp_path))
    assert len(record) == 1 and "empty.jpg" in str(record[0].message) and "text.jpg" in str(record[0].message)
    assert len(faces) == 6 and sorted(map(os.path.basename, faces.skipped)) == ["empty.jpg", "text.jpg"]


def test_truncated_image_is_replaced_by_another_of_its_identity(tmp_path):
    make_faces(tmp_path, identities=2, images=3)
    whole = (tmp_path / "p1" / "0.png").read_bytes()
    (tmp_path / "p1" / "0.png").write_bytes(whole[: len(whole) // 2])  # header intact, data cut
    faces = FaceFolder(str(tmp_path), transform=make_transform(16, train=False))
    index = [i for i, (p, _) in enumerate(faces.samples) if p.endswith(os.path.join("p1", "0.png"))][0]
    with pytest.warns(UserWarning, match="0.png"):
        image, label = faces[index]
    assert image.shape == (3, 16, 16) and label == 1
    assert faces.skipped == [faces.samples[index][0]]


@pytest.mark.parametrize("train", [True, False])
def test_cached_images_give_the_same_items_as_decoding_each_time(tmp_path, train):
    make_faces(tmp_path, identities=2, images=3)
    whole = (tmp_path / "p1" / "0.png").read_bytes()
    (tmp_path / "p1" / "0.png").write_bytes(whole[: len(whole) // 2])  # fails when decoded: replaced either way
    items = []
    for cached in (False, True):
        faces = FaceFolder(str(tmp_path), transform=make_transform((20, 16), train=train))
        assert faces.cache_bytes() == 6 * 3 * 22 * 18  # uint8, resized with the 1.1 margin (cropped per item)
        with pytest.warns(UserWarning, match="0.png"):
            if cached:
                faces.cache()
            torch.manual_seed(0)  # the random augmentation draws alike
            items.append([faces[i] for i in range(len(faces))])
        assert faces.skipped == [str(tmp_path / "p1" / "0.png")]
    assert faces.cached is not None and len(faces.cached) == 5
    for (a, label_a), (b, label_b) in zip(*items):
        assert torch.equal(a, b) and label_a == label_b


def test_a_gallery_of_the_training_images_shares_their_cache(tmp_path):
    make_faces(tmp_path, identities=2, images=3)
    training = FaceFolder(str(tmp_path), make_transform((20, 16), train=True, pixels=True))
    training.cache()
    gallery = FaceFolder(str(tmp_path), make_transform((20, 16), train=False))
    gallery.cache(like=training)
    assert gallery.cached is training.cached  # decoded once
    decoded = FaceFolder(str(tmp_path), make_transform((20, 16), train=False))
    assert all(torch.equal(gallery[i][0], decoded[i][0]) for i in range(len(gallery)))
    other_size = FaceFolder(str(tmp_path), make_transform((24, 20), train=False))
    other_size.cache(like=training)  # resized otherwise: decoded anew
    assert other_size.cached is not training.cached and other_size[0][0].shape == (3, 24, 20)


def test_symlink_cycle_is_followed_once(tmp_path):
    make_faces(tmp_path / "data", identities=2, images=2)
    os.symlink(tmp_path / "data" / "p0", tmp_path / "data" / "p0" / "loop")
    faces = FaceFolder(str(tmp_path / "data"))
    assert len(faces) == 4


def test_identities_can_sit_deeper_than_the_first_level(tmp_path):
    write_image(tmp_path / "group-a" / "team-1" / "ann" / "1.png")
    write_image(tmp_path / "group-a" / "team-1" / "ann" / "distortion" / "1_blur.png")
    write_image(tmp_path / "group-a" / "team-2" / "bob" / "1.png")
    write_image(tmp_path / "group-b" / "team-3" / "cid" / "1.png")
    faces = FaceFolder(str(tmp_path), identity_depth=3)
    assert faces.classes == ["group-a/team-1/ann", "group-a/team-2/bob", "group-b/team-3/cid"]
    assert faces.targets == [0, 0, 1, 2]
    assert FaceFolder(str(tmp_path)).classes == ["group-a", "group-b"]  # depth 1: the groups are identities
