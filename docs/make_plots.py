"""Make the figures and tables of ``docs/cost-model.md`` from the cost model.

    .venv/bin/python docs/make_plots.py              # prints both markdown tables, writes docs/img/*.png
    .venv/bin/python docs/make_plots.py --no-plots   # tables only (no matplotlib needed)

* ``docs/img/duplication.png``: duplication rate vs top-K for R = 32/16/8/4 groups of E = 128 experts under uniform
  routing (``hiermoe_lightning.cost.model.expected_duplication_rate``), with the HierMoE paper's measured values as
  markers.
* ``docs/img/paper_sweep.png``: predicted all-to-all speedup of the chosen ``hd<d>`` over ``flat`` with the
  ``paper-a6000`` link costs for the paper's three sweeps (K, E, G), next to the paper's measured "HD-auto (no swap)"
  speedups over Megatron-LM. Hidden 2048, bf16, 1024 tokens per rank, uniform routing, seed 0.

Everything is deterministic: the routing is drawn with ``torch.Generator().manual_seed(0)``.
"""

from __future__ import annotations

import argparse
import os

from hiermoe_lightning import LinkCosts, Placement, Topology
from hiermoe_lightning.cost.model import expected_duplication_rate, predict
from hiermoe_lightning.traces import generate_routing

HERE = os.path.dirname(os.path.abspath(__file__))

# HierMoE paper (arXiv 2508.09591): measured duplication rate, E = 128, R groups x top-K (percent)
PAPER_DUPLICATION = {32: {2: 2, 4: 4, 6: 7, 8: 9}, 16: {2: 3, 4: 9, 6: 14, 8: 18},
                     8: {2: 6, 4: 17, 6: 27, 8: 34}, 4: {2: 12, 4: 32, 6: 46, 8: 55}}
NUM_EXPERTS_DUP = 128

# The paper's sweeps (base: Qwen3-30B-A3B-like, K = 8, E = 128, G = 32) and its measured "HD-auto (no swap)"
# all-to-all speedup over Megatron-LM.
SWEEPS = [
    # (sweep, label, topology, num_experts, top_k, paper)
    ("K", "K=6", "4x2x2x2", 128, 6, 1.37),
    ("K", "K=8", "4x2x2x2", 128, 8, 1.72),
    ("K", "K=10", "4x2x2x2", 128, 10, 1.82),
    ("E", "E=64", "4x2x2x2", 64, 8, 1.57),
    ("E", "E=128", "4x2x2x2", 128, 8, 1.72),
    ("E", "E=256", "4x2x2x2", 256, 8, 1.61),
    ("G", "G=8 (1x8)", "1x8", 128, 8, 2.36),
    ("G", "G=16 (2x8)", "2x8", 128, 8, 2.50),
    ("G", "G=32 (4x2x2x2)", "4x2x2x2", 128, 8, 1.72),
]
HIDDEN, BYTES_PER_ELEM, TOKENS_PER_RANK, SEED = 2048, 2, 1024, 0


def duplication_table() -> list[tuple[int, int, float, int]]:
    """``(R, K, predicted %, paper %)`` for the paper's grid."""
    return [(R, K, 100 * expected_duplication_rate(NUM_EXPERTS_DUP, R, K), PAPER_DUPLICATION[R][K])
            for R in PAPER_DUPLICATION for K in PAPER_DUPLICATION[R]]


def sweep_rows() -> list[dict]:
    """One dict per sweep point: the chosen hd<d>, flat and chosen ms, speedups (unequal splits and padded)."""
    costs = LinkCosts.preset("paper-a6000")
    out = []
    for sweep, label, topo, E, K, paper in SWEEPS:
        topology = Topology.parse(topo)
        G = topology.world_size
        ids = generate_routing("uniform", G, TOKENS_PER_RANK, E, K, SEED)
        placement = Placement.contiguous(E, G)
        real = predict(topology, placement, ids, HIDDEN, BYTES_PER_ELEM, costs)
        padded = predict(topology, placement, ids, HIDDEN, BYTES_PER_ELEM, costs, padded=True)
        flat, pflat = real.dispatch["flat"].predicted_ms, padded.dispatch["flat"].predicted_ms
        out.append(dict(
            sweep=sweep, label=label, topology=topo, E=E, K=K, paper=paper,
            chosen=real.chosen, flat_ms=flat, chosen_ms=real.chosen_ms, speedup=flat / real.chosen_ms,
            padded_chosen=padded.chosen, padded_speedup=pflat / padded.chosen_ms,
            hd_ms={n: d.predicted_ms for n, d in real.dispatch.items() if n.startswith("hd")},
        ))
    return out


