"""Make the tables and figures of ``docs/benchmarks.md`` from the saved benchmark JSON in ``docs/results/``.

    .venv/bin/python docs/make_benchmark_plots.py              # prints the markdown tables, writes docs/img/bench_*.png
    .venv/bin/python docs/make_benchmark_plots.py --no-plots   # tables only (no matplotlib needed)
    .venv/bin/python docs/make_benchmark_plots.py --results other/results --out other/img   # another set of runs

Nothing is measured here: the script only reads JSON written by ``hiermoe bench comm|e2e|placement|simulate``
(see docs/benchmarks.md for the command behind every file). Point ``--results`` at a folder of newer runs with the
same file names to compare versions. Figures:

* ``bench_comm_bytes.png``: payload bytes by link level of every dispatch (dispatch + combine, all ranks), with the
  level-1 lower bound, for the loopback runs (uniform and zipf:1.2) and the emulated K=8 run.
* ``bench_comm_bandwidth.png``: median dispatch + combine time (p90 as the upper whisker) against the emulated
  inter-node bandwidth, K=8, one line per dispatch, with the level-1 lower bound.
* ``bench_e2e.png``: training tokens/s of every variant per bandwidth, one panel per model shape (repeats as dots).
* ``bench_placement.png``: the cost model's predicted all-to-all time and the experts moved, per placement method,
  for the zipf:1.2 and clusters:8 routings.
"""

from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = float(1 << 20)
DISPATCH_ORDER = ("flat", "2dh", "hd1", "hd2", "auto")
E2E_ORDER = ("flat", "2dh", "hd1", "hd2", "auto", "auto+swaps")
COLORS = {"flat": "C3", "2dh": "C1", "hd1": "C2", "hd2": "C0", "auto": "C4", "auto+swaps": "C5"}

LOOPBACK = {"uniform": "bench_comm_2x2_uniform.json", "zipf:1.2": "bench_comm_2x2_zipf1.2.json"}
LOOPBACK_CALIBRATED = "bench_comm_2x2_calibrated.json"  # the same problem, auto with link costs measured here
EMULATED_K8 = {200: "bench_comm_emulated_2x2_k8_200mbit.json", 500: "bench_comm_emulated_2x2_k8_500mbit.json",
               1000: "bench_comm_emulated_2x2_k8_1000mbit.json"}
EMULATED_K4 = [("200 Mbit/s", "bench_comm_emulated_2x2_k4_200mbit.json"),
               ("500 Mbit/s", "bench_comm_emulated_2x2_k4_500mbit.json"),
               ("1000 Mbit/s", "bench_comm_emulated_2x2_k4_1000mbit.json")]
PIPELINE = {c: f"bench_comm_emulated_2x2_k8_1000mbit_hd2_chunks{c}.json" for c in (1, 2, 3, 4)}
CALIBRATED = [("loopback", "bench_comm_2x2_calibrated{}.json"),
              ("200 Mbit/s", "bench_comm_emulated_2x2_k8_200mbit_calibrated{}.json"),
              ("1000 Mbit/s", "bench_comm_emulated_2x2_k8_1000mbit_calibrated{}.json")]
QWEN3 = "Qwen3-30B-A3B-shaped (top-8, expert FFN 96)"
TOP8_WIDE = "top-8, expert FFN 256"
TOP4 = "top-4, expert FFN 256"
E2E = {f"{QWEN3}, 1000 Mbit/s": "bench_e2e_qwen3_1000.json",
       f"{QWEN3}, 200 Mbit/s": "bench_e2e_qwen3_200.json",
       f"{QWEN3}, loopback (no link limit)": "bench_e2e_qwen3_loopback.json",
       f"{QWEN3}, 1000 Mbit/s, 2 pipeline chunks": "bench_e2e_qwen3_1000_chunks2.json",
       f"{TOP8_WIDE}, 1000 Mbit/s, 2 pipeline chunks": "bench_e2e_top8_ffn256_1000.json",
       f"{TOP4}, 200 Mbit/s, 2 pipeline chunks": "bench_e2e_200_calibrated.json",
       f"{TOP4}, 1000 Mbit/s, 2 pipeline chunks": "bench_e2e_1000_calibrated.json",
       f"{TOP4}, 1000 Mbit/s": "bench_e2e_1000_calibrated_chunks1.json",
       f"{TOP4}, 200 Mbit/s, paper-a6000 costs (previous version)": "bench_e2e_200.json",
       f"{TOP4}, 1000 Mbit/s, paper-a6000 costs (previous version)": "bench_e2e_1000.json",
       f"{TOP4}, loopback (no link limit), paper-a6000 costs (previous version)": "bench_e2e_loopback.json"}
