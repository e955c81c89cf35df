"""DedupMonitor: logs what the hierarchical dispatch saved, per training step, to every Lightning logger.

Metrics (contract names): ``hiermoe/dispatch_bytes_level{L}`` (payload bytes of dispatch + combine over level-L
links, summed over layers and ranks), ``hiermoe/dedup_saving`` (1 - bytes sent / bytes a flat dispatch would send),
``hiermoe/dedup_saving_level{L}`` (the same per link level), ``hiermoe/load_imbalance`` (max over ranks / mean of the (token, expert) pairs the experts processed),
``hiermoe/predicted_a2a_ms`` (the cost model's one-way time of the dispatch in use, summed over layers; logged only
with ``dispatch="auto"``, which computes it) and ``hiermoe/chosen_dims/layer{i}`` (the depth ``d`` in use).
At the end of ``fit`` rank 0 prints a summary: loss, tokens/s, bytes by level against flat.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from typing_extensions import override

from .checkpoint import moe_layers
from .dispatch.spec import level_key
from .validation import check_bool_arg, check_int
from .layer import MoELayer

__all__ = ["DedupMonitor", "flat_bytes_by_level", "dispatch_depth"]


def dispatch_depth(name: str) -> int:
    """``hd<d>`` -> d; ``flat``/``hd1``/``local`` -> 1; ``2dh`` -> its number of phases is not a dedup depth: 0."""
    if name.startswith("hd"):
        return int(name[2:])
    return 0 if name == "2dh" else 1


def flat_bytes_by_level(layer: MoELayer) -> torch.Tensor:
    """``[D]`` bytes a flat dispatch + combine would move from this rank for the layer's last routing."""
    ep = layer.expert_parallel
    ids = layer.last_expert_ids.reshape(-1)
    ids = ids[ids >= 0]
    dest = layer.placement.expert_to_rank[ids]
    levels = ep.topology.link_level_table[ep.rank][dest]  # 0 = stays here
    counts = torch.bincount(levels, minlength=ep.topology.num_levels + 1)[1:]
    row_bytes = layer.last_handle.row_bytes
    return counts.double() * row_bytes * 2


