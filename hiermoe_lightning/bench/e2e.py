"""``hiermoe bench e2e``: training throughput (tokens/s) of an MoE model under every dispatch, end to end.

The model (``--model``): the bundled MoEGPT (``moegpt``, the default, shaped by ``--hidden-size`` ... ``--top-k``),
``hf-qwen3-moe-tiny`` (:class:`~hiermoe_lightning.hf.HFCausalLM`: a tiny random Hugging Face Qwen3-MoE, its MoE blocks
converted, the shape of ``configs/hf-qwen3-moe-tiny.yaml``; ``--lr`` and ``--seed`` apply, AdamW only), or a YAML
file with a LightningCLI ``model`` section (``class_path`` + ``init_args``, used as given) whose module trains on
``(inputs, targets)`` byte batches. The MoEGPT shape flags apply to ``moegpt`` only.

For each variant (``--dispatch`` values, plus ``auto+swaps`` with ``--swaps``) the command forks ``world_size`` ranks
with :func:`~hiermoe_lightning.testing.launch.run_ranks` (one spawn per variant). Every rank already holds an
initialised gloo process group there, and builds a real ``lightning.pytorch.Trainer``::

    Trainer(accelerator="cpu", devices=world, num_nodes=1, plugins=[ExternalRankEnvironment(rank, world)],
            strategy=HierMoEStrategy(topology=..., dispatch=...), max_steps=warmup + steps, ...)

:class:`ExternalRankEnvironment` reports the rank and world of the forked process and
``creates_processes_externally = True``, so Lightning forks nothing and skips ``init_process_group`` (the group
exists). Every variant trains the same model (same ``--seed``) on the same batches (the default corpus or ``--data``,
a hand-built ``DistributedSampler(shuffle=False)`` per rank, so the union of the ranks' step-s batches is the same
global batch for every variant).

Timing: a callback (after every other callback, so expert-swap planning and migration are counted) takes a
``dist.barrier()``-synchronised timestamp at the end of every optimizer step; the first ``--warmup-steps`` are
excluded. ``tokens_per_s = steps x world x batch_size x seq_len / (slowest rank's time from the end of the last
warmup step to the end of the last step)``; ``step_ms_median`` / ``step_ms_p90`` over the timed steps.

Traffic: every variant runs a :class:`~hiermoe_lightning.metrics.DedupMonitor` (``auto+swaps``: a
:class:`~hiermoe_lightning.callback.HierMoECallback`, a subclass); the report holds its totals over the timed steps:
``bytes_by_level`` (payload of every MoE layer's forward dispatch + combine, all ranks; the backward moves the same
rows again, not counted) against ``flat_bytes_by_level`` (what a flat dispatch would have moved for the same
routing), ``dedup_saving`` and, with swaps, ``swaps`` / ``plan_seconds`` / ``migration_seconds``.

Clustered routing (``--router-clusters C``, ``--router-cluster-strength S``; ``moegpt`` only): the MoEGPT is built with
``router_clusters=C, router_cluster_strength=S`` (:mod:`~hiermoe_lightning.models.clustered_routing`), so tokens route
mostly inside one of ``C`` interleaved expert clusters (expert ``e`` in cluster ``e % C``), a stand-in for the
co-activation of trained MoE routers; a fresh router routes near uniformly and swaps cannot gain on it. The report's
``router_clustering`` (and a header line) holds ``C``, ``S``, the chance level and the measured within-cluster share
(:func:`~hiermoe_lightning.models.clustered_routing.within_cluster_share` of every layer's top-k on each rank's batch)
at the first training step and at the last, mean over layers and ranks (and over variants; each variant's own values
are in its result, ``within_cluster_share``).

Plan steps (``auto+swaps``): the timer records the ``trainer.global_step`` of every timed step and reads the swap
callback's ``plan_started_steps`` / ``plan_applied_steps`` (empty when the callback does not keep them); a timed step
whose global step is in either list is a plan step. The variant's result gets ``step_ran_plan`` (one flag per entry of
``step_ms``), the median repeat's ``plan_started_steps`` / ``plan_applied_steps``, and ``step_ms_median_plan_steps``
/ ``step_ms_median_other_steps`` (None when there are no such steps).

``--repeats R`` trains every variant R times, round robin (round ``i`` starts with the ``i``-th variant), and
reports the median repeat's tokens/s (``tokens_per_s_repeats`` holds them all): on a shared machine the load of
other processes easily moves one run by 10-20 %. ``--link-costs calibrate`` first measures the link costs of these
ranks (on the emulated network, if any) with :meth:`~hiermoe_lightning.cost.link_costs.LinkCosts.calibrate` and gives
them to ``auto`` and the swap planner of every variant.

``--emulate-inter-mbit N`` (root only; see :mod:`hiermoe_lightning.bench.netem`): the ranks of each top-level group
(``world / sizes[0]`` consecutive ranks: one "node") run in a network namespace of their own, node links limited to
N Mbit/s each way (``--emulate-latency-ms`` adds delay on each shaped hop). The namespaces are set up once for the
whole command. Without root / ``ip`` / ``tc`` the command exits with status 3 and says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment
from typing_extensions import override

from ..cli.flags import int_flag, topology_flag
from ..cli.main import CLIError
from ..cost.link_costs import LinkCosts
from ..dispatch.engine import validate_overlap_chunks, validate_pipeline_chunks
from ..placement.records import PlanRecord
from ..testing.launch import Deadline, run_ranks
from ..topology import Topology
from .comm import EMULATION_EXIT_STATUS, emulated_network, emulation_line, parse_dispatch_list

__all__ = ["add_arguments", "run", "main", "format_report", "variant_names", "ExternalRankEnvironment", "E2EConfig",
           "SWAPS_VARIANT", "EMULATION_EXIT_STATUS", "RESULT_KEYS", "BYTES_NOTE", "MODELS", "HF_QWEN3_MOE_TINY"]

DEFAULT_DISPATCH = "flat,2dh,hd1,hd2,auto"
MOEGPT = "moegpt"
HF_QWEN3 = "hf-qwen3-moe-tiny"
MODELS = (MOEGPT, HF_QWEN3)  # --model names; anything else is a YAML path
MOEGPT_CLASS = "hiermoe_lightning.models.moe_gpt.MoEGPT"
HF_CLASS = "hiermoe_lightning.hf.HFCausalLM"
# the Hugging Face config of configs/hf-qwen3-moe-tiny.yaml (tests/bench/test_e2e.py keeps the two equal)
HF_QWEN3_MOE_TINY = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
                         moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                         max_position_embeddings=128, router_aux_loss_coef=0.001)
CALIBRATE = "calibrate"
SWAPS_VARIANT = "auto+swaps"
RESULT_KEYS = ("tokens_per_s", "step_ms_median", "step_ms_p90", "elapsed_s", "speedup_vs_flat", "dispatch_resolved",
               "bytes_by_level", "flat_bytes_by_level", "dedup_saving", "swaps", "loss_first", "loss_last")
BYTES_NOTE = ("bytes_by_level: payload bytes of every MoE layer's forward dispatch + combine over level-L links, "
              "summed over ranks, layers and timed steps (DedupMonitor's count; the backward moves the same rows "
              "again and is not included). flat_bytes_by_level: what a flat dispatch would move for the same routing. "
              "Dense-gradient all-reduce (DDP) traffic is not counted either.")


# ---------------------------------------------------------------------------- arguments
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bench e2e`` flags to ``p``."""
    p.add_argument("--topology", default="2x2", help="level sizes, outermost first; its product = ranks (default 2x2)")
    p.add_argument("--dispatch", default=DEFAULT_DISPATCH,
                   help=f"comma-separated dispatch values to train with (default {DEFAULT_DISPATCH})")
    p.add_argument("--swaps", action="store_true",
                   help=f"also run '{SWAPS_VARIANT}': dispatch auto + HierMoECallback expert swaps")
    p.add_argument("--plan-every-n-steps", type=int, default=5,
                   help="with --swaps: optimizer steps between swap plans (default 5)")
    p.add_argument("--max-swaps-per-plan", type=int, default=4,
                   help="with --swaps: swaps per layer and plan, at most (default 4)")
    p.add_argument("--no-charge-migration", dest="charge_migration", action="store_false",
                   help="with --swaps: let the planner ignore the cost of migrating experts (default: charge it "
                        "over the next plan interval, as HierMoECallback does)")
    p.add_argument("--model", default=MOEGPT, metavar="NAME|YAML",
                   help=f"the model to train: {MOEGPT} (the bundled MoEGPT, shaped by the flags below; default), "
                        f"{HF_QWEN3} (a converted tiny Hugging Face Qwen3-MoE, the shape of "
                        f"configs/hf-qwen3-moe-tiny.yaml; --lr and --seed apply), or a YAML file with a LightningCLI "
                        f"model section (class_path + init_args, used as given)")
    p.add_argument("--hidden-size", type=int, default=256, help="model hidden size (default 256)")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="hidden size of each expert's SwiGLU (default: 3/8 of --hidden-size, the fine-grained "
                        "experts of Qwen3-30B-A3B, 768 per 2048, the paper's end-to-end model)")
    p.add_argument("--num-experts", type=int, default=16, help="experts per MoE layer (default 16)")
    p.add_argument("--top-k", type=int, default=8,
                   help="experts per token (default 8, as in Qwen3-30B-A3B and DeepSeek-V3)")
    p.add_argument("--num-layers", type=int, default=2, help="transformer blocks, each with an MoE FFN (default 2)")
    p.add_argument("--router-clusters", type=int, default=0, metavar="C",
                   help="moegpt only: clustered routing (MoEGPT router_clusters): every MoE layer's gate makes the "
                        "experts e with the same e %% C co-activate, as trained routers do, so swaps have clusters "
                        "to gather; C must divide --num-experts; 0 = the usual near-uniform init (default 0)")
    p.add_argument("--router-cluster-strength", type=float, default=None, metavar="S",
                   help=f"with --router-clusters: MoEGPT router_cluster_strength, the cluster term's norm relative "
                        f"to a gate row's (0 = no clustering; default {_default_strength():g}, MoEGPT's)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per rank and step (default 8)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant (default 20)")
    p.add_argument("--warmup-steps", type=int, default=3,
                   help="optimizer steps before the timed ones, not timed (default 3)")
    p.add_argument("--optimizer", default="adamw", help="adamw, adam or sgd (default adamw)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="model seed, the same for every variant (default 0)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a text file to train on (default: Python's documentation topics, offline)")
    p.add_argument("--link-costs", default="paper-a6000",
                   help="preset name (paper-a6000), a YAML file, or 'calibrate' (measure them first on these ranks "
                        "and network with LinkCosts.calibrate): the costs auto and the swap planner use "
                        "(default paper-a6000)")
    p.add_argument("--auto-interval", type=int, default=50,
                   help="dispatch auto re-chooses each layer's depth every this many steps (default 50)")
    p.add_argument("--pipeline-chunks", type=int, default=1,
                   help="token chunks each dispatch runs as a pipeline (HierMoEStrategy pipeline_chunks; default 1)")
    p.add_argument("--overlap-chunks", type=int, default=1,
                   help="each MoE layer's dispatch, experts and combine as one pipeline of this many token chunks "
                        "(HierMoEStrategy overlap_chunks; default 1 = off)")
    p.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                   help="ranks of one node exchange through loopback sockets instead of shared memory "
                        "(HierMoEStrategy shared_memory=False), for an A/B")
    p.add_argument("--emulate-inter-mbit", type=int, default=None, metavar="N",
                   help="run each top-level group of ranks in its own network namespace, node links limited to "
                        "N Mbit/s each way (needs root; exit status 3 otherwise)")
    p.add_argument("--emulate-latency-ms", type=float, default=0.0, metavar="L",
                   help="with --emulate-inter-mbit: add L ms of delay on every shaped hop (default 0)")
    p.add_argument("--repeats", type=int, default=1,
                   help="train every variant this many times, round robin (round i starts with the i-th variant), and "
                        "report the median tokens/s: evens out a shared machine's load (default 1)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds for the whole command (calibration, every variant and repeat); when they pass, "
                        "every rank is stopped and the command exits with status 124 (default 900)")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


_int = int_flag  # shared validator (cli/flags.py)


def _default_strength() -> float:
    """MoEGPT's default ``router_cluster_strength``."""
    from ..models.clustered_routing import DEFAULT_STRENGTH

    return DEFAULT_STRENGTH


def _number(value: object, flag: str, low: float, high: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{flag} must be a number, got {value!r}")
    if value < low or (strict and value == low) or (high is not None and value > high):
        bound = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{flag} must be {bound}, got {value}")
    return float(value)


OVERLAP_SUFFIX = ":overlap="


def variant_names(args: argparse.Namespace, num_levels: int) -> list[str]:
    """The ``--dispatch`` values (checked for the topology, duplicates dropped), then ``auto+swaps`` with --swaps.
    A value may end in ``:overlap=C`` (e.g. ``auto:overlap=2``): that dispatch with ``overlap_chunks=C``."""
    if not isinstance(args.dispatch, str):
        raise TypeError(f"--dispatch must be a comma-separated string, got {args.dispatch!r}")
    items = [n.strip() for n in args.dispatch.split(",")]
    parse_dispatch_list(",".join(n.split(OVERLAP_SUFFIX)[0] for n in items), num_levels)
    for item in items:
        _overlap_of(item)
    return list(dict.fromkeys(items)) + ([SWAPS_VARIANT] if args.swaps else [])


def _overlap_of(variant: str) -> "int | str":
    """``"auto:overlap=2"`` -> 2; a plain dispatch -> 1; a bad count is a ValueError naming --dispatch."""
    if OVERLAP_SUFFIX not in variant:
        return 1
    text = variant.split(OVERLAP_SUFFIX, 1)[1]
    try:
        return validate_overlap_chunks(text if text == "auto" else int(text))
    except ValueError:
        raise ValueError(f"--dispatch {variant!r}: the overlap count must be 'auto' or an int in 1..64, got "
                         f"{text!r}") from None


def default_ffn_hidden_size(hidden_size: int) -> int:
    """3/8 of ``hidden_size`` (at least 1): Qwen3-30B-A3B's expert width per hidden size (768 / 2048).

    Fine-grained experts are what makes the all-to-all a large part of an MoE step: the bytes a token sends grow with
    ``hidden_size * top_k``, its expert compute with ``hidden_size * ffn_hidden_size * top_k``.
    """
    return max(1, hidden_size * 3 // 8)


def _model_kwargs(args: argparse.Namespace) -> dict:
    ffn = args.ffn_hidden_size or default_ffn_hidden_size(args.hidden_size)
    kwargs = dict(vocab_size=256, seq_len=args.seq_len, num_layers=args.num_layers, hidden_size=args.hidden_size,
                  num_heads=args.num_heads, ffn_hidden_size=ffn,
                  num_experts=args.num_experts, top_k=args.top_k, optimizer=args.optimizer, lr=args.lr, seed=args.seed)
    clusters = getattr(args, "router_clusters", 0)
    if clusters:  # only then: the model's keyword arguments (and the report's "model") are unchanged otherwise
        strength = getattr(args, "router_cluster_strength", None)
        kwargs.update(router_clusters=clusters,
                      router_cluster_strength=_default_strength() if strength is None else float(strength))
    return kwargs


def _check_router_clusters(args: argparse.Namespace, model_name: str) -> None:
    """``--router-clusters`` / ``--router-cluster-strength``: moegpt only, C a divisor of --num-experts (<= the
    hidden size), S >= 0 and only with C > 0. Errors name the flag."""
    from ..models.clustered_routing import check_clusters

    clusters = getattr(args, "router_clusters", 0)
    strength = getattr(args, "router_cluster_strength", None)
    _int(clusters, "--router-clusters", 0)
    if strength is not None:
        _number(strength, "--router-cluster-strength", 0.0)
        if not clusters:
            raise ValueError("--router-cluster-strength needs --router-clusters C (C >= 1)")
    if clusters and model_name != MOEGPT:
        raise ValueError(f"--router-clusters applies to --model {MOEGPT} only (MoEGPT's router_clusters), got "
                         f"--model {model_name}")
    if clusters:
        check_clusters(clusters, args.num_experts, "--router-clusters", allow_zero=True, hidden_size=args.hidden_size)


@dataclass(frozen=True)
class E2EConfig:
    """What the ranks of every variant need, from the checked flags (:func:`_resolve`, in the parent)."""

    topology: Topology
    world: int  # ranks: topology.world_size
    names: tuple[str, ...]  # the variants, in --dispatch order, then auto+swaps with --swaps
    link_costs: LinkCosts | None  # None: --link-costs calibrate, measured by run() on the ranks first
    model: dict  # the model class's keyword arguments (the report's "model"; MoEGPT's by default)
    data: str | None  # --data (None: the default corpus)
    seq_len: int
    batch_size: int  # samples per rank and step
    steps: int  # timed optimizer steps
    warmup: int  # optimizer steps before the timed ones
    auto_interval: int
    pipeline_chunks: int
    shared_memory: bool
    overlap_chunks: int
    plan_every_n_steps: int  # auto+swaps: HierMoECallback's options
    max_swaps_per_plan: int
    charge_migration: bool
    root_dir: str | None = None  # the Trainers' default_root_dir (a temporary directory run() makes)
    model_name: str = MOEGPT  # --model: moegpt, hf-qwen3-moe-tiny or the YAML path
    model_class: str = MOEGPT_CLASS  # the LightningModule class built from ``model``
    seed: int = 0  # torch.manual_seed of every rank before it builds the model
    # variant name -> (dispatch, more HierMoEStrategy arguments): variants that are not just a dispatch (e.g. the
    # expert-parallel size or dense sharding of ``bench scaleout``); a name not listed is its own dispatch
    variant_options: tuple = ()


def _resolve(args: argparse.Namespace) -> E2EConfig:
    """Validate every flag in the parent (before any namespace or rank exists); return the ranks' configuration."""
    from ..data.text import ByteTextDataModule
    from ..models.moe_gpt import MoEGPT

    topology = topology_flag(args.topology)
    world = topology.world_size
    if world < 2:
        raise ValueError(f"--topology {args.topology!r} has {world} rank; expert parallelism needs at least 2")
    names = variant_names(args, topology.num_levels)
    for value, flag, low in ((args.hidden_size, "--hidden-size", 1), (args.num_heads, "--num-heads", 1),
                             (args.num_experts, "--num-experts", 1), (args.top_k, "--top-k", 1),
                             (args.num_layers, "--num-layers", 1), (args.seq_len, "--seq-len", 1),
                             (args.batch_size, "--batch-size", 1), (args.steps, "--steps", 1),
                             (args.warmup_steps, "--warmup-steps", 0), (args.seed, "--seed", 0),
                             (args.plan_every_n_steps, "--plan-every-n-steps", 1),
                             (args.max_swaps_per_plan, "--max-swaps-per-plan", 0),
                             (args.auto_interval, "--auto-interval", 1), (args.repeats, "--repeats", 1)):
        _int(value, flag, low)
    validate_pipeline_chunks(args.pipeline_chunks, "--pipeline-chunks")
    validate_pipeline_chunks(getattr(args, "overlap_chunks", 1), "--overlap-chunks")
    if args.ffn_hidden_size is not None:
        _int(args.ffn_hidden_size, "--ffn-hidden-size", 1)
    model_name = getattr(args, "model", MOEGPT)
    _check_router_clusters(args, model_name)
    if model_name == MOEGPT and args.top_k > args.num_experts:
        raise ValueError(f"--top-k ({args.top_k}) must be <= --num-experts ({args.num_experts})")
    if model_name == MOEGPT and args.num_experts % world:
        raise ValueError(f"--num-experts ({args.num_experts}) must be divisible by the {world} ranks of "
                         f"--topology {topology}")
    _number(args.lr, "--lr", 0.0, strict=True)
    _number(args.timeout, "--timeout", 0.0, strict=True)
    if args.emulate_inter_mbit is not None:
        _int(args.emulate_inter_mbit, "--emulate-inter-mbit", 1)
    _number(args.emulate_latency_ms, "--emulate-latency-ms", 0.0, 10_000.0)
    if args.emulate_latency_ms > 0 and args.emulate_inter_mbit is None:
        raise ValueError("--emulate-latency-ms needs --emulate-inter-mbit")
    link_costs = None  # "calibrate": measured by run() on the ranks (and network) of the benchmark
    if args.link_costs != CALIBRATE:
        try:
            link_costs = LinkCosts.resolve(args.link_costs)
        except (TypeError, ValueError, OSError) as e:
            raise ValueError(f"--link-costs: {e}") from None
    if model_name == MOEGPT:
        model_class, model_kwargs = MOEGPT_CLASS, _model_kwargs(args)
        try:
            MoEGPT(**{**model_kwargs, "num_layers": 1})  # every model argument checked once, cheaply
        except (TypeError, ValueError) as e:
            raise type(e)(f"model: {e}") from None
    else:
        model_class, model_kwargs = _other_model(args, model_name, world)
    try:
        data = ByteTextDataModule(args.data, seq_len=args.seq_len, batch_size=args.batch_size)
    except (TypeError, ValueError) as e:
        raise type(e)(f"--data: {e}") from None
    if data.num_train_samples < world * args.batch_size:
        raise ValueError(f"--data: {data.num_train_samples} training windows of {args.seq_len + 1} bytes are fewer "
                         f"than one global batch ({world} ranks x --batch-size {args.batch_size})")
    overlapped = tuple((n, n.split(OVERLAP_SUFFIX)[0], {"overlap_chunks": _overlap_of(n)}) for n in names
                       if OVERLAP_SUFFIX in n)
    return E2EConfig(topology=topology, world=world, names=tuple(names), link_costs=link_costs, model=model_kwargs,
                     variant_options=overlapped,
                     data=args.data, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps,
                     warmup=args.warmup_steps, auto_interval=args.auto_interval,
                     pipeline_chunks=args.pipeline_chunks, shared_memory=bool(getattr(args, "shared_memory", True)),
                     overlap_chunks=int(getattr(args, "overlap_chunks", 1)),
                     plan_every_n_steps=args.plan_every_n_steps, max_swaps_per_plan=args.max_swaps_per_plan,
                     charge_migration=bool(getattr(args, "charge_migration", True)), model_name=model_name,
                     model_class=model_class, seed=int(model_kwargs.get("seed", args.seed)))


def _import_class(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"class_path {path!r} is not a dotted path (package.module.Class)")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"class_path {path!r} cannot be imported: {e}") from None


def _other_model(args: argparse.Namespace, name: str, world: int) -> tuple[str, dict]:
    """``--model hf-qwen3-moe-tiny`` or a YAML path -> (class path, keyword arguments), checked by building the model
    once here: a LightningModule with MoE layers whose experts divide over the ``world`` ranks."""
    import lightning.pytorch as pl

    from ..checkpoint import moe_layers

    if name == HF_QWEN3:
        if args.optimizer != "adamw":
            raise ValueError(f"--optimizer {args.optimizer!r}: --model {HF_QWEN3} trains with AdamW only")
        class_path, kwargs = HF_CLASS, dict(config=dict(HF_QWEN3_MOE_TINY), lr=float(args.lr), seed=int(args.seed))
    else:
        if not os.path.isfile(str(name)):
            raise ValueError(f"--model must be one of {', '.join(MODELS)} or a YAML file with a model section, got "
                             f"{name!r}: no such file")
        import yaml

        with open(name) as f:
            doc = yaml.safe_load(f)
        section = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(section, dict) or "class_path" not in section:
            raise ValueError(f"--model {name}: expected a 'model' section with a class_path (and init_args), as "
                             f"LightningCLI configs have (e.g. configs/hf-qwen3-moe-tiny.yaml)")
        class_path, kwargs = str(section["class_path"]), dict(section.get("init_args") or {})
    cls = _import_class(class_path)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise ValueError(f"--model {name}: {class_path} is not a LightningModule")
    try:
        module = cls(**kwargs)
    except (TypeError, ValueError, ImportError) as e:
        raise type(e)(f"model ({name}): {e}") from None
    layers = moe_layers(module)
    if not layers:
        raise ValueError(f"--model {name}: {class_path} has no MoELayer to shard")
    for layer_name, layer in layers.items():
        if layer.num_experts % world:
            raise ValueError(f"--model {name}: {layer_name} has {layer.num_experts} experts, not divisible by the "
                             f"{world} ranks of --topology")
    vocab = getattr(getattr(getattr(module, "model", None), "config", None), "vocab_size", None)
    if vocab is not None and vocab < 256:
        raise ValueError(f"--model {name}: vocab_size {vocab} < 256 (the data are bytes)")
    return class_path, kwargs


# ---------------------------------------------------------------------------- Lightning on already-forked ranks
class ExternalRankEnvironment(ClusterEnvironment):
    """The cluster environment of a process started by someone else (``run_ranks``) with its process group up.

    ``creates_processes_externally`` is True, so Lightning's launcher starts nothing, and the strategy finds
    ``torch.distributed`` initialised and skips ``init_process_group``. Ranks are reported as given (one node:
    local rank = global rank).
    """

    def __init__(self, rank: int, world_size: int):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0 .. {world_size - 1}")
        self._rank, self._world = int(rank), int(world_size)

    @override
    @property
    def creates_processes_externally(self) -> bool:
        return True

    @override
    @property
    def main_address(self) -> str:
        return os.environ.get("MASTER_ADDR", "127.0.0.1")

    @override
    @property
    def main_port(self) -> int:
        return int(os.environ.get("MASTER_PORT", "0"))

    @override
    @staticmethod
    def detect() -> bool:
        return False

    @override
    def world_size(self) -> int:
        return self._world

    @override
    def set_world_size(self, size: int) -> None:
        if size != self._world:
            raise ValueError(f"Lightning computed a world size of {size}, but the process group has {self._world} "
                             f"ranks (use devices=world_size, num_nodes=1)")

    @override
    def global_rank(self) -> int:
        return self._rank

    @override
    def set_global_rank(self, rank: int) -> None:
        if rank != self._rank:
            raise ValueError(f"Lightning computed global rank {rank} for the process of rank {self._rank}")

    @override
    def local_rank(self) -> int:
        return self._rank

    @override
    def node_rank(self) -> int:
        return 0


def _quiet_child() -> None:
    """Forked ranks: no per-rank banners ("GPU available: ...") and none of Lightning's advice warnings."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _cluster_share(pl_module, clusters: int) -> float:
    """Mean over this rank's MoE layers of the within-cluster share of their last forward's top-k (nan: none)."""
    from ..checkpoint import moe_layers
    from ..models.clustered_routing import within_cluster_share

    shares = [within_cluster_share(m.last_expert_ids, clusters) for m in moe_layers(pl_module).values()
              if m.last_expert_ids is not None and bool((m.last_expert_ids >= 0).any())]
    return sum(shares) / len(shares) if shares else float("nan")


def _make_timer(warmup: int, monitor, clusters: int = 0, track_plans: bool = False):
    """The step timer of one rank. ``clusters > 0``: also the within-cluster share of the routing at the first and
    the last training step (mean over layers and ranks). ``track_plans``: also which timed steps ran a swap plan
    (``monitor.plan_started_steps`` / ``plan_applied_steps``, read with a default: empty without them)."""
    import lightning.pytorch as pl

    class _StepTimer(pl.Callback):
        """Barrier-synchronised timestamps at the end of every optimizer step, monitor totals after the warmup."""

        def __init__(self):
            self.stamps: list[float] = []
            self.losses: list[float] = []
            self.global_steps: list[int] = []  # trainer.global_step after each batch (stamps[1:])
            self.first_share = float("nan")  # within-cluster share of the first step's routing (clusters > 0)
            self.snapshot = None
            self.result: dict | None = None

        def _totals(self):
            sent = monitor.total_sent.clone() if monitor.total_sent is not None else None
            flat = monitor.total_flat.clone() if monitor.total_flat is not None else None
            return sent, flat, getattr(monitor, "swaps_total", 0), getattr(monitor, "plan_seconds", 0.0), \
                getattr(monitor, "migration_seconds", 0.0), \
                getattr(monitor, "stats_seconds", 0.0) + getattr(monitor, "blocked_seconds", 0.0)

        def on_train_start(self, trainer, pl_module):
            dist.barrier()
            self.stamps = [time.perf_counter()]
            if warmup == 0:
                self.snapshot = self._totals()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if isinstance(outputs, dict) and "loss" in outputs:
                self.losses.append(float(outputs["loss"]))
            self.global_steps.append(int(trainer.global_step))
            if clusters and len(self.global_steps) == 1:  # the first step's routing (the last: on_train_end)
                self.first_share = _cluster_share(pl_module, clusters)
            dist.barrier()
            self.stamps.append(time.perf_counter())
            if len(self.stamps) - 1 == warmup:
                self.snapshot = self._totals()

        def on_train_end(self, trainer, pl_module):
            stamps = self.stamps[warmup:]
            steps = torch.tensor([b - a for a, b in zip(stamps, stamps[1:])], dtype=torch.float64)
            elapsed = torch.tensor([stamps[-1] - stamps[0]], dtype=torch.float64)
            dist.all_reduce(steps, op=dist.ReduceOp.MAX)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            losses = torch.tensor(self.losses, dtype=torch.float64)
            dist.all_reduce(losses)
            losses /= dist.get_world_size()
            sent0, flat0, swaps0, plan0, mig0, crit0 = self.snapshot
            sent, flat, swaps, plan, mig, crit = self._totals()

            def diff(end, start):
                if end is None:
                    return None
                return (end - start if start is not None else end).tolist()

            from ..checkpoint import moe_layers

            history: list[PlanRecord] = getattr(monitor, "history", [])
            plan_steps = sorted({h.step for h in history})
            plans = {"count": len(plan_steps)}
            if plan_steps:
                first = [h for h in history if h.step == plan_steps[0]]
                last = [h for h in history if h.step == plan_steps[-1]]
                plans["predicted_ms_before_first"] = sum(h.predicted_ms_before for h in first)
                plans["predicted_ms_after_last"] = sum(h.predicted_ms_after for h in last)
            extra = {}
            if clusters:
                # the layers still hold the last training step's routing (no validation runs)
                shares = torch.tensor([self.first_share, _cluster_share(pl_module, clusters)], dtype=torch.float64)
                dist.all_reduce(shares)
                shares /= dist.get_world_size()
                extra["within_cluster_share"] = {"first": float(shares[0]), "last": float(shares[1])}
            if track_plans:
                started = sorted(int(s) for s in getattr(monitor, "plan_started_steps", []))
                applied = sorted(int(s) for s in getattr(monitor, "plan_applied_steps", []))
                ran = set(started) | set(applied)
                timed = self.global_steps[warmup:]  # the global step of each timed step, as step_seconds
                extra.update(plan_started_steps=started, plan_applied_steps=applied, timed_global_steps=timed,
                             timed_plan_flags=[g in ran for g in timed])
            self.result = {
                **extra,
                "plans": plans,
                "step_seconds": steps.tolist(), "elapsed_s": float(elapsed), "losses": losses.tolist(),
                "sent": diff(sent, sent0), "flat": diff(flat, flat0), "swaps": swaps - swaps0,
                "plan_seconds": plan - plan0, "migration_seconds": mig - mig0,
                "swap_critical_path_seconds": crit - crit0,
                "dispatch_resolved": [m.dispatch for m in moe_layers(pl_module).values()],
                "state_bytes_per_rank": _max_state_bytes(pl_module, trainer.optimizers),
            }

    return _StepTimer()


def _max_state_bytes(module, optimizers) -> dict:
    """The largest any rank holds of each part of the training state (:func:`~.memory.state_bytes`; collective)."""
    from .memory import STATE_KINDS, state_bytes

    mine = state_bytes(module, optimizers)
    flat = torch.tensor([mine[part][kind] for part in ("dense", "expert") for kind in STATE_KINDS], dtype=torch.float64)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    values = iter(int(v) for v in flat.tolist())
    return {part: {kind: next(values) for kind in STATE_KINDS} for part in ("dense", "expert")}


def _rank_fn(rank: int, world: int, cfg: E2EConfig, variant: str) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, DistributedSampler

    from ..callback import HierMoECallback
    from ..data.text import ByteTextDataModule
    from ..metrics import DedupMonitor
    from ..models.moe_gpt import MoEGPT
    from ..strategy import HierMoEStrategy

    _quiet_child()
    torch.manual_seed(cfg.seed)
    swaps = variant == SWAPS_VARIANT
    dispatch, extra = dict((n, (d, kw)) for n, d, kw in cfg.variant_options).get(
        variant, ("auto" if swaps else variant, {}))
    model = MoEGPT(**cfg.model) if cfg.model_class == MOEGPT_CLASS else _import_class(cfg.model_class)(**cfg.model)
    dataset = ByteTextDataModule(cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size).train_dataset
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    if swaps:
        monitor = HierMoECallback(plan_every_n_steps=cfg.plan_every_n_steps, max_swaps_per_plan=cfg.max_swaps_per_plan,
                                  charge_migration=cfg.charge_migration, print_summary=False, save_plots=False)
    else:
        monitor = DedupMonitor(print_summary=False)
    clusters = int(cfg.model.get("router_clusters", 0) or 0) if cfg.model_class == MOEGPT_CLASS else 0
    timer = _make_timer(cfg.warmup, monitor, clusters=clusters, track_plans=swaps)
    strategy = HierMoEStrategy(**{**dict(topology=str(cfg.topology), dispatch=dispatch, link_costs=cfg.link_costs,
                                         auto_interval=cfg.auto_interval, pipeline_chunks=cfg.pipeline_chunks,
                                         overlap_chunks=cfg.overlap_chunks, shared_memory=cfg.shared_memory),
                                      **extra})
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, num_nodes=1, strategy=strategy, plugins=[ExternalRankEnvironment(rank, world)],
        max_steps=cfg.warmup + cfg.steps, max_epochs=-1, callbacks=[monitor, timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=cfg.root_dir,
    )
    trainer.fit(model, train_dataloaders=loader)
    if timer.result is None:
        raise RuntimeError(f"variant {variant}: training ended before its first step")
    return timer.result


def _calibrate_fn(rank: int, world: int, topology: Topology) -> dict:
    """``LinkCosts.calibrate`` on these ranks (identical result on every rank) as a plain dict."""
    from ..parallel import ExpertParallel

    ep = ExpertParallel(topology, dispatch="flat")
    costs = LinkCosts.calibrate(ep, name="calibrated (bench e2e)")
    return {k: {"alpha": pc.alpha, "beta": pc.beta, "r2": pc.r2} for k, pc in costs.phases.items()}


# ---------------------------------------------------------------------------- report
def _p90(values: list[float]) -> float:
    s = sorted(values)
    pos = 0.9 * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _summarise(runs: list[dict], tokens_per_step: int, steps: int, num_levels: int) -> dict:
    """One variant's repeats -> its result: median tokens/s over repeats, step times pooled over repeats, traffic and
    swaps of the median repeat (the traffic of every repeat is the same unless swaps or auto choose differently)."""
    levels = [f"level{i}" for i in range(1, num_levels + 1)]
    rates = [tokens_per_step * steps / r["elapsed_s"] for r in runs]
    raw = runs[sorted(range(len(runs)), key=lambda i: rates[i])[(len(runs) - 1) // 2]]  # the (lower) median repeat
    sent = raw["sent"] or [0.0] * num_levels
    flat = raw["flat"] or [0.0] * num_levels
    step_ms = [s * 1e3 for r in runs for s in r["step_seconds"]]
    extra = {}
    if all("timed_plan_flags" in r for r in runs):  # a variant with swaps: which timed steps ran a plan
        flags = [bool(f) for r in runs for f in r["timed_plan_flags"]]
        plan_ms = [ms for ms, f in zip(step_ms, flags) if f]
        other_ms = [ms for ms, f in zip(step_ms, flags) if not f]
        extra.update(step_ran_plan=flags, plan_started_steps=raw["plan_started_steps"],
                     plan_applied_steps=raw["plan_applied_steps"],
                     step_ms_median_plan_steps=statistics.median(plan_ms) if plan_ms else None,
                     step_ms_median_other_steps=statistics.median(other_ms) if other_ms else None)
    if "within_cluster_share" in raw:
        extra["within_cluster_share"] = raw["within_cluster_share"]
    return {
        "tokens_per_s": statistics.median(rates),
        "step_ms_median": statistics.median(step_ms),
        "step_ms_p90": _p90(step_ms),
        "elapsed_s": raw["elapsed_s"],
        "tokens_per_s_repeats": rates,
        "speedup_vs_flat": None,
        "dispatch_resolved": raw["dispatch_resolved"],
        "bytes_by_level": {k: int(round(v)) for k, v in zip(levels, sent)},
        "flat_bytes_by_level": {k: int(round(v)) for k, v in zip(levels, flat)},
        "dedup_saving": 1.0 - sum(sent) / sum(flat) if sum(flat) > 0 else 0.0,
        "swaps": int(raw["swaps"]),
        "plan_seconds": float(raw["plan_seconds"]),
        "migration_seconds": float(raw["migration_seconds"]),
        # the callback's own time inside the steps (statistics, waiting for and sharing plans), migration aside
        "swap_critical_path_seconds": float(raw.get("swap_critical_path_seconds", 0.0)),
        "plans": raw["plans"],
        "state_bytes_per_rank": raw.get("state_bytes_per_rank"),
        "loss_first": raw["losses"][0] if raw["losses"] else None,
        "loss_last": raw["losses"][-1] if raw["losses"] else None,
        "step_ms": step_ms,
        **extra,
    }


def run(args: argparse.Namespace, cfg: E2EConfig | None = None) -> dict:
    """Validate, then train every variant on freshly forked ranks; return the report (JSON-serialisable). ``cfg``:
    the ranks' configuration when the caller resolved it already (``bench scaleout``), else from ``args``."""
    cfg = cfg if cfg is not None else _resolve(args)
    topology, world, names = cfg.topology, cfg.world, list(cfg.names)
    # one deadline for every launch (calibration, each variant and repeat): --timeout bounds the whole command
    launch = dict(timeout=Deadline(float(args.timeout), "--timeout"), pg_timeout=min(float(args.timeout), 300.0))
    root = tempfile.mkdtemp(prefix="hiermoe-e2e-")
    cfg = replace(cfg, root_dir=root)
    raw: dict[str, list[dict]] = {name: [] for name in names}

    def train_all(net=None):
        nonlocal cfg
        extra = {} if net is None else {"netns": net, "ranks_per_node": world // topology.sizes[0]}
        if cfg.link_costs is None:
            phases = run_ranks(_calibrate_fn, world, topology, **launch, **extra)[0]
            cfg = replace(cfg, link_costs=LinkCosts(phases, name="calibrated (bench e2e)"))
        for i in range(args.repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:  # each round starts one variant later
                raw[name].append(run_ranks(_rank_fn, world, cfg, name, **launch, **extra)[0])

    try:
        with emulated_network(args.emulate_inter_mbit, topology.sizes[0], args.emulate_latency_ms) as net:
            train_all(net)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    tokens_per_step = world * args.batch_size * args.seq_len
    results = {name: _summarise(raw[name], tokens_per_step, args.steps, topology.num_levels) for name in names}
    if "flat" in results:
        base = results["flat"]["tokens_per_s"]
        for r in results.values():
            r["speedup_vs_flat"] = r["tokens_per_s"] / base
    report = {
        "topology": str(topology),
        "world_size": world,
        "model": {k: v for k, v in cfg.model.items()},
        "model_name": cfg.model_name,
        "model_class": cfg.model_class,
        "seq_len": args.seq_len,
        "batch_size_per_rank": args.batch_size,
        "tokens_per_step": tokens_per_step,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "variants": names,
        "results": results,
        "link_costs": cfg.link_costs.name,
        "link_cost_phases": {k: {"alpha": pc.alpha, "beta": pc.beta, "r2": pc.r2}
                             for k, pc in cfg.link_costs.phases.items()},
        "auto_interval": args.auto_interval, "pipeline_chunks": args.pipeline_chunks,
        "overlap_chunks": cfg.overlap_chunks,
        "shared_memory": cfg.shared_memory,
        "data": args.data or "default corpus (pydoc topics)",
        "bytes_note": BYTES_NOTE,
        "cpu_count": os.cpu_count(),
    }
    if cfg.model_class == MOEGPT_CLASS and cfg.model.get("router_clusters"):
        report["router_clustering"] = _router_clustering(cfg.model, results)
    if args.swaps:
        report["swaps"] = {"plan_every_n_steps": args.plan_every_n_steps,
                           "max_swaps_per_plan": args.max_swaps_per_plan,
                           "charge_migration": cfg.charge_migration}
    if args.emulate_inter_mbit is not None:
        report["emulation"] = {"inter_mbit": args.emulate_inter_mbit, "latency_ms": float(args.emulate_latency_ms),
                               "num_nodes": topology.sizes[0], "ranks_per_node": world // topology.sizes[0],
                               "link": "each node's namespace <-> hub bridge, tbf rate limit on both directions"}
    return report


def _router_clustering(model: dict, results: dict) -> dict:
    """The report's ``router_clustering``: C, S, the chance share of uniform routing and the measured within-cluster
    share at the first and last step (mean over the variants of their means over layers and ranks)."""
    from ..models.clustered_routing import chance_within_cluster_share

    def mean(key: str) -> float | None:
        values = [r["within_cluster_share"][key] for r in results.values() if "within_cluster_share" in r]
        return sum(values) / len(values) if values else None

    clusters = int(model["router_clusters"])
    return {"clusters": clusters, "strength": float(model["router_cluster_strength"]),
            "assignment": "interleaved: expert e in cluster e % clusters",
            "chance_share": chance_within_cluster_share(model["num_experts"], model["top_k"], clusters),
            "within_cluster_share_first": mean("first"), "within_cluster_share_last": mean("last"),
            "share_note": "share of a token's (token, expert) pairs in the cluster holding most of them, "
                          "mean over MoE layers and ranks, at the first training step and the last"}


def _describe_model(report: dict) -> str:
    model, name = report["model"], report.get("model_name", MOEGPT)
    if name == MOEGPT:
        return (f"MoEGPT hidden {model['hidden_size']}, {model['num_layers']} layers, {model['num_experts']} experts "
                f"top-{model['top_k']} (expert FFN {model['ffn_hidden_size']})")
    config = model.get("config")
    if isinstance(config, dict):
        experts = config.get("num_experts", config.get("n_routed_experts", config.get("num_local_experts", "?")))
        return (f"{name} ({config.get('model_type', '?')} hidden {config.get('hidden_size', '?')}, "
                f"{config.get('num_hidden_layers', '?')} layers, {experts} experts "
                f"top-{config.get('num_experts_per_tok', '?')}, expert FFN {config.get('moe_intermediate_size', '?')})")
    return f"{name} ({report.get('model_class', '?')})"


def format_report(report: dict) -> str:
    """An aligned table: tokens/s, speedup over flat, step times, dispatch in use, bytes per level, dedup, swaps."""
    mib = float(1 << 20)
    head = (f"topology {report['topology']} ({report['world_size']} ranks, gloo on this machine), "
            f"{_describe_model(report)}, seq {report['seq_len']} x batch "
            f"{report['batch_size_per_rank']}/rank = {report['tokens_per_step']} tokens/step; {report['steps']} timed steps after {report['warmup_steps']} warmup"
            + (f", median of {report['repeats']} repeats (round robin)" if report.get("repeats", 1) > 1 else "")
            + (f", {report['pipeline_chunks']} pipeline chunks" if report.get("pipeline_chunks", 1) != 1 else "")
            + (f", {report['overlap_chunks']} overlap chunks" if report.get("overlap_chunks", 1) != 1 else "")
            + ("" if report.get("shared_memory", True) else ", no shared memory"))
    if "router_clustering" in report:
        rc = report["router_clustering"]

        def share(v):
            return "?" if v is None or v != v else f"{100 * v:.1f}%"

        head += (f"\nrouting clustered: {rc['clusters']} interleaved expert clusters, strength {rc['strength']:g}; "
                 f"within-cluster share {share(rc['within_cluster_share_first'])} at the first step, "
                 f"{share(rc['within_cluster_share_last'])} at the last (mean over layers and ranks; uniform "
                 f"routing: {share(rc['chance_share'])})")
    head += emulation_line(report)
    results = report["results"]
    levels = sorted({k for r in results.values() for k in r["bytes_by_level"]}, key=lambda s: int(s[5:]))
    cols = ["variant", "tokens/s", "vs flat", "step ms", "p90 ms", "dispatch", *[f"L{lv[5:]} MiB" for lv in levels],
            "dedup", "swaps", "loss"]
    rows = [cols]
    for name, r in results.items():
        resolved = sorted(set(r["dispatch_resolved"]))
        rows.append([
            name, f"{r['tokens_per_s']:,.0f}",
            f"{r['speedup_vs_flat']:.2f}x" if r["speedup_vs_flat"] is not None else "",
            f"{r['step_ms_median']:.1f}", f"{r['step_ms_p90']:.1f}", "/".join(resolved),
            *[f"{r['bytes_by_level'].get(lv, 0) / mib:.1f}" for lv in levels],
            f"{100 * r['dedup_saving']:.1f}%", str(r["swaps"]),
            f"{r['loss_last']:.3f}" if r["loss_last"] is not None else "",
        ])
    widths = [max(len(row[c]) for row in rows) for c in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    foot = [f"auto chooses with link costs {report['link_costs']} (every {report['auto_interval']} steps)"]
    if "swaps" in report:
        sw = report["swaps"]
        foot.append(f"{SWAPS_VARIANT}: HierMoECallback plans every {sw['plan_every_n_steps']} steps, "
                    f"<= {sw['max_swaps_per_plan']} swaps per layer and plan (planning + migration inside the timing)")
        r = results.get(SWAPS_VARIANT)
        if r is not None and "step_ran_plan" in r:
            foot.append(_plan_step_line(r))
    foot.append("L<i> MiB: forward dispatch+combine payload over level-i links, all ranks and timed steps; "
                "loss: mean over ranks at the last step")
    return "\n".join([head, "", *lines, "", *foot])


def _plan_step_line(r: dict) -> str:
    """One line: the median step time of the timed steps that started or applied a swap plan, and of the others."""
    n_plan = sum(r["step_ran_plan"])
    n_other = len(r["step_ran_plan"]) - n_plan
    if not n_plan:
        return (f"{SWAPS_VARIANT}: no timed step started or applied a plan (the callback records none: "
                f"plan_started_steps / plan_applied_steps empty); median step {r['step_ms_median']:.1f} ms")
    other = (f"{r['step_ms_median_other_steps']:.1f} ms on the other {n_other}" if n_other
             else "no other timed step")
    return (f"{SWAPS_VARIANT}: median step {r['step_ms_median_plan_steps']:.1f} ms on the {n_plan} timed steps that "
            f"started or applied a plan, {other}")


def main(args: argparse.Namespace) -> int:
    return report_main(args, run, format_report)


def report_main(args: argparse.Namespace, run_fn, format_fn) -> int:
    """``run_fn(args)``, then the report as a table (``format_fn``) or JSON (``--json``), also written to ``--output``;
    an emulation this machine cannot do is one line and exit status 3. Shared with ``bench scaleout``."""
    try:
        report = run_fn(args)
    except CLIError as e:
        if e.status != EMULATION_EXIT_STATUS or getattr(args, "debug", False):
            raise
        print(f"hiermoe: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EMULATION_EXIT_STATUS
    text = json.dumps(report, indent=2)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text if args.json else format_fn(report))
    return 0