PLACEMENT = {"zipf:1.2": "placement_zipf1.2.json", "clusters:8": "placement_clusters8.json"}
CLUSTERED = "clustered routing (32 experts, 2 clusters), top-8, expert FFN 96"
SWAPS = {f"{QWEN3}, 1000 Mbit/s": "bench_e2e_swaps_qwen3_1000.json",
         f"{QWEN3}, 200 Mbit/s": "bench_e2e_swaps_qwen3_200.json",
         f"{TOP4}, 1000 Mbit/s": "bench_e2e_swaps_top4_1000.json",
         f"{CLUSTERED}, 1000 Mbit/s, whole run": "bench_e2e_swaps_clustered_1000.json",
         f"{CLUSTERED}, 1000 Mbit/s, after the first plan": "bench_e2e_swaps_clustered_steady_1000.json",
         f"{CLUSTERED}, 200 Mbit/s, after the first plan": "bench_e2e_swaps_clustered_steady_200.json"}
SIMULATE = "simulate_paper.json"

# project targets (docs/benchmarks.md)
TARGET_AUTO_VS_FLAT, TARGET_AUTO_VS_2DH, TARGET_VS_BOUND, TARGET_E2E = 1.5, 1.3, 1.3, 1.15


def load(results: str, name: str) -> dict | None:
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


# ------------------------------------------------------------------------------------------------------ tables
def table_loopback(results: str) -> str:
    out = []
    for name in [*LOOPBACK.values(), LOOPBACK_CALIBRATED]:
        d = load(results, name)
        if d is None:
            continue
        lb = d["lower_bound"]["bytes_by_level"]["level1"]
        flat = d["results"]["flat"]["median_ms"]
        out += [f"Routing `{d['routing']}`, link costs `{d['link_costs']}`, {d['iters']} iterations (`{name}`); "
                f"level-1 lower bound {lb / MIB:.1f} MiB.", "",
                "| dispatch | median ms | p90 ms | vs flat | predicted ms | level-1 MiB | level-2 MiB "
                "| level-1 / lower bound |",
                "|---|---|---|---|---|---|---|---|"]
        for n in DISPATCH_ORDER:
            r = d["results"].get(n)
            if r is None:
                continue
            label = f"auto ({r['resolved']})" if "resolved" in r else n
            b = r["bytes_by_level"]
            out.append(f"| {label} | {r['median_ms']:.0f} | {r['p90_ms']:.0f} | {flat / r['median_ms']:.2f}x | "
                       f"{r['predicted_ms']:.1f} | {b['level1'] / MIB:.1f} | {b['level2'] / MIB:.1f} | "
                       f"{b['level1'] / lb:.2f} |")
        out.append("")
    return "\n".join(out)


def _emulated_rows(runs: list[tuple[str, dict]]) -> list[str]:
    out = ["| dispatch | " + " | ".join(label for label, _ in runs) + " |", "|---|" + "---|" * len(runs)]
    for n in DISPATCH_ORDER:
        cells = []
        for _, d in runs:
            r = d["results"].get(n)
            cells.append("-" if r is None else f"{r['median_ms']:.0f} ({r['p90_ms']:.0f})")
        label = n
        if n == "auto":
            label = f"auto ({runs[0][1]['results']['auto'].get('resolved', '?')})"
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("| level-1 lower bound (wire time) | "
               + " | ".join(f"{d['lower_bound_ms']:.0f}" for _, d in runs) + " |")
    return out


