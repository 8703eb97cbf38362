"""The miners: which triplets and pairs of a labelled batch (e.g. a P x K sampler's) an objective learns from.
MINING names them; losses.py's objectives call them."""
import torch

MINING = ("none", "batch_all", "batch_hard", "semihard")


def check_mining(mining):
    if mining not in MINING:
        raise ValueError(f"mining must be one of {', '.join(MINING)}, got {mining!r}")


def all_pairs(count, device):
    """(first, second) index columns of every pair i < j of a batch of `count`: the pairs a batch_all pair
    objective learns from."""
    return torch.triu_indices(count, count, offset=1, device=device)


def mined_triplet_losses(d, labels, margin, mining):
    """Per-triplet losses max(0, d(a, p) - d(a, n) + margin) of the triplets `mining` picks in a labelled batch,
    from its (N, N) distances d and (N,) labels on d's device (see losses.TripletLoss); empty when there is none."""
    if len(labels) == 0:  # (the reductions over a row below fail on an empty one)
        return d.new_zeros(0)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=d.device)
    positive, negative = same & ~eye, ~same
    hardest_negative = d.masked_fill(~negative, float("inf")).min(dim=1).values  # per anchor
    if mining == "batch_hard":
        hardest_positive = (d * positive).max(dim=1).values
        valid = positive.any(dim=1) & negative.any(dim=1)
        return torch.relu(hardest_positive - hardest_negative + margin)[valid]
    d_ap, d_an = d[:, :, None], d[:, None, :]  # [a, p, n]
    valid = positive[:, :, None] & negative[:, None, :]
    if mining == "batch_all":
        return torch.relu(d_ap - d_an + margin)[valid]
    # semihard: the nearest negative farther than the positive but within the margin, else the hardest
    semihard = valid & (d_an > d_ap) & (d_an < d_ap + margin)
    chosen = d_an.expand_as(semihard).masked_fill(~semihard, float("inf")).min(dim=2).values  # per (a, p)
    chosen = torch.where(torch.isfinite(chosen), chosen, hardest_negative[:, None].expand_as(chosen))
    pairs = positive & negative.any(dim=1, keepdim=True)
    return torch.relu(d - chosen + margin)[pairs]
