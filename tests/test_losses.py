import math

import pytest
import torch
import torch.nn.functional as F

from distill import Distillation
from losses import (ARCFACE_FORMS, OBJECTIVES, ArcFaceLoss, ContrastiveLoss, CosFaceLoss, PairClassifierLoss,
                    TripletLoss, batch_rows, build_objective, pair_distance, pairwise_distances)
from mining import MINING
from partial_fc import PartialFC


def embeddings(n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) for _ in range(3))


def stacked(*parts):
    """The batch that collate_rows makes of row-aligned parts (N, D) each: the parts concatenated, and rows (N, k)
    with rows[b] = [b, N + b, 2N + b, ...]."""
    n = len(parts[0])
    return torch.cat(parts), torch.arange(n)[:, None] + n * torch.arange(len(parts))[None, :]


def triplet_batch(a, p, n):
    """(embeddings, labels, rows) of the triplets (a[i], p[i], n[i]): anchor and positive of identity i, the
    negative of identity N + i."""
    batch, rows = stacked(a, p, n)
    identity = torch.arange(len(a))
    return batch, torch.cat([identity, identity, identity + len(a)]), rows


def pair_batch(e1, e2, same):
    """(embeddings, labels, rows) of the pairs (e1[i], e2[i]), of one person where same[i] is true."""
    batch, rows = stacked(e1, e2)
    identity = torch.arange(len(e1))
    return batch, torch.cat([identity, torch.where(torch.as_tensor(same).bool(), identity, identity + len(e1))]), rows


def triplet_loss(margin, a, p, n, squared=True):
    return TripletLoss(margin, squared)(*triplet_batch(a, p, n))


# -----------------------------------------------------------------------------
# triplet loss on given rows

@pytest.mark.parametrize("margin", [0.05, 0.2, 1.0])
def test_plain_distance_matches_torch_triplet_margin_loss(margin):
    a, p, n = embeddings()
    ours, _ = triplet_loss(margin, a, p, n, squared=False)
    reference = F.triplet_margin_loss(a, p, n, margin=margin, p=2, eps=0)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_squared_distance_matches_a_brute_force_loop():
    a, p, n = embeddings(seed=1)
    margin, losses = 0.5, []
    for i in range(len(a)):
        d_ap = sum((a[i, k] - p[i, k]) ** 2 for k in range(a.shape[1]))
        d_an = sum((a[i, k] - n[i, k]) ** 2 for k in range(a.shape[1]))
        losses.append(max(0.0, float(d_ap - d_an) + margin))
    loss, stats = triplet_loss(margin, a, p, n)
    assert loss.item() == pytest.approx(sum(losses) / len(a), rel=1e-5)
    assert stats["active"] == pytest.approx(sum(x > 0 for x in losses) / len(a))


def test_hand_computed_case_with_rows_sharing_embeddings():
    # one anchor [0, 0] and one positive [1, 0] (d = 1) in both rows; negatives [2, 0] (d = 2) and [0, 1] (d = 1)
    batch = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([1, 0, 2, 0])
    rows = torch.tensor([[1, 3, 0], [1, 3, 2]])
    # squared: max(0, 1 - 4 + 0.5) = 0 and max(0, 1 - 1 + 0.5) = 0.5 -> mean 0.25, one row of two active
    loss, stats = TripletLoss(0.5)(batch, labels, rows)
    assert loss.item() == pytest.approx(0.25) and stats == {"active": 0.5}
    # plain, margin 1.5: max(0, 1 - 2 + 1.5) = 0.5 and 1.5 -> 1.0
    loss, stats = TripletLoss(1.5, squared=False)(batch, labels, rows)
    assert loss.item() == pytest.approx(1.0) and stats == {"active": 1.0}


@pytest.mark.parametrize("squared", [True, False])
def test_coinciding_embeddings_give_finite_gradients(squared):
    a = torch.ones(4, 8, requires_grad=True)
    p = torch.ones(4, 8, requires_grad=True)  # identical to the anchor: d(a, p) = 0
    n = torch.ones(4, 8, requires_grad=True)
    loss, stats = triplet_loss(0.2, a, p, n, squared=squared)
    loss.backward()
    assert loss.item() == pytest.approx(0.2) and stats["active"] == 1.0
    for t in (a, p, n):
        assert torch.isfinite(t.grad).all()


def test_gradient_pulls_positive_in_and_pushes_negative_out():
    a = torch.zeros(1, 2)
    p = torch.tensor([[1.0, 0.0]], requires_grad=True)
    n = torch.tensor([[0.5, 0.0]], requires_grad=True)
    triplet_loss(0.2, a, p, n)[0].backward()
    assert p.grad[0, 0] > 0  # descending moves p towards the anchor
    assert n.grad[0, 0] < 0  # and n away from it


