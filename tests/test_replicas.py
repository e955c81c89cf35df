"""replicas: the layout arithmetic, the routing fold, and the expert-gradient average over copies (real gloo ranks,
compared with the mean computed in one process)."""

import pytest
import torch
import torch.distributed as dist

from hiermoe_lightning import ExpertParallel
from hiermoe_lightning.parallel import fold_replicas
from hiermoe_lightning.replicas import (ReplicaLayout, average_over_copies_, build_replicas,
                                        default_replica_topology)
from hiermoe_lightning.testing import run_ranks


def test_layout_of_consecutive_ranks():
    layout = ReplicaLayout.resolve(2, 6)
    assert layout.num_replicas == 3
    assert [layout.replica_of(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert layout.expert_parallel_ranks(1) == [2, 3]
    assert layout.copies_of(1) == [1, 3, 5]
    assert ReplicaLayout.resolve(None, 4) == ReplicaLayout(4, 4)


@pytest.mark.parametrize("size, error, match", [
    (3, ValueError, r"expert_parallel_size=3 must divide the world size \(4 ranks\): one of \[1, 2, 4\]"),
    (0, ValueError, "expert_parallel_size must be None .* or an int >= 1, got 0"),
    (2.0, TypeError, "expert_parallel_size must be None"),
    (True, TypeError, "expert_parallel_size must be None"),
])
def test_bad_sizes_name_the_parameter(size, error, match):
    with pytest.raises(error, match=match):
        ReplicaLayout.resolve(size, 4)


@pytest.mark.parametrize("size, devices, expected", [(4, 2, "2x2"), (2, 2, "1x2"), (2, 4, "2"), (6, 4, "6"),
                                                     (4, 1, "4x1")])
def test_default_topology_of_one_replica(size, devices, expected):
    assert default_replica_topology(size, devices) == expected


def test_fold_puts_each_replicas_tokens_under_its_expert_parallel_rank():
    # 2 replicas x 2 ranks, 3 tokens each, top-1: rank r routes its tokens to expert 10 * r + t
    routing = torch.tensor([[[10 * r + t] for t in range(3)] for r in range(4)])
    folded = fold_replicas(routing, 2)
    assert folded.shape == (2, 6, 1)
    assert folded[0, :, 0].tolist() == [0, 1, 2, 20, 21, 22]  # ranks 0 and 2
    assert folded[1, :, 0].tolist() == [10, 11, 12, 30, 31, 32]  # ranks 1 and 3
    assert torch.equal(fold_replicas(routing, 1), routing)


def _grads(rank: int) -> list:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(2, 2, generator=g)]


def _average(rank, world):
    replicas = build_replicas(ReplicaLayout.resolve(2, world), rank)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads(rank)]
    for i, (p, g) in enumerate(zip(params, _grads(rank))):
        # param 1 has a gradient on replica 0 only; param 2 on no rank at all
        p.grad = None if (i == 1 and replicas.index == 1) or i == 2 else g.clone()
    calls = average_over_copies_(params, replicas.copies_group, replicas.num_replicas, bucket_bytes=64)
    return calls, [None if p.grad is None else p.grad for p in params], replicas.index


def test_average_over_copies_equals_the_mean_of_the_copies():
    world = 4
    out = run_ranks(_average, world)
    for rank, (calls, grads, index) in enumerate(out):
        copy = (rank + 2) % world  # the same expert-parallel rank in the other replica
        mine, theirs = _grads(rank), _grads(copy)
        assert index == rank // 2
        assert calls == 2  # 48 + 20 bytes of float32: two buckets of at most 64 bytes
        torch.testing.assert_close(grads[0], (mine[0] + theirs[0]) / 2)
        first = mine if rank < 2 else theirs  # the copy in replica 0 is the only one with a gradient
        torch.testing.assert_close(grads[1], first[1] / 2)
        assert grads[2] is None  # no copy had one: stays None, so the optimizer skips it as one process would


def _gather_with_replicas(rank, world):
    replicas = build_replicas(ReplicaLayout.resolve(2, world), rank)
    ep = ExpertParallel("2", dispatch="hd1", replicas=replicas)
    ids = torch.full((rank + 1, 2), rank)  # rank r routes r + 1 tokens, all to expert r
    routing = ep.gather_routing(ids)
    shared = ep.all_gather_object(f"replica {replicas.index} rank {ep.rank}")
    return ep.rank, ep.world_size, routing, shared, dist.get_world_size(ep.peer_group("a2a").group)


def test_expert_parallel_with_replicas_sees_every_replicas_tokens():
    out = run_ranks(_gather_with_replicas, 4)
    for rank, (ep_rank, ep_world, routing, shared, group_size) in enumerate(out):
        assert (ep_rank, ep_world, group_size) == (rank % 2, 2, 2)
        assert shared == ["replica 0 rank 0", "replica 0 rank 1"]  # the first replica's, on every rank
        assert torch.equal(routing, out[0][2])  # identical everywhere
        for g in range(2):  # expert-parallel rank g holds its own tokens and those of its copy (rank g + 2)
            rows = routing[g][routing[g][:, 0] >= 0]
            assert sorted(rows[:, 0].tolist()) == [g] * (g + 1) + [g + 2] * (g + 3)
