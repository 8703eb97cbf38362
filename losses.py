"""Training objectives behind one interface, and the distance math they share.

Every objective is an nn.Module called as `loss, stats = objective(embeddings, labels, rows=None)`:
  embeddings  (N, D), any float dtype (computed in float32);
  labels      (N,) integer identities (int64);
  rows        None, or an integer tensor of index rows into the batch: (B, 3) (anchor, positive, negative) for
              triplets, (B, 2) (first, second) for pairs. Whether a pair is of one person is read from labels.
It returns a scalar loss (an empty batch gives a zero that still backpropagates) and `stats`, a dict of plain
floats. Its attribute `rows` says what batches it trains on: "triplets" or "pairs" (rows required), None
(labelled P x K batches; rows are ignored), or "images" (any images; labels and rows are ignored). `figure` is the
stats key to show while training.
build_objective makes one from the training options.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

OBJECTIVES = ("triplet", "contrastive", "pair_bce", "arcface", "cosface", "none")
MARGIN_SOFTMAX = ("arcface", "cosface")  # classify over the training identities, whatever the mining
MINING = ("none", "batch_all", "batch_hard", "semihard")
PAIR_BCE_MINING = ("none", "batch_all")  # the pair classifier learns from given pairs or from every pair of a batch


def safe_sqrt(d2, eps=1e-12):
    """Distances from squared distances. The square root's argument is clamped so that a zero distance gives a
    zero gradient rather than NaN."""
    return d2.clamp_min(eps).sqrt()


def pair_distance(x, y, squared=True, eps=1e-12):
    """Row-wise Euclidean distance between (N, D) tensors, in float32; coinciding rows give finite gradients."""
    d2 = (x.float() - y.float()).pow(2).sum(dim=1)
    return d2 if squared else safe_sqrt(d2, eps)


def pairwise_distances(embeddings, squared=True, eps=1e-12):
    """(N, N) Euclidean distances between the rows of an (N, D) tensor, in float32, through one matrix
    product. The square root's argument is clamped, so coinciding rows (the diagonal too) give finite
    gradients."""
    e = embeddings.float()
    squares = e.pow(2).sum(dim=1)
    d2 = (squares[:, None] - 2 * e @ e.T + squares[None, :]).clamp_min(0)
    d2 = d2.masked_fill(torch.eye(len(e), dtype=torch.bool, device=e.device), 0)  # exact, not round-off
    return d2 if squared else safe_sqrt(d2, eps)


def contrastive_losses(d2, different, margin):
    """Per-pair contrastive loss from squared distances d2 and a boolean `different` (pair of two people):
    d^2 for a pair of one person, taken as it is so that coinciding embeddings give exactly 0, and
    max(0, margin - d)^2 for a pair of two."""
    return torch.where(different, torch.relu(margin - safe_sqrt(d2)).pow(2), d2)


# -----------------------------------------------------------------------------
# input checks and the reduction the objectives share

def check_margin(margin):
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")


def check_mining(mining):
    if mining not in MINING:
        raise ValueError(f"mining must be one of {', '.join(MINING)}, got {mining!r}")


def check_batch(embeddings, labels):
    """embeddings (N, D) floating point, labels (N,) integers."""
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"expected (N, D) embeddings and (N,) labels, got {tuple(embeddings.shape)} and "
                         f"{tuple(labels.shape)}")
    if not embeddings.is_floating_point() or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"expected float embeddings and integer labels, got {embeddings.dtype} and {labels.dtype}")


def checked_rows(rows, width, n, device):
    """`rows` as (width, B) index columns on `device`, after checking that it is a (B, width) integer tensor of
    indices into a batch of n."""
    kind = "(anchor, positive, negative)" if width == 3 else "(first, second)"
    if rows is None:
        raise ValueError(f"this objective trains on rows of {kind} indices into the batch; pass rows (B, {width}) "
                         f"or use in-batch mining on a labelled batch")
    if rows.dim() != 2 or rows.shape[1] != width or rows.is_floating_point() or rows.dtype == torch.bool:
        raise ValueError(f"expected rows (B, {width}) of integer {kind} indices, got {rows.dtype} rows of shape "
                         f"{tuple(rows.shape)}")
    if ((rows < 0) | (rows >= n)).any():
        raise ValueError(f"rows must index the batch of {n} embeddings, got indices from {rows.min().item()} to "
                         f"{rows.max().item()}")
    return rows.to(device).T


def empty_batch(embeddings, figure):
    """The result of a batch with nothing to learn from: a zero (float32) that still backpropagates, figure 0."""
    return embeddings.float().sum() * 0.0, {figure: 0.0}


def mean_and_active(losses, embeddings, active_above=0.0, over_active=False):
    """(mean of the per-row `losses`, {"active": share of them above `active_above`}). over_active averages over
    the active rows only, so that the easy ones do not dilute the hard ones' gradient (batch_all). No rows: see
    empty_batch."""
    if losses.numel() == 0:
        return empty_batch(embeddings, "active")
    active = losses > active_above
    loss = losses.sum() / active.sum().clamp_min(1) if over_active else losses.mean()
    return loss, {"active": active.float().mean().item()}


# -----------------------------------------------------------------------------
# triplet loss

def mined_triplet_losses(d, labels, margin, mining):
    """Per-triplet losses max(0, d(a, p) - d(a, n) + margin) of the triplets `mining` picks in a labelled batch,
    from its (N, N) distances d and (N,) labels on d's device (see TripletLoss); empty when there is none."""
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


