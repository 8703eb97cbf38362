"""Triplet loss and its relatives: contrastive (siamese) loss and the ArcFace classification loss."""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def safe_sqrt(d2, eps=1e-12):
    """Distances from squared distances. The square root's argument is clamped so that a zero distance gives a
    zero gradient rather than NaN."""
    return d2.clamp_min(eps).sqrt()


def pair_distance(x, y, squared=True, eps=1e-12):
    """Row-wise Euclidean distance between (N, D) tensors, in float32; coinciding rows give finite gradients."""
    d2 = (x.float() - y.float()).pow(2).sum(dim=1)
    return d2 if squared else safe_sqrt(d2, eps)


def check_margin(margin):
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")


def check_labelled(embeddings, labels):
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"expected (N, D) embeddings and (N,) labels, got {tuple(embeddings.shape)} and "
                         f"{tuple(labels.shape)}")


class TripletLoss(nn.Module):
    """Mean over triplets of max(0, d(a, p) - d(a, n) + margin).

    Input: anchor, positive, negative, each (N, D), row i of the three forming triplet i; any float dtype
    (computed in float32, so autocast does not change it). d is the squared Euclidean distance
    (squared=True, as in FaceNet) or the Euclidean distance (squared=False, matching
    torch.nn.functional.triplet_margin_loss). Output: a scalar, or the (N,) losses with reduction='none'.
    """

    def __init__(self, margin=0.2, squared=True, reduction="mean"):
        super().__init__()
        check_margin(margin)
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


def pairwise_distances(embeddings, squared=True, eps=1e-12):
    """(N, N) Euclidean distances between the rows of an (N, D) tensor, in float32, through one matrix
    product. The square root's argument is clamped, so coinciding rows (the diagonal too) give finite
    gradients."""
    e = embeddings.float()
    squares = e.pow(2).sum(dim=1)
    d2 = (squares[:, None] - 2 * e @ e.T + squares[None, :]).clamp_min(0)
    d2 = d2.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), 0)  # exact, not round-off
    return d2 if squared else safe_sqrt(d2, eps)


class OnlineTripletLoss(nn.Module):
    """Triplet loss over the triplets found inside a batch of labelled embeddings (FaceNet-style mining).

    Input: embeddings (N, D), any float dtype (computed in float32); labels (N,) integer identities. A batch
    from a P x K sampler (P identities, K images each) has triplets for every anchor.
    mining:
      'batch_all'  every valid (a, p, n); the loss is averaged over the active ones (loss > 0);
      'batch_hard' per anchor, its farthest positive and its nearest negative;
      'semihard'   per (anchor, positive) pair, the nearest negative farther than the positive but within
                   the margin (FaceNet); where there is none, the hardest negative.
    Output: (loss, fraction of active triplets among the valid ones). A batch without a valid triplet gives
    a zero loss that still backpropagates, and fraction 0.
    """

    MINING = ("batch_all", "batch_hard", "semihard")

    def __init__(self, margin=0.2, mining="batch_hard", squared=True):
        super().__init__()
        if mining not in self.MINING:
            raise ValueError(f"mining must be one of {', '.join(self.MINING)}, got {mining!r}")
        check_margin(margin)
        self.margin, self.mining, self.squared = margin, mining, squared

    def forward(self, embeddings, labels):
        check_labelled(embeddings, labels)
        d = pairwise_distances(embeddings, self.squared)
        labels = labels.to(d.device)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=d.device)
        positive, negative = same & ~eye, ~same
        if self.mining == "batch_hard":
            hardest_positive = (d * positive).max(dim=1).values
            hardest_negative = d.masked_fill(~negative, float("inf")).min(dim=1).values
            valid = positive.any(dim=1) & negative.any(dim=1)
            losses = torch.relu(hardest_positive - hardest_negative + self.margin)[valid]
        else:
            d_ap, d_an = d[:, :, None], d[:, None, :]  # [a, p, n]
            valid = positive[:, :, None] & negative[:, None, :]
            if self.mining == "batch_all":
                losses = torch.relu(d_ap - d_an + self.margin)[valid]
            else:
                semihard = valid & (d_an > d_ap) & (d_an < d_ap + self.margin)
                hardest = d.masked_fill(~negative, float("inf")).min(dim=1).values  # per anchor
                # nearest semi-hard negative per (a, p)
                chosen = d_an.expand_as(semihard).masked_fill(~semihard, float("inf")).min(dim=2).values
                chosen = torch.where(torch.isfinite(chosen), chosen, hardest[:, None].expand_as(chosen))
                pairs = positive & negative.any(dim=1, keepdim=True)
                losses = torch.relu(d - chosen + self.margin)[pairs]
        if losses.numel() == 0:
            return embeddings.sum() * 0.0, 0.0
        active = losses > 1e-16
        fraction = active.float().mean().item()
        if self.mining == "batch_all":
            return losses.sum() / active.sum().clamp_min(1), fraction
        return losses.mean(), fraction