def test_half_precision_input_is_computed_in_float32():
    a, p, n = embeddings(seed=2)
    loss, _ = triplet_loss(0.2, a.half(), p.half(), n.half())
    assert loss.dtype == torch.float32
    assert pair_distance(a.half(), p.half()).dtype == torch.float32


def assert_rejected(loss, batch, labels, rows, bad_rows):
    """Each of `bad_rows`, labels of another length or dtype, and a single embedding vector are ValueErrors."""
    for bad in bad_rows:
        with pytest.raises(ValueError):
            loss(batch, labels, bad)
    for bad_batch, bad_labels, some_rows in ((batch, labels[:-1], rows), (batch[0], labels[:1], rows[:1]),
                                             (batch, labels.float(), rows)):
        with pytest.raises(ValueError):
            loss(bad_batch, bad_labels, some_rows)


def test_bad_inputs_are_rejected():
    batch, labels, rows = triplet_batch(*embeddings())
    assert_rejected(TripletLoss(), batch, labels, rows,
                    (None, rows[:, :2], rows[:, 0], rows.float(), rows.clamp_max(len(batch) - 1) + 1, rows - 1))
    with pytest.raises(ValueError):
        TripletLoss(margin=-1)
    with pytest.raises(ValueError):
        TripletLoss(mining="hardest")


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


MINED = MINING[1:]


@pytest.mark.parametrize("mining", MINED)
@pytest.mark.parametrize("squared", [True, False])
def test_mining_matches_brute_force(mining, squared):
    embeddings, labels = labelled_batch(seed=3)
    embeddings = F.normalize(embeddings, dim=1)
    margin = 0.5 if squared else 0.3
    loss, stats = TripletLoss(margin, squared, mining)(embeddings, labels)
    expected, expected_fraction = brute_force(embeddings, labels, margin, mining, squared)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert stats["active"] == pytest.approx(expected_fraction)
    assert 0 < stats["active"] <= 1


def test_semihard_prefers_the_nearest_negative_beyond_the_positive():
    # 1-D: anchor 0, positive at 1 (d=1); negatives at 0.5 (hard), 1.2 and 1.4 (semi-hard, margin 0.5)
    embeddings = torch.tensor([[0.0], [1.0], [0.5], [1.2], [1.4]])
    labels = torch.tensor([0, 0, 1, 2, 3])
    mine = TripletLoss(0.5, squared=False, mining="semihard")
    loss, _ = mine(embeddings[:2], labels[:2])  # only one identity: no triplet
    assert loss.item() == 0
    # anchor 0 with positive 1: semi-hard negative 1.2 -> 1 - 1.2 + 0.5 = 0.3; anchor 1 with positive 0:
    # distances to negatives 0.5, 0.2, 0.4, none beyond 1 -> hardest (0.2): 1 - 0.2 + 0.5 = 1.3
    per_pair = brute_force(embeddings, labels, 0.5, "semihard", squared=False)[0]
    assert per_pair == pytest.approx((0.3 + 1.3) / 2)
    assert mine(embeddings, labels)[0].item() == pytest.approx(per_pair)


@pytest.mark.parametrize("mining", MINED)
@pytest.mark.parametrize("squared", [True, False])
def test_mining_with_identical_embeddings_has_finite_gradients(mining, squared):
    embeddings = torch.ones(8, 4, requires_grad=True)  # duplicates everywhere: all distances 0
    labels = torch.arange(2).repeat_interleave(4)
    loss, stats = TripletLoss(0.2, squared, mining)(embeddings, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.2, abs=1e-3)
    assert stats["active"] == 1.0 and torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("mining", MINED)
def test_batch_without_valid_triplet_gives_zero_not_nan(mining):
    embeddings = torch.randn(4, 3, requires_grad=True)
    for labels in (torch.zeros(4, dtype=torch.long), torch.arange(4)):  # one identity; all different
        loss, stats = TripletLoss(0.2, mining=mining)(embeddings, labels)
        loss.backward()
        assert loss.item() == 0 and stats["active"] == 0 and torch.isfinite(embeddings.grad).all()