class TripletLoss(nn.Module):
    """Mean over triplets of max(0, d(a, p) - d(a, n) + margin).

    d is the squared Euclidean distance (squared=True, as in FaceNet) or the Euclidean distance (squared=False,
    matching torch.nn.functional.triplet_margin_loss), computed in float32.
    mining:
      'none'       rows (B, 3) give the triplets: indices of anchor, positive and negative (rows = "triplets");
    and inside a labelled batch, e.g. from a P x K sampler (rows = None; the rows argument is ignored):
      'batch_all'  every valid (a, p, n); the loss is averaged over the active ones (loss > 0);
      'batch_hard' per anchor, its farthest positive and its nearest negative;
      'semihard'   per (anchor, positive) pair, the nearest negative farther than the positive but within
                   the margin (FaceNet); where there is none, the hardest negative.
    stats: {"active": share of the triplets with loss > 0}. No triplet: a zero loss that still backpropagates.
    """

    figure = "active"

    def __init__(self, margin=0.2, squared=True, mining="none"):
        super().__init__()
        check_margin(margin)
        check_mining(mining)
        self.margin, self.squared, self.mining = margin, squared, mining
        self.rows = batch_rows("triplet", mining)

    def forward(self, embeddings, labels, rows=None):
        check_batch(embeddings, labels)
        if self.rows:
            anchor, positive, negative = embeddings[checked_rows(rows, 3, len(embeddings), embeddings.device)]
            losses = torch.relu(pair_distance(anchor, positive, self.squared)
                                - pair_distance(anchor, negative, self.squared) + self.margin)
        else:
            d = pairwise_distances(embeddings, self.squared)
            losses = mined_triplet_losses(d, labels.to(d.device), self.margin, self.mining)
        # above 1e-16, not 0: a difference of distances that is zero but for round-off is no active triplet
        return mean_and_active(losses, embeddings, active_above=1e-16, over_active=self.mining == "batch_all")


# -----------------------------------------------------------------------------
# pairs: contrastive loss and the pair classifier

