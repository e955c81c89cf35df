"""A converted Hugging Face MoE model trains on 4 ranks ("2x2", dispatch auto, expert swaps mid-training) exactly
like one process: Qwen3-MoE and DeepSeek-V3, AdamW and SGD (SGD shows a wrong gradient scale that Adam hides),
DeepSeek-V3 also with its selection bias learned aux-loss-free by the strategy.

The MoE aux loss is off (``router_aux_loss_coef=0``): it is computed per rank (docs/design.md, "Known limits").
Weights are re-drawn at ~1/sqrt(fan_in) (``tests/hf/tiny.redraw_``) so that routing is decisive and the training
moves them by more than HF's std-0.02 init would. Checked by hand: an expert gradient 4x too large moves the SGD
losses by 2.5% (the tolerance is 1e-4 relative) and the AdamW ones by < 1e-6; the planner swaps 2-12 times per run.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch

pytest.importorskip("transformers")

from hiermoe_lightning import HierMoECallback, LinkCosts  # noqa: E402
from hiermoe_lightning.balancing import update_routing_biases  # noqa: E402
from hiermoe_lightning.checkpoint import moe_layers  # noqa: E402
from hiermoe_lightning.hf import HFCausalLM  # noqa: E402
from tests.hf.test_causal_lm import TINY  # noqa: E402
from tests.hf.test_export_cli import DEEPSEEK  # noqa: E402
from tests.hf.tiny import redraw_  # noqa: E402
from tests.lightning_harness import RecordSwaps, fit_module  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)
QWEN3 = dict(TINY, router_aux_loss_coef=0.0)
DEEPSEEK_V3 = dict(DEEPSEEK, router_aux_loss_coef=0.0)  # 1 dense layer, then 1 MoE layer (2 groups, top-1 group)
# a slow level-1 link: co-locating co-activated experts is worth a swap even on these tiny models (tests/test_callback)
COSTS = LinkCosts({"a2a": (0.1, 1e-4), "inter1": (0.1, 1e-4), "intra1": (0.01, 1e-7)})
SAMPLES = 64  # 8 optimizer steps of 8 samples x 16 bytes; plans after steps 2, 4, 6, 8
BIAS_RATE = 0.02


class SGDCausalLM(HFCausalLM):
    """HFCausalLM trained with SGD + momentum (migration moves ``momentum_buffer``)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def _factory(config: dict, optimizer: str, bias_rate: float):
    def make():
        cls, lr = (HFCausalLM, 3e-3) if optimizer == "adamw" else (SGDCausalLM, 0.05)
        module = cls(config=config, lr=lr, seed=4)
        redraw_(module.model, seed=7)
        g = torch.Generator().manual_seed(8)
        for layer in moe_layers(module).values():
            if config["model_type"] == "deepseek_v3":  # a fixed (loaded) or learned selection bias that matters
                layer.router.expert_bias.copy_(0.1 * torch.randn(layer.num_experts, generator=g))
            layer.router.bias_update_rate = bias_rate
            assert layer.router.aux_loss_coef == 0.0
        return module

    return make


class UpdateBiasesInOneProcess(pl.Callback):
    """The one-process reference of the strategy's bias update: after every optimizer step, from this process's
    counts (the strategy sums every rank's)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = [m for m in moe_layers(pl_module).values() if m.router.bias_update_rate > 0]
        update_routing_biases(layers, None)


class RecordBiases(pl.Callback):
    """Rank 0's routers' selection biases at the end of training, as JSON."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            json.dump([m.router.expert_bias.tolist() for m in moe_layers(pl_module).values()], open(self.path, "w"))


CASES = {
    "qwen3-adamw": (QWEN3, "adamw", 0.0),
    "qwen3-sgd": (QWEN3, "sgd", 0.0),
    "deepseek-v3-sgd": (DEEPSEEK_V3, "sgd", 0.0),  # the loaded selection bias, fixed
    "deepseek-v3-adamw-bias-update": (DEEPSEEK_V3, "adamw", BIAS_RATE),  # learned aux-loss-free by the strategy
}


@pytest.mark.parametrize("case", list(CASES))
def test_four_ranks_auto_with_swaps_equal_one_process(tmp_path, case):
    config, optimizer, bias_rate = CASES[case]
    make = _factory(config, optimizer, bias_rate)
    tmp = str(tmp_path)
    reference, _ = fit_module(tmp, 1, make, samples=SAMPLES, tag="one",
                              extra_callbacks=[UpdateBiasesInOneProcess(), RecordBiases(str(tmp_path / "one.bias"))])
    planner = HierMoECallback(plan_every_n_steps=2, max_swaps_per_plan=2, charge_migration=False,
                              compute_balance_tolerance=None, print_summary=False, save_plots=False)
    losses, _ = fit_module(tmp, 4, make, topology="2x2", dispatch="auto", samples=SAMPLES, tag="four",
                           link_costs=COSTS, check_replicas=True,
                           extra_callbacks=[planner, RecordSwaps(str(tmp_path / "swaps.json")),
                                            RecordBiases(str(tmp_path / "four.bias"))])
    assert len(reference) == len(losses) == SAMPLES // 8
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), **TOL)
    assert reference[-1] < reference[0]  # it trained
    swaps = json.load(open(tmp_path / "swaps.json"))
    assert swaps["swaps_total"] >= 1 and swaps["placement_moved"], f"no swap happened: {swaps}"
    assert json.load(open(tmp_path / "four.replicas.json"))["dense_identical"]
    biases = [json.load(open(tmp_path / f"{tag}.bias")) for tag in ("one", "four")]
    torch.testing.assert_close(torch.tensor(biases[1]), torch.tensor(biases[0]), rtol=0, atol=1e-6)
    if bias_rate > 0:  # the strategy really updated them (8 steps of +-rate from the initial values)
        initial = [m.router.expert_bias for m in moe_layers(make()).values()]
        assert not torch.allclose(torch.tensor(biases[1]), torch.stack(initial))
