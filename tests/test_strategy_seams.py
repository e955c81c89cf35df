"""HierMoEStrategy on Lightning's seams: ``setup`` leaves DDP ignoring the experts (in fit and outside it), and norm
clipping goes through the precision plugin's ``clip_grad_by_norm`` (:class:`GlobalNormClipping`) to the global norm.

The 4-rank-against-one-process clipping test is ``tests/test_strategy.py::test_clipping_uses_the_global_norm``; here
2 ranks, and the seam itself."""

from __future__ import annotations

import copy
import json
import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch.nn.parallel import DistributedDataParallel

from hiermoe_lightning import HierMoEStrategy
from hiermoe_lightning.checkpoint import expert_parameter_names, full_state_dict, moe_layers
from hiermoe_lightning.models import MoEGPT
from hiermoe_lightning.strategy import GlobalNormClipping
from tests.lightning_harness import MODEL, fit

TOL = dict(atol=2e-5, rtol=2e-5)


def _not_replicated(module) -> set[str]:
    names = set(expert_parameter_names(module))
    return names | {f"{n}.routed_tokens" for n in moe_layers(module)}


# ------------------------------------------------------------------ the plugin: same instance, class and checkpoint key
@pytest.mark.parametrize("plugin", [Precision(), MixedPrecision("bf16-mixed", "cpu")], ids=["32-true", "bf16-mixed"])
def test_adopt_keeps_the_plugin_its_class_and_its_checkpoint_key(plugin):
    base = type(plugin)
    strategy = HierMoEStrategy(topology="2")
    adopted = GlobalNormClipping.adopt(plugin, strategy)
    assert adopted is plugin and isinstance(plugin, base) and isinstance(plugin, GlobalNormClipping)
    # Lightning saves and restores a plugin's state under its class's __qualname__: unchanged
    assert type(plugin).__qualname__ == base.__qualname__
    assert GlobalNormClipping.adopt(plugin, strategy) is plugin and type(plugin).__mro__.count(GlobalNormClipping) == 1
    assert type(GlobalNormClipping.adopt(base.__new__(base), strategy)) is type(plugin)  # one class per base
    for clone in (pickle.loads(pickle.dumps(plugin)), copy.deepcopy(plugin)):  # spawn pickles the strategy
        assert type(clone) is type(plugin) and isinstance(clone._hiermoe_strategy, HierMoEStrategy)


def _model_with_grads():
    torch.manual_seed(0)
    model = MoEGPT(**MODEL)
    tokens = torch.randint(0, 256, (4, MODEL["seq_len"] + 1))
    lm_loss, aux = model.loss_terms((tokens[:, :-1], tokens[:, 1:]))
    (lm_loss + aux).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer


def test_norm_clipping_goes_through_the_global_norm_and_value_clipping_does_not(monkeypatch):
    model, optimizer = _model_with_grads()
    params = [p for p in model.parameters() if p.grad is not None]
    assert any(n in dict(model.named_parameters()) for n in expert_parameter_names(model))
    before = [p.grad.clone() for p in params]
    strategy = HierMoEStrategy(topology="1")
    strategy._lightning_module = model  # one process: no expert-parallel group, nothing to all-reduce
    plugin = GlobalNormClipping.adopt(Precision(), strategy)
    calls = []
    real = strategy.clip_by_global_norm
    monkeypatch.setattr(strategy, "clip_by_global_norm", lambda opt, m: calls.append(m) or real(opt, m))

    # the reference: torch's own clip of the same gradients in one process
    ref_params = [torch.nn.Parameter(torch.zeros_like(g)) for g in before]
    for p, g in zip(ref_params, before):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(ref_params, 0.05)
    assert total > 0.05  # the clip is active
    plugin.clip_gradients(optimizer, 0.05, "norm")
    assert calls == [0.05]
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p.grad, ref.grad, atol=1e-7, rtol=1e-5)

    for p, g in zip(params, before):
        p.grad = g.clone()
    plugin.clip_gradients(optimizer, 1e-3, "value")
    assert calls == [0.05]  # value clipping is the plugin's own
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g.clamp(-1e-3, 1e-3))


