"""partial_fc.py: gather_batch (in-batch mining across the processes of a distributed run matches one process on
the global batch) and PartialFC (the margin softmax on one process, the sampled centres, eval mode, the shares
build_objective gives each process, two processes' sharded centres against the full softmax)."""
import math
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from losses import ArcFaceLoss, ContrastiveLoss, CosFaceLoss, TripletLoss, build_objective
from partial_fc import PartialFC, build_partial_fc, gather_batch, partial_fc_shard


# -----------------------------------------------------------------------------
# mining across the processes of a distributed run

GATHERED_LOSSES = {"batch_all": lambda: TripletLoss(0.5, mining="batch_all"),
                   "batch_hard": lambda: TripletLoss(0.5, squared=False, mining="batch_hard"),
                   "semihard": lambda: TripletLoss(0.5, mining="semihard"),
                   "contrastive": lambda: ContrastiveLoss(1.0, mining="batch_all")}


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


# -----------------------------------------------------------------------------
# PartialFC: class centres sharded across the processes

def margin_softmax(kind, dim, classes):
    return (ArcFaceLoss if kind == "arcface" else CosFaceLoss)(dim, classes, scale=16.0, margin=0.3)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_partial_fc_on_one_process_at_sample_rate_1_is_the_margin_softmax(kind):
    torch.manual_seed(0)
    full = margin_softmax(kind, 6, 5)
    partial = PartialFC(margin_softmax(kind, 6, 5), num_classes=5)
    with torch.no_grad():
        partial.margin.weight.copy_(full.weight)
    embeddings_ = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(5).repeat_interleave(2)  # 5 identities x 2
    mine, theirs = embeddings_.clone().requires_grad_(), embeddings_.clone().requires_grad_()
    (loss, stats), (reference, reference_stats) = partial(mine, labels), full(theirs, labels)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    assert stats == pytest.approx(reference_stats)
    (loss + reference).backward()
    torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(partial.margin.weight.grad, full.weight.grad, atol=1e-5, rtol=1e-5)


def test_partial_fc_samples_the_batch_classes_and_a_share_of_the_others():
    torch.manual_seed(0)
    partial = PartialFC(ArcFaceLoss(4, 100), num_classes=100, sample_rate=0.1)
    labels = torch.tensor([3, 3, 50, 97])
    index, target = partial.sampled(labels)
    assert len(index) == 10 and {3, 50, 97} <= set(index.tolist()) and index.tolist() == sorted(index.tolist())
    assert index[target].tolist() == labels.tolist()
    crowded = torch.arange(20)  # more classes in the batch than the share: all of them
    assert len(partial.sampled(crowded)[0]) == 20
    inputs = torch.randn(4, 4, requires_grad=True)
    torch.manual_seed(5)
    index, _ = partial.sampled(labels)
    torch.manual_seed(5)  # the forward draws the same share
    loss, _ = partial(inputs, labels)
    loss.backward()
    unused = torch.ones(100, dtype=torch.bool)
    unused[index] = False
    assert partial.margin.weight.grad[unused].abs().sum() == 0 and partial.margin.weight.grad[index].abs().sum() > 0
    with pytest.raises(ValueError):
        PartialFC(ArcFaceLoss(4, 100), num_classes=100, sample_rate=0)
    with pytest.raises(ValueError):
        PartialFC(ArcFaceLoss(4, 60), num_classes=100, rank=0, world_size=2)  # holds 50 of 100


def test_partial_fc_in_eval_mode_scores_every_centre_and_draws_nothing():
    torch.manual_seed(0)
    full, partial = ArcFaceLoss(4, 100), PartialFC(ArcFaceLoss(4, 100), num_classes=100, sample_rate=0.1)
    with torch.no_grad():
        partial.margin.weight.copy_(full.weight)
    inputs, labels = torch.randn(6, 4), torch.tensor([3, 3, 50, 97, 0, 1])
    partial.eval()
    generator = torch.get_rng_state()
    assert partial(inputs, labels)[0].item() == pytest.approx(full(inputs, labels)[0].item(), rel=1e-5)
    assert torch.equal(torch.get_rng_state(), generator)  # evaluation leaves training's random stream alone
    partial.train()
    partial(inputs, labels)
    assert not torch.equal(torch.get_rng_state(), generator)


