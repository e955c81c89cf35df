"""The GPU-ready path, checked on the CPU: a dispatch reads values back to the host once per hop (the counts), the
combine and both backwards never.

On a GPU every such read is a synchronisation: the host waits for the device. Here a TorchFunctionMode counts the
operations that would be one (``tolist``, ``item``, ``int()``/``bool()`` of a tensor, ``nonzero``, ``unique``,
``bincount``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``) while real hops run on gloo
ranks. (``tests/dispatch/test_cuda.py`` checks the same on a GPU with CUDA's own sync detector.)
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hiermoe_lightning import ExpertParallel
from hiermoe_lightning.dispatch.engine import DispatchHandle, combine, dispatch_blocks, gather_rows
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.testing import run_ranks

_READS = {"tolist", "item", "__int__", "__bool__", "__float__", "__index__", "nonzero", "unique", "bincount",
          "masked_select"}


class HostReads(TorchFunctionMode):
    """Counts the torch calls that read tensor values back to the host (synchronising on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS or _mask_index(name, args) or (name == "repeat_interleave" and _sized_by_data(args, kwargs)):
            self.calls.append(name)
        return func(*args, **kwargs)


def _mask_index(name, args) -> bool:
    if name != "__getitem__" or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


def _sized_by_data(args, kwargs) -> bool:
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None


def _count_reads(rank, world, name):
    ep = ExpertParallel("2x2", dispatch=name, shared_memory=False)  # sockets: counts travel before the rows
    placement = Placement.contiguous(8, world)
    g = torch.Generator().manual_seed(rank)
    T, K, M = 24, 3, 8
    ids = torch.stack([torch.randperm(8, generator=g)[:K] for _ in range(T)])
    pair_row, pair_expert = torch.arange(T).repeat_interleave(K), ids.reshape(-1)
    weight = torch.rand(T * K, generator=g).requires_grad_(True)
    x = torch.randn(T, M, generator=g).requires_grad_(True)
    route = ep.route(name, placement)
    handle = DispatchHandle(name, 2, M * 4)
    counts = {}
    with HostReads() as reads:
        blocks, w, prow, _ = dispatch_blocks(x, weight, pair_row, pair_expert, route, handle)
    counts["dispatch"] = reads.calls
    y = (gather_rows(blocks, prow) * w[:, None]).float()
    y = torch.zeros(sum(b.shape[0] for b in blocks), M).index_add(0, prow, y)
    with HostReads() as reads:
        out = combine(y, handle, x.dtype)
    counts["combine"] = reads.calls
    with HostReads() as reads:
        out.square().sum().backward()
    counts["backward"] = [c for c in reads.calls]
    return counts, len(handle.hops)


@pytest.mark.parametrize("name", ["flat", "hd1", "2dh", "hd2"])
def test_a_dispatch_reads_the_host_once_per_hop_and_the_way_back_never(name):
    for counts, hops in run_ranks(_count_reads, 4, name):
        assert hops == (1 if name in ("flat", "hd1") else 2)
        assert counts["dispatch"] == ["tolist"] * hops, counts["dispatch"]
        assert counts["combine"] == [], counts["combine"]
        assert counts["backward"] == [], counts["backward"]
