"""``hiermoe bench ...`` under SIGTERM / SIGINT / an expired ``--timeout``: every rank gone, nothing left on disk,
exit status 143 / 130 / 124 and ONE line on stderr; a failed rank is one line naming it.

The subprocess tests run ``python -m hiermoe_lightning`` in a session of its own with ``TMPDIR`` pointing at a fresh
directory; whatever happens, a ``finally`` block kills every process they started.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from hiermoe_lightning.bench import comm
from hiermoe_lightning.cli import main as cli
from hiermoe_lightning.testing.launch import RankFailure, RanksInterrupted, RanksTimeout
from hiermoe_lightning.testing.processes import SessionCommand, children

from ..testing.test_launch import wait_gone

ROOT = Path(__file__).resolve().parents[2]
COMM_FOREVER = ["bench", "comm", "--topology", "2x2", "--num-experts", "8", "--top-k", "2", "--hidden-size", "64",
                "--tokens-per-rank", "64", "--dispatch", "flat", "--iters", "1000000"]
E2E_FOREVER = ["bench", "e2e", "--topology", "2x2", "--hidden-size", "32", "--num-heads", "2", "--num-experts", "8",
               "--top-k", "2", "--num-layers", "1", "--seq-len", "16", "--batch-size", "2", "--steps", "1000000",
               "--warmup-steps", "1", "--dispatch", "flat"]


class Command(SessionCommand):
    """``python -m hiermoe_lightning ARGV`` in its own session and temporary directory."""

    def __init__(self, tmp_path: Path, argv: list[str]):
        super().__init__(tmp_path, [sys.executable, "-m", "hiermoe_lightning", *argv], cwd=ROOT)

    def wait_for_ranks(self, count: int = 4, timeout: float = 150.0) -> list[int]:
        """The rank processes, once ``count`` exist and have run for a moment."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(children(self.proc.pid)) >= count:
                time.sleep(1.0)  # inside the ranks' work, not only forked
                self.rank_pids = children(self.proc.pid)
                return self.rank_pids
            assert self.proc.poll() is None, f"the command ended early: {self.stderr()}"
            time.sleep(0.05)
        raise AssertionError(f"no {count} ranks within {timeout:.0f} s: {self.stderr()}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("argv,sig,status", [(COMM_FOREVER, signal.SIGTERM, 143), (E2E_FOREVER, signal.SIGINT, 130)],
                         ids=["comm-SIGTERM", "e2e-SIGINT"])
def test_signal_to_a_bench_stops_its_ranks(tmp_path, argv, sig, status):
    command = Command(tmp_path, argv)
    try:
        pids = command.wait_for_ranks()
        command.proc.send_signal(sig)
        assert wait_gone(pids) == [], "a rank outlived the signal"
        assert command.proc.wait(timeout=60) == status
        lines = command.stderr().strip().splitlines()
        assert lines == [f"hiermoe: interrupted by {signal.Signals(sig).name}; 4 ranks stopped"], lines
        assert command.leftovers() == []
    finally:
        command.kill_everything()


@pytest.mark.timeout(300)
def test_timeout_bounds_the_whole_bench(tmp_path):
    command = Command(tmp_path, [*COMM_FOREVER, "--timeout", "5"])
    try:
        assert command.proc.wait(timeout=240) == cli.TIMEOUT_EXIT_STATUS
        lines = command.stderr().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hiermoe: error: --timeout of 5 s expired"), lines
        log = command.tmp / f"hiermoe-ranks-{command.proc.pid}-failure.log"
        assert f"(stacks: {log})" in lines[0] and log.exists()
        assert command.leftovers() == [log.name]  # the report it names, nothing else
    finally:
        command.kill_everything()


# ---------------------------------------------------------------------------- the CLI's mapping (in process)
def _raising(exc: BaseException):
    def main(args):
        raise exc
    return main


@pytest.mark.parametrize("exc,status,line", [
    (RanksInterrupted.for_signal(signal.SIGTERM, 4), 143, "hiermoe: interrupted by SIGTERM; 4 ranks stopped"),
    (RanksInterrupted.for_signal(signal.SIGINT, 2), 130, "hiermoe: interrupted by SIGINT; 2 ranks stopped"),
    (RankFailure("rank 2 (pid 1234) died: killed by SIGKILL", rank=2, pid=1234, cause="died: killed by SIGKILL",
                 traceback="Traceback (most recent call last):\n  ...", log_path="/tmp/x.log"), 1,
     "hiermoe: error: rank 2 (pid 1234) died: killed by SIGKILL (tracebacks: /tmp/x.log)"),
    (RanksTimeout("--timeout of 5 s expired; 4 ranks stopped", stopped=[0, 1, 2, 3], log_path="/tmp/x.log"), 124,
     "hiermoe: error: --timeout of 5 s expired; 4 ranks stopped (stacks: /tmp/x.log)"),
], ids=["SIGTERM", "SIGINT", "failure", "timeout"])
def test_cli_prints_one_line_and_the_status(monkeypatch, capsys, exc, status, line):
    monkeypatch.setattr(comm, "main", _raising(exc))
    assert cli.main(["bench", "comm"]) == status
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line] and captured.out == ""


def test_debug_shows_the_failing_rank_traceback(monkeypatch):
    monkeypatch.setattr(comm, "main", _raising(RankFailure("rank 1 (pid 5) raised ValueError: x", rank=1, pid=5)))
    with pytest.raises(RankFailure, match="rank 1"):
        cli.main(["bench", "comm", "--debug"])
