"""distill.py: the distillation losses, the teacher's targets and their cache (per teacher, per photo, in parts), and
what a distilled run adds elsewhere: items with their dataset indices, batches of any images, a training step with a
distiller, the settings' rules, and the distiller's state in checkpoints. Tiny networks on tiny image folders."""
import json
import os
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import distill
from align import ALIGNMENT_FILE, alignment_record
from checkpoint import Checkpointer, RandomState, RunState, load_checkpoint, resume_training, training_state
from conftest import make_faces, write_image, write_teacher
from data_utils import FaceFolder, make_transform, normalize
from distill import Distillation, centred, teacher_centres, teacher_targets
from engine import TrainingStep, build_optimizer, build_schedule
from losses import NoObjective, batch_rows, build_objective
from model import EmbeddingNet
from pretrained import DLIB_NETWORK, load_face_network
from sampling import TripletFaceDataset, collate_rows, train_loader_for

SIZE = (16, 16)
TEACHER_DIM = 8
def unit_rows(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# -----------------------------------------------------------------------------
# Distillation

def test_cosine_distillation_of_equal_sizes_is_the_mean_of_one_minus_cosine():
    """Equal sizes: no projection; the loss is mean(1 - cos(s, t)), teacher_cosine the mean cosine."""
    student, targets = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), unit_rows(6, 8)
    distiller = Distillation(8, 8, "cosine")
    assert not list(distiller.parameters())
    loss, stats = distiller(student, targets)
    cosines = F.cosine_similarity(student, targets, dim=1)
    torch.testing.assert_close(loss, (1 - cosines).mean())
    assert stats["teacher_cosine"] == pytest.approx(cosines.mean().item(), abs=1e-6)


def test_cosine_distillation_projects_a_larger_student_to_the_teacher_size():
    """Student 16-d, teacher 8-d: a bias-free Linear(16 -> 8), the loss mean(1 - cos(W s, t))."""
    torch.manual_seed(0)
    student, targets = torch.randn(5, 16), unit_rows(5, 8)
    distiller = Distillation(16, 8, "cosine")
    assert isinstance(distiller.projection, nn.Linear) and distiller.projection.weight.shape == (8, 16)
    assert distiller.projection.bias is None
    loss, _ = distiller(student, targets)
    projected = student @ distiller.projection.weight.T
    torch.testing.assert_close(loss, (1 - F.cosine_similarity(projected, targets, dim=1)).mean())


def test_rows_the_teacher_could_not_see_are_left_out_of_the_mean():
    """Zero rows in the targets: the loss is the straight one over the other rows; none seen: zero, and it still
    backpropagates."""
    torch.manual_seed(0)
    student, targets = torch.randn(6, 8), unit_rows(6, 8)
    targets[[1, 4]] = 0
    kept = [0, 2, 3, 5]
    for kind in ("cosine", "relational"):
        loss, _ = Distillation(8, 8, kind)(student, targets)
        expected, _ = Distillation(8, 8, kind)(student[kept], targets[kept])
        torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(
        Distillation(8, 8)(student, targets)[0],
        (1 - F.cosine_similarity(student[kept], targets[kept], dim=1)).mean())
    embeddings = student.clone().requires_grad_()
    loss, _ = Distillation(8, 8)(embeddings, torch.zeros(6, 8))
    loss.backward()
    assert loss.item() == 0 and embeddings.grad is not None


