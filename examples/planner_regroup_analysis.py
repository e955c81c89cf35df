"""What the swap planner can find on the bundled model's routing: greedy swaps alone, the hiermoe planner (greedy or
regroup) and the ideal clusters-gathered placement, as predicted one-way all-to-all savings (docs/benchmarks.md
section 13). Run from the repository root: python examples/planner_regroup_analysis.py"""
import torch
from hiermoe_lightning.models.moe_gpt import MoEGPT
from hiermoe_lightning.data.text import ByteTextDataModule
from hiermoe_lightning.placement import Placement, plan_swaps
from hiermoe_lightning.placement.planners import PlanRequest, hiermoe_planner, regroup_plan
from hiermoe_lightning.placement.payoff import realised_saving_ms
from hiermoe_lightning.cost.link_costs import LinkCosts
costs = LinkCosts.from_yaml("docs/results/calibrated_2x2_1000mbit.yaml")
ds = ByteTextDataModule(None, seq_len=128, batch_size=8).train_dataset
xs = torch.stack([ds[i][0] for i in range(16)])  # 4 ranks x 512 tokens
print("| routing | layer | greedy swaps (<= 32) | hiermoe planner (greedy or regroup) | clusters gathered, unbalanced |")
print("|---|---|---|---|---|")
for E, C, S in [(16, 0, 0.0), (16, 2, 1.5), (32, 2, 1.5), (32, 4, 3.0)]:
    m = MoEGPT(hidden_size=256, num_heads=4, ffn_hidden_size=96, num_experts=E, top_k=8, num_layers=2,
               router_clusters=C, router_cluster_strength=S or 1.5)
    with torch.no_grad():
        m(xs)
    for j, layer in enumerate(m.moe_layers()):
        ids = layer.last_expert_ids.reshape(4, -1, 8)
        start = Placement.contiguous(E, 4)
        req = PlanRequest(ids, None, start, "2x2", costs, 256, 4, max_swaps=32, compute_balance_tolerance=1.10)
        g = plan_swaps(ids, start, "2x2", costs, 256, 4, max_swaps=32, compute_balance_tolerance=1.10)
        h = hiermoe_planner(req)
        pct = lambda p: f"{len(p.swaps)} swaps, {100 * (1 - p.predicted_ms_after / p.predicted_ms_before):.1f}%"
        ideal = "-"
        if C:
            order = sorted(range(E), key=lambda e: (e % C, e))
            rank = torch.empty(E, dtype=torch.long); slot = torch.empty(E, dtype=torch.long)
            for pos, e in enumerate(order):
                rank[e], slot[e] = pos // (E // 4), pos % (E // 4)
            b, a = realised_saving_ms(ids, None, start, Placement(rank, slot, 4), "2x2", costs, 1024)
            ideal = f"{100 * (1 - a / b):.1f}%"
        label = f"E={E}, " + (f"{C} clusters, strength {S}" if C else "plain router")
        print(f"| {label} | {j} | {pct(g)} | {pct(h)} | {ideal} |")