class ContrastiveLoss(nn.Module):
    """Siamese contrastive loss (Hadsell, Chopra and LeCun 2006): mean over pairs of d^2 for a pair of one
    person and max(0, margin - d)^2 for a pair of two, d the Euclidean distance (in float32).

    mining 'none': rows (B, 2) give the pairs, indices of first and second embedding (rows = "pairs"). Any other
    mining: every pair i < j of a labelled batch, e.g. from a P x K sampler (rows = None; rows are ignored).
    A pair is of one person when its labels are equal. stats: {"active": share of the active pairs}: a pair of one
    person is active unless its embeddings coincide, a pair of two while closer than the margin. No pair: a zero
    loss that still backpropagates.
    """

    figure = "active"

    def __init__(self, margin=1.0, mining="none"):
        super().__init__()
        check_margin(margin)
        check_mining(mining)
        self.margin, self.mining = margin, mining
        self.rows = batch_rows("contrastive", mining)

    def forward(self, embeddings, labels, rows=None):
        check_batch(embeddings, labels)
        labels = labels.to(embeddings.device)
        if self.rows:
            first, second = checked_rows(rows, 2, len(embeddings), embeddings.device)
            d2 = pair_distance(embeddings[first], embeddings[second])
        else:
            first, second = torch.triu_indices(len(labels), len(labels), offset=1, device=embeddings.device)
            d2 = pairwise_distances(embeddings)[first, second]
        return mean_and_active(contrastive_losses(d2, labels[first] != labels[second], self.margin), embeddings)


class PairClassifierLoss(nn.Module):
    """The pair classifier and its binary cross-entropy. mining 'none': rows (B, 2) give the pairs, indices of
    first and second embedding (rows = "pairs"). mining 'batch_all': every pair i < j of a labelled batch, e.g. from
    a P x K sampler (rows = None; rows are ignored), the pairs of one person and those of two weighing half the loss
    each, so that the decision stays that of balanced pairs. The target is 1 for a pair of one person (equal
    labels), 0 for two.

    logits(e1, e2): features |e1 - e2| and e1 * e2 (2D values) -> Linear -> ReLU -> Linear -> 1, one logit per
    pair, positive for 'same person'. Both features are exactly symmetric, so logits(e1, e2) == logits(e2, e1) bit
    for bit: a pair has one score whatever its order. `config` rebuilds it: PairClassifierLoss(**config).
    stats: {"accuracy": share of the pairs decided right (logit > 0 for same)}. No pair: a zero loss that still
    backpropagates.
    """

    figure = "accuracy"

    def __init__(self, embedding_dim, hidden_dim=64, mining="none"):
        super().__init__()
        if embedding_dim < 1 or hidden_dim < 1:
            raise ValueError(f"embedding_dim and hidden_dim must be positive, got {embedding_dim}, {hidden_dim}")
        if mining not in PAIR_BCE_MINING:
            raise ValueError(f"loss='pair_bce' trains on given pairs (mining='none') or on every pair of a batch "
                             f"(mining='batch_all'), not on {mining!r}")
        self.config = dict(embedding_dim=embedding_dim, hidden_dim=hidden_dim)
        self.rows = batch_rows("pair_bce", mining)
        self.classifier = nn.Sequential(nn.Linear(2 * embedding_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, 1))

    def logits(self, e1, e2):
        """(N,) logits of the pairs (e1[i], e2[i]), e1 and e2 (N, embedding_dim) of any float dtype (in float32)."""
        dim = self.config["embedding_dim"]
        if e1.shape != e2.shape or e1.dim() != 2 or e1.shape[1] != dim:
            raise ValueError(f"the pair classifier wants two (N, {dim}) embedding batches, got {tuple(e1.shape)} "
                             f"and {tuple(e2.shape)}")
        e1, e2 = e1.float(), e2.float()
        return self.classifier(torch.cat([(e1 - e2).abs(), e1 * e2], dim=1)).squeeze(1)

    def forward(self, embeddings, labels, rows=None):
        check_batch(embeddings, labels)
        if self.rows:
            first, second = checked_rows(rows, 2, len(embeddings), embeddings.device)
        else:
            first, second = torch.triu_indices(len(labels), len(labels), offset=1, device=embeddings.device)
        logits = self.logits(embeddings[first], embeddings[second])
        if len(logits) == 0:
            return empty_batch(embeddings, self.figure)
        labels = labels.to(logits.device)
        same = labels[first] == labels[second]
        accuracy = ((logits > 0) == same).float().mean().item()
        losses = F.binary_cross_entropy_with_logits(logits, same.float(), reduction="none")
        if self.rows or same.all() or not same.any():
            return losses.mean(), {"accuracy": accuracy}
        return 0.5 * (losses[same].mean() + losses[~same].mean()), {"accuracy": accuracy}


