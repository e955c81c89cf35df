"""Measure how clustered ``MoEGPT(router_clusters=C, router_cluster_strength=S)`` routes, at init and after training.

    .venv/bin/python examples/clustered_routing_sweep.py                       # the table of docs/clustered-routing.md
    .venv/bin/python examples/clustered_routing_sweep.py --top-k 8 --clusters 2 --strengths 2 --steps 10 --mid-step 5

One process, no distribution. For every ``(top_k, clusters, strength)`` it builds the ``bench e2e`` default model
(hidden 256, 4 heads, 2 layers, 16 experts, expert FFN 96, AdamW lr 3e-3, seed 0) with a clustered router, then
trains it ``--steps`` optimizer steps on the bundled byte text (``ByteTextDataModule``, the training windows in
order, ``--batch-size`` x ``--seq-len`` tokens per step) with the model's own optimizer and loss (token
cross-entropy + aux loss). Routing is measured on a fixed held-out batch (the first ``--batch-size`` validation
windows, eval mode) before training, after ``--mid-step`` steps (about a ``bench e2e`` run) and at the end:

* ``share``: :func:`~hiermoe_lightning.models.clustered_routing.within_cluster_share` of every MoE layer's top-k
  (the share of a token's pairs inside its main cluster), mean over layers; ``chance`` is uniform random top-k's,
  ``max`` the most a token can have in one cluster, ``min(1, (E / C) / K)``;
* ``load min/max``: the least and most loaded expert over all layers, as a multiple of the mean load ``T*K/E``
  (1.0 = perfectly balanced; 0 = an expert no token reaches).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hiermoe_lightning.data.text import ByteTextDataModule
from hiermoe_lightning.models import MoEGPT
from hiermoe_lightning.models.clustered_routing import chance_within_cluster_share, within_cluster_share


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",")]


@torch.no_grad()
def routing_stats(model: MoEGPT, inputs: torch.Tensor, clusters: int) -> dict:
    """``{"share", "load_min", "load_max"}`` of ``model``'s routing of ``inputs [B, S]`` (eval mode, restored)."""
    was_training = model.training
    model.eval()
    model(inputs)
    model.train(was_training)
    shares, loads = [], []
    for layer in model.moe_layers():
        ids = layer.last_expert_ids  # [T, K]
        shares.append(within_cluster_share(ids, clusters))
        counts = torch.bincount(ids.flatten(), minlength=layer.num_experts).double()  # [E]
        loads.append(counts / (ids.numel() / layer.num_experts))
    load = torch.stack(loads)  # [layers, E]
    return {"share": sum(shares) / len(shares), "load_min": float(load.min()), "load_max": float(load.max())}


def measure(top_k: int, clusters: int, strength: float, steps: int, batch_size: int, seq_len: int,
            mid_step: int = 25, num_experts: int = 16, hidden_size: int = 256, seed: int = 0) -> dict:
    """One row: routing at init and after ``steps`` training steps (see the module docstring)."""
    data = ByteTextDataModule(seq_len=seq_len, batch_size=batch_size)
    held_out = torch.stack([data.val_dataset[i][0] for i in range(batch_size)])  # [B, S]
    model = MoEGPT(seq_len=seq_len, num_layers=2, hidden_size=hidden_size, num_heads=4,
                   ffn_hidden_size=hidden_size * 3 // 8, num_experts=num_experts, top_k=top_k, lr=3e-3, seed=seed,
                   router_clusters=clusters, router_cluster_strength=strength)
    before = routing_stats(model, held_out, clusters)
    optimizer = model.configure_optimizers()
    loader = torch.utils.data.DataLoader(data.train_dataset, batch_size=batch_size, shuffle=False, drop_last=True)
    model.train()
    losses, batches, mid = [], iter(loader), None
    for step in range(1, steps + 1):
        lm_loss, aux = model.loss_terms(next(batches))
        optimizer.zero_grad()
        (lm_loss + aux).backward()
        optimizer.step()
        losses.append(float(lm_loss.detach()))
        if step == mid_step:
            mid = routing_stats(model, held_out, clusters)
    after = routing_stats(model, held_out, clusters)
    return {"top_k": top_k, "clusters": clusters, "strength": strength,
            "chance": chance_within_cluster_share(num_experts, top_k, clusters),
            "max_share": min(1.0, num_experts / clusters / top_k), "seed": seed, "steps": steps, "mid_step": mid_step,
            "share_init": before["share"], "share_mid": mid["share"] if mid else None, "share_trained": after["share"],
            "load_min_init": before["load_min"], "load_max_init": before["load_max"],
            "load_min_trained": after["load_min"], "load_max_trained": after["load_max"],
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--top-k", type=_csv(int), default=[8, 4])
    p.add_argument("--clusters", type=_csv(int), default=[2, 4])
    p.add_argument("--strengths", type=_csv(float), default=[0.0, 1.0, 2.0, 4.0, 8.0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--mid-step", type=int, default=25, help="also measure after this many steps (default 25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON to FILE")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"E=16, hidden 256, 2 MoE layers, seed {args.seed}; {args.steps} steps of {args.batch_size}x{args.seq_len} "
          f"tokens; share and load on {args.batch_size}x{args.seq_len} held-out tokens\n")
    print(f"| top-k | C | strength | chance | max | share init | share step {args.mid_step} | share step {args.steps} "
          f"| load min/max init | load min/max step {args.steps} | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for top_k in args.top_k:
        for clusters in args.clusters:
            for strength in args.strengths:
                start = time.perf_counter()
                r = measure(top_k, clusters, strength, args.steps, args.batch_size, args.seq_len, args.mid_step,
                            seed=args.seed)
                rows.append(r)
                loss = f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}" if r["loss_first"] is not None else ""
                mid = f"{r['share_mid']:.3f}" if r["share_mid"] is not None else ""
                print(f"| {top_k} | {clusters} | {strength:g} | {r['chance']:.3f} | {r['max_share']:.2f} | "
                      f"{r['share_init']:.3f} | {mid} | {r['share_trained']:.3f} | "
                      f"{r['load_min_init']:.2f} / {r['load_max_init']:.2f} | "
                      f"{r['load_min_trained']:.2f} / {r['load_max_trained']:.2f} | {loss} |", flush=True)
                r["seconds"] = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
