import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import (ArcFaceLoss, ContrastiveLoss, OnlineContrastiveLoss, OnlineTripletLoss, TripletLoss,
                    gather_batch, pair_distance, pairwise_distances)


def embeddings(n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) for _ in range(3))


@pytest.mark.parametrize("margin", [0.05, 0.2, 1.0])
def test_plain_distance_matches_torch_triplet_margin_loss(margin):
    a, p, n = embeddings()
    ours = TripletLoss(margin, squared=False)(a, p, n)
    reference = F.triplet_margin_loss(a, p, n, margin=margin, p=2, eps=0)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_squared_distance_matches_a_brute_force_loop():
    a, p, n = embeddings(seed=1)
    margin, total = 0.5, 0.0
    for i in range(len(a)):
        d_ap = sum((a[i, k] - p[i, k]) ** 2 for k in range(a.shape[1]))
        d_an = sum((a[i, k] - n[i, k]) ** 2 for k in range(a.shape[1]))
        total += max(0.0, float(d_ap - d_an) + margin)
    assert TripletLoss(margin, squared=True)(a, p, n).item() == pytest.approx(total / len(a), rel=1e-5)


def test_hand_computed_case():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # d(a,p) = 1 (squared 1)
    n = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # d(a,n) = 2 (squared 4), and 1 (squared 1)
    # squared: max(0, 1 - 4 + 0.5) = 0 and max(0, 1 - 1 + 0.5) = 0.5 -> mean 0.25
    assert TripletLoss(0.5)(a, p, n).item() == pytest.approx(0.25)
    # plain: max(0, 1 - 2 + 0.5) = 0 and 0.5 -> mean 0.25; with margin 1.5: 0.5 and 1.5 -> 1.0
    assert TripletLoss(1.5, squared=False)(a, p, n).item() == pytest.approx(1.0)
    assert TripletLoss(0.5, reduction="none")(a, p, n).tolist() == pytest.approx([0.0, 0.5])


@pytest.mark.parametrize("squared", [True, False])
def test_coinciding_embeddings_give_finite_gradients(squared):
    a = torch.ones(4, 8, requires_grad=True)
    p = torch.ones(4, 8, requires_grad=True)  # identical to the anchor: d(a, p) = 0
    n = torch.ones(4, 8, requires_grad=True)
    loss = TripletLoss(0.2, squared=squared)(a, p, n)
    loss.backward()
    assert loss.item() == pytest.approx(0.2)
    for t in (a, p, n):
        assert torch.isfinite(t.grad).all()


def test_gradient_pulls_positive_in_and_pushes_negative_out():
    a = torch.zeros(1, 2)
    p = torch.tensor([[1.0, 0.0]], requires_grad=True)
    n = torch.tensor([[0.5, 0.0]], requires_grad=True)
    TripletLoss(0.2)(a, p, n).backward()
    assert p.grad[0, 0] > 0  # descending moves p towards the anchor
    assert n.grad[0, 0] < 0  # and n away from it


def test_half_precision_input_is_computed_in_float32():
    a, p, n = embeddings(seed=2)
    loss = TripletLoss(0.2)(a.half(), p.half(), n.half())
    assert loss.dtype == torch.float32
    assert pair_distance(a.half(), p.half()).dtype == torch.float32


def test_bad_inputs_are_rejected():
    a, p, n = embeddings()
    with pytest.raises(ValueError, match="one shape"):
        TripletLoss()(a, p[:3], n)
    with pytest.raises(ValueError, match="one shape"):
        TripletLoss()(a[0], p[0], n[0])
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=-1)


# -----------------------------------------------------------------------------
# in-batch mining

def labelled_batch(p=4, k=3, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p * k, d, generator=g), torch.arange(p).repeat_interleave(k)


