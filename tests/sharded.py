"""Shared harness: run a sharded MoELayer on N gloo ranks and compare with the unsharded single-process layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hiermoe_lightning import ExpertParallel, MoELayer
from hiermoe_lightning.testing import run_ranks

HIDDEN, FFN = 16, 24


@dataclass
class Case:
    topology: str
    dispatch: str
    num_experts: int
    top_k: int
    tokens: list[int]  # tokens per rank (may hold zeros)
    dtype: torch.dtype = torch.float32
    seed: int = 0
    layer_kwargs: dict = field(default_factory=dict)
    force_expert: int | None = None  # route every token to this expert first (selection bias)
    # capacity is per local batch, so the reference runs the unsharded layer on each rank's tokens separately
    per_rank_reference: bool = False
    parallel_kwargs: dict = field(default_factory=dict)  # extra ExpertParallel arguments (e.g. pipeline_chunks)

    def build(self) -> MoELayer:
        kwargs = dict(self.layer_kwargs)
        if self.force_expert is not None:
            kwargs["bias_update_rate"] = 1.0
        layer = MoELayer(HIDDEN, FFN, self.num_experts, self.top_k, seed=self.seed, dtype=self.dtype, **kwargs)
        if self.force_expert is not None:
            layer.router.expert_bias[self.force_expert] = 1e6
        return layer

    def inputs(self):
        g = torch.Generator().manual_seed(self.seed + 7)
        total = sum(self.tokens)
        x = torch.randn(total, HIDDEN, generator=g).to(self.dtype)
        probe = torch.randn(total, HIDDEN, generator=g).to(self.dtype)  # loss = sum(out * probe)
        return x, probe


def _grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}


def reference(case: Case):
    """Unsharded layer, one process, all tokens: output, input grad, parameter grads (experts [E, ...])."""
    layer = case.build()
    x, probe = case.inputs()
    x = x.clone().requires_grad_(True)
    chunks = torch.split(x, case.tokens) if case.per_rank_reference else [x]
    out = torch.cat([layer(c) for c in chunks])
    (out.float() * probe.float()).sum().backward()
    return out.detach(), x.grad.detach(), _grads(layer)


def _rank_fn(rank, world, cases, device="cpu"):
    results = []
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    for case in cases:
        layer = case.build()
        ExpertParallel(case.topology, dispatch=case.dispatch, **case.parallel_kwargs).shard_(layer)
        layer.to(device)
        x_all, probe_all = case.inputs()
        start = sum(case.tokens[:rank])
        sl = slice(start, start + case.tokens[rank])
        x = x_all[sl].clone().to(device).requires_grad_(True)
        out = layer(x)
        (out.float() * probe_all[sl].to(device).float()).sum().backward()
        results.append({
            "out": out.detach().cpu(), "x_grad": x.grad.detach().cpu(),
            "grads": {n: g.cpu() for n, g in _grads(layer).items()},
            "experts": layer.local_expert_ids(), "bytes": layer.last_handle.bytes_by_level(),
            "phases": layer.last_handle.phase_bytes(), "num_chunks": len(layer.last_handle.chunks),
        })
    return results


def run_sharded(world: int, cases: list[Case], timeout: float = 90.0, backend: str = "gloo"):
    """Every case on ``world`` ranks; ``backend="nccl"``: each rank on its own GPU (layer, tokens and collectives on
    CUDA), results brought back to the CPU."""
    if backend == "nccl":  # spawned: CUDA may already be initialised in this process, and forks cannot use it then
        return run_ranks(_rank_fn, world, cases, "cuda", timeout=timeout, backend=backend, start_method="spawn")
    return run_ranks(_rank_fn, world, cases, timeout=timeout)


def assert_matches_reference(case: Case, per_rank: list[dict], atol=2e-5, rtol=1e-4):
    """Outputs, input grads, router/shared grads (summed over ranks) and each expert's grad equal the reference."""
    ref_out, ref_xg, ref_grads = reference(case)
    out = torch.cat([r["out"] for r in per_rank])
    xg = torch.cat([r["x_grad"] for r in per_rank])
    label = f"{case.topology}/{case.dispatch}/E{case.num_experts}/K{case.top_k}/T{case.tokens}/{case.dtype}"
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol, msg=lambda m: f"{label} output: {m}")
    torch.testing.assert_close(xg, ref_xg, atol=atol, rtol=rtol, msg=lambda m: f"{label} input grad: {m}")
    for name, ref_g in ref_grads.items():
        if name.startswith("experts."):
            got = torch.zeros_like(ref_g)
            for r in per_rank:
                got[r["experts"]] = r["grads"][name]
        else:  # replicated parameters: each rank holds the grad of its own tokens; DDP would sum them
            got = sum(r["grads"][name] for r in per_rank)
        torch.testing.assert_close(got, ref_g, atol=atol, rtol=rtol, msg=lambda m: f"{label} grad {name}: {m}")
