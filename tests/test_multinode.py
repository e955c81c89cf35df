"""Multi-node launch, proven: two ``torchrun`` "nodes" (2 ranks each) in separate network namespaces of an
:class:`~hiermoe_lightning.bench.netem.EmulatedNetwork` (joined by a rate-limited link) run
``python -m hiermoe_lightning fit --trainer.num_nodes 2 --trainer.devices 2`` under ``HierMoEStrategy`` (topology
"2x2"); their global training losses equal one process training the same global batches.

Data: ``ByteTextDataModule(shuffle=False)`` gives each rank a ``ResumableSampler`` shard (rank ``r`` of ``W`` reads
every ``W``-th window from ``r``), so the union of the 4 ranks' step-``s`` batches (2 windows each) is exactly
windows ``8s .. 8s+7``, the one-process step-``s`` batch (``batch_size`` 8). Losses are recorded inside the run by
``tests.lightning_harness.RecordLosses`` (all-reduced mean over the ranks), imported by the children through
``PYTHONPATH``. ``aux_loss_coef`` is 0 (a per-rank aux loss does not average to the global one) and the optimizer is
SGD with momentum (Adam would hide a gradient off by a constant factor).

Needs root and ``ip netns`` (as tests/bench/test_netem.py); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from hiermoe_lightning.bench.netem import EmulatedNetwork, EmulationUnavailable
from hiermoe_lightning.testing.fit_process import user_environment
from hiermoe_lightning.testing.launch import free_port
from hiermoe_lightning.testing.processes import session_alive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MODEL = {"seq_len": 16, "num_layers": 2, "hidden_size": 32, "num_heads": 2, "ffn_hidden_size": 32, "num_experts": 8,
         "top_k": 2, "aux_loss_coef": 0.0, "lr": 0.05, "seed": 5, "optimizer": "sgd", "momentum": 0.9}
PER_RANK_BATCH = 2
WORLD = 4
STEPS = 5
TIMEOUT_S = 240.0  # generous: the machine is shared; a normal run takes well under a minute


def _netns_usable() -> str | None:
    """Why this test cannot run here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) not installed"
    try:
        subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"`ip netns` unavailable: {e}"
    if not os.path.exists(TORCHRUN):
        return f"torchrun not found next to {sys.executable}"
    return None


_SKIP = _netns_usable()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"multi-node emulation: {_SKIP}")


def _config(root: str, tag: str, *, devices: int, batch_size: int, strategy) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "max_steps": STEPS, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
            "enable_checkpointing": False, "default_root_dir": os.path.join(root, tag), "strategy": strategy,
            "callbacks": [{"class_path": "tests.lightning_harness.RecordLosses",
                           "init_args": {"path": os.path.join(root, f"{tag}.losses.json")}}],
        },
        "model": {"class_path": "hiermoe_lightning.models.MoEGPT", "init_args": dict(MODEL)},
        "data": {"class_path": "hiermoe_lightning.data.ByteTextDataModule",
                 "init_args": {"seq_len": MODEL["seq_len"], "batch_size": batch_size, "shuffle": False,
                               "max_train_samples": WORLD * PER_RANK_BATCH * STEPS}},
    }
    path = os.path.join(root, f"{tag}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = user_environment()
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _start(argv: list[str], root: str, tag: str, env: dict[str, str]) -> subprocess.Popen:
    out = open(os.path.join(root, f"{tag}.out"), "w")
    try:
        return subprocess.Popen(argv, cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    finally:
        out.close()


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process's whole session (torchrun, its workers) and reap it."""
    for p in procs:
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


def _wait_all(procs: dict[str, subprocess.Popen], root: str, deadline: float) -> None:
    """Wait for every process; on a failure or the deadline kill them all and fail with the logs."""
    try:
        while True:
            codes = {tag: p.poll() for tag, p in procs.items()}
            bad = {tag: c for tag, c in codes.items() if c not in (None, 0)}
            if bad or time.monotonic() > deadline:
                why = f"exit codes {bad}" if bad else f"not finished within {TIMEOUT_S:.0f} s"
                _kill(list(procs.values()))
                logs = "\n".join(f"==== {tag}\n{_tail(os.path.join(root, f'{tag}.out'))}" for tag in procs)
                pytest.fail(f"{why}\n{logs}")
            if all(c == 0 for c in codes.values()):
                return
            time.sleep(0.2)
    finally:
        _kill(list(procs.values()))  # no-op for finished ones; leaves no worker behind whatever happened
        assert not any(session_alive(p.pid) for p in procs.values()), "processes left behind"


def _tx_bytes(namespace: str, interface: str) -> int:
    out = subprocess.run(["ip", "-n", namespace, "-s", "-j", "link", "show", "dev", interface], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def _tail(path: str, chars: int = 4000) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return f.read()[-chars:]
    return "(no output)"


def test_two_torchrun_nodes_in_separate_namespaces_train_like_one_process(tmp_path):
    root = str(tmp_path)
    deadline = time.monotonic() + TIMEOUT_S
    strategy = {"class_path": "hiermoe_lightning.HierMoEStrategy",
                "init_args": {"topology": "2x2", "dispatch": "auto", "timeout": 120}}
    multi = _config(root, "multi", devices=2, batch_size=PER_RANK_BATCH, strategy=strategy)
    single = _config(root, "single", devices=1, batch_size=WORLD * PER_RANK_BATCH, strategy="auto")
    fit = [sys.executable, "-m", "hiermoe_lightning", "fit", "--config"]

    try:
        net = EmulatedNetwork(2, 1000).setup()
    except EmulationUnavailable as e:
        pytest.skip(f"network emulation unavailable here: {e}")
    with net:
        port = str(free_port())  # node 0's namespace is fresh: any port is free there; this one is also not ours
        nodes = {}
        for node in (0, 1):
            argv = ["ip", "netns", "exec", net.namespace(node), TORCHRUN, "--nnodes", "2", "--nproc-per-node", "2",
                    "--node-rank", str(node), "--master-addr", net.node_address(0), "--master-port", port,
                    "--max-restarts", "0", "-m", "hiermoe_lightning", "fit", "--config", multi, "--trainer.num_nodes", "2", "--trainer.devices", "2"]
            nodes[f"node{node}"] = _start(argv, root, f"node{node}", _env(GLOO_SOCKET_IFNAME=net.interface(node)))
        _wait_all(nodes, root, deadline)
        sent = {node: _tx_bytes(net.namespace(node), net.interface(node)) for node in (0, 1)}
    # one process, same global batches (run after the nodes: the machine has few cores)
    _wait_all({"single": _start([*fit, single], root, "single", _env())}, root, deadline)

    multi_losses = json.load(open(os.path.join(root, "multi.losses.json")))
    single_losses = json.load(open(os.path.join(root, "single.losses.json")))
    assert len(multi_losses) == len(single_losses) == STEPS, (multi_losses, single_losses)
    assert multi_losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6), (multi_losses, single_losses)
    assert single_losses[-1] < single_losses[0]  # it trained
    # the nodes really exchanged the training's collectives over the emulated link (not a shortcut)
    assert min(sent.values()) > 100_000, sent
    assert not net.active
