"""Run ``python -m hiermoe_lightning fit`` (Lightning's script launcher: rank 0 is the command, ranks 1.. re-run it)
on a tiny config as a scheduler or a user would, and look at its processes: for fault-injection tests and
``examples/fault_timings.py``."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from .processes import wait_for

TINY_MODEL = {"seq_len": 16, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "ffn_hidden_size": 32,
              "num_experts": 8, "top_k": 2, "lr": 0.01}


def write_config(root: str, *, max_steps: int = 100000, devices: int = 4, every_n_train_steps: int = 10,
                 checkpoint_format: str = "full") -> str:
    """``<root>/fit.yaml``: the tiny MoEGPT on ``devices`` CPU ranks (topology ``"<devices/2>x2"``, dispatch auto,
    swaps every 5 steps), checkpoints every ``every_n_train_steps`` steps to ``<root>/ckpt`` with ``last.ckpt``."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "max_steps": max_steps, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
            "default_root_dir": os.path.join(root, "run"),
            "strategy": {"class_path": "hiermoe_lightning.HierMoEStrategy",
                         "init_args": {"topology": f"{devices // 2}x2", "dispatch": "auto", "timeout": 300,
                                       "checkpoint_format": checkpoint_format}},
            "callbacks": [
                {"class_path": "hiermoe_lightning.HierMoECallback",
                 "init_args": {"plan_every_n_steps": 5, "print_summary": False, "save_plots": False}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": os.path.join(root, "ckpt"), "save_last": True,
                               "every_n_train_steps": every_n_train_steps}},
            ],
        },
        "model": {"class_path": "hiermoe_lightning.models.MoEGPT", "init_args": dict(TINY_MODEL)},
        "data": {"class_path": "hiermoe_lightning.data.ByteTextDataModule",
                 "init_args": {"seq_len": 16, "batch_size": 2, "max_train_samples": 400}},
    }
    path = os.path.join(root, "fit.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


# what a launcher leaves in its own environment (Lightning's fork launcher sets MASTER_PORT in the parent for good):
# inherited, a fresh `hiermoe fit` would meet at the port of an earlier run instead of a free one
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
               "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "HIERMOE_SUPERVISOR_DIR")


def user_environment() -> dict[str, str]:
    """This process's environment as a user's shell would give a fresh command: without what a launcher (Lightning,
    torchrun, hiermoe's own) leaves behind, which a new run would otherwise take for its own rendezvous."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV and not k.startswith("TORCHELASTIC")}


def start(root: str, *extra: str) -> subprocess.Popen:
    """Start ``hiermoe fit`` in its own session (so a test can always kill all of it), with the environment a user's
    shell would give it (no launcher variables); stdout/stderr to files."""
    out = open(os.path.join(root, "stdout.txt"), "w")
    err = open(os.path.join(root, "stderr.txt"), "w")
    env = user_environment()
    return subprocess.Popen([sys.executable, "-m", "hiermoe_lightning", "fit", "--config",
                             os.path.join(root, "fit.yaml"), *extra], cwd=root, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env)


def stderr_lines(root: str) -> list[str]:
    with open(os.path.join(root, "stderr.txt")) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def wait_for_file(path: str, timeout: float) -> bool:
    return wait_for(lambda: os.path.exists(path), timeout)
