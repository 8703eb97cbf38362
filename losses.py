"""Training objectives behind one interface, and the distance math they share.

Every objective is an nn.Module called as `loss, stats = objective(embeddings, labels, rows=None)`:
  embeddings  (N, D), any float dtype (computed in float32);
  labels      (N,) integer identities (int64);
  rows        None, or an integer tensor of index rows into the batch: (B, 3) (anchor, positive, negative) for
              triplets, (B, 2) (first, second) for pairs. Whether a pair is of one person is read from labels.
It returns a scalar loss (an empty batch gives a zero that still backpropagates) and `stats`, a dict of plain
floats. Its attribute `rows` says what batches it trains on: "triplets" or "pairs" (rows required), None
(labelled P x K batches; rows are ignored), or "images" (any images; labels and rows are ignored). `stat` is the
stats key to show while training.
OBJECTIVES is the table of them, which build_objective, batch_rows, objective_conflicts and train.py's choices read;
the miners are mining.py's, PartialFC's sharded centres partial_fc.py's.
"""
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mining import MINING, all_pairs, check_mining, mined_triplet_losses


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


def empty_batch(embeddings, stat):
    """The result of a batch with nothing to learn from: a zero (float32) that still backpropagates, `stat` 0."""
    return embeddings.float().sum() * 0.0, {stat: 0.0}


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

    stat = "active"

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

    stat = "active"

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
            first, second = all_pairs(len(labels), embeddings.device)
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

    stat = "accuracy"

    def __init__(self, embedding_dim, hidden_dim=64, mining="none"):
        super().__init__()
        if embedding_dim < 1 or hidden_dim < 1:
            raise ValueError(f"embedding_dim and hidden_dim must be positive, got {embedding_dim}, {hidden_dim}")
        check_objective("pair_bce", mining)
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
            first, second = all_pairs(len(labels), embeddings.device)
        logits = self.logits(embeddings[first], embeddings[second])
        if len(logits) == 0:
            return empty_batch(embeddings, self.stat)
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

    rows, stat = None, "accuracy"

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
            return empty_batch(embeddings, self.stat)
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

    rows, stat = "images", "teacher_cosine"

    def forward(self, embeddings, labels, rows=None):
        return embeddings.sum() * 0.0, {}


# -----------------------------------------------------------------------------
# the table of the objectives, and building one

@dataclass(frozen=True)
class Objective:
    """An entry of OBJECTIVES. build(options): the objective, from build_objective's keyword options (a namespace;
    num_classes those this process holds). rows: what batches it trains on without mining ("triplets" or "pairs" of
    given rows, None for labelled P x K batches, "images" for any; see batch_rows). mining: the mining it takes.
    margin_softmax: it classifies over the training identities whatever the mining, with centres that PartialFC can
    shard over the processes (partial_fc applies to these alone). decides: it answers same-or-not with a learnt
    head, which the metrics that choose the checkpoint (of the embedding) do not see, so that ties between epochs
    are broken by its valid loss (the epoch whose head decides the valid photos best)."""

    build: Callable[[SimpleNamespace], nn.Module]
    rows: Optional[str]
    mining: tuple = MINING
    margin_softmax: bool = False
    decides: bool = False


OBJECTIVES = dict(
    triplet=Objective(lambda o: TripletLoss(o.margin, o.squared, o.mining), "triplets"),
    contrastive=Objective(lambda o: ContrastiveLoss(o.margin, o.mining), "pairs"),
    # the pair classifier learns from given pairs or from every pair of a batch
    pair_bce=Objective(lambda o: PairClassifierLoss(o.embedding_dim, o.pair_hidden_dim, o.mining), "pairs",
                       mining=("none", "batch_all"), decides=True),
    arcface=Objective(lambda o: ArcFaceLoss(o.embedding_dim, o.num_classes, o.arcface_scale, o.arcface_margin,
                                            o.arcface_form), None, margin_softmax=True),
    cosface=Objective(lambda o: CosFaceLoss(o.embedding_dim, o.num_classes, o.arcface_scale, o.cosface_margin),
                      None, margin_softmax=True),
    none=Objective(lambda o: NoObjective(), "images"),
)


def batch_rows(loss, mining="none"):
    """What batches the objective `loss` with `mining` trains on (its `rows`), known before anything is built:
    "triplets" or "pairs" of given rows, None for labelled P x K batches, "images" for any."""
    rows = OBJECTIVES[loss].rows
    return rows if mining == "none" or rows == "images" else None


def objective_conflicts(loss, mining="none", partial_fc=0.0):
    """{option: why} for each option that the objective `loss` cannot train with, by its OBJECTIVES entry: the one
    home of these rules, which check_objective raises and engine.check_config reports as ConfigErrors of those
    flags."""
    entry, conflicts = OBJECTIVES[loss], {}
    if mining not in entry.mining:  # (the pair classifier's alone)
        conflicts["mining"] = f"--loss={loss} trains on given pairs (none) or on every pair of a batch (batch_all)"
    if partial_fc and not entry.margin_softmax:
        margin_softmax = " or ".join(name for name, other in OBJECTIVES.items() if other.margin_softmax)
        conflicts["partial_fc"] = f"shards the class centres of a margin softmax: use it with --loss={margin_softmax}"
    return conflicts


def check_objective(loss, mining="none", partial_fc=0.0):
    """Raise a ValueError for an unknown `loss`, or, naming its flag, for the first of objective_conflicts."""
    if loss not in OBJECTIVES:
        raise ValueError(f"loss={loss!r} is unknown; choose one of {', '.join(OBJECTIVES)}")
    for flag, message in objective_conflicts(loss, mining, partial_fc).items():
        raise ValueError(f"--{flag}: {message}")


def build_objective(loss, *, mining="none", margin=0.2, squared=True, embedding_dim=128, num_classes=0,
                    arcface_scale=30.0, arcface_margin=0.5, pair_hidden_dim=64, cosface_margin=0.35,
                    arcface_form="paper"):
    """The training objective `loss` (of OBJECTIVES) with `mining` (of MINING): "none" trains the triplet and
    contrastive losses on given rows, the others mine labelled batches; pair_bce takes none or batch_all; arcface
    and cosface classify labelled batches whatever the mining, over `num_classes` training identities
    (arcface_scale is the scale of both; arcface_form ArcFaceLoss's form). Their centres sharded across processes:
    partial_fc.build_partial_fc."""
    check_mining(mining)
    check_objective(loss, mining)
    return OBJECTIVES[loss].build(SimpleNamespace(
        mining=mining, margin=margin, squared=squared, embedding_dim=embedding_dim, num_classes=num_classes,
        arcface_scale=arcface_scale, arcface_margin=arcface_margin, pair_hidden_dim=pair_hidden_dim,
        cosface_margin=cosface_margin, arcface_form=arcface_form))