def brute_force(embeddings, labels, margin, mining, squared=True):
    """The mined loss by explicit loops over anchors, positives and negatives."""
    n = len(labels)

    def dist(i, j):
        d2 = float(((embeddings[i] - embeddings[j]) ** 2).sum())
        return d2 if squared else d2 ** 0.5
    losses = []
    for a in range(n):
        positives = [q for q in range(n) if q != a and labels[q] == labels[a]]
        negatives = [q for q in range(n) if labels[q] != labels[a]]
        if not positives or not negatives:
            continue
        if mining == "batch_hard":
            hp, hn = max(dist(a, q) for q in positives), min(dist(a, q) for q in negatives)
            losses.append(max(0.0, hp - hn + margin))
        for q in positives:
            if mining == "batch_all":
                losses += [max(0.0, dist(a, q) - dist(a, r) + margin) for r in negatives]
            elif mining == "semihard":
                semi = [dist(a, r) for r in negatives if dist(a, q) < dist(a, r) < dist(a, q) + margin]
                chosen = min(semi) if semi else min(dist(a, r) for r in negatives)
                losses.append(max(0.0, dist(a, q) - chosen + margin))
    active = [x for x in losses if x > 0]
    fraction = len(active) / len(losses)
    if mining == "batch_all":
        return sum(active) / max(len(active), 1), fraction
    return sum(losses) / len(losses), fraction


@pytest.mark.parametrize("mining", OnlineTripletLoss.MINING)
@pytest.mark.parametrize("squared", [True, False])
def test_mining_matches_brute_force(mining, squared):
    embeddings, labels = labelled_batch(seed=3)
    embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    margin = 0.5 if squared else 0.3
    loss, fraction = OnlineTripletLoss(margin, mining, squared)(embeddings, labels)
    expected, expected_fraction = brute_force(embeddings, labels, margin, mining, squared)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert fraction == pytest.approx(expected_fraction)
    assert 0 < fraction <= 1


def test_semihard_prefers_the_nearest_negative_beyond_the_positive():
    # 1-D: anchor 0, positive at 1 (d=1); negatives at 0.5 (hard), 1.2 and 1.4 (semi-hard, margin 0.5)
    embeddings = torch.tensor([[0.0], [1.0], [0.5], [1.2], [1.4]])
    labels = torch.tensor([0, 0, 1, 2, 3])
    mine = OnlineTripletLoss(0.5, "semihard", squared=False)
    loss, _ = mine(embeddings[:2], labels[:2])  # only one identity: no triplet
    assert loss.item() == 0
    # anchor 0 with positive 1: semi-hard negative 1.2 -> 1 - 1.2 + 0.5 = 0.3; anchor 1 with positive 0:
    # distances to negatives 0.5, 0.2, 0.4, none beyond 1 -> hardest (0.2): 1 - 0.2 + 0.5 = 1.3
    per_pair = brute_force(embeddings, labels, 0.5, "semihard", squared=False)[0]
    assert per_pair == pytest.approx((0.3 + 1.3) / 2)
    assert mine(embeddings, labels)[0].item() == pytest.approx(per_pair)


@pytest.mark.parametrize("mining", OnlineTripletLoss.MINING)
@pytest.mark.parametrize("squared", [True, False])
def test_mining_with_identical_embeddings_has_finite_gradients(mining, squared):
    embeddings = torch.ones(8, 4, requires_grad=True)  # duplicates everywhere: all distances 0
    labels = torch.arange(2).repeat_interleave(4)
    loss, fraction = OnlineTripletLoss(0.2, mining, squared)(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.2, abs=1e-3)
    assert fraction == 1.0 and torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("mining", OnlineTripletLoss.MINING)
def test_batch_without_valid_triplet_gives_zero_not_nan(mining):
    embeddings = torch.randn(4, 3, requires_grad=True)
    for labels in (torch.zeros(4, dtype=torch.long), torch.arange(4)):  # one identity; all different
        loss, fraction = OnlineTripletLoss(0.2, mining)(embeddings, labels)
        loss.backward()
        assert loss.item() == 0 and fraction == 0 and torch.isfinite(embeddings.grad).all()


