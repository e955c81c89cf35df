"""``hiermoe export --ckpt CKPT --out DIR``: a trained Hugging Face model (``HFCausalLM``, full or sharded checkpoint)
as a directory ``AutoModelForCausalLM.from_pretrained`` loads (config.json + safetensors)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a checkpoint of hiermoe_lightning.hf.HFCausalLM: a .ckpt file "
                                                 "(full) or a directory (checkpoint_format: sharded)")
    p.add_argument("--out", required=True, help="the directory to write (created; files of the same names replaced)")


def run(args) -> int:
    try:
        from ..hf.checkpoint_export import export_checkpoint
    except ImportError as e:
        raise ValueError(f"hiermoe export needs the [hf] extra (pip install 'hiermoe-lightning[hf]'): {e}") from None
    out = export_checkpoint(args.ckpt, args.out)
    print(f"exported {args.ckpt} -> {out} (AutoModelForCausalLM.from_pretrained({out!r}))")
    return 0