def _targets_rows(runs: list[tuple[str, dict]]) -> list[str]:
    out = ["| run | auto / flat (target ≥ 1.5x) | auto / 2dh (target ≥ 1.3x) | auto / lower bound (target ≤ 1.3x) "
           "| hd2 / flat | hd2 / lower bound |",
           "|---|---|---|---|---|---|"]
    for label, d in runs:
        r = d["results"]
        auto, flat, tdh, hd2 = (r[k]["median_ms"] for k in ("auto", "flat", "2dh", "hd2"))
        lb = d["lower_bound_ms"]
        out.append(f"| {label} | {flat / auto:.2f}x {_met(flat / auto >= TARGET_AUTO_VS_FLAT)} | "
                   f"{tdh / auto:.2f}x {_met(tdh / auto >= TARGET_AUTO_VS_2DH)} | "
                   f"{auto / lb:.2f}x {_met(auto / lb <= TARGET_VS_BOUND)} | {flat / hd2:.2f}x | {hd2 / lb:.2f}x |")
    return out


def _k8_runs(results: str) -> list[tuple[str, dict]]:
    runs = []
    for mbit, name in EMULATED_K8.items():
        d = load(results, name)
        if d is not None:
            runs.append((f"{mbit} Mbit/s", d))
    return runs


def _k4_runs(results: str) -> list[tuple[str, dict]]:
    return [(label, d) for label, name in EMULATED_K4 if (d := load(results, name)) is not None]


def table_emulated(results: str) -> str:
    out = []
    k8, k4 = _k8_runs(results), _k4_runs(results)
    if k8:
        d = k8[0][1]
        b = {n: d["results"][n]["bytes_by_level"] for n in DISPATCH_ORDER if n in d["results"]}
        out += ["K=8: median ms (p90 ms) of dispatch + combine, slowest rank.", "", *_emulated_rows(k8), "",
                *_targets_rows(k8), "",
                "Bytes of the K=8 runs (the same in every run; MiB, dispatch + combine, all ranks):", "",
                "| | " + " | ".join(b) + " | lower bound |", "|---|" + "---|" * (len(b) + 1),
                "| level 1 | " + " | ".join(f"{v['level1'] / MIB:.1f}" for v in b.values())
                + f" | {d['lower_bound']['bytes_by_level']['level1'] / MIB:.1f} |",
                "| level 2 | " + " | ".join(f"{v['level2'] / MIB:.1f}" for v in b.values()) + " | - |", ""]
    if k4:
        out += ["K=4: median ms (p90 ms).", "", *_emulated_rows(k4), "", *_targets_rows(k4), ""]
    return "\n".join(out)


def table_repeats_1000(results: str) -> str:
    """The 1000 Mbit/s runs, where the lower-bound target is closest, repeated (``_run2``, ``_run3``, ...), with the
    median over the runs of each K."""
    out = ["| K | run | flat ms | hd2 ms | auto ms | auto / flat | auto / lower bound | hd2 / lower bound |",
           "|---|---|---|---|---|---|---|---|"]
    found = False
    for k in (8, 4):
        ratios = []
        for i, suffix in enumerate(("", "_run2", "_run3", "_run4", "_run5"), start=1):
            d = load(results, f"bench_comm_emulated_2x2_k{k}_1000mbit{suffix}.json")
            if d is None:
                continue
            found = True
            r, lb = d["results"], d["lower_bound_ms"]
            ratios.append((r["flat"]["median_ms"] / r["auto"]["median_ms"], r["auto"]["median_ms"] / lb,
                           r["hd2"]["median_ms"] / lb))
            out.append(f"| {k} | {i} | {r['flat']['median_ms']:.0f} | {r['hd2']['median_ms']:.0f} | "
                       f"{r['auto']['median_ms']:.0f} | {ratios[-1][0]:.2f}x | {ratios[-1][1]:.2f}x | "
                       f"{ratios[-1][2]:.2f}x |")
        if len(ratios) > 1:
            med = [_median(list(col)) for col in zip(*ratios)]
            out.append(f"| {k} | median of {len(ratios)} | | | | {med[0]:.2f}x | **{med[1]:.2f}x** | {med[2]:.2f}x |")
    return "\n".join(out) + "\n" if found else ""


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def table_transport(results: str) -> str:
    """K=8 at 1000 Mbit/s: the repeated runs (shared memory inside a node, the default) against the interleaved
    ``--no-shared-memory`` runs (``..._noshm_run<k>.json``: gloo's loopback sockets inside a node)."""
    name = "bench_comm_emulated_2x2_k8_1000mbit{}.json"
    shared = [load(results, name.format(s)) for s in ("", "_run2", "_run3", "_run4", "_run5")]
    sockets = [load(results, name.format(f"_noshm_run{i}")) for i in range(1, 6)]
    groups = {"shared memory (default)": shared, "loopback sockets (`--no-shared-memory`)": sockets}
    out = ["| inside a node | runs | hd2 / lower bound | median | auto / lower bound | median | hd2 dispatch ms | "
           "hd2 combine ms |", "|---|---|---|---|---|---|---|---|"]
    found = False
    for label, runs in groups.items():
        runs = [d for d in runs if d is not None]
        if not runs:
            continue
        found = True
        lb = [d["lower_bound_ms"] for d in runs]
        hd2 = [d["results"]["hd2"]["median_ms"] / b for d, b in zip(runs, lb)]
        auto = [d["results"]["auto"]["median_ms"] / b for d, b in zip(runs, lb)]
        disp = _median([d["results"]["hd2"]["dispatch_ms"] for d in runs])
        comb = _median([d["results"]["hd2"]["combine_ms"] for d in runs])
        out.append(f"| {label} | {len(runs)} | {', '.join(f'{x:.2f}' for x in hd2)} | {_median(hd2):.2f}x | "
                   f"{', '.join(f'{x:.2f}' for x in auto)} | {_median(auto):.2f}x | {disp:.0f} | {comb:.0f} |")
    return "\n".join(out) + "\n" if found else ""