def test_mining_is_computed_in_float32_and_checks_its_inputs():
    embeddings, labels = labelled_batch()
    loss, _ = OnlineTripletLoss(0.2, "batch_all")(embeddings.half(), labels)
    assert loss.dtype == torch.float32
    with pytest.raises(ValueError, match="mining must be one of"):
        OnlineTripletLoss(mining="hardest")
    with pytest.raises(ValueError, match=r"\(N, D\) embeddings and \(N,\) labels"):
        OnlineTripletLoss()(embeddings, labels[:-1])


def test_pairwise_distances_match_cdist():
    embeddings, _ = labelled_batch(seed=5)
    distances = pairwise_distances(embeddings, squared=False)
    off_diagonal = ~torch.eye(len(embeddings), dtype=torch.bool)
    torch.testing.assert_close(distances[off_diagonal], torch.cdist(embeddings, embeddings)[off_diagonal],
                               atol=1e-4, rtol=1e-4)
    assert (pairwise_distances(embeddings).diagonal() == 0).all()


# -----------------------------------------------------------------------------
# contrastive loss

def contrastive_by_loop(e1, e2, target, margin):
    """The contrastive loss of pairs (e1[i], e2[i]) by an explicit loop in Python floats."""
    total = 0.0
    for x, y, t in zip(e1.tolist(), e2.tolist(), target.tolist()):
        d = sum((a - b) ** 2 for a, b in zip(x, y)) ** 0.5
        total += d ** 2 if t == 0 else max(0.0, margin - d) ** 2
    return total / len(target)


def test_contrastive_hand_computed_case():
    e1 = torch.zeros(3, 2)
    e2 = torch.tensor([[3.0, 4.0], [0.6, 0.8], [3.0, 4.0]])  # distances 5, 1, 5
    target = torch.tensor([0, 1, 1])
    # same at d=5: 25; different at d=1 within margin 2: (2 - 1)^2 = 1; different at d=5: 0 -> mean 26 / 3
    assert ContrastiveLoss(2.0)(e1, e2, target).item() == pytest.approx(26 / 3)
    assert ContrastiveLoss(0.0)(e1, e2, target).item() == pytest.approx(25 / 3)


@pytest.mark.parametrize("margin", [0.5, 1.0, 4.0])
def test_contrastive_matches_a_brute_force_loop(margin):
    e1, e2, _ = embeddings(seed=4)
    target = torch.arange(len(e1)) % 3 == 0  # bool targets: True = different
    expected = contrastive_by_loop(e1, e2, target.long(), margin)
    assert ContrastiveLoss(margin)(e1, e2, target).item() == pytest.approx(expected, rel=1e-5)
    assert ContrastiveLoss(margin)(e1.half(), e2.half(), target.long()).dtype == torch.float32


def test_contrastive_gradient_pulls_same_and_pushes_different_apart():
    e1 = torch.zeros(2, 2)
    e2 = torch.tensor([[1.0, 0.0], [0.5, 0.0]], requires_grad=True)
    ContrastiveLoss(1.0)(e1, e2, torch.tensor([0, 1])).backward()
    # d/dx of x^2 / 2 = x, and of (1 - x)^2 / 2 = x - 1, at x = 1 and x = 0.5 (the mean halves both)
    torch.testing.assert_close(e2.grad, torch.tensor([[1.0, 0.0], [-0.5, 0.0]]))
    assert e2.grad[0, 0] > 0  # descending moves the same person's embedding towards e1
    assert e2.grad[1, 0] < 0  # and the other person's away from it