# -----------------------------------------------------------------------------
# contrastive loss

class _GatherWithGradients(torch.autograd.Function):
    """all_gather whose backward sends each process the gradient of its own rows, summed over the processes."""

    @staticmethod
    def forward(ctx, local):
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # (gloo has no reduce_scatter)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_batch(embeddings, labels):
    """The global batch of a distributed run: every process's (N, D) embeddings and (N,) labels, concatenated in
    rank order (each process must hold the same N), so that in-batch mining sees the triplets across processes.
    Gradients flow back to each process's own embeddings summed over the processes; as DistributedDataParallel
    averages them, the weights get the gradient of the loss on the global batch. Outside a distributed run
    (or with one process) returns the inputs."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return embeddings, labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return _GatherWithGradients.apply(embeddings), torch.cat(parts)


def contrastive_losses(d2, different, margin):
    """Per-pair contrastive loss from squared distances d2 and a boolean `different` (pair of two people):
    d^2 for a pair of one person, taken as it is so that coinciding embeddings give exactly 0, and
    max(0, margin - d)^2 for a pair of two."""
    return torch.where(different, torch.relu(margin - safe_sqrt(d2)).pow(2), d2)


class ContrastiveLoss(nn.Module):
    """Siamese contrastive loss (Hadsell, Chopra and LeCun 2006): mean over pairs of d^2 for a pair of one
    person and max(0, margin - d)^2 for a pair of two, d the Euclidean distance.

    Input: e1, e2 (N, D), row i of both forming pair i, any float dtype (computed in float32); target (N,) with
    0 = same person, 1 = different people. Output: a scalar.
    """

    def __init__(self, margin=1.0):
        super().__init__()
        check_margin(margin)
        self.margin = margin

    def forward(self, e1, e2, target):
        if e1.shape != e2.shape or e1.dim() != 2 or target.shape != e1.shape[:1]:
            raise ValueError(f"expected e1 and e2 (N, D) of one shape and target (N,), got {tuple(e1.shape)}, "
                             f"{tuple(e2.shape)} and {tuple(target.shape)}")
        d2 = pair_distance(e1, e2)
        return contrastive_losses(d2, target.to(d2.device) != 0, self.margin).mean()


class OnlineContrastiveLoss(nn.Module):
    """Contrastive loss over every pair (i < j) of a batch of labelled embeddings, e.g. from a P x K sampler.

    Input: embeddings (N, D), any float dtype (computed in float32); labels (N,) integer identities.
    Output: (loss, fraction of active pairs). The loss is the mean over all pairs; a pair of one person is
    active unless its embeddings coincide, a pair of two while closer than the margin. A batch without a pair
    (N < 2) gives a zero loss that still backpropagates, and fraction 0.
    """

    def __init__(self, margin=1.0):
        super().__init__()
        check_margin(margin)
        self.margin = margin

    def forward(self, embeddings, labels):
        check_labelled(embeddings, labels)
        if len(labels) < 2:
            return embeddings.sum() * 0.0, 0.0
        d2 = pairwise_distances(embeddings)
        labels = labels.to(d2.device)
        i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=d2.device)
        losses = contrastive_losses(d2[i, j], labels[i] != labels[j], self.margin)
        return losses.mean(), (losses > 0).float().mean().item()


# -----------------------------------------------------------------------------
# classification over the training identities

class ArcFaceLoss(nn.Module):
    """Additive angular margin softmax (ArcFace, Deng et al. 2019) over the training identities.

    Holds one learnable centre per identity, `weight` (num_classes, embedding_dim). Embeddings and centres are
    L2-normalised, so the logits are the cosines of their angles theta; the label's logit becomes
    cos(theta + margin), and the loss is the cross-entropy of scale * logits. Where theta + margin would pass
    pi, past which cos(theta + margin) grows again with theta, the label's logit is
    cos(theta) - margin * sin(pi - margin) instead (as in insightface), which keeps falling with theta.

    Input: embeddings (N, D), any float dtype (computed in float32); labels (N,) integers in [0, num_classes).
    Output: (loss, accuracy): accuracy is the share of embeddings whose nearest centre by cosine (without the
    margin) is their label's, a float. An empty batch gives a zero loss that still backpropagates, and 0.
    """

    def __init__(self, embedding_dim, num_classes, scale=30.0, margin=0.5):
        super().__init__()
        if not 0 <= margin < math.pi:
            raise ValueError(f"margin must be an angle in [0, pi) radians, got {margin}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold, self.fallback = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def forward(self, embeddings, labels):
        check_labelled(embeddings, labels)
        num_classes, dim = self.weight.shape
        if embeddings.shape[1] != dim:
            raise ValueError(f"expected embeddings of dimension {dim}, got {embeddings.shape[1]}")
        if len(labels) == 0:
            return embeddings.sum() * 0.0, 0.0
        low, high = labels.min().item(), labels.max().item()
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got {low} to {high}")
        cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T
        labels = labels.to(cos.device)
        cos_t = cos.gather(1, labels[:, None])
        # clamped away from 0, where the square root's gradient is infinite (an embedding on its centre)
        sin_t = (1 - cos_t.pow(2)).clamp_min(1e-7).sqrt()
        phi = cos_t * self.cos_m - sin_t * self.sin_m  # cos(theta + margin)
        phi = torch.where(cos_t > self.threshold, phi, cos_t - self.fallback)
        logits = cos.scatter(1, labels[:, None], phi)
        accuracy = (cos.argmax(dim=1) == labels).float().mean().item()
        return F.cross_entropy(self.scale * logits, labels), accuracy


# -----------------------------------------------------------------------------
# training health

def embedding_spread(embeddings):
    """1 - |mean of the L2-normalised embeddings|^2: 0 when every embedding is the same point, near 1 when they
    spread over the sphere."""
    return 1 - F.normalize(embeddings.detach().float(), dim=1).mean(dim=0).pow(2).sum().item()


class CollapseDetector:
    """Watches a margin loss for collapse: every embedding alike (spread below `min_spread`) while the loss sits
    at the margin (within `tolerance` of it), for `patience` steps in a row. `update` returns True once, at the
    step where that happens."""

    def __init__(self, margin, patience=10, min_spread=0.05, tolerance=0.1):
        self.margin, self.patience, self.min_spread, self.tolerance = margin, patience, min_spread, tolerance
        self.steps, self.spread = 0, 1.0

    def update(self, loss, embeddings):
        self.spread = embedding_spread(embeddings)
        at_margin = abs(float(loss) - self.margin) <= self.tolerance * max(self.margin, 1e-8)
        self.steps = self.steps + 1 if self.spread < self.min_spread and at_margin else 0
        return self.steps == self.patience
