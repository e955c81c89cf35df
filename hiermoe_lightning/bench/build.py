"""``hiermoe bench build``: per-rank time and peak memory to build a stack of MoE layers and shard it, today's path
(every rank builds every expert, then ``ExpertParallel.shard_`` keeps its own) against building on the meta device
(``MoELayer(..., device="meta")``; ``shard_`` then draws only this rank's experts).

Each path runs in its own launch of fresh forked ranks (one after the other, so they never share the CPUs). Per rank:
the seconds to construct the layers, the seconds ``shard_`` takes (the process groups are created before the clock
starts), and the peak resident memory (VmHWM) above the rank's resident memory before the build. The expert share is
what a rank keeps: ``layers x E/G x 3 x M x F x bytes``; the issue's targets are peak <= 1.2 x that share and a meta
build (construct + shard) taking <= 1/3 of today's time. Defaults: Qwen3-30B-A3B-shaped layers (hidden 2048, expert
FFN 768, 128 experts, bf16), 2 of them, on 4 ranks.

A third path, ``load``: a Qwen3-MoE checkpoint of those layers (attention as Qwen3-30B-A3B's: 32 query heads,
4 key/value heads of 128; a 256-token vocabulary; experts stored per expert, as ``save_pretrained`` and the Hub
checkpoints store them; several safetensors files and an index) is generated into a temporary directory first (not
timed); then each rank builds the model on meta (``hf.build_meta_model``: construct), shards it without drawing any
expert (shard), and reads the dense tensors and its own experts (``hf.load_pretrained_``: load). Its peak includes
the dense weights (``dense_mib``, the same on every rank) and the pages of the files it read."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from ..cli.flags import add_timeout_and_json
from ..layer import MoELayer
from ..parallel import ExpertParallel
from ..testing import Deadline, run_ranks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATHS = ("today", "meta", "load")


def _status_mib(key: str) -> float:
    """``/proc/self/status`` field ``key`` (``VmHWM``, ``VmRSS``), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _qwen3_config(args) -> dict:
    """A Qwen3-30B-A3B-shaped config of ``args.num_layers`` MoE layers (a small vocabulary: the bench is about the
    experts)."""
    return dict(model_type="qwen3_moe", vocab_size=256, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                intermediate_size=6144, moe_intermediate_size=args.ffn_hidden_size, num_experts=args.num_experts,
                num_experts_per_tok=args.top_k, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=4096,
                tie_word_embeddings=False, dtype=args.dtype_name)