def print_tables(dup, rows) -> None:
    print("| R \\ K | " + " | ".join(f"K={K}" for K in (2, 4, 6, 8)) + " |")
    print("|---|---|---|---|---|")
    for R in PAPER_DUPLICATION:
        cells = [f"{p:.1f}% ({paper}%)" for r, _, p, paper in dup if r == R]
        print(f"| R={R} | " + " | ".join(cells) + " |")
    print()
    print("| sweep point | topology | E | K | chosen | flat ms | chosen ms | predicted speedup "
          "| padded form (chosen) | paper HD-auto |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['topology']} | {r['E']} | {r['K']} | {r['chosen']} | {r['flat_ms']:.2f} "
              f"| {r['chosen_ms']:.2f} | **{r['speedup']:.2f}x** | {r['padded_speedup']:.2f}x ({r['padded_chosen']}) "
              f"| {r['paper']:.2f}x |")


def plot_duplication(dup, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = list(range(1, 11))
    for i, R in enumerate(PAPER_DUPLICATION):
        color = f"C{i}"
        ax.plot(ks, [100 * expected_duplication_rate(NUM_EXPERTS_DUP, R, K) for K in ks], color=color,
                label=f"R={R} ({NUM_EXPERTS_DUP // R} experts/group) predicted")
        ax.scatter(list(PAPER_DUPLICATION[R]), list(PAPER_DUPLICATION[R].values()), color=color, marker="o",
                   edgecolor="black", zorder=3)
    ax.scatter([], [], color="gray", marker="o", edgecolor="black", label="paper, measured")
    ax.set_xlabel("top-K")
    ax.set_ylabel("duplication rate (%)")
    ax.set_title(f"Duplicated rows of a flat dispatch, E={NUM_EXPERTS_DUP}, uniform routing")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = ["K", "E", "G"]
    titles = {"K": "top-K (E=128, 4x2x2x2)", "E": "experts E (K=8, 4x2x2x2)", "G": "ranks G (E=128, K=8)"}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2), sharey=True)
    width = 0.27
    for ax, sweep in zip(axes, sweeps):
        pts = [r for r in rows if r["sweep"] == sweep]
        xs = range(len(pts))
        series = [("predicted (unequal splits)", "speedup", "C0"),
                   ("predicted, padded form", "padded_speedup", "C9"),
                   ("paper, measured HD-auto", "paper", "C3")]
        for j, (name, key, color) in enumerate(series):
            vals = [p[key] for p in pts]
            bars = ax.bar([x + (j - 1) * width for x in xs], vals, width, label=name, color=color)
            for b, v in zip(bars, vals):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.05, f"{v:.2f}", ha="center", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{p['label']}\n{p['chosen']}" for p in pts], fontsize=8)
        ax.set_title(titles[sweep])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("all-to-all speedup over flat")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Chosen hd<d> vs flat: paper-a6000 link costs, hidden 2048 bf16, 1024 tokens/rank, uniform routing "
                 "(label: point, chosen dispatch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "img"), help="folder for the PNGs (default docs/img)")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    dup, rows = duplication_table(), sweep_rows()
    print_tables(dup, rows)
    if not args.no_plots:
        os.makedirs(args.out, exist_ok=True)
        plot_duplication(dup, os.path.join(args.out, "duplication.png"))
        plot_sweep(rows, os.path.join(args.out, "paper_sweep.png"))
        print(f"\nwrote {os.path.join(args.out, 'duplication.png')} and {os.path.join(args.out, 'paper_sweep.png')}")


if __name__ == "__main__":
    main()