def test_gradients_reach_the_embeddings_and_the_projection():
    """The cosine loss through a projection backpropagates to the student's embeddings and to the projection."""
    torch.manual_seed(0)
    embeddings = torch.randn(5, 16, requires_grad=True)
    distiller = Distillation(16, 8)
    loss, _ = distiller(embeddings, unit_rows(5, 8))
    loss.backward()
    for grad in (embeddings.grad, distiller.projection.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_relational_distillation_compares_the_batch_similarity_matrices():
    """'relational': mean((S S^T - T T^T)^2) over normalised rows, whatever the sizes (no projection)."""
    torch.manual_seed(0)
    student, targets = torch.randn(6, 16), unit_rows(6, 8)
    distiller = Distillation(16, 8, "relational")
    assert not list(distiller.parameters())
    loss, _ = distiller(student, targets)
    s = F.normalize(student, dim=1)
    torch.testing.assert_close(loss, ((s @ s.T - targets @ targets.T) ** 2).mean())
    embeddings = student.clone().requires_grad_()
    distiller(embeddings, targets)[0].backward()
    assert embeddings.grad.abs().sum() > 0


def test_teacher_centres_are_the_normalised_means_of_each_identitys_seen_targets():
    """Hand-made: identity 0 has two seen photos, identity 1 one seen and one unseen (zero) photo, identity 2 only an
    unseen one (its centre stays zero); fewer than two identities is a ValueError."""
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    centres = teacher_centres(targets, [0, 0, 1, 1, 2], 3)
    torch.testing.assert_close(centres, torch.tensor([[0.5 ** 0.5, 0.5 ** 0.5, 0.0], [0.0, 0.0, 1.0], [0.0] * 3]))
    with pytest.raises(ValueError):
        teacher_centres(targets, [0] * 5, 1)


def test_inherited_distillation_is_arcface_over_the_teacher_centres_held_fixed():
    """'inherited': the cross-entropy of scale x logits, the cosines of the projected student with the fixed centres
    and cos(theta + margin) for the label's (computed here by hand); the gradient reaches the projection and the
    embeddings, never the centres; a row the teacher did not see is left out; no centres is a ValueError."""
    torch.manual_seed(0)
    centres, targets = unit_rows(4, 8, seed=2), unit_rows(6, 8)
    targets[3] = 0
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    embeddings = torch.randn(6, 16, requires_grad=True)
    distiller = Distillation(16, 8, "inherited", centres, scale=16.0, margin=0.3)
    loss, stats = distiller(embeddings, targets, labels)
    kept = [0, 1, 2, 4, 5]
    student = F.normalize(embeddings[kept] @ distiller.projection.weight.T, dim=1)
    cos = student @ centres.T
    own = cos[range(5), labels[kept]]
    logits = cos.clone()
    logits[range(5), labels[kept]] = torch.cos(torch.acos(own) + 0.3)
    torch.testing.assert_close(loss, F.cross_entropy(16.0 * logits, labels[kept]))
    assert stats["teacher_cosine"] == pytest.approx((student * targets[kept]).sum(1).mean().item(), abs=1e-6)
    loss.backward()
    assert embeddings.grad[kept].abs().sum() > 0 and not embeddings.grad[3].any()
    assert distiller.projection.weight.grad.abs().sum() > 0
    assert [name for name, p in distiller.named_parameters() if p.requires_grad] == ["projection.weight"]
    torch.testing.assert_close(distiller.inherited.weight, centres)
    with pytest.raises(ValueError):
        Distillation(16, 8, "inherited")
    with pytest.raises(ValueError):
        Distillation(16, 8, "inherited", unit_rows(4, 5))


def test_an_unknown_distillation_kind_is_a_value_error():
    with pytest.raises(ValueError):
        Distillation(8, 8, "l2")


# -----------------------------------------------------------------------------
# the teacher's targets and their cache

@torch.no_grad()
def straight_targets(path, faces):
    """Each photo's target computed straight: the teacher's embeddings of it and its mirror image, at its
    evaluation transform, added and normalised."""
    model, state = load_face_network(path)
    transform = make_transform(state["image_size"], train=False)
    rows = []
    for index in range(len(faces)):
        image = transform(faces.read(index)).unsqueeze(0)
        rows.append(F.normalize(model(image) + model(image.flip(3)), dim=1)[0])
    return torch.stack(rows)


@pytest.fixture
def counted(monkeypatch):
    """The number of photos the teacher embeds, batch by batch (distill.embed_views wrapped)."""
    calls, real = [], distill.embed_views

    def embed_views(teacher, images, device):
        calls.append(len(images))
        return real(teacher, images, device)

    monkeypatch.setattr(distill, "embed_views", embed_views)
    return calls


def targets_of(spec, faces, cache, pixel_norm=None):
    targets, network, views = teacher_targets(spec, faces, str(cache), faces.root, pixel_norm=pixel_norm,
                                              log=lambda *_: None)
    assert isinstance(network, str) and views is None
    return targets


def part_files(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("part-") and name.endswith(".pt"))


def test_teacher_targets_are_the_flip_test_embeddings_and_are_cached(tmp_path, counted):
    """The first call embeds all 12 photos: (12, 8) unit rows, the straight flip-test embeddings; a second call
    embeds none and returns the same targets."""
    faces = FaceFolder(make_faces(str(tmp_path / "faces")))
    spec = write_teacher(tmp_path / "teacher")
    targets = targets_of(spec, faces, tmp_path / "cache")
    assert sum(counted) == 12
    assert targets.shape == (12, TEACHER_DIM)
    torch.testing.assert_close(targets.norm(dim=1), torch.ones(12))
    torch.testing.assert_close(targets, straight_targets(spec, faces), atol=1e-5, rtol=0)
    assert len(os.listdir(tmp_path / "cache")) == 1
    counted.clear()
    again = targets_of(spec, faces, tmp_path / "cache")
    assert sum(counted) == 0
    assert torch.equal(again, targets)


def test_dlib_network_teaches_in_torch_and_is_cached(tmp_path, counted):
    """--teacher=dlib_resnet (dlib's network read into torch): 128-d targets, the straight flip-test embeddings at
    150x150 of photos aligned already (prepare.py align's record beside them); cached, so that a second call embeds
    nothing."""
    root = make_faces(str(tmp_path / "faces"))
    with open(os.path.join(root, ALIGNMENT_FILE), "w") as f:
        json.dump(alignment_record(112), f)
    faces = FaceFolder(root)
    targets = targets_of(DLIB_NETWORK, faces, tmp_path / "cache")
    assert targets.shape == (12, 128) and sum(counted) == 12
    torch.testing.assert_close(targets, straight_targets(DLIB_NETWORK, faces), atol=1e-5, rtol=0)
    counted.clear()
    assert torch.equal(targets_of(DLIB_NETWORK, faces, tmp_path / "cache"), targets) and sum(counted) == 0


def test_a_changed_photo_is_computed_anew_alone(tmp_path, counted):
    """New bytes in one photo: that photo alone is embedded again, and its target is the new photo's."""
    faces = FaceFolder(make_faces(str(tmp_path / "faces")))
    spec = write_teacher(tmp_path / "teacher")
    before = targets_of(spec, faces, tmp_path / "cache")
    changed = 5
    write_image(faces.samples[changed][0], seed=999)
    counted.clear()
    after = targets_of(spec, faces, tmp_path / "cache")
    assert sum(counted) == 1
    others = [i for i in range(12) if i != changed]
    assert torch.equal(after[others], before[others])
    assert not torch.allclose(after[changed], before[changed], atol=1e-4)
    torch.testing.assert_close(after, straight_targets(spec, faces), atol=1e-5, rtol=0)


def test_another_teacher_has_its_own_cache(tmp_path, counted):
    """A second teacher (other weights, same file name) embeds every photo itself, in another cache folder."""
    faces = FaceFolder(make_faces(str(tmp_path / "faces")))
    first, second = write_teacher(tmp_path / "a"), write_teacher(tmp_path / "b", seed=1)
    targets_of(first, faces, tmp_path / "cache")
    counted.clear()
    targets = targets_of(second, faces, tmp_path / "cache")
    assert sum(counted) == 12
    assert len(os.listdir(tmp_path / "cache")) == 2
    torch.testing.assert_close(targets, straight_targets(second, faces), atol=1e-5, rtol=0)


def test_a_stopped_cache_computes_only_the_missing_part(tmp_path, counted, monkeypatch):
    """Parts of 5 photos (5, 5, 2); one deleted, as if the run had stopped before writing it: the next call
    embeds only its photos, and the targets are those of the whole run."""
    monkeypatch.setattr(distill, "PART_SIZE", 5)
    faces = FaceFolder(make_faces(str(tmp_path / "faces")))
    spec = write_teacher(tmp_path / "teacher")
    whole = targets_of(spec, faces, tmp_path / "cache")
    (folder,) = [tmp_path / "cache" / name for name in os.listdir(tmp_path / "cache")]
    parts = part_files(folder)
    assert sorted(len(torch.load(folder / name, weights_only=True)["keys"]) for name in parts) == [2, 5, 5]
    lost = next(name for name in parts if len(torch.load(folder / name, weights_only=True)["keys"]) == 5)
    os.remove(folder / lost)
    counted.clear()
    resumed = targets_of(spec, faces, tmp_path / "cache")
    assert sum(counted) == 5
    torch.testing.assert_close(resumed, whole)


def test_a_corrupt_cache_part_is_warned_about_and_its_photos_computed_anew(tmp_path, counted, monkeypatch):
    """A part file of garbage bytes: a warning, its photos embedded again, the targets as before; then it is
    whole again (no warning, nothing computed)."""
    monkeypatch.setattr(distill, "PART_SIZE", 5)
    faces = FaceFolder(make_faces(str(tmp_path / "faces")))
    spec = write_teacher(tmp_path / "teacher")
    whole = targets_of(spec, faces, tmp_path / "cache")
    (folder,) = [tmp_path / "cache" / name for name in os.listdir(tmp_path / "cache")]
    corrupt = part_files(folder)[0]
    lost = len(torch.load(folder / corrupt, weights_only=True)["keys"])
    (folder / corrupt).write_bytes(b"not a torch file " * 20)
    counted.clear()
    with pytest.warns(UserWarning):
        again = targets_of(spec, faces, tmp_path / "cache")
    assert sum(counted) == lost
    torch.testing.assert_close(again, whole)
    counted.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        targets_of(spec, faces, tmp_path / "cache")
    assert sum(counted) == 0


class Pixels(nn.Module):
    """A tiny ONNX-exportable face network: (N, 3, 16, 16) normalised pixels -> (N, 8)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, TEACHER_DIM)

    def forward(self, images):
        return self.fc(images.flatten(1))


def test_an_onnx_teacher_with_another_side_file_is_not_served_the_old_cache(tmp_path):
    """An ONNX teacher's side file decides how photos are normalised, so its vectors: after the side file changes,
    the targets are those of a fresh cache, not the vectors cached under the old normalisation."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    path = str(tmp_path / "teacher.onnx")
    program = torch.onnx.export(Pixels().eval(), (torch.zeros(2, 3, 16, 16),), dynamo=True, verbose=False,
                                input_names=["images"], output_names=["embeddings"],
                                dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    with open(path, "wb") as f:
        f.write(program.model_proto.SerializeToString())

    def side(mean, std):
        with open(path + ".json", "w") as f:
            json.dump(dict(input_mean=mean, input_std=std, alignment=None), f)

    faces = FaceFolder(make_faces(str(tmp_path / "faces")))
    side(127.5, 127.5)
    old = targets_of(path, faces, tmp_path / "cache")
    side(0.0, 1.0)
    fresh = targets_of(path, faces, tmp_path / "fresh")
    assert not torch.allclose(old, fresh, atol=1e-3)  # (the side file changes what the teacher computes)
    served = targets_of(path, faces, tmp_path / "cache")
    assert torch.allclose(served, fresh, atol=1e-5), \
        "teacher_identity ignores the ONNX side file: stale vectors of the old normalisation are served"
    # --onnx_norm wins over the side file, and is keyed alike: the first normalisation's vectors again
    torch.testing.assert_close(targets_of(path, faces, tmp_path / "cache", pixel_norm=(127.5, 127.5)), old)
    torch.testing.assert_close(targets_of(path, faces, tmp_path / "fresh", pixel_norm=(127.5, 127.5)), old)


# -----------------------------------------------------------------------------
# augmented views

KEYS = [f"{i:040x}" for i in range(12)]


def test_view_params_are_drawn_alike_every_time_and_differ_between_views():
    """The same photo and view give the same parameters (and key) in every call; views of a photo differ, in
    range; a blended view's partner is another readable photo, named by its key."""
    first = distill.view_params(KEYS[0], 1, KEYS)
    assert first == distill.view_params(KEYS[0], 1, list(KEYS))
    assert distill.view_key(KEYS[0], first) == distill.view_key(KEYS[0], distill.view_params(KEYS[0], 1, KEYS))
    keys = [key for key in KEYS for _ in (1, 2, 3)]
    drawn = [distill.view_params(key, view, KEYS) for key in KEYS for view in (1, 2, 3)]
    assert len({json.dumps(params, sort_keys=True) for params in drawn}) == len(drawn)
    for params in drawn:
        assert abs(params["angle"]) <= 12 and 0.9 <= params["scale"] <= 1.1
        assert all(0.7 <= c <= 1.3 for c in params["colour"]) and 0 <= params["blur"] <= 1.2
    blended = [(key, params) for key, params in zip(keys, drawn) if "blend" in params]
    assert 0 < len(blended) < len(drawn)
    for key, params in blended:
        assert params["partner"] == KEYS[params["partner_index"]] != key and 0.15 <= params["blend"] <= 0.45
    unreadable = [None] * 11 + [KEYS[11]]  # only the photo itself: nothing to blend with
    assert not any("blend" in distill.view_params(KEYS[11], view, unreadable) for view in range(1, 20))


def test_a_views_key_changes_with_its_partners_bytes_and_its_own():
    """The key of a blended view names the photo and the partner by their bytes: another partner photo (another
    key at the same index) gives another key, as another photo does."""
    view = next(v for v in range(1, 40) if "blend" in distill.view_params(KEYS[0], v, KEYS))
    params = distill.view_params(KEYS[0], view, KEYS)
    changed = list(KEYS)
    changed[params["partner_index"]] = "f" * 40
    assert distill.view_key(KEYS[0], distill.view_params(KEYS[0], view, changed)) != distill.view_key(KEYS[0], params)
    assert distill.view_key(KEYS[1], params) != distill.view_key(KEYS[0], params)


def test_view_image_blends_then_turns_recolours_and_blurs_a_photo():
    """Plain parameters (no turn, scale, shift or colour change) and a blend of 0.3: the view is PIL's blend of the
    photo with its partner; a colour change alone changes pixels and keeps the size and mode; a blur smooths."""
    from PIL import Image, ImageStat
    rng = torch.Generator().manual_seed(0)
    photo, partner = (Image.fromarray(torch.randint(0, 256, (20, 24, 3), generator=rng, dtype=torch.uint8).numpy())
                      for _ in range(2))
    plain = dict(angle=0.0, scale=1.0, shift=[0.0, 0.0], colour=[1.0, 1.0, 1.0], blur=0.0)
    blended = distill.view_image(photo, dict(plain, partner="k", blend=0.3), partner)
    assert blended.tobytes() == Image.blend(photo, partner, 0.3).tobytes()
    assert distill.view_image(photo, plain).tobytes() == photo.tobytes()
    recoloured = distill.view_image(photo, dict(plain, colour=[1.2, 0.8, 0.5]))
    assert recoloured.size == photo.size and recoloured.mode == "RGB" and recoloured.tobytes() != photo.tobytes()
    grey = photo.convert("L")
    assert distill.view_image(grey, dict(plain, colour=[1.2, 0.8, 0.5], angle=5.0)).mode == "L"
    blurred = distill.view_image(photo, dict(plain, blur=1.2))
    assert sum(ImageStat.Stat(blurred).stddev) < sum(ImageStat.Stat(photo).stddev)


def straight_view_targets(path, faces, views):
    """Each row's target computed straight: the teacher's flip-test embedding of the photo, or of its view."""
    model, state = load_face_network(path)
    transform = make_transform(state["image_size"], train=False)
    rows = []
    with torch.no_grad():
        for row in range(len(faces) * (views.count + 1)):
            index, view = divmod(row, views.count + 1)
            params = views.params(index, view)
            image = faces.read(index) if params is None else distill.view_image(
                faces.read(index), params, faces.read(params["partner_index"]) if "blend" in params else None)
            image = transform(image).unsqueeze(0)
            rows.append(F.normalize(model(image) + model(image.flip(3)), dim=1)[0])
    return torch.stack(rows)


def test_teacher_targets_of_views_are_each_views_embedding_and_reuse_the_photos_cache(tmp_path, counted):
    """Two views: (36, 8) targets, rows 3i the photos' (served from the cache of a run without views: only the 24
    views are embedded), rows 3i + v the straight flip-test embeddings of photo i's view v; again, nothing is
    embedded."""
    faces = FaceFolder(make_faces(str(tmp_path / "faces")))
    spec = write_teacher(tmp_path / "teacher")
    plain = targets_of(spec, faces, tmp_path / "cache")
    counted.clear()
    targets, _, views = teacher_targets(spec, faces, str(tmp_path / "cache"), faces.root, views=2, log=lambda *_: None)
    assert sum(counted) == 24 and views.count == 2
    assert targets.shape == (36, TEACHER_DIM) and torch.equal(targets[::3], plain)
    torch.testing.assert_close(targets, straight_view_targets(spec, faces, views), atol=1e-5, rtol=0)
    assert not torch.allclose(targets[1::3], targets[::3], atol=1e-3)
    counted.clear()
    again, _, _ = teacher_targets(spec, faces, str(tmp_path / "cache"), faces.root, views=2, log=lambda *_: None)
    assert sum(counted) == 0 and torch.equal(again, targets)


def test_items_with_views_draw_each_view_with_its_row(tmp_path):
    """With views, faces[i] is (the transform of one of photo i's views, its label, 3i + v), the image that of
    view v (the cached and the read images alike); over many draws every view comes up."""
    faces = FaceFolder(make_faces(str(tmp_path / "faces")), make_transform(SIZE, train=False, pixels=True))
    faces.with_items = True
    faces.views = distill.TeacherViews(2, distill.photo_keys(faces))
    rest = faces._split_transform()[1]
    torch.manual_seed(0)
    for cache in (False, True):
        if cache:
            faces.cache()
        drawn = set()
        for _ in range(8):
            for index in range(len(faces)):
                image, label, row = faces[index]
                view = row - 3 * index
                assert label == faces.targets[index] and 0 <= view <= 2
                params = faces.views.params(index, view)
                staged = faces.staged(index)
                expected = rest(staged if params is None else distill.view_image(
                    staged, params, faces.staged(params["partner_index"]) if "blend" in params else None))
                assert torch.equal(image, expected)
                drawn.add(view)
        assert drawn == {0, 1, 2}


# -----------------------------------------------------------------------------
# batches with the items' indices

def test_items_with_their_indices(tmp_path):
    """with_items: faces[i] is (the same image, its label, i)."""
    faces = FaceFolder(make_faces(str(tmp_path / "faces")), make_transform(SIZE, train=False, pixels=True))
    plain = [faces[i] for i in range(len(faces))]
    faces.with_items = True
    for i in range(len(faces)):
        image, label, index = faces[i]
        assert torch.equal(image, plain[i][0]) and label == plain[i][1] == faces.targets[i] and index == i


def test_collate_rows_adds_the_indices_position_major(tmp_path):
    """Triplet items with their indices: collate_rows returns (images, labels, rows, indices), indices (3B,) in the
    labels' position-major order, each image the dataset's image of its index."""
    faces = FaceFolder(make_faces(str(tmp_path / "faces")), make_transform(SIZE, train=False, pixels=True))
    faces.with_items = True
    triplets = TripletFaceDataset(faces, seed=0)
    items = [triplets[b] for b in range(4)]
    images, labels, rows, indices = collate_rows(items)
    expected = [items[b][2][position] for position in range(3) for b in range(4)]
    assert indices.dtype == torch.int64 and indices.tolist() == expected
    assert labels.tolist() == [faces.targets[i] for i in expected]
    assert rows.tolist() == [[b, 4 + b, 8 + b] for b in range(4)]
    for image, index in zip(images, expected):
        assert torch.equal(image, faces[index][0])


def test_an_images_loader_shuffles_every_item_once_an_epoch(tmp_path):
    """rows "images" (loss none): batches (images, labels, indices) in random order, each item once an epoch, and
    nothing to set_epoch."""
    assert batch_rows("none") == "images" and build_objective("none").rows == "images"
    faces = FaceFolder(make_faces(str(tmp_path / "faces")), make_transform(SIZE, train=False, pixels=True))
    faces.with_items = True
    loader, sources = train_loader_for(faces, "images", 4, seed=0, log=lambda *_: None, num_workers=0)
    assert sources == []
    orders = []
    for _ in range(2):
        order = []
        for images, labels, indices in loader:
            assert images.shape == (4, 3, *SIZE) and images.dtype == torch.uint8
            assert labels.tolist() == [faces.targets[i] for i in indices]
            assert all(torch.equal(image, faces[i][0]) for image, i in zip(images, indices.tolist()))
            order += indices.tolist()
        assert sorted(order) == list(range(12))
        orders.append(order)
    assert orders[0] != list(range(12)) and orders[0] != orders[1]


# -----------------------------------------------------------------------------
# training with a distiller; the settings' rules; checkpoints

def test_a_training_step_with_a_distiller_moves_the_student_towards_the_teacher():
    """NoObjective and a projecting Distillation of weight 2: the step's loss is 2 x (1 - teacher_cosine); over 20
    SGD steps on fixed targets the loss falls, the projection trains, and the student in eval mode is nearer the
    teacher than before."""
    torch.manual_seed(0)
    model = EmbeddingNet("smallcnn", 16, "linear")
    distiller = Distillation(16, TEACHER_DIM)
    objective = NoObjective()
    optimizer = build_optimizer("sgd", [*model.parameters(), *distiller.parameters()], 0.02, 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    targets = unit_rows(12, TEACHER_DIM)
    step = TrainingStep(model, objective, optimizer, schedule, torch.amp.GradScaler("cuda", enabled=False), "cpu",
                        nullcontext(), stat=objective.stat, distiller=distiller, targets=targets, weight=2.0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    indices = torch.tensor([0, 2, 3, 5, 7, 8, 10, 11])
    batch = (images, torch.zeros(8, dtype=torch.int64), indices)

    @torch.no_grad()
    def eval_loss():
        model.eval()
        loss, _ = distiller(model(normalize(images)), targets[indices])
        model.train()
        return loss.item()

    before, projection = eval_loss(), distiller.projection.weight.detach().clone()
    losses = []
    for _ in range(20):
        loss, stats, embeddings = step(batch)
        losses.append(loss.item())
        assert loss.item() == pytest.approx(2.0 * (1 - stats["teacher_cosine"]), abs=1e-5)
    assert embeddings.shape == (8, 16)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert not torch.equal(distiller.projection.weight, projection)
    assert eval_loss() < before - 0.1


def test_a_training_step_gives_the_inherited_classifier_the_batch_labels():
    """'inherited' through TrainingStep (a linear network over tiny distinct images): the batch's labels reach the
    distiller, and 20 SGD steps bring its loss down until each photo's nearest teacher centre is its label's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16))
    targets, labels = unit_rows(8, TEACHER_DIM), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    distiller = Distillation(16, TEACHER_DIM, "inherited", teacher_centres(targets, labels, 4), scale=8.0)
    optimizer = build_optimizer("sgd", [*model.parameters(), *distiller.parameters()], 0.05, 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainingStep(model, NoObjective(), optimizer, schedule, torch.amp.GradScaler("cuda", enabled=False), "cpu",
                        nullcontext(), distiller=distiller, targets=targets)
    images = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def nearest_centres():
        return (distiller.projection(model(normalize(images))) @ distiller.inherited.weight.T).argmax(1)

    assert not torch.equal(nearest_centres(), labels)
    losses = [step((images, labels, torch.arange(8)))[0].item() for _ in range(20)]
    assert losses[-1] < 0.1 * losses[0]
    assert torch.equal(nearest_centres(), labels)


def test_checkpoints_keep_the_distiller_and_resume_loads_it(tmp_path):
    """Checkpointer given a distiller saves distill_state (none without one); resume_training puts the saved
    projection into a fresh distiller."""
    torch.manual_seed(0)
    model = EmbeddingNet("smallcnn", 16, "mlp", 32)
    objective = build_objective("arcface", embedding_dim=16, num_classes=3)
    distiller = Distillation(16, TEACHER_DIM)
    optimizer = build_optimizer("adam", [*model.parameters(), *objective.parameters(), *distiller.parameters()],
                                1e-3, 0.0)
    schedule = build_schedule("onecycle", optimizer, steps_per_epoch=2, epochs=3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    classes = ["p0", "p1", "p2"]
    run = RunState(history=[dict(epoch=0, valid_identification=0.5)], rng=RandomState("cpu").capture())
    saver = Checkpointer(str(tmp_path), model, objective, {}, classes, (32, 32), distiller=distiller)
    assert saver.save("last.pth", 0, {}, training_state(run, optimizer, schedule, scaler, 1))
    plain = Checkpointer(str(tmp_path), model, objective, {}, classes, (32, 32))
    assert plain.save("plain.pth", 0, {})
    assert "distill_state" not in load_checkpoint(plain.path("plain.pth"))
    checkpoint = load_checkpoint(saver.path("last.pth"))
    torch.testing.assert_close(checkpoint["distill_state"]["projection.weight"], distiller.projection.weight)

    torch.manual_seed(1)
    fresh = Distillation(16, TEACHER_DIM)
    assert not torch.equal(fresh.projection.weight, distiller.projection.weight)
    parts = (EmbeddingNet("smallcnn", 16, "mlp", 32), build_objective("arcface", embedding_dim=16, num_classes=3))
    resumed_optimizer = build_optimizer("adam", [*parts[0].parameters(), *parts[1].parameters(),
                                                 *fresh.parameters()], 1e-3, 0.0)
    resume_training(checkpoint, (*parts, resumed_optimizer, build_schedule("onecycle", resumed_optimizer, 2, 3),
                                 torch.amp.GradScaler("cuda", enabled=False)), RandomState("cpu"), 1,
                    str(tmp_path / "tb_model.pth"), log=lambda *_: None, distiller=fresh)
    assert torch.equal(fresh.projection.weight, distiller.projection.weight)


def test_centred_targets_are_the_normalised_differences_from_the_mean_of_the_seen_rows():
    targets = F.normalize(torch.tensor([[3.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [3.0, 1.0, 1.0]]), dim=1)
    got = centred(targets)
    seen = targets[[0, 1, 3]]
    assert torch.allclose(got[[0, 1, 3]], F.normalize(seen - seen.mean(0), dim=1), atol=1e-6)
    assert torch.equal(got[2], torch.zeros(3))  # a photo the teacher could not see stays unknown