def write_checkpoint(args, directory: str, shard_mib: int = 512) -> dict:
    """A Hugging Face directory (config.json, safetensors files of about ``shard_mib`` each, the index) of a random
    Qwen3-MoE model shaped by ``args``, without building the model: each tensor named and shaped as the HF model's
    state dict, experts per expert (``...experts.{e}.gate_proj.weight`` ...). Returns ``{"bytes", "files"}``."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = _qwen3_config(args)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    dtype = DTYPES[args.dtype]
    specs = []  # (key, shape) in the model's order
    for key, t in meta.state_dict().items():
        if key.endswith("experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            E, two_f, m = t.shape
            for e in range(E):
                specs += [(f"{base}{e}.gate_proj.weight", (two_f // 2, m)), (f"{base}{e}.up_proj.weight", (two_f // 2, m))]
        elif key.endswith("experts.down_proj"):
            base = key[: -len("down_proj")]
            specs += [(f"{base}{e}.down_proj.weight", tuple(t.shape[1:])) for e in range(t.shape[0])]
        else:
            specs.append((key, tuple(t.shape)))
    g = torch.Generator().manual_seed(args.seed)
    files, shard, size, total = [], {}, 0, 0
    elem = torch.empty((), dtype=dtype).element_size()

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, size = {}, 0

    for key, shape in specs:
        n = math.prod(shape) * elem
        if size and size + n > shard_mib * 2**20:
            flush()
        value = torch.ones(shape, dtype=dtype) if key.endswith("norm.weight") else \
            (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(dtype)
        shard[key], size, total = value, size + n, total + n
    flush()
    weight_map = {}
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(os.path.join(directory, name), os.path.join(directory, final))
        weight_map.update((k, final) for k in keys)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(directory)
    return {"bytes": total, "files": len(files)}


def _write_into(args, directory, results) -> None:
    torch.set_num_threads(1)
    results.put(write_checkpoint(args, directory))


def _load_rank_fn(rank, world, args, directory):
    from .. import hf

    torch.set_num_threads(1)
    ep = ExpertParallel(args.topology, dispatch="flat")
    gc.collect()
    dist.barrier()
    base = _status_mib("VmRSS")
    start = time.perf_counter()
    model = hf.build_meta_model(directory)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.skip_expert_init = True  # the loader fills them: allocate, draw nothing
    built = time.perf_counter()
    ep.shard_(model, device="cpu")
    sharded = time.perf_counter()
    report = hf.load_pretrained_(model, directory)
    loaded = time.perf_counter()
    peak = _status_mib("VmHWM")
    kept = sum(p.untyped_storage().nbytes() for layer in layers for p in layer.experts.slot_parameters())
    expert_ids = {id(p) for layer in layers for p in layer.experts.slot_parameters()}
    dense = sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers()) if id(t) not in expert_ids)
    left_on_meta = sum(t.is_meta for t in (*model.parameters(), *model.buffers()))
    dist.barrier()
    return {"construct_s": built - start, "shard_s": sharded - built, "load_s": loaded - sharded,
            "total_s": loaded - start, "base_rss_mib": base, "peak_rss_mib": peak, "peak_over_base_mib": peak - base,
            "kept_expert_mib": kept / 2**20, "dense_mib": dense / 2**20, "read_mib": report["bytes"] / 2**20,
            "left_on_meta": int(left_on_meta)}


def _rank_fn(rank, world, args, path):
    torch.set_num_threads(1)
    ep = ExpertParallel(args.topology, dispatch="flat")  # process groups first: not part of the build
    gc.collect()
    dist.barrier()
    base = _status_mib("VmRSS")
    device = "meta" if path == "meta" else None
    start = time.perf_counter()
    layers = nn.ModuleList(
        MoELayer(args.hidden_size, args.ffn_hidden_size, args.num_experts, args.top_k, seed=args.seed + i,
                 dtype=DTYPES[args.dtype], device=device)
        for i in range(args.num_layers))
    built = time.perf_counter()
    ep.shard_(layers, device="cpu")
    sharded = time.perf_counter()
    peak = _status_mib("VmHWM")
    kept = sum(p.untyped_storage().nbytes() for layer in layers for p in layer.experts.slot_parameters())
    left_on_meta = sum(t.is_meta for layer in layers for t in (*layer.parameters(), *layer.buffers()))
    dist.barrier()
    return {"construct_s": built - start, "shard_s": sharded - built, "total_s": sharded - start,
            "base_rss_mib": base, "peak_rss_mib": peak, "peak_over_base_mib": peak - base,
            "kept_expert_mib": kept / 2**20, "left_on_meta": int(left_on_meta)}


def run(args) -> dict:
    from ..topology import Topology

    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    deadline = Deadline(args.timeout, "--timeout")  # bounds every launch together
    world = Topology.parse(args.topology).world_size
    if args.num_experts % world:
        raise ValueError(f"--num-experts ({args.num_experts}) must be divisible by the world size ({world})")
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    share_mib = args.num_layers * (args.num_experts // world) * 3 * args.hidden_size * args.ffn_hidden_size * elem / 2**20
    out = {"topology": args.topology, "world_size": world, "num_layers": args.num_layers,
           "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size, "num_experts": args.num_experts,
           "dtype": args.dtype, "expert_share_per_rank_mib": share_mib, "paths": {}}
    for path in args.paths:
        if path == "load":
            per_rank = _run_load(args, world, deadline, out)
        else:
            per_rank = run_ranks(_rank_fn, world, args, path, timeout=deadline)
        worst = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
        worst["peak_over_share"] = worst["peak_over_base_mib"] / share_mib
        if path == "load":  # the experts' part of the peak: without the dense weights every rank holds
            worst["peak_minus_dense_over_share"] = (worst["peak_over_base_mib"] - worst["dense_mib"]) / share_mib
        out["paths"][path] = {"per_rank": per_rank, "max": worst}
    if "today" in out["paths"] and "meta" in out["paths"]:
        today, meta = out["paths"]["today"]["max"], out["paths"]["meta"]["max"]
        out["meta_vs_today"] = {"time_ratio": meta["total_s"] / today["total_s"],
                                "peak_ratio": meta["peak_over_base_mib"] / today["peak_over_base_mib"]}
    if "today" in out["paths"] and "load" in out["paths"]:
        today, load = out["paths"]["today"]["max"], out["paths"]["load"]["max"]
        out["load_vs_today"] = {"time_ratio": load["total_s"] / today["total_s"],
                                "peak_ratio": load["peak_over_base_mib"] / today["peak_over_base_mib"]}
    out["targets"] = {"peak_over_share_max": 1.2, "time_ratio_max": 1 / 3}
    return out


def _run_load(args, world, deadline, out) -> list[dict]:
    """The ``load`` path: the checkpoint written into a temporary directory (not timed), then the ranks."""
    args.dtype_name = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    import multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="hiermoe-bench-build-") as directory:
        start = time.perf_counter()
        # in a child process: the memory it allocates and frees must not be inherited by the forked ranks (freed
        # but resident heap pages would hide their allocations from the peak)
        results = mp.get_context("fork").SimpleQueue()
        writer = mp.get_context("fork").Process(target=_write_into, args=(args, directory, results), daemon=True)
        writer.start()
        writer.join(max(1.0, deadline.remaining()))
        if writer.is_alive() or writer.exitcode != 0 or results.empty():
            writer.kill()
            raise RuntimeError(f"writing the benchmark checkpoint failed (exit code {writer.exitcode})")
        written = results.get()
        out["checkpoint"] = {"mib": written["bytes"] / 2**20, "files": written["files"],
                             "write_s": time.perf_counter() - start, "expert_layout": "per expert"}
        return run_ranks(_load_rank_fn, world, args, directory, timeout=deadline)


def _default_paths() -> list[str]:
    """Every path; ``load`` only where transformers (the ``[hf]`` extra) is installed."""
    import importlib.util

    return list(PATHS) if importlib.util.find_spec("transformers") is not None else ["today", "meta"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", default="4", help="expert-parallel ranks (fork, gloo), e.g. 4 or 2x2")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=768)
    p.add_argument("--num-experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=_default_paths(),
                   help="today: every rank builds every expert, then shard_; meta: device='meta', then shard_; "
                        "load: a generated local HF checkpoint (Qwen3-MoE of these layers), each rank reading its "
                        "experts (hf.load_pretrained_)")
    add_timeout_and_json(p, 1200.0)


def main(args) -> int:
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['num_layers']} MoE layers (M={res['hidden_size']}, F={res['ffn_hidden_size']}, "
          f"E={res['num_experts']}, {res['dtype']}) on {res['world_size']} ranks; "
          f"expert share per rank {res['expert_share_per_rank_mib']:.0f} MiB (slowest / largest rank)")
    print(f"  {'path':<6} {'construct s':>11} {'shard_ s':>9} {'total s':>8} {'peak MiB':>9} {'x share':>8}")
    for path, r in res["paths"].items():
        m = r["max"]
        print(f"  {path:<6} {m['construct_s']:11.2f} {m['shard_s']:9.2f} {m['total_s']:8.2f} "
              f"{m['peak_over_base_mib']:9.0f} {m['peak_over_share']:8.2f}")
    if "load" in res["paths"]:
        m, c = res["paths"]["load"]["max"], res["checkpoint"]
        print(f"  load: {m['load_s']:.2f} s reading {m['read_mib']:.0f} MiB per rank of a {c['mib']:.0f} MiB "
              f"checkpoint ({c['files']} files, written in {c['write_s']:.1f} s, not timed); dense weights "
              f"{m['dense_mib']:.0f} MiB per rank; peak without them {m['peak_minus_dense_over_share']:.2f} x share")
    if "meta_vs_today" in res:
        r = res["meta_vs_today"]
        print(f"  meta / today: time {r['time_ratio']:.3f} (target <= {res['targets']['time_ratio_max']:.3f}), "
              f"peak {r['peak_ratio']:.3f}; meta peak / share target <= {res['targets']['peak_over_share_max']}")
    if "load_vs_today" in res:
        r = res["load_vs_today"]
        print(f"  load / today: time {r['time_ratio']:.3f}, peak {r['peak_ratio']:.3f}")
    return 0
