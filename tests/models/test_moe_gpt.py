"""MoEGPT: deterministic seeded init, shapes, causality, losses, optimizers, presets/configs, Lightning fit."""

import inspect
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml

from hiermoe_lightning.data import ByteTextDataModule
from hiermoe_lightning.experts import derive_seed
from hiermoe_lightning.layer import MoELayer
from hiermoe_lightning.models import PRESETS, MoEGPT

# one intra-op thread per test: tests/conftest.py


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


def _batch(batch_size: int = 2, seq: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (batch_size, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


# ---------------------------------------------------------------------------------------------- initialisation
def test_same_seed_identical_weights_whatever_the_global_rng():
    torch.manual_seed(1)
    a = MoEGPT(seed=3, dense_layers=1, num_shared_experts=1)
    torch.manual_seed(999)
    torch.rand(17)
    rng_before = torch.get_rng_state()
    b = MoEGPT(seed=3, dense_layers=1, num_shared_experts=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "building the model must not touch the global RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_different_seeds_differ_in_every_random_tensor():
    a, b = MoEGPT(seed=0, dense_layers=1), MoEGPT(seed=1, dense_layers=1)
    pb = dict(b.named_parameters())
    random_params = [n for n, p in a.named_parameters() if not n.endswith("norm.weight")]
    assert any("experts" in n for n in random_params) and any("router" in n for n in random_params)
    for name in random_params:
        assert not torch.equal(a.get_parameter(name), pb[name]), name


def test_moe_layer_seeds_follow_the_layer_index():
    model = MoEGPT(seed=5, num_layers=3, dense_layers=1)
    layers = model.moe_layers()
    assert [type(x) for x in layers] == [MoELayer, MoELayer]
    assert [x.seed for x in layers] == [derive_seed(5, "moe", i) % (2**31) for i in (1, 2)]
    assert layers[0] is model.blocks[1].ffn and not isinstance(model.blocks[0].ffn, MoELayer)


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kwargs", [{}, {"dense_layers": 1, "num_shared_experts": 1},
                                    {"score_func": "sigmoid", "num_expert_groups": 4, "topk_groups": 2},
                                    {"capacity_factor": 1.0}])
def test_forward_shape(kwargs):
    model = MoEGPT(**kwargs)
    inputs, _ = _batch(3, 20)
    logits = model(inputs)
    assert logits.shape == (3, 20, 256) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_forward_is_causal():
    model = MoEGPT().eval()
    inputs, _ = _batch(2, 24)
    changed = inputs.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(inputs), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_forward_rejects_float_inputs():
    with pytest.raises(ValueError, match="inputs"):
        MoEGPT()(torch.zeros(2, 8))


# ---------------------------------------------------------------------------------------------- losses
def test_aux_loss_is_added_to_the_training_loss():
    batch = _batch(4, 32)
    with_aux, without = MoEGPT(aux_loss_coef=1.0), MoEGPT(aux_loss_coef=0.0)
    with warnings.catch_warnings():  # self.log without a Trainer only warns
        warnings.simplefilter("ignore")
        loss = with_aux.training_step(batch, 0)
        loss0 = without.training_step(batch, 0)
    aux = sum(layer.aux_loss for layer in with_aux.moe_layers())
    lm = F.cross_entropy(with_aux(batch[0]).reshape(-1, 256), batch[1].reshape(-1))
    assert aux.item() > 0.5  # ~ coef * 1 per layer for a near-balanced router
    torch.testing.assert_close(loss, lm + aux)
    torch.testing.assert_close(loss0, lm)  # same weights: the aux-free model's loss is the bare LM loss
    loss.backward()
    loss0.backward()
    router_a = with_aux.moe_layers()[0].router.weight.grad
    router_b = without.moe_layers()[0].router.weight.grad
    assert not torch.allclose(router_a, router_b), "the aux loss must reach the router through backward"


def test_loss_decreases_with_adamw_on_the_default_corpus():
    torch.manual_seed(0)
    dm = ByteTextDataModule(seq_len=64, batch_size=8)
    model = MoEGPT(**PRESETS["tiny"])
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    losses = []
    for step, batch in zip(range(30), dm.train_dataloader()):
        lm, aux = model.loss_terms(batch)
        opt.zero_grad()
        (lm + aux).backward()
        opt.step()
        losses.append(lm.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert first > 5.0  # ~ln(256) = 5.55 at init
    assert last < first - 1.5, losses  # byte unigram statistics alone are worth ~2 nats


# ---------------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_configure_optimizers_types(name, cls):
    model = MoEGPT(optimizer=name, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = model.configure_optimizers()
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.01
    assert len(group["params"]) == len(list(model.parameters()))
    if name == "sgd":
        assert group["momentum"] == 0.9


def test_warmup_is_linear():
    model = MoEGPT(warmup_steps=4, lr=1.0)
    config = model.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_bias_update_runs_after_each_training_batch():
    model = MoEGPT(bias_update_rate=0.01, aux_loss_coef=0.0)
    model.loss_terms(_batch(4, 32))
    model.on_train_batch_end(None, None, 0)
    biases = [layer.router.expert_bias for layer in model.moe_layers()]
    assert all(b.abs().sum() > 0 for b in biases)
    assert all(int(layer.routed_tokens.sum()) == 0 for layer in model.moe_layers())


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, exc, word", [
    ({"optimizer": "lamb"}, ValueError, "optimizer"),
    ({"hidden_size": 66}, ValueError, "num_heads"),
    ({"num_heads": 64}, ValueError, "head size"),  # head size 1 is odd: no rotary
    ({"dense_layers": 3}, ValueError, "dense_layers"),
    ({"num_layers": 0}, ValueError, "num_layers"),
    ({"lr": 0.0}, ValueError, "lr"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"hidden_size": 64.0}, TypeError, "hidden_size"),
    ({"score_func": "relu"}, ValueError, "score_func"),
    ({"top_k": 9}, ValueError, "top_k"),
])
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        MoEGPT(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset.*tiny"):
        MoEGPT.from_preset("gpt-5")


# ---------------------------------------------------------------------------------------------- presets, configs
def test_tiny_preset_is_the_defaults():
    defaults = {n: p.default for n, p in inspect.signature(MoEGPT.__init__).parameters.items() if n != "self"}
    assert all(defaults[k] == v for k, v in PRESETS["tiny"].items())
    model = MoEGPT.from_preset("tiny", seed=2)
    assert model.hparams.seed == 2 and model.hparams.num_experts == 8


def test_full_size_presets_have_the_published_moe_dimensions():
    ds, qw = PRESETS["deepseek-v3-like"], PRESETS["qwen3-30b-a3b-like"]
    assert (ds["hidden_size"], ds["num_experts"], ds["top_k"], ds["num_shared_experts"], ds["num_expert_groups"],
            ds["topk_groups"], ds["score_func"], ds["ffn_hidden_size"], ds["num_layers"], ds["dense_layers"]) == \
        (7168, 256, 8, 1, 8, 4, "sigmoid", 2048, 61, 3)
    assert (qw["hidden_size"], qw["num_experts"], qw["top_k"], qw["ffn_hidden_size"], qw["num_layers"],
            qw["score_func"], qw["num_shared_experts"]) == (2048, 128, 8, 768, 48, "softmax", 0)


@pytest.mark.parametrize("name", ["deepseek-v3-like", "qwen3-30b-a3b-like"])
def test_full_size_presets_run_when_scaled_down(name):
    """The presets' option mix (sigmoid, groups, shared expert, dense blocks) runs; only the sizes are shrunk."""
    small = dict(vocab_size=256, seq_len=16, num_layers=4, hidden_size=32, num_heads=2, ffn_hidden_size=16,
                 num_experts=16, dense_ffn_hidden_size=64 if PRESETS[name]["dense_layers"] else None,
                 dense_layers=min(PRESETS[name]["dense_layers"], 1))
    model = MoEGPT.from_preset(name, **small)
    assert len(model.moe_layers()) == 4 - small["dense_layers"]
    lm, aux = model.loss_terms(_batch(2, 16))
    (lm + aux).backward()
    assert torch.isfinite(lm) and aux > 0


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3-like", "qwen3-30b-a3b-like"])
def test_model_configs_match_the_presets(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert list(config) == ["model"]
    assert config["model"]["class_path"] == "hiermoe_lightning.models.MoEGPT"
    init_args = config["model"]["init_args"]
    assert set(init_args) <= set(inspect.signature(MoEGPT.__init__).parameters)
    assert init_args == PRESETS[name]


def test_tiny_config_parses_with_lightning_cli(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["hiermoe"])  # LightningCLI warns when pytest's own argv is also present
    cli = LightningCLI(
        run=False, save_config_callback=None, seed_everything_default=False,
        args=["--config", str(CONFIGS / "tiny.yaml"), "--model.init_args.seed=4",
              "--data=hiermoe_lightning.data.ByteTextDataModule", "--data.seq_len=32",
              "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"],
    )
    assert isinstance(cli.model, MoEGPT) and cli.model.hparams.seed == 4
    assert isinstance(cli.datamodule, ByteTextDataModule) and cli.datamodule.seq_len == 32


# ---------------------------------------------------------------------------------------------- Lightning
def test_trainer_fits_three_steps(tmp_path):
    dm = ByteTextDataModule(seq_len=64, batch_size=8, max_train_samples=64)
    model = MoEGPT(seq_len=64, bias_update_rate=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=2)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert {"train/loss", "train/aux_loss"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert any(layer.router.expert_bias.abs().sum() > 0 for layer in model.moe_layers())
    result = trainer.validate(model, datamodule=dm, verbose=False)
    assert 0 < result[0]["val/loss"] < 6.0
    result = trainer.test(model, datamodule=dm, verbose=False)
    assert 0 < result[0]["test/loss"] < 6.0


# ---------------------------------------------------------------------------------------------- built on meta
def _materialize(model: MoEGPT) -> MoEGPT:
    """What the strategy does to a meta model, in one process: every MoE layer's ``materialize_``, then the dense
    rule (``to_empty`` + ``reset_parameters`` under a per-module global seed)."""
    from hiermoe_lightning.strategy import materialize_dense_

    for layer in model.moe_layers():
        layer.materialize_("cpu")
    materialize_dense_(model, "cpu", seed=123)
    return model


@pytest.mark.parametrize("kwargs", [{}, {"seed": 3, "num_layers": 3, "dense_layers": 1, "num_shared_experts": 1},
                                    {"seed": 7, "score_func": "sigmoid", "num_expert_groups": 4, "topk_groups": 2,
                                     "bias_update_rate": 1e-3}])
def test_meta_build_materialised_equals_a_normal_build_bit_for_bit(kwargs):
    rng = torch.get_rng_state()
    with torch.device("meta"):
        meta = MoEGPT(**kwargs)
    assert all(t.is_meta for t in (*meta.parameters(), *meta.buffers()))  # nothing allocated, nothing drawn
    for metrics in (meta.val_metrics, meta.test_metrics):  # the metric states are never meta (nothing would fill them)
        assert metrics.perplexity.count.device.type == "cpu" and metrics.accuracy.tp.device.type == "cpu"
    _materialize(meta)
    assert torch.equal(torch.get_rng_state(), rng)
    normal, got = MoEGPT(**kwargs).state_dict(), meta.state_dict()
    assert list(got) == list(normal)  # the same keys (checkpoints load either way): tok_emb, lm_head, blocks.N...
    assert "tok_emb" in got and "lm_head" in got
    for name, want in normal.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    inputs, _ = _batch(2, 12)
    torch.testing.assert_close(meta(inputs), MoEGPT(**kwargs)(inputs), rtol=0, atol=0)


def test_meta_build_under_a_low_precision_default_dtype_matches_the_normal_build():
    """``trainer.init_module`` with ``precision="bf16-true"`` builds with a bf16 default dtype: the meta build draws
    in the tensors' own dtype, as the normal build does."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        normal = MoEGPT(seed=2, dense_layers=1).state_dict()
        with torch.device("meta"):
            meta = MoEGPT(seed=2, dense_layers=1)
    finally:
        torch.set_default_dtype(default)
    got = _materialize(meta).state_dict()
    assert normal["tok_emb"].dtype == torch.bfloat16
    for name, want in normal.items():
        assert torch.equal(got[name].to(want.dtype), want), name
        if ".ffn." not in name or name.startswith("blocks.0."):  # the dense tensors: this model's own draws
            assert got[name].dtype == want.dtype, name
    # (MoELayer.materialize_ outside a bf16 default gives its float buffers (the router's expert_bias) in fp32; under
    # the strategy, precision="bf16-true" converts the whole model after materialising, so both builds agree there)


def test_reset_parameters_redraws_each_modules_own_tensors_from_its_seed():
    model = MoEGPT(seed=4, dense_layers=1)
    want = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.reset_parameters()  # the model's own tensors only (torch's convention): tok_emb, lm_head
    assert torch.equal(model.tok_emb, want["tok_emb"]) and torch.equal(model.lm_head, want["lm_head"])
    assert not model.blocks[0].attn.w_qkv.any()
    moe = [name for name, m in model.named_modules() if isinstance(m, MoELayer)]
    for name, m in model.named_modules():
        if m is not model and hasattr(m, "reset_parameters") and not any(name == p or name.startswith(p + ".") for p in moe):
            m.reset_parameters()
    for name, t in model.state_dict().items():
        if ".ffn." not in name or name.startswith("blocks.0."):  # the MoE layers are not reset here
            assert torch.equal(t, want[name]), name


def test_each_dense_part_materialises_from_meta_with_its_normal_values():
    """Each part alone (as the dense rule sees it): built on meta, ``to_empty`` + its own ``reset_parameters()``."""
    from hiermoe_lightning.models.moe_gpt import CausalSelfAttention, DenseSwiGLU, RMSNorm

    with torch.device("meta"):
        parts = [CausalSelfAttention(8, 2, seed=1, out_std=0.1), DenseSwiGLU(8, 16, seed=1), RMSNorm(8)]
    for part in parts:
        assert all(p.is_meta for p in part.parameters())
        part.to_empty(device="cpu")
        part.reset_parameters()
    assert torch.equal(parts[0].w_qkv, CausalSelfAttention(8, 2, seed=1, out_std=0.1).w_qkv)
    assert torch.equal(parts[1].w_down, DenseSwiGLU(8, 16, seed=1).w_down)
    assert torch.equal(parts[2].weight, torch.ones(8))
