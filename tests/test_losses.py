import pytest
import torch
import torch.nn.functional as F

from losses import TripletLoss, pair_distance


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