# -----------------------------------------------------------------------------
# classification over the training identities

ARCFACE_FORMS = ("paper", "arcface_torch")
# arcface_torch's cross-entropy takes the log of max(p, 1e-30): no sample's loss exceeds -log(1e-30), about 69.08
LOSS_CAP = -math.log(1e-30)


def capped(losses):
    """Per-sample cross-entropies `losses` whose values are capped at LOSS_CAP, as arcface_torch's are, and whose
    gradient is left whole, as arcface_torch's is (its backward is the softmax less the one-hot label whatever the
    cap): training is the same, the loss shown is its."""
    return losses - (losses - losses.clamp_max(LOSS_CAP)).detach()


class ArcFaceLoss(nn.Module):
    """Additive angular margin softmax (ArcFace, Deng et al. 2019) over the training identities.

    Holds one learnable centre per identity, `weight` (num_classes, embedding_dim). Embeddings and centres are
    L2-normalised, so the logits are the cosines of their angles theta; the label's logit becomes
    cos(theta + margin), and the loss is the cross-entropy of scale * logits, each sample's capped at LOSS_CAP in
    value (`capped`). `form` says how the label's logit is made of cos(theta):
      'paper'          the paper's formula, differentiated as it stands; where theta + margin would pass pi, past
                       which cos(theta + margin) grows again with theta, the logit is cos(theta) - margin *
                       sin(pi - margin) instead (as insightface's code had it until 2022), which keeps falling;
      'arcface_torch'  arcface_torch's since December 2022: cos(theta + margin) through arccos without a gradient,
                       so that the gradient reaches cos(theta) with slope 1, and no fallback past pi (the cosines
                       clamped to [-1, 1] first, as arcface_torch does).
    The two agree in value while theta + margin < pi; their gradients differ everywhere but at theta = pi/2 - m/2.

    Trains on labelled batches (rows = None; the rows argument is ignored): labels (N,) integers in
    [0, num_classes). stats: {"accuracy": share of embeddings whose nearest centre by cosine (without the margin)
    is their label's}. An empty batch gives a zero loss that still backpropagates, and accuracy 0.
    """

    rows, figure = None, "accuracy"

    def __init__(self, embedding_dim, num_classes, scale=30.0, margin=0.5, form="paper"):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"embedding_dim and num_classes must be positive, got {embedding_dim}, {num_classes}")
        if not 0 <= margin < math.pi:
            raise ValueError(f"margin must be an angle in [0, pi) radians, got {margin}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if form not in ARCFACE_FORMS:
            raise ValueError(f"form must be one of {', '.join(ARCFACE_FORMS)}, got {form!r}")
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin, self.form = scale, margin, form
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold, self.fallback = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin

    def target_logit(self, cos_t):
        """The label's logit for the cosines `cos_t` (N, 1) of the embeddings with their own centres."""
        if self.form == "arcface_torch":
            cos_t = cos_t.clamp(-1, 1)
            with torch.no_grad():
                shift = torch.cos(torch.acos(cos_t) + self.margin) - cos_t
            return cos_t + shift
        # clamped away from 0, where the square root's gradient is infinite (an embedding on its centre)
        sin_t = (1 - cos_t.pow(2)).clamp_min(1e-7).sqrt()
        phi = cos_t * self.cos_m - sin_t * self.sin_m  # cos(theta + margin)
        return torch.where(cos_t > self.threshold, phi, cos_t - self.fallback)

    def forward(self, embeddings, labels, rows=None):
        check_batch(embeddings, labels)
        num_classes, dim = self.weight.shape
        if embeddings.shape[1] != dim:
            raise ValueError(f"expected embeddings of dimension {dim}, got {embeddings.shape[1]}")
        if len(labels) == 0:
            return empty_batch(embeddings, self.figure)
        low, high = labels.min().item(), labels.max().item()
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got {low} to {high}")
        cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T
        labels = labels.to(cos.device)
        logits = cos.scatter(1, labels[:, None], self.target_logit(cos.gather(1, labels[:, None])))
        accuracy = (cos.argmax(dim=1) == labels).float().mean().item()
        return capped(F.cross_entropy(self.scale * logits, labels, reduction="none")).mean(), {"accuracy": accuracy}


class CosFaceLoss(ArcFaceLoss):
    """Additive cosine margin softmax (CosFace, Wang et al. 2018; the margin of insightface's Glint360K and
    WebFace recipes): ArcFaceLoss with the label's logit cos(theta) - margin, `margin` a cosine in [0, 2).
    The same contract, centres and stats as ArcFaceLoss."""

    def __init__(self, embedding_dim, num_classes, scale=64.0, margin=0.35):
        if not 0 <= margin < 2:
            raise ValueError(f"margin must be a cosine margin in [0, 2), got {margin}")
        super().__init__(embedding_dim, num_classes, scale)
        self.margin = margin

    def target_logit(self, cos_t):
        return cos_t - self.margin


class NoObjective(nn.Module):
    """No objective on the labels (loss none): a zero loss that still backpropagates, for a student that learns
    from a teacher alone (train.py --teacher), on any images (rows = "images"; labels and rows are ignored)."""

    rows, figure = "images", "teacher_cosine"

    def forward(self, embeddings, labels, rows=None):
        return embeddings.sum() * 0.0, {}


class PartialFC(nn.Module):
    """A margin softmax whose class centres are sharded across the processes of a distributed run (PartialFC, An
    et al. 2022): process `rank` of `world_size` holds the centres of classes [rank * C / world_size, (rank + 1) *
    C / world_size) of `num_classes` C, in `margin.weight`, where `margin` is an ArcFaceLoss or CosFaceLoss built
    over that share (its margin and scale apply). Each step scores the global batch (every process's embeddings
    and labels, gathered beforehand as gather_batch does) against the centres of the batch's classes plus a random
    `sample_rate` share of the others of this process, and the softmax's normaliser is summed over the processes:
    at sample_rate 1 the loss is the full margin softmax over all C classes, each sample's capped in value as
    arcface_torch's (`capped`). Per process the centres take C / world_size x D floats, not C x D.

    Contract: embeddings (N, D), labels (N,) in [0, C), the same global batch on every process; rows ignored.
    Gradients: the centres get exactly their share of the loss's gradient (do not wrap this module in
    DistributedDataParallel: no two processes hold the same centres); the embeddings get world_size times theirs,
    which gather_batch's backward and DistributedDataParallel's averaging of the network's gradients bring back to
    the loss's. stats: {"accuracy": share of embeddings whose label's centre is the most similar of those scored}.
    Outside a distributed run it is the margin softmax on one process (with sampling below sample_rate 1).

    The centres start uniform in +-sqrt(6 / (C + D)), Xavier's bound of the whole (C, D) layer, whatever the share:
    as normalised centres, their norm sets how fast they turn, which must not depend on the number of processes.
    In eval mode every centre of this process is scored (nothing is drawn); a `sharded` one (world_size > 1) needs
    every process at each call."""

    rows, figure = None, "accuracy"

    def __init__(self, margin, num_classes, sample_rate=1.0, rank=0, world_size=1):
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        self.start, end = partial_fc_shard(num_classes, rank, world_size)
        if margin.weight.shape[0] != end - self.start:
            raise ValueError(f"the margin softmax holds {margin.weight.shape[0]} centres; process {rank} of "
                             f"{world_size} holds classes {self.start}..{end - 1}")
        self.margin, self.num_classes, self.sample_rate, self.world_size = margin, num_classes, sample_rate, world_size
        self.end, self.sharded = end, world_size > 1
        dim = margin.weight.shape[1]
        with torch.no_grad():  # the margin softmax drew them with the bound of its share's (end - start, D) layer
            margin.weight.mul_(math.sqrt((end - self.start + dim) / (num_classes + dim)))

    def summary(self):
        """The startup line: the centres' memory per process against the unsharded layer's."""
        dim, size = self.margin.weight.shape[1], self.margin.weight.element_size()
        largest = max(b - a for a, b in (partial_fc_shard(self.num_classes, r, self.world_size)
                                         for r in range(self.world_size)))
        return (f"centres: {self.num_classes:,} x {dim}, {_megabytes(largest * dim * size)} per process of "
                f"{self.world_size} ({_megabytes(self.num_classes * dim * size)} unsharded; as much again per "
                f"optimiser moment), each step scoring the batch's classes and {self.sample_rate:.0%} of the others")

    def sampled(self, labels):
        """(the indices into this process's centres scored this step, each label's position among them or -1):
        the batch's classes of this share, then a random `sample_rate` share of the rest (in eval mode, all)."""
        local = labels - self.start
        mine = (local >= 0) & (local < self.margin.weight.shape[0])
        count = self.margin.weight.shape[0]
        positives = torch.unique(local[mine])
        keep = max(int(self.sample_rate * count), len(positives)) if self.training else count
        if keep >= count:
            index = torch.arange(count, device=labels.device)
        else:  # the positives rank first, then the others at random
            score = torch.rand(count, device=labels.device)
            score[positives] = 2.0
            index = torch.sort(torch.topk(score, keep).indices).values
        position = torch.full((count,), -1, dtype=torch.long, device=labels.device)
        position[index] = torch.arange(len(index), device=labels.device)
        return index, torch.where(mine, position[local.clamp(0, count - 1)], torch.full_like(local, -1))

    def forward(self, embeddings, labels, rows=None):
        check_batch(embeddings, labels)
        if len(labels) == 0:
            return empty_batch(embeddings, self.figure)
        low, high = labels.min().item(), labels.max().item()
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {low} to {high}")
        index, target = self.sampled(labels.to(self.margin.weight.device))
        embeddings = _ScaleGradient.apply(embeddings.float(), float(self.world_size))
        cos = F.normalize(embeddings, dim=1) @ F.normalize(self.margin.weight[index].float(), dim=1).T
        has = target >= 0
        rows_with = has.nonzero().squeeze(1)
        cos_t = cos[rows_with, target[has]][:, None]
        logits = cos.index_put((rows_with, target[has]), self.margin.target_logit(cos_t).squeeze(1))
        logits = self.margin.scale * logits
        with torch.no_grad():  # a shift for a stable exp: the global maximum (any shift gives the same loss)
            shift = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX) if self.world_size > 1 else \
                logits.max(dim=1).values
        exp_sum = _AllReduceSum.apply((logits - shift[:, None]).exp().sum(dim=1))
        label_logit = _AllReduceSum.apply(torch.zeros_like(shift).index_put((rows_with,), logits[rows_with,
                                                                                               target[has]]))
        loss = capped(exp_sum.log() + shift - label_logit).mean()
        with torch.no_grad():
            best = cos.max(dim=1).values
            own = torch.zeros_like(best).index_put((rows_with,), cos_t.squeeze(1))
            if self.world_size > 1:
                best, own = _all_reduce(best, dist.ReduceOp.MAX), _all_reduce(own, dist.ReduceOp.SUM)
            accuracy = (own >= best).float().mean().item()
        return loss, {"accuracy": accuracy}


