"""hf.load_pretrained_: a local Hugging Face checkpoint (several safetensors + an index, or one file) into a
meta-built converted model, unsharded or sharded, each rank reading only its own experts; HFCausalLM(pretrained=DIR)
under HierMoEStrategy trains like one process."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from hiermoe_lightning import ExpertParallel, HierMoEStrategy, hf  # noqa: E402
from hiermoe_lightning.checkpoint import moe_layers  # noqa: E402
from hiermoe_lightning.hf import loading  # noqa: E402
from hiermoe_lightning.testing import run_ranks  # noqa: E402
from tests.hf.tiny import build, token_ids  # noqa: E402

EXACT = dict(rtol=1e-5, atol=1e-5)
FAMILIES = ("qwen3_moe", "deepseek_v3")


def _save(model, directory, fused: bool = False):
    """``save_pretrained`` in small shards (an index and several files; experts per expert, as transformers
    writes them), or (``fused``) the model's own state dict, fused expert tensors, as one ``model.safetensors``."""
    if not fused:
        model.save_pretrained(directory, max_shard_size="20KB")
        assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) > 2
        assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
        return str(directory)
    from safetensors.torch import save_file

    model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def _reference(directory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    hf.convert_(model)
    return model


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("fused, tie", [(False, False), (True, True)])
def test_unsharded_load_equals_from_pretrained(tmp_path, model_type, fused, tie):
    directory = _save(build(model_type, tie_word_embeddings=tie), tmp_path / "ckpt", fused)
    model = hf.build_meta_model(directory)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated, nothing drawn
    report = hf.load_pretrained_(model, directory)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie  # tied as HF ties them
    assert all(ids == list(range(8)) for ids in report["experts"].values())
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _reference(directory)(ids).logits, rtol=0, atol=0)


class _Recorder:
    """``safe_open`` wrapped: every ``get_tensor`` key and every ``get_slice(key)[...]`` row range."""

    def __init__(self):
        self.whole, self.rows = [], []

    def __call__(self, *args, **kwargs):
        handle, rec = _real_safe_open(*args, **kwargs), self

        class Slice:
            def __init__(self, key):
                self.key, self.inner = key, handle.get_slice(key)

            def __getitem__(self, index):
                rec.rows.append((self.key, index.start, index.stop))
                return self.inner[index]

        class Handle:
            def keys(self):
                return handle.keys()

            def get_tensor(self, key):
                rec.whole.append(key)
                return handle.get_tensor(key)

            def get_slice(self, key):
                return Slice(key)

        return Handle()


_real_safe_open = loading.safe_open


def _sharded_load(rank, world, directory, ids):
    recorder = _Recorder()
    loading.safe_open = recorder  # this forked rank's module only
    model = hf.build_meta_model(directory)
    ExpertParallel(str(world), dispatch="flat").shard_(model, device="cpu")
    layer = model.model.layers[0].mlp.moe
    report = hf.load_pretrained_(model, directory)
    with torch.no_grad():
        logits = model(ids[rank: rank + 1]).logits
    return logits, layer.local_expert_ids().tolist(), recorder.whole, recorder.rows, report


def _expert_of(key):
    """The expert id of a per-expert key (``...experts.3.down_proj.weight``), or None."""
    parts = key.split(".")
    i = parts.index("experts") if "experts" in parts else -1
    return int(parts[i + 1]) if 0 <= i < len(parts) - 1 and parts[i + 1].isdigit() else None


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("fused", [False, True])
def test_each_rank_reads_only_its_experts_and_gives_the_unsharded_logits(tmp_path, model_type, fused):
    directory = _save(build(model_type), tmp_path / "ckpt", fused)
    ids = token_ids(batch=2, seq=10)
    results = run_ranks(_sharded_load, 2, directory, ids, timeout=120)
    with torch.no_grad():
        want = _reference(directory)(ids).logits
    torch.testing.assert_close(torch.cat([r[0] for r in results]), want, **EXACT)
    for rank, (_, local, whole, rows, report) in enumerate(results):
        assert local == list(range(4 * rank, 4 * rank + 4))
        assert all(v == local for v in report["experts"].values())
        read_experts = {_expert_of(k) for k in whole} - {None}
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in whole)  # no full tensor
        if fused:
            assert read_experts == set() and rows
            assert all((start, stop) == (4 * rank, 4 * rank + 4) for _, start, stop in rows)
        else:
            assert read_experts == set(local) and not rows
        assert len(whole) == len(set(whole))  # nothing read twice


TINY = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=8,
            num_experts_per_tok=2, max_position_embeddings=64, router_aux_loss_coef=0.0)


def _fit(tmp, world, directory, tag, empty_init=True):
    from tests.lightning_harness import FixedOrderData, RecordLosses

    strategy = HierMoEStrategy(topology=str(world), dispatch="flat", start_method="fork", timeout=60) \
        if world > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=3, logger=False,
                         callbacks=[RecordLosses(os.path.join(tmp, f"{tag}.json"))], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=tmp, num_sanity_val_steps=0, limit_val_batches=0)
    if empty_init:
        with trainer.init_module(empty_init=True):
            module = hf.HFCausalLM(pretrained=directory, lr=1e-2)
    else:  # as LightningCLI builds it: outside any init context
        module = hf.HFCausalLM(pretrained=directory, lr=1e-2)
    if world > 1:  # the parent built the dense part only: the experts come after sharding, in the ranks
        assert all(layer.is_meta for layer in moe_layers(module.model).values())
    trainer.fit(module, datamodule=FixedOrderData(world, samples=24))
    return json.load(open(os.path.join(tmp, f"{tag}.json")))


@pytest.mark.parametrize("empty_init", [True, False], ids=["init_module", "plain"])
def test_hfcausallm_pretrained_under_the_strategy_trains_like_one_process(tmp_path, empty_init):
    source = hf.HFCausalLM(config=TINY, seed=4)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.load_state_dict(hf.to_hf_state_dict(source.model), strict=True)
    directory = _save(model, tmp_path / "ckpt")
    losses = _fit(str(tmp_path), 2, directory, "two", empty_init)
    reference = _fit(str(tmp_path), 1, directory, "one", empty_init)
    assert len(losses) == len(reference) == 3
    assert abs(losses[0] - reference[0]) < 1e-5  # the same pretrained weights on both
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-4, atol=1e-4)


def test_missing_files_and_tensors_name_the_directory(tmp_path):
    with pytest.raises(ValueError, match="neither model.safetensors.index.json nor model.safetensors"):
        hf.load_pretrained_(torch.nn.Linear(2, 2), str(tmp_path))
    directory = _save(build("qwen3_moe"), tmp_path / "ckpt")
    index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))
    del index["weight_map"]["model.norm.weight"]
    json.dump(index, open(os.path.join(directory, "model.safetensors.index.json"), "w"))
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.norm.weight"):
        hf.load_pretrained_(hf.build_meta_model(directory), directory)
    with pytest.raises(ValueError, match="parts must be one of"):
        hf.load_pretrained_(hf.build_meta_model(directory), directory, parts="experts")
