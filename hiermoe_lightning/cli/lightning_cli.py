"""``hiermoe fit|validate|test --config FILE.yaml``: LightningCLI over any LightningModule (the bundled
:class:`~hiermoe_lightning.models.MoEGPT`, a Hugging Face model through :class:`~hiermoe_lightning.hf.HFCausalLM`, or
your own, named by ``class_path``) and the text data.

Configs use ``class_path``/``init_args`` (see ``configs/``) and may use omegaconf interpolation (``${...}``).
``trainer.strategy: hiermoe`` works because importing the package registers the strategy.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

import hiermoe_lightning  # noqa: F401  (registers the "hiermoe" strategy)

from ..data import ByteTextDataModule
from ..models import MoEGPT  # noqa: F401  (the bundled model: configs name it by class_path)
from ..validation import check_choice

__all__ = ["run_lightning_cli", "HierMoECLI"]


class HierMoECLI(LightningCLI):
    """LightningCLI whose config is saved with ``overwrite=True`` (a second run in one directory must not crash),
    and whose ``--ckpt_path`` never silently replaces a model argument the configuration gives.

    Lightning's CLI loads a checkpoint file's ``hyper_parameters`` over the model's arguments, so
    ``--model.init_args.num_experts 16`` with an 8-expert checkpoint trained the 8-expert model and exited 0. Here a
    model argument that differs from the checkpoint's is an error naming the key (status 2); equal ones change
    nothing. ``--ckpt_path last`` is checked the same way by the strategy once the trainer resolved the path.
    """

    @override
    def before_fit(self) -> None:
        from ..checkpoint_files import use_newest_for_last

        use_newest_for_last(self.trainer)  # --ckpt_path last: the newest complete checkpoint, whatever its name

    @override
    def before_instantiate_classes(self) -> None:
        self._check_ckpt_model_arguments()

    def _parse_ckpt_path(self) -> None:
        """Lightning >= 2.6 (a private method) loads the checkpoint's ``hyper_parameters`` over the configuration
        here; we keep the configuration and check it against them instead (:meth:`before_instantiate_classes`,
        a public hook on every supported version)."""

    def _check_ckpt_model_arguments(self) -> None:
        if not self.config.get("subcommand"):
            return
        sub = self.config[self.config.subcommand]
        ckpt_path = sub.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        saved = _checkpoint_hparams(ckpt_path)
        given = sub.get("model")
        init_args = given.get("init_args") if hasattr(given, "get") else None
        if not saved or init_args is None:
            return
        from ..faults.checkpoint_checks import hparam_differences

        differ = hparam_differences(saved, dict(init_args), prefix="model.init_args.")
        if differ:
            raise ValueError(f"--ckpt_path {ckpt_path}: the checkpoint was trained with other model arguments: "
                             + ", ".join(differ) + "; resume with the checkpoint's values or start a new run")


def _checkpoint_hparams(path) -> dict:
    """The ``hyper_parameters`` saved in a checkpoint file or sharded directory (a broken one: CheckpointError)."""
    import os

    from ..checkpoint_sharded import META_FILE, is_sharded_checkpoint, load_meta
    from ..faults.checkpoint_checks import check_sharded_checkpoint, load_full_checkpoint

    if is_sharded_checkpoint(path):
        check_sharded_checkpoint(path, META_FILE)
        return dict(load_meta(path).get("hyper_parameters") or {})
    if not os.path.exists(path):
        from ..faults import CheckpointError

        raise CheckpointError(path, "no such file or directory")
    return dict(load_full_checkpoint(path).get("hyper_parameters") or {})


def run_lightning_cli(subcommand: str, argv: list[str]) -> int:
    check_choice(subcommand, "subcommand", ("fit", "validate", "test"))
    HierMoECLI(
        pl.LightningModule, ByteTextDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        args=[subcommand, *argv],
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
    )
    return 0