def partial_fc_shard(num_classes, rank, world_size):
    """[start, end) of the classes process `rank` of `world_size` holds: consecutive, as even as can be."""
    return rank * num_classes // world_size, (rank + 1) * num_classes // world_size


def _megabytes(count):
    return f"{count / 1e6:,.0f} MB" if count >= 1e7 else f"{count / 1e6:.2g} MB"


def _all_reduce(tensor, op):
    tensor = tensor.clone()
    dist.all_reduce(tensor, op)
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """The sum over the processes, whose backward hands each process the gradient unchanged: every process
    computes the same loss from the sum, so its own part's gradient is that loss's gradient (the default
    all_reduce backward would sum the processes' identical gradients, world_size times too much)."""

    @staticmethod
    def forward(ctx, tensor):
        return _all_reduce(tensor, dist.ReduceOp.SUM) if dist.is_initialized() and dist.get_world_size() > 1 \
            else tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScaleGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, tensor, factor):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def batch_rows(loss, mining="none"):
    """What batches the objective `loss` with `mining` trains on (its `rows`), known before anything is built:
    "triplets" or "pairs" of given rows, None for labelled P x K batches, "images" for any."""
    if loss == "none":
        return "images"
    if loss in ("pair_bce", "contrastive") and mining == "none":
        return "pairs"
    return "triplets" if loss == "triplet" and mining == "none" else None


