"""HierMoEStrategy with a model built on meta (``configure_model`` or ``trainer.init_module(empty_init=True)``): each
rank materialises only its experts (the values of a normal build) and the dense modules (``reset_parameters`` under a
fixed seed; DDP broadcasts rank 0's), and N ranks still train like one process started from those values."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hiermoe_lightning import HierMoEStrategy, MoELayer
from hiermoe_lightning.strategy import check_dense_materializable, materialize_dense_
from tests.lightning_harness import MODEL, CheckReplicas, FixedOrderData, RecordLosses

TOL = dict(atol=2e-5, rtol=2e-5)
V, H = 256, 32


class MetaLM(pl.LightningModule):
    """A user's model: torch dense modules (each with ``reset_parameters``) around two MoE layers. ``build``:
    ``"init"`` builds in ``__init__`` (on whatever device is current), ``"configure_model"`` in that hook on meta."""

    def __init__(self, build: str = "init"):
        super().__init__()
        self.build = build
        if build == "init":
            self._build()

    def _build(self):
        self.emb = nn.Embedding(V, H)
        self.norms = nn.ModuleList([nn.LayerNorm(H) for _ in range(2)])
        self.moe = nn.ModuleList([MoELayer(H, 32, 8, 2, seed=20 + i, num_shared_experts=i, aux_loss_coef=0.0)
                                  for i in range(2)])
        self.head = nn.Linear(H, V)

    def configure_model(self):
        if self.build == "configure_model" and not hasattr(self, "emb"):
            with torch.device("meta"):
                self._build()

    def forward(self, tokens):
        x = self.emb(tokens)
        for norm, moe in zip(self.norms, self.moe):
            x = x + moe(norm(x))
        return self.head(x)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.cross_entropy(self(inputs).reshape(-1, V).float(), targets.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class RecordStates(pl.Callback):
    """The full unsharded state at the start of training (after setup: materialised, DDP-wrapped) and at its end,
    written by rank 0 to ``{prefix}.init.pt`` and ``{prefix}.final.pt`` (a model built in ``configure_model`` exists
    only in the ranks, so the parent cannot receive it)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def _save(self, trainer, pl_module, what):
        from hiermoe_lightning.checkpoint import full_state_dict

        state = full_state_dict(pl_module)  # collective
        if trainer.global_rank == 0:
            torch.save(state, f"{self.prefix}.{what}.pt")

    def on_train_start(self, trainer, pl_module):
        self._save(trainer, pl_module, "init")

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "final")


def _fit(tmp, world, model, tag, topology=None, dispatch="flat", build_under_init_module=False, strategy_kwargs=None):
    callbacks = [RecordLosses(os.path.join(tmp, f"{tag}.json")), RecordStates(os.path.join(tmp, tag))]
    if world > 1:
        callbacks.append(CheckReplicas(os.path.join(tmp, f"{tag}.replicas.json")))
        strategy = HierMoEStrategy(topology=topology or str(world), dispatch=dispatch, start_method="fork", timeout=60,
                                   **(strategy_kwargs or {}))
    else:
        strategy = "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=1, logger=False,
                         callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp,
                         num_sanity_val_steps=0, limit_val_batches=0)
    if build_under_init_module:
        with trainer.init_module(empty_init=True):
            model = model()
        assert all(p.is_meta for p in model.parameters())  # nothing allocated in the parent
    trainer.fit(model, datamodule=FixedOrderData(world))
    if build_under_init_module:  # the parent's meta model received rank 0's unsharded trained tensors
        assert not any(p.is_meta for p in model.parameters())
        torch.save(model.state_dict(), os.path.join(tmp, f"{tag}.parent.pt"))
    load = lambda what: torch.load(os.path.join(tmp, f"{tag}.{what}.pt"))  # noqa: E731
    return json.load(open(os.path.join(tmp, f"{tag}.json"))), load("init"), load("final")


def _is_moe(name):
    return name.startswith("moe.")