def test_contrastive_coinciding_embeddings_give_finite_gradients():
    e1 = torch.ones(4, 3, requires_grad=True)
    e2 = torch.ones(4, 3, requires_grad=True)
    loss = ContrastiveLoss(0.5)(e1, e2, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert loss.item() == pytest.approx(0.5 ** 2 / 2, abs=1e-5)  # the two different pairs, at distance 0
    assert torch.isfinite(e1.grad).all() and torch.isfinite(e2.grad).all()


def test_contrastive_rejects_bad_inputs():
    e1, e2, _ = embeddings()
    target = torch.zeros(len(e1))
    with pytest.raises(ValueError, match=r"e1 and e2 \(N, D\) of one shape.*\(16, 8\), \(3, 8\)"):
        ContrastiveLoss()(e1, e2[:3], target)
    with pytest.raises(ValueError, match=r"target \(N,\)"):
        ContrastiveLoss()(e1, e2, target[:-1])
    with pytest.raises(ValueError, match="one shape"):
        ContrastiveLoss()(e1[0], e2[0], target[:1])
    with pytest.raises(ValueError, match="margin"):
        ContrastiveLoss(margin=-0.1)


@pytest.mark.parametrize("margin", [0.5, 1.5])
def test_online_contrastive_equals_the_loss_over_every_pair(margin):
    embeddings_, labels = labelled_batch(seed=6)
    embeddings_ = F.normalize(embeddings_, dim=1)
    i, j = map(list, zip(*[(a, b) for a in range(len(labels)) for b in range(a + 1, len(labels))]))
    target = (labels[i] != labels[j]).long()
    expected = ContrastiveLoss(margin)(embeddings_[i], embeddings_[j], target)
    loss, fraction = OnlineContrastiveLoss(margin)(embeddings_, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    d = (embeddings_[i] - embeddings_[j]).norm(dim=1)
    expected_fraction = ((target == 0) & (d > 0) | (target == 1) & (d < margin)).float().mean().item()
    assert fraction == pytest.approx(expected_fraction) and 0 < fraction < 1
    assert loss.item() == pytest.approx(contrastive_by_loop(embeddings_[i], embeddings_[j], target, margin),
                                        rel=1e-4)


def test_online_contrastive_hand_computed_fraction():
    # 1-D, margin 1: same pair (0, 3) at distance 0 is inactive; different pairs at 0.5 active, at 2 and 1.5 not
    embeddings_ = torch.tensor([[0.0], [0.5], [2.0], [0.0]])
    labels = torch.tensor([0, 1, 2, 0])
    loss, fraction = OnlineContrastiveLoss(1.0)(embeddings_, labels)
    # pairs: (0,1) d=.5 diff -> .25; (0,2) d=2 diff -> 0; (0,3) same d=0 -> 0; (1,2) d=1.5 diff -> 0;
    # (1,3) d=.5 diff -> .25; (2,3) d=2 diff -> 0
    assert loss.item() == pytest.approx(0.5 / 6)
    assert fraction == pytest.approx(2 / 6)


def test_online_contrastive_without_pairs_gives_zero_and_finite_gradients():
    for n in (0, 1):
        embeddings_ = torch.randn(n, 3, requires_grad=True)
        loss, fraction = OnlineContrastiveLoss()(embeddings_, torch.zeros(n, dtype=torch.long))
        loss.backward()
        assert loss.item() == 0 and fraction == 0 and torch.isfinite(embeddings_.grad).all()
    coinciding = torch.ones(6, 4, requires_grad=True)
    loss, fraction = OnlineContrastiveLoss(1.0)(coinciding, torch.arange(3).repeat_interleave(2))
    loss.backward()
    assert loss.item() == pytest.approx(12 / 15, abs=1e-5)  # 12 of the 15 pairs: different people at distance 0
    assert fraction == pytest.approx(12 / 15) and torch.isfinite(coinciding.grad).all()
    with pytest.raises(ValueError, match=r"\(N, D\) embeddings and \(N,\) labels"):
        OnlineContrastiveLoss()(coinciding, torch.arange(5))


# -----------------------------------------------------------------------------
# ArcFace

@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_arcface_without_margin_is_the_scaled_cosine_softmax(scale):
    embeddings_, labels = labelled_batch(p=5, k=2, d=6, seed=7)
    arcface = ArcFaceLoss(6, 5, scale=scale, margin=0.0)
    loss, accuracy = arcface(embeddings_, labels)
    cos = F.normalize(embeddings_, dim=1) @ F.normalize(arcface.weight.detach(), dim=1).T
    torch.testing.assert_close(loss, F.cross_entropy(scale * cos, labels))
    assert accuracy == pytest.approx((cos.argmax(dim=1) == labels).float().mean().item())


def test_arcface_margin_matches_the_angle_formula_and_raises_the_loss():
    embeddings_, labels = labelled_batch(p=5, k=2, d=6, seed=8)
    with torch.no_grad():
        plain = ArcFaceLoss(6, 5, margin=0.0)
        margin = ArcFaceLoss(6, 5, margin=0.5)
        margin.weight.copy_(plain.weight)
        cos = F.normalize(embeddings_, dim=1) @ F.normalize(plain.weight, dim=1).T
        theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1, 1))
        target = torch.where(theta + 0.5 < math.pi, torch.cos(theta + 0.5),
                             torch.cos(theta) - 0.5 * math.sin(math.pi - 0.5))
        expected = F.cross_entropy(30 * cos.scatter(1, labels[:, None], target), labels)
        with_margin, without = margin(embeddings_, labels)[0], plain(embeddings_, labels)[0]
    torch.testing.assert_close(with_margin, expected, atol=1e-4, rtol=1e-4)
    assert with_margin > without + 1  # 30 x (cos(theta) - cos(theta + 0.5)) is large for every sample