def build_objective(loss, mining="none", margin=0.2, squared=True, embedding_dim=128, num_classes=0,
                    arcface_scale=30.0, arcface_margin=0.5, pair_hidden_dim=64, cosface_margin=0.35, partial_fc=0.0,
                    rank=0, world_size=1, arcface_form="paper"):
    """The training objective `loss` (one of OBJECTIVES) with `mining` (one of MINING): "none" trains the triplet
    and contrastive losses on given rows, the others mine labelled batches; pair_bce takes none or batch_all;
    arcface and cosface classify labelled batches whatever the mining, over `num_classes` training identities
    (arcface_scale is the scale of both; arcface_form ArcFaceLoss's form); with `partial_fc` > 0, as PartialFC of
    that sample rate, process `rank` of `world_size` holding its share of the centres."""
    if loss not in OBJECTIVES:
        raise ValueError(f"loss={loss!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    check_mining(mining)
    if partial_fc and loss not in MARGIN_SOFTMAX:
        raise ValueError(f"partial_fc shards the centres of a margin softmax ({', '.join(MARGIN_SOFTMAX)}), not "
                         f"of loss={loss!r}")
    if partial_fc and num_classes < world_size:
        raise ValueError(f"partial_fc shares the centres of {num_classes} identities among {world_size} processes: "
                         f"each needs one at least")
    if loss == "none":
        return NoObjective()
    if loss == "triplet":
        return TripletLoss(margin, squared, mining)
    if loss == "contrastive":
        return ContrastiveLoss(margin, mining)
    if loss == "pair_bce":
        return PairClassifierLoss(embedding_dim, pair_hidden_dim, mining)
    start, end = partial_fc_shard(num_classes, rank, world_size) if partial_fc else (0, num_classes)
    if loss == "cosface":
        softmax = CosFaceLoss(embedding_dim, end - start, arcface_scale, cosface_margin)
    else:
        softmax = ArcFaceLoss(embedding_dim, end - start, arcface_scale, arcface_margin, arcface_form)
    return PartialFC(softmax, num_classes, partial_fc, rank, world_size) if partial_fc else softmax


# -----------------------------------------------------------------------------
# distributed runs

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
