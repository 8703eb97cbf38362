"""Triplet loss and its relatives."""
import torch
import torch.nn as nn


def pair_distance(x, y, squared=True, eps=1e-12):
    """Row-wise Euclidean distance between (N, D) tensors, in float32. The square root's argument is clamped
    so that coinciding rows give a zero gradient rather than NaN."""
    d2 = (x.float() - y.float()).pow(2).sum(dim=1)
    return d2 if squared else d2.clamp_min(eps).sqrt()


class TripletLoss(nn.Module):
    """Mean over triplets of max(0, d(a, p) - d(a, n) + margin).

    Input: anchor, positive, negative, each (N, D), row i of the three forming triplet i; any float dtype
    (computed in float32, so autocast does not change it). d is the squared Euclidean distance
    (squared=True, as in FaceNet) or the Euclidean distance (squared=False, matching
    torch.nn.functional.triplet_margin_loss). Output: a scalar, or the (N,) losses with reduction='none'.
    """

    def __init__(self, margin=0.2, squared=True, reduction="mean"):
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.margin, self.squared, self.reduction = margin, squared, reduction

    def forward(self, anchor, positive, negative):
        if not anchor.shape == positive.shape == negative.shape or anchor.dim() != 2:
            raise ValueError(f"anchor, positive and negative must be (N, D) tensors of one shape, got "
                             f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}")
        losses = torch.relu(pair_distance(anchor, positive, self.squared)
                            - pair_distance(anchor, negative, self.squared) + self.margin)
        return losses.mean() if self.reduction == "mean" else losses
