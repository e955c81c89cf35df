"""``hiermoe fit|validate|test --config FILE.yaml``: LightningCLI over the bundled MoE model and text data.

Configs use ``class_path``/``init_args`` (see ``configs/``) and may use omegaconf interpolation (``${...}``).
``trainer.strategy: hiermoe`` works because importing the package registers the strategy.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import hiermoe_lightning  # noqa: F401  (registers the "hiermoe" strategy)

from ..data import ByteTextDataModule
from ..models import MoEGPT

__all__ = ["run_lightning_cli", "HierMoECLI"]


class HierMoECLI(LightningCLI):
    """LightningCLI whose config is saved with ``overwrite=True`` (a second run in one directory must not crash)."""


def run_lightning_cli(subcommand: str, argv: list[str]) -> int:
    if subcommand not in ("fit", "validate", "test"):
        raise ValueError(f"subcommand must be one of 'fit', 'validate', 'test', got {subcommand!r}")
    HierMoECLI(
        MoEGPT, ByteTextDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        args=[subcommand, *argv],
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
    )
    return 0