def table_pipeline(results: str) -> str:
    """hd2 with 1 to 4 pipeline chunks at 1000 Mbit/s, K=8 (separate runs, one after the other)."""
    runs = [(c, d) for c, name in PIPELINE.items() if (d := load(results, name)) is not None]
    if not runs:
        return ""
    out = ["| pipeline chunks | hd2 median ms (p90) | dispatch ms | combine ms | vs 1 chunk | / lower bound |",
           "|---|---|---|---|---|---|"]
    base = runs[0][1]["results"]["hd2"]["median_ms"]
    for c, d in runs:
        r = d["results"]["hd2"]
        out.append(f"| {c} | {r['median_ms']:.0f} ({r['p90_ms']:.0f}) | {r.get('dispatch_ms', float('nan')):.0f} | "
                   f"{r.get('combine_ms', float('nan')):.0f} | {base / r['median_ms']:.2f}x | "
                   f"{r['median_ms'] / d['lower_bound_ms']:.2f}x |")
    return "\n".join(out) + "\n"


def table_calibrated(results: str) -> str:
    """Predicted / measured of every dispatch with link costs calibrated on the same network, three runs each."""
    out = ["| network | " + " | ".join(DISPATCH_ORDER) + " |", "|---|" + "---|" * len(DISPATCH_ORDER)]
    found = False
    for label, pattern in CALIBRATED:
        runs = [d for suffix in ("", "_run2", "_run3") if (d := load(results, pattern.format(suffix))) is not None]
        if not runs:
            continue
        found = True
        cells = []
        for n in DISPATCH_ORDER:
            ratios = [d["results"][n]["predicted_ms"] / d["results"][n]["median_ms"] for d in runs if n in d["results"]]
            cells.append(" / ".join(f"{x:.2f}" for x in ratios) + (" **out**" if any(abs(x - 1) > 0.25 for x in ratios)
                                                                    else ""))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n" if found else ""


