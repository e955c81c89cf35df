"""Train a Hugging Face MoE model with hierarchical, deduplicated expert parallelism, then export it back.

    python examples/train_hf_moe.py [--devices 4] [--topology 2x2] [--steps 20] [--out runs/hf-example]
    python examples/train_hf_moe.py --pretrained /path/to/local/qwen3-moe   # a real model (config + safetensors)

A tiny random Qwen3-MoE by default. Its sparse-MoE blocks become MoELayers (``hf.convert_``, inside ``HFCausalLM``),
``HierMoEStrategy`` shards their experts over the ranks and picks the all-to-all per layer (``auto``),
``HierMoECallback`` swaps experts between ranks and logs what deduplication saved, and the trained model is written
as a Hugging Face directory (``hiermoe export``'s function) that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl

from hiermoe_lightning import HierMoECallback, HierMoEStrategy
from hiermoe_lightning.data import ByteTextDataModule
from hiermoe_lightning.hf import HFCausalLM
from hiermoe_lightning.hf.checkpoint_export import export_checkpoint

TINY_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128,
                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_experts=16, num_experts_per_tok=4, max_position_embeddings=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--topology", default="2x2", help="expert-parallel layout, e.g. 2x2 = 2 nodes x 2 ranks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pretrained", default=None, help="a local Hugging Face model directory")
    parser.add_argument("--out", default="runs/hf-example")
    args = parser.parse_args()

    model = HFCausalLM(pretrained=args.pretrained) if args.pretrained else HFCausalLM(config=TINY_QWEN3_MOE, lr=3e-3)
    ckpt = os.path.join(args.out, "last.ckpt")
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, max_steps=args.steps, default_root_dir=args.out,
        strategy=HierMoEStrategy(topology=args.topology, dispatch="auto"),
        callbacks=[HierMoECallback(plan_every_n_steps=10, max_swaps_per_plan=2)],
        limit_val_batches=2, val_check_interval=args.steps, num_sanity_val_steps=0, enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=ByteTextDataModule(seq_len=64, batch_size=8))
    trainer.save_checkpoint(ckpt)  # collective: every rank takes part; the file holds every expert
    if trainer.is_global_zero:
        out = export_checkpoint(ckpt, os.path.join(args.out, "hf"))
        print(f"trained {args.steps} steps; Hugging Face model in {out}")


if __name__ == "__main__":
    main()