# ------------------------------------------------------------------ 2 ranks: fit
class _ProbeFit(pl.Callback):
    """On every rank: what DDP ignores and which plugin clips; every call of the strategy's global-norm clip."""

    def __init__(self, path: str):
        self.path, self.norms, self.seen = path, [], {}

    def on_train_start(self, trainer, pl_module):
        strategy = trainer.strategy
        expected = _not_replicated(pl_module)
        ddp = strategy.model
        experts = set(expert_parameter_names(pl_module))
        self.seen = {
            "ddp_wrapped": isinstance(ddp, DistributedDataParallel),
            "module_ignores": set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ())) == expected,
            "ddp_ignores": set(getattr(ddp, "parameters_to_ignore", ())) == expected,
            "experts_marked": all(getattr(p, "_ddp_ignored", False) for n, p in pl_module.named_parameters()
                                  if n in experts),
            "dense_not_marked": not any(getattr(p, "_ddp_ignored", False) for n, p in pl_module.named_parameters()
                                        if n not in experts),
            "plugin": isinstance(trainer.precision_plugin, GlobalNormClipping),
            "plugin_qualname": type(trainer.precision_plugin).__qualname__,
        }
        real = strategy.clip_by_global_norm

        def counted(optimizer, max_norm):
            total = real(optimizer, max_norm)
            self.norms.append(float(total))
            return total

        strategy.clip_by_global_norm = counted

    def on_train_end(self, trainer, pl_module):
        ok = torch.tensor([int(all(v for k, v in self.seen.items() if k != "plugin_qualname"))])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if trainer.global_rank == 0:
            json.dump({**self.seen, "all_ranks_ok": bool(ok), "norms": self.norms}, open(self.path, "w"))


def test_fit_on_two_ranks_ignores_experts_in_ddp_and_clips_through_the_seam(tmp_path):
    probe = str(tmp_path / "probe.json")
    single, _ = fit(str(tmp_path), 1, max_epochs=1, clip=0.3, tag="single")
    two, _ = fit(str(tmp_path), 2, max_epochs=1, clip=0.3, tag="two", check_replicas=True,
                 extra_callbacks=[_ProbeFit(probe)])
    torch.testing.assert_close(torch.tensor(two), torch.tensor(single), **TOL)
    assert json.load(open(tmp_path / "two.replicas.json"))["dense_identical"]
    seen = json.load(open(probe))
    assert seen["all_ranks_ok"], seen
    assert seen["plugin_qualname"] == "Precision"
    assert len(seen["norms"]) == 5  # every optimizer step clipped through the seam
    assert max(seen["norms"]) > 0.3  # and the clip was active


# ------------------------------------------------------------------ 2 ranks: outside fit
class _ProbeValidate(pl.Callback):
    def __init__(self, path: str, reference: dict):
        self.path, self.reference = path, reference

    def on_validation_start(self, trainer, pl_module):
        ignores = set(getattr(pl_module, "_ddp_params_and_buffers_to_ignore", ())) == _not_replicated(pl_module)
        full = full_state_dict(pl_module)  # collective: every expert, gathered in expert-id order
        same = all(torch.equal(full[k], v) for k, v in self.reference.items())
        ok = torch.tensor([int(ignores and same)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if trainer.global_rank == 0:
            json.dump({"ignores": ignores, "all_ranks_ok": bool(ok)}, open(self.path, "w"))


def test_validate_on_two_ranks_keeps_each_ranks_experts(tmp_path):
    # outside fit Lightning broadcasts rank 0's module states; the ignore list set in setup keeps every rank's experts
    from torch.utils.data import DataLoader, DistributedSampler

    from hiermoe_lightning.data import ByteTextDataModule

    class Module(MoEGPT):
        def val_dataloader(self):
            ds = torch.utils.data.Subset(ByteTextDataModule(seq_len=MODEL["seq_len"], batch_size=1).val_dataset,
                                         range(8))
            return DataLoader(ds, batch_size=4,
                              sampler=DistributedSampler(ds, num_replicas=2, rank=dist.get_rank(), shuffle=False))

    model = Module(**MODEL)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    probe = str(tmp_path / "validate.json")
    trainer = pl.Trainer(accelerator="cpu", devices=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
                         strategy=HierMoEStrategy(topology="2", dispatch="flat", start_method="fork", timeout=60),
                         callbacks=[_ProbeValidate(probe, reference)])
    trainer.validate(model, verbose=False)
    assert json.load(open(probe)) == {"ignores": True, "all_ranks_ok": True}