def test_arcface_fallback_past_pi():
    # theta = pi - 0.1: theta + m passes pi, so the logit is cos(theta) - m sin(pi - m), not cos(theta + m)
    arcface = ArcFaceLoss(2, 2, scale=1.0, margin=0.5)
    with torch.no_grad():
        arcface.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta = math.pi - 0.1
    embedding = torch.tensor([[math.cos(theta), math.sin(theta)]])
    loss, accuracy = arcface(embedding, torch.tensor([0]))
    target = math.cos(theta) - 0.5 * math.sin(math.pi - 0.5)
    other = math.sin(theta)  # cosine to the centre of class 1
    expected = -math.log(math.exp(target) / (math.exp(target) + math.exp(other)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert target < math.cos(theta + 0.5)  # where the plain formula would have rewarded the larger angle
    assert accuracy == 0.0


@pytest.mark.parametrize("centres", ["random", "basis"])
def test_arcface_accuracy_and_finite_gradients_on_the_class_centres(centres):
    arcface = ArcFaceLoss(8, 4)
    if centres == "basis":  # cosines of exactly 1, where sqrt(1 - cos^2) has an infinite derivative
        with torch.no_grad():
            arcface.weight.copy_(torch.eye(4, 8))
    labels = torch.tensor([0, 1, 2, 3, 2])
    on_centres = (3 * arcface.weight.detach()[labels]).requires_grad_()  # theta = 0: any length
    loss, accuracy = arcface(on_centres, labels)
    loss.backward()
    assert accuracy == 1.0
    assert torch.isfinite(on_centres.grad).all() and torch.isfinite(arcface.weight.grad).all()
    _, accuracy = arcface(on_centres, torch.tensor([1, 2, 3, 0, 0]))
    assert accuracy == 0.0


def test_arcface_accuracy_ignores_the_margin():
    arcface = ArcFaceLoss(2, 2, margin=0.5)
    with torch.no_grad():
        arcface.weight.copy_(torch.eye(2))
    angle = math.radians(40)  # 40 degrees from centre 0, 50 from centre 1; with the margin 40 + 28.6 > 50
    loss, accuracy = arcface(torch.tensor([[math.cos(angle), math.sin(angle)]]), torch.tensor([0]))
    assert accuracy == 1.0
    assert loss.item() > math.log(2)  # yet the margin logit loses to the other class


def test_arcface_training_reduces_the_loss_and_separates_the_classes():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(5)
    embeddings_ = torch.eye(6)[labels] + 0.1 * torch.randn(len(labels), 6)  # four separable clusters
    arcface = ArcFaceLoss(6, 4, scale=10.0, margin=0.2)
    opt = torch.optim.SGD(arcface.parameters(), lr=0.5)
    first, _ = arcface(embeddings_, labels)
    for _ in range(50):
        loss, accuracy = arcface(embeddings_, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()
    assert accuracy == 1.0


def test_arcface_is_computed_in_float32_and_checks_its_inputs():
    embeddings_, labels = labelled_batch(p=3, k=2, d=4)
    arcface = ArcFaceLoss(4, 3)
    assert arcface(embeddings_.half(), labels)[0].dtype == torch.float32
    empty = torch.zeros(0, 4, requires_grad=True)
    loss, accuracy = arcface(empty, labels[:0])
    loss.backward()
    assert loss.item() == 0 and accuracy == 0.0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 0 to 3"):
        arcface(embeddings_, torch.tensor([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match="dimension 4, got 5"):
        arcface(torch.randn(6, 5), labels)
    with pytest.raises(ValueError, match=r"\(N, D\) embeddings and \(N,\) labels"):
        arcface(embeddings_, labels[:-1])
    with pytest.raises(ValueError, match="margin"):
        ArcFaceLoss(4, 3, margin=-0.1)
    with pytest.raises(ValueError, match="scale"):
        ArcFaceLoss(4, 3, scale=0)


def test_collapse_is_detected_after_patience_steps_and_only_then():
    from losses import CollapseDetector, embedding_spread
    alike = torch.ones(16, 8) + 1e-4 * torch.randn(16, 8)
    spread_out = torch.nn.functional.normalize(torch.randn(256, 8), dim=1)
    assert embedding_spread(alike) < 1e-3 and embedding_spread(spread_out) > 0.9
    detector = CollapseDetector(margin=0.2, patience=3)
    assert [detector.update(0.2, alike) for _ in range(5)] == [False, False, True, False, False]
    detector = CollapseDetector(margin=0.2, patience=3)
    flags = [detector.update(0.2, alike), detector.update(0.2, spread_out), detector.update(0.2, alike),
             detector.update(0.05, alike), detector.update(0.2, alike)]
    assert not any(flags)  # interrupted by a spread batch and by a loss away from the margin


# -----------------------------------------------------------------------------
# mining across the processes of a distributed run

GATHERED_LOSSES = {"batch_all": lambda: OnlineTripletLoss(0.5, "batch_all"),
                   "batch_hard": lambda: OnlineTripletLoss(0.5, "batch_hard", squared=False),
                   "semihard": lambda: OnlineTripletLoss(0.5, "semihard"),
                   "contrastive": lambda: OnlineContrastiveLoss(1.0)}


def global_batch():
    """16 inputs of 4 identities x 4 images, in identity blocks as the P x K sampler gives them."""
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(5)), torch.arange(4).repeat_interleave(4)


def loss_and_gradient(network, inputs, labels, name):
    """(loss, the network's weight gradient) of an in-batch loss on L2-normalised embeddings."""
    embeddings, labels = gather_batch(F.normalize(network(inputs)), labels)
    value = GATHERED_LOSSES[name]()(embeddings, labels)[0]
    value.backward()
    weights = network.module.weight if hasattr(network, "module") else network.weight
    grad = weights.grad.clone()
    network.zero_grad()
    return value.item(), grad


def gathered_worker(rank, world_size, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    network = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(6, 5))
    inputs, labels = global_batch()
    mine = slice(rank * 8, (rank + 1) * 8)  # two identities each
    results = {name: loss_and_gradient(network, inputs[mine], labels[mine], name) for name in GATHERED_LOSSES}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_gathered_mining_matches_one_process_on_the_global_batch(tmp_path):
    mp.spawn(gathered_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    network = torch.nn.Linear(6, 5)
    inputs, labels = global_batch()
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name in GATHERED_LOSSES:
            value, grad = loss_and_gradient(network, inputs, labels, name)
            assert value > 0.01, name  # the comparison means something
            assert abs(results[name][0] - value) < 1e-5, name
            torch.testing.assert_close(results[name][1], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_gather_batch_outside_a_distributed_run_returns_its_inputs():
    embeddings, labels = torch.randn(4, 3), torch.arange(4)
    gathered = gather_batch(embeddings, labels)
    assert gathered[0] is embeddings and gathered[1] is labels