@pytest.mark.parametrize("loss", ["arcface", "cosface"])
def test_build_partial_fc_gives_each_process_its_share_started_as_the_whole_layer(loss):
    classes, dim = 1000, 8
    bound = math.sqrt(6 / (classes + dim))  # Xavier's, of the whole (classes, dim) layer
    for world_size in (1, 2, 3):
        shares = [build_partial_fc(loss, embedding_dim=dim, num_classes=classes, partial_fc=0.3, rank=rank,
                                  world_size=world_size) for rank in range(world_size)]
        assert all(isinstance(share, PartialFC) and share.sample_rate == 0.3 for share in shares)
        assert all(isinstance(share.margin, CosFaceLoss) == (loss == "cosface") for share in shares)
        assert [(share.start, share.end) for share in shares] == [partial_fc_shard(classes, rank, world_size)
                                                                  for rank in range(world_size)]
        assert sum(len(share.margin.weight) for share in shares) == classes
        for share in shares:
            largest = share.margin.weight.abs().max().item()
            assert 0.95 * bound < largest <= bound
        assert [share.sharded for share in shares] == [world_size > 1] * world_size
    torch.manual_seed(0)
    unsharded = build_objective(loss, embedding_dim=dim, num_classes=classes)
    torch.manual_seed(0)  # one process, every class: the very centres of the margin softmax
    whole = build_partial_fc(loss, embedding_dim=dim, num_classes=classes, partial_fc=1.0)
    assert torch.equal(whole.margin.weight, unsharded.weight)


def test_build_partial_fc_refuses_an_unknown_loss_one_without_a_margin_softmax_and_too_few_classes():
    for loss in ("triplet", "contrastive", "pair_bce", "unknown"):
        with pytest.raises(ValueError):
            build_partial_fc(loss, embedding_dim=8, num_classes=10, partial_fc=0.5)
    with pytest.raises(ValueError):
        build_partial_fc("arcface", embedding_dim=8, num_classes=3, partial_fc=0.5, rank=0, world_size=4)


def test_partial_fc_summary_reports_the_centres_memory_per_process_and_unsharded():
    partial = build_partial_fc("arcface", embedding_dim=100, num_classes=10_000, partial_fc=0.5, rank=1,
                              world_size=2)
    line = partial.summary()
    assert "10,000 x 100" in line and re.findall(r"([\d.,]+) MB", line) == ["2", "4"]  # float32: 4 bytes each


CLASSES, SHARDED_DIM = 10, 6


def sharded_reference():
    """The full margin softmax's centres, a global batch of 16 over the 10 classes, and its loss and gradients."""
    torch.manual_seed(1)
    full = ArcFaceLoss(SHARDED_DIM, CLASSES, scale=16.0, margin=0.3)
    inputs = torch.randn(16, SHARDED_DIM, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 9, 4, 5, 2, 7])
    loss, stats = full(inputs, labels)
    loss.backward()
    return full.weight.detach(), inputs.detach(), labels, loss.item(), stats, inputs.grad, full.weight.grad


def sharded_worker(rank, world_size, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    weight, inputs, labels, *_ = sharded_reference()
    start, end = partial_fc_shard(CLASSES, rank, world_size)
    partial = PartialFC(ArcFaceLoss(SHARDED_DIM, end - start, scale=16.0, margin=0.3), CLASSES, 1.0, rank, world_size)
    with torch.no_grad():
        partial.margin.weight.copy_(weight[start:end])
    mine = inputs[rank * 8:(rank + 1) * 8].clone().requires_grad_()
    loss, stats = partial(*gather_batch(mine, labels[rank * 8:(rank + 1) * 8]))
    loss.backward()
    torch.save(dict(loss=loss.item(), stats=stats, grad=mine.grad, weight_grad=partial.margin.weight.grad,
                    centres=partial.margin.weight.numel()), os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_sharded_centres_on_two_processes_give_the_full_softmax_and_its_gradients(tmp_path):
    mp.spawn(sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    weight, _, _, loss, stats, input_grad, weight_grad = sharded_reference()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        start, end = partial_fc_shard(CLASSES, rank, 2)
        assert result["centres"] == weight.numel() // 2  # half the centres' memory on each process
        assert result["loss"] == pytest.approx(loss, abs=1e-5) and result["stats"] == pytest.approx(stats)
        torch.testing.assert_close(result["weight_grad"], weight_grad[start:end], atol=1e-5, rtol=1e-5)
        # world_size times the embeddings' gradient: DistributedDataParallel's average brings it back
        torch.testing.assert_close(result["grad"], 2 * input_grad[rank * 8:(rank + 1) * 8], atol=1e-5, rtol=1e-5)
