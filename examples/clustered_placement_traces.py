"""Routing traces for timing a swap plan with ``hiermoe bench comm`` (docs/benchmarks.md section 13).

The bundled model's clustered routing (32 experts, 2 clusters, strength 1.5, 4 ranks x 2048 tokens, at init), for
each MoE layer: ``<out>/trace_l<j>_before.pt`` as routed, and ``<out>/trace_l<j>_after.pt`` with every expert
renamed to its position under the hiermoe planner's placement. ``bench comm`` places experts contiguously, so the
second trace times the planned placement. Run from the repository root:
``python examples/clustered_placement_traces.py [out_dir]``."""
import sys

import torch
from hiermoe_lightning.models.moe_gpt import MoEGPT
from hiermoe_lightning.data.text import ByteTextDataModule
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.placement.planners import PlanRequest, hiermoe_planner
from hiermoe_lightning.cost.link_costs import LinkCosts
OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
costs = LinkCosts.from_yaml("docs/results/calibrated_2x2_1000mbit.yaml")
ds = ByteTextDataModule(None, seq_len=128, batch_size=8).train_dataset
xs = torch.stack([ds[i][0] for i in range(64)])  # 4 ranks x 2048 tokens
m = MoEGPT(hidden_size=256, num_heads=4, ffn_hidden_size=96, num_experts=32, top_k=8, num_layers=2,
           router_clusters=2, router_cluster_strength=1.5)
with torch.no_grad():
    m(xs)
for j, layer in enumerate(m.moe_layers()):
    ids = layer.last_expert_ids.reshape(4, -1, 8)
    start = Placement.contiguous(32, 4)
    plan = hiermoe_planner(PlanRequest(ids, None, start, "2x2", costs, 256, 4, max_swaps=32))
    after = plan.placement_after
    position = after.expert_to_rank * 8 + after.expert_to_slot
    torch.save(ids.clone(), f"{OUT}/trace_l{j}_before.pt")
    torch.save(position[ids].clone(), f"{OUT}/trace_l{j}_after.pt")
    print(j, len(plan.swaps), "swaps", round(plan.predicted_ms_before, 3), "->", round(plan.predicted_ms_after, 3))