def test_mining_is_computed_in_float32_ignores_rows_and_checks_its_inputs():
    embeddings, labels = labelled_batch()
    mine = TripletLoss(0.2, mining="batch_all")
    loss, _ = mine(embeddings.half(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(mine(embeddings, labels, torch.tensor([[0, 1, 3]]))[0], mine(embeddings, labels)[0])
    with pytest.raises(ValueError):
        mine(embeddings, labels[:-1])


def test_pairwise_distances_match_cdist():
    embeddings, _ = labelled_batch(seed=5)
    distances = pairwise_distances(embeddings, squared=False)
    off_diagonal = ~torch.eye(len(embeddings), dtype=torch.bool)
    torch.testing.assert_close(distances[off_diagonal], torch.cdist(embeddings, embeddings)[off_diagonal],
                               atol=1e-4, rtol=1e-4)
    assert (pairwise_distances(embeddings).diagonal() == 0).all()


# -----------------------------------------------------------------------------
# contrastive loss

def contrastive_by_loop(e1, e2, same, margin):
    """The contrastive loss of pairs (e1[i], e2[i]) by an explicit loop in Python floats (same: 1 = one person)."""
    total = 0.0
    for x, y, s in zip(e1.tolist(), e2.tolist(), same.tolist()):
        d = sum((a - b) ** 2 for a, b in zip(x, y)) ** 0.5
        total += d ** 2 if s else max(0.0, margin - d) ** 2
    return total / len(same)


def test_contrastive_hand_computed_case():
    e1 = torch.zeros(3, 2)
    e2 = torch.tensor([[3.0, 4.0], [0.6, 0.8], [3.0, 4.0]])  # distances 5, 1, 5
    batch = pair_batch(e1, e2, [1, 0, 0])
    # same at d=5: 25; different at d=1 within margin 2: (2 - 1)^2 = 1; different at d=5: 0 -> mean 26 / 3
    loss, stats = ContrastiveLoss(2.0)(*batch)
    assert loss.item() == pytest.approx(26 / 3) and stats["active"] == pytest.approx(2 / 3)
    assert ContrastiveLoss(0.0)(*batch)[0].item() == pytest.approx(25 / 3)


@pytest.mark.parametrize("margin", [0.5, 1.0, 4.0])
def test_contrastive_matches_a_brute_force_loop(margin):
    e1, e2, _ = embeddings(seed=4)
    same = torch.arange(len(e1)) % 3 != 0
    expected = contrastive_by_loop(e1, e2, same, margin)
    assert ContrastiveLoss(margin)(*pair_batch(e1, e2, same))[0].item() == pytest.approx(expected, rel=1e-5)
    assert ContrastiveLoss(margin)(*pair_batch(e1.half(), e2.half(), same))[0].dtype == torch.float32


def test_contrastive_gradient_pulls_same_and_pushes_different_apart():
    e1 = torch.zeros(2, 2)
    e2 = torch.tensor([[1.0, 0.0], [0.5, 0.0]], requires_grad=True)
    ContrastiveLoss(1.0)(*pair_batch(e1, e2, [1, 0]))[0].backward()
    # d/dx of x^2 / 2 = x, and of (1 - x)^2 / 2 = x - 1, at x = 1 and x = 0.5 (the mean halves both)
    torch.testing.assert_close(e2.grad, torch.tensor([[1.0, 0.0], [-0.5, 0.0]]))
    assert e2.grad[0, 0] > 0  # descending moves the same person's embedding towards e1
    assert e2.grad[1, 0] < 0  # and the other person's away from it


def test_contrastive_coinciding_embeddings_give_finite_gradients():
    e1 = torch.ones(4, 3, requires_grad=True)
    e2 = torch.ones(4, 3, requires_grad=True)
    loss, stats = ContrastiveLoss(0.5)(*pair_batch(e1, e2, [1, 1, 0, 0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.5 ** 2 / 2, abs=1e-5)  # the two different pairs, at distance 0
    assert stats["active"] == 0.5
    assert torch.isfinite(e1.grad).all() and torch.isfinite(e2.grad).all()


def test_contrastive_rejects_bad_inputs():
    batch, labels, rows = pair_batch(*list(embeddings())[:2], torch.ones(16))
    assert_rejected(ContrastiveLoss(), batch, labels, rows,
                    (None, torch.cat([rows, rows[:, :1]], dim=1), rows + 1, rows.float()))
    with pytest.raises(ValueError):
        ContrastiveLoss(margin=-0.1)
    with pytest.raises(ValueError):
        ContrastiveLoss(mining="hardest")


def every_pair(n):
    """Rows (n (n - 1) / 2, 2) of the pairs i < j."""
    return torch.triu_indices(n, n, offset=1).T


@pytest.mark.parametrize("mining", MINED)
@pytest.mark.parametrize("margin", [0.5, 1.5])
def test_mined_contrastive_equals_the_loss_over_every_pair(mining, margin):
    embeddings_, labels = labelled_batch(seed=6)
    embeddings_ = F.normalize(embeddings_, dim=1)
    rows = every_pair(len(labels))
    expected, expected_stats = ContrastiveLoss(margin)(embeddings_, labels, rows)
    loss, stats = ContrastiveLoss(margin, mining)(embeddings_, labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    i, j = rows.T
    same, d = labels[i] == labels[j], (embeddings_[i] - embeddings_[j]).norm(dim=1)
    expected_fraction = (same & (d > 0) | ~same & (d < margin)).float().mean().item()
    assert stats["active"] == pytest.approx(expected_fraction) == expected_stats["active"]
    assert 0 < stats["active"] < 1
    assert loss.item() == pytest.approx(contrastive_by_loop(embeddings_[i], embeddings_[j], same, margin), rel=1e-4)


def test_mined_contrastive_hand_computed_fraction():
    # 1-D, margin 1: same pair (0, 3) at distance 0 is inactive; different pairs at 0.5 active, at 2 and 1.5 not
    embeddings_ = torch.tensor([[0.0], [0.5], [2.0], [0.0]])
    labels = torch.tensor([0, 1, 2, 0])
    loss, stats = ContrastiveLoss(1.0, "batch_all")(embeddings_, labels)
    # pairs: (0,1) d=.5 diff -> .25; (0,2) d=2 diff -> 0; (0,3) same d=0 -> 0; (1,2) d=1.5 diff -> 0;
    # (1,3) d=.5 diff -> .25; (2,3) d=2 diff -> 0
    assert loss.item() == pytest.approx(0.5 / 6)
    assert stats["active"] == pytest.approx(2 / 6)


def test_mined_contrastive_without_pairs_gives_zero_and_finite_gradients():
    mine = ContrastiveLoss(1.0, "batch_all")
    for n in (0, 1):
        embeddings_ = torch.randn(n, 3, requires_grad=True)
        loss, stats = mine(embeddings_, torch.zeros(n, dtype=torch.long))
        loss.backward()
        assert loss.item() == 0 and stats["active"] == 0 and torch.isfinite(embeddings_.grad).all()
    coinciding = torch.ones(6, 4, requires_grad=True)
    loss, stats = mine(coinciding, torch.arange(3).repeat_interleave(2))
    loss.backward()
    assert loss.item() == pytest.approx(12 / 15, abs=1e-5)  # 12 of the 15 pairs: different people at distance 0
    assert stats["active"] == pytest.approx(12 / 15) and torch.isfinite(coinciding.grad).all()
    with pytest.raises(ValueError):
        mine(coinciding, torch.arange(5))


# -----------------------------------------------------------------------------
# the pair classifier

def test_pair_classifier_gives_one_symmetric_logit_per_pair_with_gradients():
    torch.manual_seed(0)
    head = PairClassifierLoss(8, hidden_dim=16)
    e1, e2 = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    logits = head.logits(e1, e2)
    assert logits.shape == (5,)
    assert torch.equal(logits, head.logits(e2, e1))
    assert logits.unique().numel() == 5  # a score per pair, not a constant
    assert head.logits(e1[:1], e2[:1]).shape == (1,)
    logits.sum().backward()
    for tensor in (e1, e2, *head.parameters()):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_pair_classifier_rebuilds_from_its_config_with_the_same_state_dict_keys():
    torch.manual_seed(0)
    head = PairClassifierLoss(8, hidden_dim=16)
    assert head.config == dict(embedding_dim=8, hidden_dim=16)
    assert list(head.state_dict()) == ["classifier.0.weight", "classifier.0.bias", "classifier.2.weight",
                                       "classifier.2.bias"]
    rebuilt = PairClassifierLoss(**head.config)
    rebuilt.load_state_dict(head.state_dict())
    e1, e2 = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(rebuilt.logits(e1, e2), head.logits(e1, e2), rtol=0, atol=0)


def test_pair_classifier_refuses_embeddings_that_do_not_fit():
    head = PairClassifierLoss(8)
    for e1, e2 in ((torch.randn(3, 8), torch.randn(2, 8)), (torch.randn(3, 4), torch.randn(3, 4)),
                   (torch.randn(8), torch.randn(8))):
        with pytest.raises(ValueError):
            head.logits(e1, e2)
    batch, labels, rows = pair_batch(torch.randn(3, 4), torch.randn(3, 4), [1, 0, 1])
    with pytest.raises(ValueError):
        head(batch, labels, rows)
    for bad_rows in (None, rows[:, :1], rows + 1):
        with pytest.raises(ValueError):
            PairClassifierLoss(4)(batch, labels, bad_rows)


def test_pair_classifier_loss_is_bce_against_same_person_as_1():
    torch.manual_seed(0)
    head = PairClassifierLoss(8, hidden_dim=16)
    e1, e2 = torch.randn(6, 8), torch.randn(6, 8)
    same = torch.tensor([1, 0, 1, 1, 0, 0])
    loss, stats = head(*pair_batch(e1.half(), e2.half(), same))
    logits = head.logits(e1.half(), e2.half())
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, same.float()))
    assert loss.dtype == torch.float32
    assert stats == {"accuracy": pytest.approx(((logits > 0).long() == same).float().mean().item())}


def test_pair_classifier_on_a_batch_weighs_its_pairs_of_one_person_and_of_two_half_each():
    torch.manual_seed(0)
    rows_head = PairClassifierLoss(8, hidden_dim=16)
    head = PairClassifierLoss(8, hidden_dim=16, mining="batch_all")
    head.load_state_dict(rows_head.state_dict())
    assert head.rows is None and rows_head.rows == "pairs"
    batch, labels = torch.randn(6, 8, requires_grad=True), torch.tensor([0, 0, 0, 1, 1, 2])
    loss, stats = head(batch, labels, rows=torch.zeros(1, 2, dtype=torch.long))  # rows are ignored
    pairs = torch.combinations(torch.arange(6))  # 15 pairs: 4 of one person, 11 of two
    same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    logits = head.logits(batch[pairs[:, 0]], batch[pairs[:, 1]])
    each = F.binary_cross_entropy_with_logits(logits, same.float(), reduction="none")
    torch.testing.assert_close(loss, (each[same].mean() + each[~same].mean()) / 2)
    assert stats == {"accuracy": pytest.approx(((logits > 0) == same).float().mean().item())}
    loss.backward()
    assert torch.isfinite(batch.grad).all() and batch.grad.abs().sum() > 0
    one_kind = head(batch[:3], labels[:3])[0]  # only pairs of one person: their plain mean
    torch.testing.assert_close(one_kind, F.binary_cross_entropy_with_logits(
        head.logits(batch[[0, 0, 1]], batch[[1, 2, 2]]), torch.ones(3)))
    with pytest.raises(ValueError):
        PairClassifierLoss(8, mining="semihard")


def test_pair_classifier_learns_same_from_different_pairs_with_bce():
    torch.manual_seed(0)
    head = PairClassifierLoss(8, hidden_dim=16)
    anchors = F.normalize(torch.randn(64, 8), dim=1)
    same = F.normalize(anchors + 0.1 * torch.randn(64, 8), dim=1)
    other = F.normalize(torch.randn(64, 8), dim=1)
    batch = pair_batch(torch.cat([anchors, anchors]), torch.cat([same, other]), torch.arange(128) < 64)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.03)
    for _ in range(60):
        optimizer.zero_grad()
        loss, _ = head(*batch)
        loss.backward()
        optimizer.step()
    assert head(*batch)[1]["accuracy"] > 0.95


# -----------------------------------------------------------------------------
# ArcFace

@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_arcface_without_margin_is_the_scaled_cosine_softmax(scale):
    embeddings_, labels = labelled_batch(p=5, k=2, d=6, seed=7)
    arcface = ArcFaceLoss(6, 5, scale=scale, margin=0.0)
    loss, stats = arcface(embeddings_, labels)
    cos = F.normalize(embeddings_, dim=1) @ F.normalize(arcface.weight.detach(), dim=1).T
    torch.testing.assert_close(loss, F.cross_entropy(scale * cos, labels))
    assert stats["accuracy"] == pytest.approx((cos.argmax(dim=1) == labels).float().mean().item())


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
    loss, stats = arcface(embedding, torch.tensor([0]))
    target = math.cos(theta) - 0.5 * math.sin(math.pi - 0.5)
    other = math.sin(theta)  # cosine to the centre of class 1
    expected = -math.log(math.exp(target) / (math.exp(target) + math.exp(other)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert target < math.cos(theta + 0.5)  # where the plain formula would have rewarded the larger angle
    assert stats["accuracy"] == 0.0


@pytest.mark.parametrize("centres", ["random", "basis"])
def test_arcface_accuracy_and_finite_gradients_on_the_class_centres(centres):
    arcface = ArcFaceLoss(8, 4)
    if centres == "basis":  # cosines of exactly 1, where sqrt(1 - cos^2) has an infinite derivative
        with torch.no_grad():
            arcface.weight.copy_(torch.eye(4, 8))
    labels = torch.tensor([0, 1, 2, 3, 2])
    on_centres = (3 * arcface.weight.detach()[labels]).requires_grad_()  # theta = 0: any length
    loss, stats = arcface(on_centres, labels)
    loss.backward()
    assert stats["accuracy"] == 1.0
    assert torch.isfinite(on_centres.grad).all() and torch.isfinite(arcface.weight.grad).all()
    assert arcface(on_centres, torch.tensor([1, 2, 3, 0, 0]))[1]["accuracy"] == 0.0


def test_arcface_accuracy_ignores_the_margin():
    arcface = ArcFaceLoss(2, 2, margin=0.5)
    with torch.no_grad():
        arcface.weight.copy_(torch.eye(2))
    angle = math.radians(40)  # 40 degrees from centre 0, 50 from centre 1; with the margin 40 + 28.6 > 50
    loss, stats = arcface(torch.tensor([[math.cos(angle), math.sin(angle)]]), torch.tensor([0]))
    assert stats["accuracy"] == 1.0
    assert loss.item() > math.log(2)  # yet the margin logit loses to the other class


def test_arcface_training_reduces_the_loss_and_separates_the_classes():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(5)
    embeddings_ = torch.eye(6)[labels] + 0.1 * torch.randn(len(labels), 6)  # four separable clusters
    arcface = ArcFaceLoss(6, 4, scale=10.0, margin=0.2)
    opt = torch.optim.SGD(arcface.parameters(), lr=0.5)
    first, _ = arcface(embeddings_, labels)
    for _ in range(50):
        loss, stats = arcface(embeddings_, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()
    assert stats["accuracy"] == 1.0


def test_arcface_is_computed_in_float32_ignores_rows_and_checks_its_inputs():
    embeddings_, labels = labelled_batch(p=3, k=2, d=4)
    arcface = ArcFaceLoss(4, 3)
    assert arcface(embeddings_.half(), labels)[0].dtype == torch.float32
    torch.testing.assert_close(arcface(embeddings_, labels, torch.tensor([[0, 1]]))[0], arcface(embeddings_, labels)[0])
    empty = torch.zeros(0, 4, requires_grad=True)
    loss, stats = arcface(empty, labels[:0])
    loss.backward()
    assert loss.item() == 0 and stats["accuracy"] == 0.0
    for bad_labels in (torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 1, 2, -1, 0, 1]), labels[:-1]):
        with pytest.raises(ValueError):
            arcface(embeddings_, bad_labels)
    with pytest.raises(ValueError):
        arcface(torch.randn(6, 5), labels)
    for options in (dict(margin=-0.1), dict(margin=math.pi), dict(scale=0)):
        with pytest.raises(ValueError):
            ArcFaceLoss(4, 3, **options)
    with pytest.raises(ValueError):
        ArcFaceLoss(4, 0)


def cross_entropy_as_arcface_torch(logits, labels, scale):
    """arcface_torch's cross-entropy of scale * `logits` (N, C), written out: each sample's loss -log(max(p, 1e-30))
    of its label's softmax probability p, their mean; its backward the softmax less the one-hot labels, over N,
    whatever the cap, handed to `logits`. Returns the loss."""
    rows = torch.arange(len(labels))
    p = torch.softmax(scale * logits.detach(), dim=1)
    loss = -p[rows, labels].clamp_min(1e-30).log().mean()
    (scale * logits).backward((p - F.one_hot(labels, logits.shape[1])) / len(labels))
    return loss


def arcface_torch_logits(cos, labels, margin):
    """arcface_torch's ArcFace as it computes it: the cosines clamped to [-1, 1], then, without a gradient and in
    place, arccos of every one, the margin added to the label's angle, and the cosine of every one."""
    logits = cos.clamp(-1, 1)
    rows = torch.arange(len(labels))
    with torch.no_grad():
        target = logits[rows, labels].arccos() + margin
        logits.arccos_()
        logits[rows, labels] = target
        logits.cos_()
    return logits


def paper_logits(cos, labels, margin):
    """The paper's ArcFace, differentiated as it stands: the label's logit cos(theta + margin), or cos(theta) -
    margin * sin(pi - margin) where theta + margin would pass pi."""
    theta = torch.acos(cos.gather(1, labels[:, None]))
    target = torch.where(theta + margin < math.pi, torch.cos(theta + margin),
                         torch.cos(theta) - margin * math.sin(math.pi - margin))
    return cos.scatter(1, labels[:, None], target)


def far_batch(seed=0, n=12, d=8, classes=5):
    """(embeddings, labels, centres) at scale 64's usual start: a third of the embeddings near the opposite of
    their own centre (theta + 0.5 past pi), the others at random."""
    g = torch.Generator().manual_seed(seed)
    centres, labels = torch.randn(classes, d, generator=g), torch.arange(n) % classes
    embeddings = torch.randn(n, d, generator=g)
    embeddings[::3] = -F.normalize(centres[labels[::3]], dim=1) + 0.1 * torch.randn(len(labels[::3]), d, generator=g)
    return embeddings, labels, centres


@pytest.mark.parametrize("form,formula", [("paper", paper_logits), ("arcface_torch", arcface_torch_logits)])
@pytest.mark.parametrize("sharded", [False, True])
def test_each_arcface_form_is_its_formula_in_value_and_gradient(form, formula, sharded):
    embeddings_, labels, centres = far_batch()
    arcface = ArcFaceLoss(8, 5, scale=64.0, margin=0.5, form=form)
    with torch.no_grad():
        arcface.weight.copy_(centres)
    objective = PartialFC(arcface, num_classes=5) if sharded else arcface  # (sample rate 1)
    mine = embeddings_.clone().requires_grad_()
    loss, _ = objective(mine, labels)
    loss.backward()
    theirs, their_centres = embeddings_.clone().requires_grad_(), centres.clone().requires_grad_()
    cos = F.normalize(theirs, dim=1) @ F.normalize(their_centres, dim=1).T
    assert (cos.gather(1, labels[:, None]) <= math.cos(math.pi - 0.5)).sum() == 4  # theta + m past pi: 4 rows
    reference = cross_entropy_as_arcface_torch(formula(cos, labels, 0.5), labels, 64.0)
    torch.testing.assert_close(loss, reference, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(arcface.weight.grad, their_centres.grad, atol=1e-5, rtol=1e-4)


def test_the_two_arcface_forms_differ_past_pi_in_value_and_before_it_in_gradient():
    embeddings_, labels, centres = far_batch(seed=1)
    losses, grads = {}, {}
    for form in ARCFACE_FORMS:
        arcface = ArcFaceLoss(8, 5, scale=16.0, margin=0.5, form=form)  # (at 64 both far losses pass the cap)
        with torch.no_grad():
            arcface.weight.copy_(centres)
        mine = embeddings_.clone().requires_grad_()
        losses[form], _ = arcface(mine, labels)
        losses[form].backward()
        grads[form] = mine.grad
    assert abs(losses["paper"].item() - losses["arcface_torch"].item()) > 0.1
    near = slice(1, None, 3)  # rows at random angles, theta + m before pi: the same logit, not the same gradient
    assert not torch.allclose(grads["paper"][near], grads["arcface_torch"][near], rtol=0.01)


def test_margin_softmax_losses_are_capped_in_value_as_arcface_torchs_not_in_gradient():
    embeddings_, labels, centres = far_batch(seed=2)
    cosface = CosFaceLoss(8, 5, scale=64.0, margin=0.35)
    with torch.no_grad():
        cosface.weight.copy_(centres)
    mine, theirs = embeddings_.clone().requires_grad_(), embeddings_.clone().requires_grad_()
    loss, _ = cosface(mine, labels)
    loss.backward()
    cos = F.normalize(theirs, dim=1) @ F.normalize(centres, dim=1).T
    logits = 64.0 * (cos - 0.35 * F.one_hot(labels, 5))
    uncapped = F.cross_entropy(logits, labels, reduction="none")
    assert (uncapped > -math.log(1e-30)).any()  # samples the cap holds
    torch.testing.assert_close(loss, uncapped.clamp_max(-math.log(1e-30)).mean())
    uncapped.mean().backward()
    torch.testing.assert_close(mine.grad, theirs.grad)


# -----------------------------------------------------------------------------
# CosFace

def test_cosface_subtracts_its_margin_from_the_label_cosine():
    embeddings_, labels = labelled_batch(p=5, k=2, d=6, seed=9)
    cosface = CosFaceLoss(6, 5, scale=64.0, margin=0.35)
    loss, stats = cosface(embeddings_, labels)
    cos = F.normalize(embeddings_, dim=1) @ F.normalize(cosface.weight.detach(), dim=1).T
    per_sample = F.cross_entropy(64.0 * (cos - 0.35 * F.one_hot(labels, 5)), labels, reduction="none")
    torch.testing.assert_close(loss, per_sample.clamp_max(-math.log(1e-30)).mean(), atol=1e-4, rtol=1e-4)
    assert stats["accuracy"] == pytest.approx((cos.argmax(dim=1) == labels).float().mean().item())
    loss.backward()
    assert torch.isfinite(cosface.weight.grad).all() and cosface.weight.grad.abs().sum() > 0
    plain = CosFaceLoss(6, 5, scale=64.0, margin=0.0)
    with torch.no_grad():
        plain.weight.copy_(cosface.weight)
    assert plain(embeddings_, labels)[0] < loss  # the margin makes the same centres cost more
    assert isinstance(build_objective("cosface", embedding_dim=6, num_classes=5, cosface_margin=0.2), CosFaceLoss)
    for options in (dict(margin=-0.1), dict(margin=2.0), dict(scale=0)):
        with pytest.raises(ValueError):
            CosFaceLoss(4, 3, **options)


# -----------------------------------------------------------------------------
# one interface: build_objective

COMBINATIONS = [(loss, mining) for loss in OBJECTIVES for mining in MINING
                if mining in OBJECTIVES[loss].mining and loss != "none"]


def interface_batch(rows_kind, n=0):
    """A labelled batch of 4 identities x 3 images (8-d) or of n = 0, with index rows of `rows_kind`."""
    batch, labels = labelled_batch(p=4, k=3, d=8, seed=9)
    if n == 0:
        batch, labels = batch[:0], labels[:0]
    batch.requires_grad_()
    if rows_kind is None:
        return batch, labels, None
    # each image as anchor, the next of its identity as positive, the first of the next identity as negative
    i = torch.arange(len(labels))
    anchor, positive, negative = i, labels * 3 + (i + 1) % 3, (labels + 1) % 4 * 3
    if rows_kind == "triplets":
        return batch, labels, torch.stack([anchor, positive, negative], dim=1)
    return batch, labels, torch.stack([anchor, torch.where(i % 2 == 0, positive, negative)], dim=1)


@pytest.mark.parametrize("loss,mining", COMBINATIONS)
def test_every_objective_obeys_the_one_interface(loss, mining):
    objective = build_objective(loss, mining=mining, embedding_dim=8, num_classes=4)
    expected_rows = {"triplet": "triplets", "contrastive": "pairs", "pair_bce": "pairs", "arcface": None,
                     "cosface": None}[loss]
    assert objective.rows == (expected_rows if mining == "none" else None)
    assert objective.stat == ("active" if loss in ("triplet", "contrastive") else "accuracy")
    for n in (12, 0):  # an empty batch too: a zero that still backpropagates
        batch, labels, rows = interface_batch(objective.rows, n)
        value, stats = objective(batch, labels, rows)
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value)
        value.backward()
        assert batch.grad is not None and torch.isfinite(batch.grad).all()
        assert objective.stat in stats and all(type(v) is float for v in stats.values())
        assert 0 <= stats[objective.stat] <= 1
        assert n or (value.item() == 0 and stats[objective.stat] == 0)


def test_no_objective_is_a_zero_that_backpropagates_on_any_images():
    """loss none: the teacher's term alone trains; labels and rows are ignored, and its stat is the teacher's."""
    objective = build_objective("none", embedding_dim=8, num_classes=4)
    assert objective.rows == batch_rows("none") == "images"
    batch = torch.randn(5, 8, requires_grad=True)
    value, stats = objective(batch, torch.zeros(5, dtype=torch.int64))
    value.backward()
    assert value.item() == 0 and stats == {} and torch.equal(batch.grad, torch.zeros(5, 8))
    assert objective.stat == "teacher_cosine" and "teacher_cosine" in Distillation(8, 8)(batch, batch)[1]


def test_build_objective_passes_its_options():
    triplet = build_objective("triplet", mining="semihard", margin=0.3, squared=False)
    assert (triplet.margin, triplet.squared, triplet.mining) == (0.3, False, "semihard")
    assert build_objective("contrastive", margin=1.5).margin == 1.5
    assert build_objective("pair_bce", embedding_dim=16, pair_hidden_dim=32).config == dict(embedding_dim=16,
                                                                                          hidden_dim=32)
    arcface = build_objective("arcface", mining="batch_hard", embedding_dim=16, num_classes=7, arcface_scale=10.0,
                              arcface_margin=0.3)
    assert arcface.weight.shape == (7, 16) and (arcface.scale, arcface.margin, arcface.form) == (10.0, 0.3, "paper")
    assert build_objective("arcface", embedding_dim=16, num_classes=7, arcface_form="arcface_torch").form == \
        "arcface_torch"


def test_build_objective_rejects_bad_combinations_and_unknown_names():
    for mining in set(MINING) - set(OBJECTIVES["pair_bce"].mining):
        with pytest.raises(ValueError):
            build_objective("pair_bce", mining=mining)
    with pytest.raises(ValueError):
        build_objective("siamese")
    with pytest.raises(ValueError):
        build_objective("triplet", mining="hardest")


def test_a_pair_of_one_person_is_same_1():
    anchor = torch.randn(1, 8)
    for loss in ("contrastive", "pair_bce"):
        objective = build_objective(loss, embedding_dim=8)
        same, _ = objective(*pair_batch(anchor, anchor, [1]))
        different, _ = objective(*pair_batch(anchor, anchor, [0]))
        if loss == "contrastive":  # coinciding embeddings: nothing to learn for one person, all for two
            assert same.item() == 0 and different.item() > 0
        else:
            logit = objective.logits(anchor, anchor)
            torch.testing.assert_close(same, F.binary_cross_entropy_with_logits(logit, torch.ones(1)))
            torch.testing.assert_close(different, F.binary_cross_entropy_with_logits(logit, torch.zeros(1)))