class DedupMonitor(pl.Callback):
    """Log the dedup savings of every sharded MoELayer each training step, and print a summary at the end of fit.

    Args:
        log_every_n_steps: how often to compute and log (the statistics cost one small all-reduce); an int >= 1.
        print_summary: print the end-of-fit summary on rank 0 (True or False).

    Its state (``state_dict``) holds everything a later metric or the summary reads: the byte totals, the tokens, the
    training seconds so far (throughput after a resume counts the earlier runs too), the first loss and the number
    of losses, so a resumed fit logs and summarises like the uninterrupted one.
    """

    def __init__(self, log_every_n_steps: int = 1, print_summary: bool = True):
        self.log_every_n_steps = check_int(log_every_n_steps, "log_every_n_steps", 1)
        self.print_summary = check_bool_arg("print_summary", print_summary)
        self.total_sent = None
        self.total_flat = None
        self.losses: list[float] = []  # this run's (rank 0 batch) losses
        self.tokens = 0
        self._start = None
        self._seconds_before = 0.0  # training seconds of the runs this one resumed
        self._first_loss: float | None = None  # the first loss of the whole (resumed) training
        self._losses_before = 0  # losses recorded by the runs this one resumed

    @override
    def state_dict(self) -> dict:
        return {"total_sent": self.total_sent, "total_flat": self.total_flat, "tokens": self.tokens,
                "train_seconds": self.train_seconds(), "first_loss": self._first_loss,
                "loss_count": self._losses_before + len(self.losses)}

    @override
    def load_state_dict(self, state: dict) -> None:
        self.total_sent, self.total_flat, self.tokens = state["total_sent"], state["total_flat"], state["tokens"]
        self._seconds_before = float(state.get("train_seconds", 0.0))
        self._first_loss = state.get("first_loss")
        self._losses_before = int(state.get("loss_count", 0))
        self.losses = []
        self._start = None

    def train_seconds(self) -> float:
        """Seconds of training so far, the resumed runs' included."""
        return self._seconds_before + (time.perf_counter() - self._start if self._start else 0.0)

    @override
    def on_train_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    @override
    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(outputs, dict) and "loss" in outputs:
            self.losses.append(float(outputs["loss"]))
            if self._first_loss is None:
                self._first_loss = self.losses[0]
        if isinstance(batch, (tuple, list)) and isinstance(batch[0], torch.Tensor):
            self.tokens += batch[0].numel() * trainer.world_size
        layers = [m for m in moe_layers(pl_module).values() if m.is_sharded and m.last_handle is not None]
        if not layers or trainer.global_step % self.log_every_n_steps != 0:
            return
        D = layers[0].expert_parallel.topology.num_levels
        sent = torch.zeros(D, dtype=torch.float64)
        flat = torch.zeros(D, dtype=torch.float64)
        # per expert-parallel rank; with replicas the all-reduce below sums each rank's copies (the replica's load)
        pairs = torch.zeros(layers[0].expert_parallel.world_size, dtype=torch.float64)
        predicted = 0.0
        for layer in layers:
            by_level = layer.last_handle.bytes_by_level()
            sent += torch.tensor([by_level[level_key(i)] for i in range(1, D + 1)], dtype=torch.float64)
            flat += flat_bytes_by_level(layer)
            pairs[layer.expert_parallel.rank] += layer.last_local_slots.numel()
            predicted += layer.auto_predictions.get(layer.dispatch, 0.0)
        stats = torch.cat([sent, flat, pairs])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        sent, flat, pairs = stats[:D], stats[D:2 * D], stats[2 * D:]
        self.total_sent = sent if self.total_sent is None else self.total_sent + sent
        self.total_flat = flat if self.total_flat is None else self.total_flat + flat
        metrics = {f"hiermoe/dispatch_bytes_level{i + 1}": float(sent[i]) for i in range(D)}
        metrics["hiermoe/dedup_saving"] = 1.0 - float(sent.sum()) / max(float(flat.sum()), 1.0)
        for i in range(D):  # per level: the slow outer links are where the saving matters most
            metrics[f"hiermoe/dedup_saving_level{i + 1}"] = 1.0 - float(sent[i]) / max(float(flat[i]), 1.0)
        metrics["hiermoe/load_imbalance"] = float(pairs.max() / pairs.mean().clamp_min(1e-9))
        if any(layer.auto_predictions for layer in layers):
            metrics["hiermoe/predicted_a2a_ms"] = predicted
        for i, layer in enumerate(layers):
            metrics[f"hiermoe/chosen_dims/layer{i}"] = float(dispatch_depth(layer.dispatch))
        pl_module.log("dedup", metrics["hiermoe/dedup_saving"], prog_bar=True, logger=False, rank_zero_only=True)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def summary(self, trainer, log_dir: str | None = None) -> str:
        elapsed = self.train_seconds() if self._start or self._seconds_before else float("nan")
        lines = ["", "hiermoe summary", "---------------"]
        if self.losses:
            count = self._losses_before + len(self.losses)
            lines.append(f"train loss (rank 0 batch)   {self._first_loss:.3f} -> {self.losses[-1]:.3f} over {count} steps")
        lines.append(f"throughput                  {self.tokens / elapsed:,.0f} tokens/s ({elapsed:.1f} s of training)")
        if self.total_sent is not None:
            lines.append("all-to-all payload bytes    sent (this run)  vs  flat dispatch")
            for i, (s, f) in enumerate(zip(self.total_sent.tolist(), self.total_flat.tolist())):
                lines.append(f"  level{i + 1:<3}                {s / 2**20:10.1f} MiB  vs {f / 2**20:10.1f} MiB")
            saving = 1.0 - float(self.total_sent.sum()) / max(float(self.total_flat.sum()), 1.0)
            lines.append(f"dedup saving                {100 * saving:.1f}% of all-to-all bytes")
        if log_dir:
            lines.append(f"logs                        {log_dir}")
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "dirpath", None):
            lines.append(f"checkpoints                 {cb.dirpath}")
        return "\n".join(lines)

    @override
    def on_fit_end(self, trainer, pl_module):
        log_dir = trainer.log_dir  # collective under DDP: every rank must ask
        if self.print_summary and trainer.global_rank == 0:
            print(self.summary(trainer, log_dir), flush=True)