def table_e2e(results: str) -> str:
    out = []
    for label, name in E2E.items():
        d = load(results, name)
        if d is None:
            continue
        reps = d.get("repeats", 1)
        out += [f"{label} (`{name}`, {d['steps']} timed steps after {d['warmup_steps']} warmup, "
                f"{'median of ' + str(reps) + ' repeats' if reps > 1 else 'one run per variant'}):", "",
                "| variant | tokens/s | vs flat | step ms median | step ms p90 | level-1 MiB | dedup saving | swaps "
                "| plans | planning s |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for n in E2E_ORDER:
            r = d["results"].get(n)
            if r is None:
                continue
            reps_s = r.get("tokens_per_s_repeats")
            spread = f" ({min(reps_s):,.0f}-{max(reps_s):,.0f})" if reps_s and len(reps_s) > 1 else ""
            swaps = n == "auto+swaps"
            extra = (f"{r['swaps']} | {r.get('plans', {}).get('count', 0)} | {r.get('plan_seconds', 0.0):.2f}"
                     if swaps else "- | - | -")
            out.append(f"| {n} | {r['tokens_per_s']:,.0f}{spread} | {r['speedup_vs_flat']:.2f}x | "
                       f"{r['step_ms_median']:,.0f} | {r['step_ms_p90']:,.0f} | "
                       f"{r['bytes_by_level']['level1'] / MIB:,.0f} | {100 * r['dedup_saving']:.1f}% | {extra} |")
        sw = d["results"].get("auto+swaps")
        if sw is not None:
            x = sw["speedup_vs_flat"]
            out += ["", f"Target auto+swaps ≥ {TARGET_E2E}x flat ({label}): {x:.2f}x, {_met(x >= TARGET_E2E)}."]
        out.append("")
    return "\n".join(out)


def _seconds(value) -> str:
    """``value`` seconds to two places, ``-`` when the run predates the field."""
    return "-" if value is None else f"{value:.2f}"


def table_swaps(results: str) -> str:
    """``auto`` against ``auto+swaps`` per workload (issue 19): throughput, steps with and without a plan, swaps,
    level-1 bytes, planning (CPU in the background) and migration time."""
    out = ["| workload | auto tokens/s | auto+swaps tokens/s | ratio | plan steps / other steps ms | swaps | plans "
           "| level-1 MiB auto → swaps | planning CPU s | statistics + waits s | migration s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, name in SWAPS.items():
        d = load(results, name)
        if d is None:
            continue
        a, w = d["results"]["auto"], d["results"]["auto+swaps"]

        def tps(r):
            reps = r.get("tokens_per_s_repeats") or [r["tokens_per_s"]]
            return f"{r['tokens_per_s']:,.0f} ({min(reps):,.0f}-{max(reps):,.0f})" if len(reps) > 1 \
                else f"{r['tokens_per_s']:,.0f}"
        plan_ms, other_ms = w.get("step_ms_median_plan_steps"), w.get("step_ms_median_other_steps")
        steps = f"{plan_ms:,.0f} / {other_ms:,.0f}" if plan_ms is not None and other_ms is not None else "-"
        out.append(f"| {label} ({d['steps']} timed steps after {d['warmup_steps']}, {d.get('repeats', 1)} repeats) "
                   f"| {tps(a)} | {tps(w)} | {w['tokens_per_s'] / a['tokens_per_s']:.3f}x | {steps} | {w['swaps']} "
                   f"| {w.get('plans', {}).get('count', 0)} | {a['bytes_by_level']['level1'] / MIB:,.0f} → "
                   f"{w['bytes_by_level']['level1'] / MIB:,.0f} | {w.get('plan_seconds', 0.0):.2f} "
                   f"| {_seconds(w.get('swap_critical_path_seconds'))} | {w.get('migration_seconds', 0.0):.2f} |")
    return "\n".join(out) if len(out) > 2 else ""


def table_simulate(results: str) -> str:
    d = load(results, SIMULATE)
    if d is None:
        return ""
    pts = d["points"]
    labels = [p["label"] for p in pts]
    rows = [("HD2", "hd2"), ("HD-auto (no swap)", "auto"), ("HierMoE (with swap)", "auto+swaps")]
    out = ["| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for paper_name, ours in rows:
        out.append(f"| {paper_name}, paper (measured) | "
                   + " | ".join(f"{p['paper'][paper_name]:.2f}" for p in pts) + " |")
        out.append(f"| {paper_name}, ours (`{ours}`, predicted) | "
                   + " | ".join(f"{p['speedup_over_flat'][ours]:.2f}" for p in pts) + " |")
    out.append("| Tutel-2DH, ours (`2dh`, predicted) | "
               + " | ".join(f"{p['speedup_over_flat']['2dh']:.2f}" for p in pts) + " |")
    out += ["", "| point | topology | flat ms | auto ms (chosen) | auto+swaps ms | swaps | moved experts |",
            "|---|---|---|---|---|---|---|"]
    for p in pts:
        ms = p["predicted_ms"]
        out.append(f"| {p['label']} | {p['topology']} | {ms['flat']:.2f} | {ms['auto']:.2f} ({p['chosen']}) | "
                   f"{ms['auto+swaps']:.2f} | {p['num_swaps']} | {p['moved_experts']} |")
    return "\n".join(out)


def table_placement(results: str) -> str:
    out = []
    for routing, name in PLACEMENT.items():
        d = load(results, name)
        if d is None:
            continue
        out += [f"Routing `{routing}` (`{name}`):", "",
                "| method | predicted ms (chosen) | vs none | moved experts | load imbalance | flat ms |",
                "|---|---|---|---|---|---|"]
        for m, r in d["methods"].items():
            label = f"hiermoe ({len(r['swaps'])} swaps)" if "swaps" in r else m
            out.append(f"| {label} | {r['predicted_ms']:.3f} ({r['chosen']}) | {r['speedup_vs_none']:.3f}x | "
                       f"{r['moved_experts']} | {r['load_imbalance']:.2f} | {r['flat_ms']:.1f} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bytes(results: str, path: str) -> bool:
    panels = [(f"loopback, K=4, {r}", load(results, n)) for r, n in LOOPBACK.items()]
    panels.append(("emulated runs, K=8, uniform", load(results, EMULATED_K8[500])))
    panels = [(t, d) for t, d in panels if d is not None]
    if not panels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), sharey=False, squeeze=False)
    for ax, (title, d) in zip(axes[0], panels):
        names = [n for n in DISPATCH_ORDER if n in d["results"]]
        l1 = [d["results"][n]["bytes_by_level"]["level1"] / MIB for n in names]
        l2 = [d["results"][n]["bytes_by_level"].get("level2", 0) / MIB for n in names]
        ax.bar(names, l1, color="C3", label="level 1 (between nodes)")
        ax.bar(names, l2, bottom=l1, color="C0", alpha=0.6, label="level 2 (inside a node)")
        lb = d["lower_bound"]["bytes_by_level"]["level1"] / MIB
        ax.axhline(lb, color="black", linestyle="--", linewidth=1, label="level-1 lower bound")
        ax.set_title(f"{title}\n{d['tokens_per_rank']} tokens/rank, hidden {d['hidden_size']} {d['dtype']}", fontsize=9)
        ax.set_ylabel("MiB (dispatch + combine, all ranks)")
        ax.grid(axis="y", alpha=0.3)
        if "resolved" in d["results"].get("auto", {}):
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([f"auto\n({d['results']['auto']['resolved']})" if n == "auto" else n for n in names])
    axes[0][0].legend(fontsize=8)
    fig.suptitle("bench comm on 2x2 (2 nodes x 2 ranks): payload bytes by link level", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_bandwidth(results: str, path: str) -> bool:
    runs = {mbit: load(results, n) for mbit, n in EMULATED_K8.items()}
    runs = {k: v for k, v in runs.items() if v is not None}
    if not runs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    mbits = sorted(runs)
    for n in DISPATCH_ORDER:
        med = [runs[m]["results"][n]["median_ms"] for m in mbits]
        p90 = [runs[m]["results"][n]["p90_ms"] for m in mbits]
        ax.errorbar(mbits, med, yerr=[[0] * len(med), [p - q for p, q in zip(p90, med)]], marker="o", capsize=3,
                    color=COLORS[n], label=n + (f" ({runs[mbits[0]]['results'][n]['resolved']})" if n == "auto" else ""))
    ax.plot(mbits, [runs[m]["lower_bound_ms"] for m in mbits], "k--", label="level-1 lower bound (wire time)")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(mbits))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(FixedLocator([100, 200, 500, 1000, 2000, 5000, 10000]))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("emulated inter-node bandwidth, Mbit/s each way")
    ax.set_ylabel("dispatch + combine, ms (median; whisker: p90)")
    d = runs[mbits[0]]
    ax.set_title(f"bench comm, emulated 2 nodes x 2 ranks: E={d['num_experts']}, K={d['top_k']}, "
                 f"{d['tokens_per_rank']} tokens/rank, hidden {d['hidden_size']} {d['dtype']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_e2e(results: str, path: str) -> bool:
    """One panel per model shape, this version's runs only (the labels without "previous version")."""
    panels: dict[str, dict[str, dict]] = {}
    for label, name in E2E.items():
        d = load(results, name)
        if d is not None and "previous version" not in label:
            shape = next(sh for sh in (QWEN3, TOP8_WIDE, TOP4) if label.startswith(sh))
            setting = label[len(shape) + 2:]
            panels.setdefault(shape, {})[setting] = d
    if not panels:
        return False
    plt = _plt()
    widths = [len({n for d in runs.values() for n in d["results"]}) for runs in panels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.3 * sum(widths) + 2, 4.8), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, (shape, runs) in zip(axes[0], panels.items()):
        width = 0.8 / len(runs)
        all_names = [n for n in E2E_ORDER if any(n in d["results"] for d in runs.values())]
        for j, (setting, d) in enumerate(runs.items()):
            names = [n for n in all_names if n in d["results"]]
            xs = [all_names.index(n) + (j - (len(runs) - 1) / 2) * width for n in names]
            bars = ax.bar(xs, [d["results"][n]["tokens_per_s"] for n in names], width, label=setting,
                          color=f"C{j}", alpha=0.8)
            for b, n in zip(bars, names):
                r = d["results"][n]
                ax.text(b.get_x() + b.get_width() / 2, 60, f"{r['speedup_vs_flat']:.2f}x", ha="center", fontsize=6,
                        color="white", fontweight="bold", rotation=90, va="bottom")
                reps = r.get("tokens_per_s_repeats") or []
                if len(reps) > 1:
                    ax.scatter([b.get_x() + b.get_width() / 2] * len(reps), reps, s=9, color="black", zorder=3)
        ax.set_xticks(range(len(all_names)))
        ax.set_xticklabels(all_names, fontsize=8)
        ax.set_ylabel("training tokens/s (4 ranks)")
        ax.set_title(shape, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("bench e2e: MoEGPT (hidden 256, 2 layers, 16 experts) on 2 nodes x 2 ranks (emulated links); "
                 "white label: speedup over flat in that run; dots: the repeats", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_placement(results: str, path: str) -> bool:
    runs = {r: load(results, n) for r, n in PLACEMENT.items()}
    runs = {k: v for k, v in runs.items() if v is not None}
    if not runs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(2, len(runs), figsize=(4.6 * len(runs), 6.2), squeeze=False)
    for j, (routing, d) in enumerate(runs.items()):
        methods = list(d["methods"])
        ms = [d["methods"][m]["predicted_ms"] for m in methods]
        moved = [d["methods"][m]["moved_experts"] for m in methods]
        colors = ["gray", "C0", "C1", "C2"][: len(methods)]
        ax = axes[0][j]
        bars = ax.bar(methods, ms, color=colors)
        low = min(ms)
        ax.set_ylim(low * 0.85, max(ms) * 1.04)
        for b, v in zip(bars, ms):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"routing {routing}: predicted all-to-all ms\n(fastest hd<d>, one way; axis does not start at 0)",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax = axes[1][j]
        bars = ax.bar(methods, moved, color=colors)
        for b, v in zip(bars, moved):
            ax.text(b.get_x() + b.get_width() / 2, v, str(v), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(moved) * 1.15 + 1)
        ax.set_title(f"experts moved from the contiguous placement (of {d['num_experts']})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("bench placement: 4x2x2x2, E=128, K=8, hidden 2048 bf16, 1024 tokens/rank, paper-a6000 costs",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"),
                        help="folder with the benchmark JSON (default docs/results)")
    parser.add_argument("--out", default=os.path.join(HERE, "img"), help="folder for the PNGs (default docs/img)")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    sections = [("comm on loopback", table_loopback), ("comm on the emulated network", table_emulated),
                ("1000 Mbit/s repeated", table_repeats_1000), ("transport inside a node", table_transport),
                ("pipeline chunks", table_pipeline), ("calibrated predicted / measured", table_calibrated),
                ("end to end", table_e2e), ("swaps that pay", table_swaps),
                ("paper-scale simulation", table_simulate),
                ("placement", table_placement)]
    for title, fn in sections:
        print(f"## {title}\n")
        print(fn(args.results))
        print()
    if args.no_plots:
        return
    os.makedirs(args.out, exist_ok=True)
    for name, fn in (("bench_comm_bytes.png", plot_bytes), ("bench_comm_bandwidth.png", plot_bandwidth),
                     ("bench_e2e.png", plot_e2e), ("bench_placement.png", plot_placement)):
        path = os.path.join(args.out, name)
        print(f"wrote {path}" if fn(args.results, path) else f"skipped {name} (its JSON is missing)")


if __name__ == "__main__":
    main()
