"""PartialFC (An et al. 2022, as insightface's partial_fc): a margin softmax whose class centres are sharded across
the processes of a distributed run, the shard of each process, the autograd functions that sum over the processes, and
gather_batch, the global batch of a distributed run."""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from losses import build_objective, capped, check_batch, check_objective, empty_batch


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

    rows, stat = None, "accuracy"

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
            return empty_batch(embeddings, self.stat)
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


def build_partial_fc(loss, *, num_classes, partial_fc, rank=0, world_size=1, **options):
    """The margin softmax `loss` (arcface or cosface, with build_objective's `options`) over `num_classes`
    identities as PartialFC of sample rate `partial_fc`, process `rank` of `world_size` holding its share of the
    centres (train.py --partial_fc)."""
    check_objective(loss, partial_fc=partial_fc)
    if num_classes < world_size:
        raise ValueError(f"partial_fc shares the centres of {num_classes} identities among {world_size} processes: "
                         f"each needs one at least")
    start, end = partial_fc_shard(num_classes, rank, world_size)
    margin = build_objective(loss, num_classes=end - start, **options)
    return PartialFC(margin, num_classes, partial_fc, rank, world_size)


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


