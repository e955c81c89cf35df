"""Aux-loss-free balancing done by HierMoEStrategy: after every optimizer step the global expert counts update every
router's bias identically on every rank (any LightningModule, not only MoEGPT), never twice, and N ranks still train
like one process."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hiermoe_lightning import HierMoEStrategy, MoELayer
from hiermoe_lightning.checkpoint import moe_layers
from tests.lightning_harness import fit

TOL = dict(atol=2e-5, rtol=2e-5)
RATE = 0.02


class RecordBiases(pl.Callback):
    """At the end of training every rank's biases (all MoE layers, model order), written by rank 0 as JSON."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        mine = [layer.router.expert_bias.tolist() for layer in moe_layers(pl_module).values()]
        everyone = [None] * trainer.world_size
        dist.all_gather_object(everyone, mine)
        if trainer.global_rank == 0:
            json.dump(everyone, open(self.path, "w"))


def test_four_ranks_update_biases_like_one_process(tmp_path):
    tmp = str(tmp_path)
    kwargs = {"bias_update_rate": RATE, "score_func": "sigmoid"}
    ref_losses, ref_model = fit(tmp, 1, max_epochs=1, tag="one", model_kwargs=kwargs)  # MoEGPT's own hook
    path = os.path.join(tmp, "biases.json")
    losses, parent = fit(tmp, 4, topology="2x2", dispatch="hd2", max_epochs=1, tag="four", model_kwargs=kwargs,
                         extra_callbacks=[RecordBiases(path)], check_replicas=True)
    ref = [layer.router.expert_bias for layer in ref_model.moe_layers()]
    assert all(b.abs().sum() > 0 for b in ref)  # the biases really moved
    per_rank = [[torch.tensor(b) for b in rank] for rank in json.load(open(path))]
    for rank in per_rank:  # the same on every rank, and the 1-process biases (updated once per step, not twice)
        for got, want in zip(rank, ref):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for got, want in zip((layer.router.expert_bias for layer in parent.moe_layers()), ref):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL)
    assert json.load(open(tmp_path / "four.replicas.json"))["dense_identical"]
    # the bias changes the routing: without it the losses differ
    plain, _ = fit(tmp, 1, max_epochs=1, tag="plain", model_kwargs={"score_func": "sigmoid"})
    assert plain != ref_losses


# ---------------------------------------------------------------------------------------------- any LightningModule
V, H, E, K = 32, 16, 4, 2


class TinyMoEModule(pl.LightningModule):
    """Not MoEGPT: an embedding, one MoELayer that learns its selection bias, a head; no hook of its own."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(V, H, generator=g))
        self.moe = MoELayer(H, 16, E, K, seed=3, bias_update_rate=0.1, aux_loss_coef=0.0, score_func="sigmoid")
        self.head = torch.nn.Parameter(torch.randn(V, H, generator=g) * H**-0.5)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return F.cross_entropy(F.linear(self.moe(F.embedding(tokens, self.emb)), self.head), tokens)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordRouting(pl.Callback):
    """Per training batch: the expert ids every rank's forward chose and the bias afterwards (all ranks')."""

    def __init__(self, path: str):
        self.path, self.batches = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ids = [None] * trainer.world_size
        biases = [None] * trainer.world_size
        dist.all_gather_object(ids, pl_module.moe.last_expert_ids.tolist())
        dist.all_gather_object(biases, pl_module.moe.router.expert_bias.tolist())
        self.batches.append({"ids": ids, "biases": biases})

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            json.dump(self.batches, open(self.path, "w"))


class RankData(pl.LightningDataModule):
    def train_dataloader(self):
        data = TensorDataset(torch.randint(0, V, (48,), generator=torch.Generator().manual_seed(1)))
        sampler = DistributedSampler(data, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=False)
        return DataLoader(data, batch_size=6, sampler=sampler)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_strategy_updates_any_module_once_per_optimizer_step_from_global_counts(tmp_path, accumulate):
    path = str(tmp_path / "routing.json")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=HierMoEStrategy(topology="2", dispatch="flat", start_method="fork",
                                                             timeout=60),
        max_epochs=1, logger=False, callbacks=[RecordRouting(path)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        accumulate_grad_batches=accumulate, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
    )
    trainer.fit(TinyMoEModule(), datamodule=RankData())
    batches = json.load(open(path))
    assert len(batches) == 4
    bias, counts = torch.zeros(E), torch.zeros(E, dtype=torch.long)
    for i, b in enumerate(batches):
        assert b["biases"][0] == b["biases"][1]  # identical on every rank after every batch
        for ids in b["ids"]:  # both ranks' tokens count
            counts += torch.bincount(torch.tensor(ids).flatten(), minlength=E)
        if (i + 1) % accumulate == 0:  # an optimizer step: one update from the global counts since the last
            bias = bias + 0.1 * torch.sign(counts.float().mean() - counts.float())
            counts.zero_()
        torch.testing.assert_close(torch.tensor(b["biases"][0]), bias, rtol=0, atol=1e-6)
    assert bias.abs().sum() > 0


def test_moegpt_hook_stands_down_under_the_strategy_and_runs_without_it():
    """Under HierMoEStrategy only the strategy updates (after each optimizer step); MoEGPT's per-batch hook would
    otherwise update a second time (with gradient accumulation, once per micro-batch on top)."""
    from types import SimpleNamespace

    from hiermoe_lightning.models import MoEGPT

    model = MoEGPT(seq_len=16, num_layers=1, hidden_size=32, num_heads=2, ffn_hidden_size=32, num_experts=4, top_k=2,
                   bias_update_rate=0.1, aux_loss_coef=0.0)
    tokens = torch.randint(0, 256, (2, 16))
    model.loss_terms((tokens, tokens))
    layer = model.moe_layers()[0]
    counts = layer.routed_tokens.clone()
    assert int(counts.sum()) == 2 * 16 * 2
    model._trainer = SimpleNamespace(strategy=HierMoEStrategy())
    model.on_train_batch_end(None, None, 0)
    assert torch.equal(layer.routed_tokens, counts) and int(layer.router.expert_bias.abs().sum()) == 0
    model._trainer = SimpleNamespace(strategy=pl.strategies.SingleDeviceStrategy(device="cpu"))
    model.on_train_batch_end(None, None, 0)
    assert int(layer.routed_tokens.sum()) == 0 and layer.router.expert_bias.abs().sum() > 0
