"""Sharded == unsharded for a MoELayer with every option Hugging Face families need switched on: a fixed selection
bias (bias_update_rate 0), routed_scaling_factor, router_dtype (fp32, bf16, the input's) and a gated shared expert, with sigmoid group-limited
routing, on "2x2" (hd2, 2dh, flat) and one level of 4 ranks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.sharded import Case, assert_matches_reference, run_sharded

ALL_ON = {"score_func": "sigmoid", "num_expert_groups": 4, "topk_groups": 2, "routed_scaling_factor": 2.5,
          "router_dtype": torch.float32, "num_shared_experts": 1, "shared_expert_gate": True}


@dataclass
class BiasedCase(Case):
    """A fixed selection bias (as loaded from a checkpoint), with no bias update."""

    fixed_bias: tuple = ()

    def build(self):
        layer = super().build()
        if self.fixed_bias:
            with torch.no_grad():
                layer.router.expert_bias.copy_(torch.tensor(self.fixed_bias))
        return layer


BIAS = (0.3, -0.2, 0.0, 0.1, -0.3, 0.25, -0.1, 0.05)


@pytest.mark.parametrize("topology, dispatches", [("2x2", ("hd2", "2dh", "flat")), ("4", ("flat", "hd1"))])
def test_all_new_options_sharded_equal_unsharded(topology, dispatches):
    cases = [BiasedCase(topology, d, 8, 3, [5, 0, 7, 4], seed=9, layer_kwargs=ALL_ON, fixed_bias=BIAS)
             for d in dispatches]
    # logits in bf16: a bf16 layer with router_dtype None (the input's dtype), an fp32 layer with bf16 logits (the
    # router's weight gradient is then a bf16 matmul over each rank's tokens: equal to bf16 tolerance)
    cases.append(BiasedCase(topology, dispatches[0], 8, 2, [6, 3, 5, 4], dtype=torch.bfloat16, seed=2,
                            layer_kwargs={**ALL_ON, "router_dtype": None}, fixed_bias=BIAS))
    cases.append(BiasedCase(topology, dispatches[0], 8, 2, [6, 3, 5, 4], seed=3,
                            layer_kwargs={**ALL_ON, "router_dtype": torch.bfloat16}, fixed_bias=BIAS))
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        bf16 = torch.bfloat16 in (case.dtype, case.layer_kwargs["router_dtype"])
        tol = dict(atol=3e-2, rtol=3e-2) if bf16 else {}
        assert_matches_reference(case, [r[i] for r in results], **tol)
    # the options are live: the bias changed the selection, and the gate got a gradient on the ranks
    unbiased = Case(topology, dispatches[0], 8, 3, [5, 0, 7, 4], seed=9, layer_kwargs=ALL_ON).build()
    biased = cases[0].build()
    x, _ = cases[0].inputs()
    with torch.no_grad():
        assert not torch.equal(unbiased.router(x).expert_ids, biased.router(x).expert_ids)
    assert sum(float(r[0]["grads"]["shared_expert_gate.weight"].abs().sum()) for r in results) > 0
