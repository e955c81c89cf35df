"""``hiermoe export``: a trained :class:`~hiermoe_lightning.hf.HFCausalLM` checkpoint -> a Hugging Face directory.

The checkpoint may be a full one (one file, every expert in expert-id order) or a sharded one (a directory, written
by ``HierMoEStrategy(checkpoint_format="sharded")`` on any number of ranks); either way it is read in one process,
into an unsharded model. The directory holds ``config.json`` and safetensors, and
``AutoModelForCausalLM.from_pretrained(DIR)`` gives the trained model's logits.
"""

from __future__ import annotations

import os

from ..checkpoint_sharded import META_FILE, is_sharded_checkpoint, load_meta, load_sharded_model
from ..faults.checkpoint_checks import check_sharded_checkpoint, load_full_checkpoint

__all__ = ["export_checkpoint", "HF_CONFIG_KEY"]

HF_CONFIG_KEY = "hf_config"  # HFCausalLM writes its model's config (a JSON-able dict) into every checkpoint here


def export_checkpoint(ckpt_path: str, out_dir: str) -> str:
    """Write the Hugging Face directory of checkpoint ``ckpt_path`` into ``out_dir`` (created; existing files of
    the same names are replaced); return ``out_dir``. A checkpoint that is not an HFCausalLM's: ``ValueError``
    naming the path; a broken one: :class:`~hiermoe_lightning.faults.CheckpointError`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .causal_lm import HFCausalLM
    from .export import to_hf_state_dict

    ckpt_path = os.fspath(ckpt_path)
    sharded = is_sharded_checkpoint(ckpt_path)
    if sharded:
        check_sharded_checkpoint(ckpt_path, META_FILE)
        checkpoint = load_meta(ckpt_path)
    else:
        checkpoint = load_full_checkpoint(ckpt_path)
    hf_config = checkpoint.get(HF_CONFIG_KEY)
    if not isinstance(hf_config, dict) or "model_type" not in hf_config:
        raise ValueError(f"--ckpt {ckpt_path}: not a checkpoint of hiermoe_lightning.hf.HFCausalLM (no "
                         f"'{HF_CONFIG_KEY}' entry); export writes Hugging Face models only")
    module = HFCausalLM(config=_for_model(hf_config))
    if sharded:
        load_sharded_model(ckpt_path, module)
    else:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    config = dict(hf_config)
    hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    hf_model.load_state_dict(to_hf_state_dict(module.model), strict=True)
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    return out_dir


def _for_model(hf_config: dict) -> dict:
    """The config keys ``AutoConfig.for_model`` takes back (the serialised bookkeeping left out)."""
    skip = {"transformers_version", "architectures", "_name_or_path"}
    return {k: v for k, v in hf_config.items() if k not in skip}
