"""``hiermoe fit`` on 4 ranks ended the ways real jobs end: preempted by SIGTERM (status 143, a checkpoint, resumed
with --ckpt_path last), one rank SIGKILLed (one line naming it, status 1, no rank left), resumed with a changed model
argument (status 2, one line naming the key)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from hiermoe_lightning.testing.fit_process import start, stderr_lines, wait_for_file, write_config
from hiermoe_lightning.testing.processes import alive, children, kill_session, wait_for

pytestmark = pytest.mark.timeout(900)


def _ranks_started(proc, count: int = 3) -> list[int]:
    assert wait_for(lambda: len(children(proc.pid)) >= count, 300), f"the launcher did not start {count} ranks"
    return children(proc.pid)


def test_sigterm_checkpoints_exits_143_and_resumes_from_last(tmp_path):
    # 2 ranks keep it short; tests/faults/test_preemption.py stops 4 ranks and compares with the uninterrupted run
    root = str(tmp_path)
    write_config(root, devices=2)
    proc = start(root)
    try:
        ranks = _ranks_started(proc, 1)
        # wait until training runs (the first step checkpoint exists), then preempt as a scheduler would
        assert wait_for_file(os.path.join(root, "ckpt", "last.ckpt"), 300)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(120)
        assert status == 143, stderr_lines(root)[-5:]
        assert wait_for(lambda: not any(alive(p) for p in ranks), 10), "a rank outlived the launcher"
        last_line = stderr_lines(root)[-1]
        assert "preempted by SIGTERM at step" in last_line and "last.ckpt" in last_line
        stopped_at = int(last_line.split("at step ")[1].split(":")[0])
        saved = torch.load(os.path.join(root, "ckpt", "last.ckpt"), weights_only=False, map_location="cpu")
        assert saved["global_step"] == stopped_at > 0
    finally:
        kill_session(proc)

    # resume: two more steps from the preemption checkpoint
    proc = start(root, "--ckpt_path", "last", "--trainer.max_steps", str(stopped_at + 2))
    try:
        assert proc.wait(480) == 0, stderr_lines(root)[-5:]
    finally:
        kill_session(proc)
    assert any("Restored all states" in line and "last.ckpt" in line for line in stderr_lines(root))
    final = torch.load(os.path.join(root, "ckpt", "last.ckpt"), weights_only=False, map_location="cpu")
    assert final["global_step"] == stopped_at + 2


def test_sigkill_of_one_rank_is_named_and_ends_the_job(tmp_path):
    root = str(tmp_path)
    write_config(root)
    proc = start(root)
    try:
        ranks = _ranks_started(proc)
        assert wait_for_file(os.path.join(root, "ckpt", "last.ckpt"), 300)
        victim = sorted(ranks)[1]  # the launcher starts local ranks 1, 2, 3 in order
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        status = proc.wait(60)
        gone_after = time.monotonic() - killed_at
        assert status == 1
        assert wait_for(lambda: not any(alive(p) for p in ranks), 10), "a rank was left running"
        lines = stderr_lines(root)
        assert f"rank 2 (pid {victim}) died: killed by SIGKILL during step" in lines[-1]
        assert not any("Traceback" in line for line in lines), "tracebacks belong in the log files"
        assert gone_after < 60
    finally:
        kill_session(proc)


def test_resuming_with_a_changed_model_argument_is_an_error_naming_it(tmp_path):
    root = str(tmp_path)
    write_config(root, max_steps=3, every_n_train_steps=3, devices=2)
    proc = start(root)
    try:
        assert proc.wait(480) == 0, stderr_lines(root)[-5:]
    finally:
        kill_session(proc)
    for ckpt_path in (os.path.join(root, "ckpt", "last.ckpt"), "last"):
        proc = start(root, "--ckpt_path", ckpt_path, "--model.init_args.num_experts", "16")
        try:
            assert proc.wait(480) == 2
        finally:
            kill_session(proc)
        line = stderr_lines(root)[-1]
        assert line.startswith("hiermoe: error:") and "num_experts=16 (checkpoint: 8)" in line, line


def test_launcher_killed_by_sigkill_takes_every_rank_with_it(tmp_path):
    root = str(tmp_path)
    write_config(root, devices=2)
    proc = start(root)
    try:
        assert wait_for(lambda: len(children(proc.pid)) >= 1, 300)
        ranks = children(proc.pid)
        assert wait_for_file(os.path.join(root, "ckpt", "last.ckpt"), 300)  # the rank is past its start-up
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert wait_for(lambda: not any(alive(p) for p in ranks), 10), "a rank outlived its launcher"
    finally:
        kill_session(proc)