@pytest.mark.parametrize("world, topology, dispatch, how, kwargs", [
    (2, "2", "flat", "configure_model", {}),
    (4, "2x2", "hd2", "init_module", {}),
    # built on meta, then two replicas of 2 and the dense part sharded with FSDP2
    (4, "2", "hd1", "configure_model", {"expert_parallel_size": 2, "dense_sharding": "fsdp"}),
])
def test_meta_built_model_trains_like_one_process_from_the_same_values(tmp_path, world, topology, dispatch, how,
                                                                       kwargs):
    tmp = str(tmp_path)
    if how == "configure_model":
        losses, initial, trained = _fit(tmp, world, MetaLM("configure_model"), "meta", topology, dispatch,
                                        strategy_kwargs=kwargs)
    else:
        losses, initial, trained = _fit(tmp, world, MetaLM, "meta", topology, dispatch, build_under_init_module=True)
    assert len(losses) == 5
    assert json.load(open(tmp_path / "meta.replicas.json"))["dense_identical"]

    normal = MetaLM("init").state_dict()  # a normal build (dense from the global RNG, MoE from the seeds)
    assert initial.keys() == normal.keys()
    for name, want in normal.items():
        if _is_moe(name):  # MoE layers: exactly the normal build's values, experts gathered from every rank
            assert torch.equal(initial[name], want), name
    # dense: the documented rule (to_empty + reset_parameters under a seed per module name), reproducible here
    with torch.device("meta"):
        rule = MetaLM("init")
    materialize_dense_(rule, "cpu")
    for name, t in rule.state_dict().items():
        if not _is_moe(name):
            assert torch.equal(initial[name], t), name
            assert not torch.isnan(t).any(), name
    assert not torch.equal(initial["emb.weight"], normal["emb.weight"])  # so the next step tests something

    # one process, normally built, started from rank 0's values: the same losses and the same trained model
    reference = MetaLM("init")
    reference.load_state_dict(initial)
    ref_losses, ref_initial, ref_trained = _fit(tmp, 1, reference, "ref")
    assert all(torch.equal(ref_initial[n], t) for n, t in initial.items())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL)
    assert trained.keys() == ref_trained.keys()
    for name, want in ref_trained.items():
        torch.testing.assert_close(trained[name], want, **TOL, msg=lambda m: f"{name}: {m}")
    if how == "init_module":
        parent = torch.load(tmp_path / "meta.parent.pt")
        assert all(torch.equal(parent[n], t) for n, t in trained.items())


def test_init_module_empty_init_builds_on_meta_only_when_asked():
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=HierMoEStrategy(start_method="fork"), logger=False)
    with trainer.init_module(empty_init=True):
        meta = MoELayer(H, 32, 8, 2)
    with trainer.init_module():
        real = MoELayer(H, 32, 8, 2)
    assert meta.is_meta and not real.is_meta and real.experts.w_gate.device.type == "cpu"


class _NoReset(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))


def test_dense_rule_seeded_per_module_leaves_the_global_rng_and_names_what_it_cannot_do():
    with torch.device("meta"):
        a, b = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    state = torch.random.get_rng_state()
    assert materialize_dense_(a) == ["0", "1"] and materialize_dense_(b) == ["0", "1"]
    assert torch.equal(torch.random.get_rng_state(), state)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert x.device.type == "cpu" and torch.equal(x, y), n  # the same on every rank
    assert not torch.equal(a[0].weight, torch.zeros(4, 4))
    with torch.device("meta"):
        bad = nn.Sequential(nn.Linear(4, 4), _NoReset())
    with pytest.raises(TypeError, match=r"no reset_parameters\(\).*: 1\. Give"):
        materialize_dense_(bad)
    assert bad[0].weight.is_meta  # nothing changed before the error
    with torch.device("meta"):
        moe_only = nn.Sequential(MoELayer(8, 8, 4, 2))  # MoE layers are shard_'s / materialize_'s job, not this one's
    check_dense_materializable(moe_only)
    assert materialize_dense_(moe_only) == []


# ---------------------------------------------------------------------------------------------- the bundled MoEGPT
GPT = {**MODEL, "num_layers": 3, "dense_layers": 1, "num_shared_experts": 1}  # a dense block, a shared expert


@pytest.mark.parametrize("world, topology, dispatch", [(2, "2", "flat"), (4, "2x2", "hd2")])
def test_moegpt_built_by_init_module_empty_init_trains_like_a_normally_built_one_process(tmp_path, world, topology,
                                                                                        dispatch):
    """The bundled model has a seeded ``reset_parameters()`` on every dense module, so the strategy's dense rule gives
    exactly the values of a normal build: no state is copied between the runs, a straight comparison."""
    from hiermoe_lightning.models import MoEGPT

    tmp = str(tmp_path)
    losses, initial, trained = _fit(tmp, world, lambda: MoEGPT(**GPT), "meta", topology, dispatch,
                                    build_under_init_module=True)
    assert len(losses) == 5
    assert json.load(open(tmp_path / "meta.replicas.json"))["dense_identical"]
    ref_losses, ref_initial, ref_trained = _fit(tmp, 1, MoEGPT(**GPT), "ref")  # normally built, one process
    assert list(initial) == list(ref_initial) and {"tok_emb", "lm_head"} <= set(initial)
    for name, want in ref_initial.items():  # every tensor, dense and expert: the normal build's values
        assert torch.equal(initial[name], want), name
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL)
    for name, want in ref_trained.items():
        torch.testing.assert_close(trained[name], want, **TOL, msg=lambda m: f"{name}: {m}")
    parent = torch.load(tmp_path / "meta.parent.pt")  # the parent's meta model received rank 0's trained tensors
    assert all(torch.equal(parent[n], t) for n, t in trained.items())
