"""The test launcher ``run_ranks``: no rank outlives it (SIGTERM, SIGINT, SIGKILL of the launcher), nothing is left
on disk, and a failed rank is named (rank, pid, cause) with its traceback in a report.

The signal tests run a small launcher program in a session of its own; every process they start is killed in a
``finally`` block, whatever the outcome. Time bounds are generous ("gone within 10 s"): the suite shares its CPUs.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hiermoe_lightning.testing import launch
from hiermoe_lightning.testing.processes import SessionCommand, alive, wait_gone as _wait_gone
from hiermoe_lightning.testing.launch import (Deadline, RankFailure, RanksInterrupted, RanksTimeout,
                                              failure_log_path, run_ranks)

GONE_WITHIN_S = 10.0


def wait_gone(pids: list[int], within: float = GONE_WITHIN_S) -> list[int]:
    """The pids still running after ``within`` seconds (at most) of waiting for them to go."""
    return _wait_gone(pids, within)

# The launcher program: loads launch.py alone (the package import is slow and beside the point), starts 4 ranks that
# record their pid and then sleep forever; argv: <pid dir> <"catch" | "raise">.
LAUNCHER = textwrap.dedent(f"""
    import importlib.util, os, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if our runner started us with SIGINT ignored
    spec = importlib.util.spec_from_file_location("launch_alone", {launch.__file__!r})
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)

    def block(rank, world, pid_dir):
        with open(os.path.join(pid_dir, f"rank{{rank}}.pid"), "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(0.05)

    try:
        launch.run_ranks(block, 4, sys.argv[1], timeout=300)
    except launch.RanksInterrupted as e:
        if sys.argv[2] != "catch":
            raise
        kind = "KeyboardInterrupt" if isinstance(e, KeyboardInterrupt) else "SystemExit"
        print(f"launcher: {{e}} ({{kind}}, code {{e.code}})", file=sys.stderr)
        sys.exit(e.code)
""")


class Launcher(SessionCommand):
    """The launcher program in a session of its own, with its own temporary directory (``TMPDIR``)."""

    def __init__(self, tmp_path: Path, mode: str = "catch"):
        self.pid_dir = tmp_path / "pids"
        self.pid_dir.mkdir()
        super().__init__(tmp_path, [sys.executable, "-c", LAUNCHER, str(self.pid_dir), mode])

    def wait_for_ranks(self, timeout: float = 120.0) -> list[int]:
        """The four ranks' pids, once each has written it (the ranks are then inside their function)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            files = sorted(self.pid_dir.glob("rank*.pid"))
            if len(files) == 4 and all(f.read_text() for f in files):
                self.rank_pids = [int(f.read_text()) for f in files]
                return self.rank_pids
            assert self.proc.poll() is None, f"the launcher ended early: {self.stderr()}"
            time.sleep(0.05)
        raise AssertionError(f"the ranks did not start within {timeout:.0f} s: {self.stderr()}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig,status,kind", [(signal.SIGTERM, 143, "SystemExit"),
                                             (signal.SIGINT, 130, "KeyboardInterrupt")])
def test_signal_stops_every_rank_and_leaves_nothing(tmp_path, sig, status, kind):
    launcher = Launcher(tmp_path)
    try:
        pids = launcher.wait_for_ranks()
        launcher.proc.send_signal(sig)
        assert wait_gone(pids) == [], "a rank outlived the signal"
        assert launcher.proc.wait(timeout=60) == status
        lines = launcher.stderr().strip().splitlines()
        name = signal.Signals(sig).name
        assert lines == [f"launcher: interrupted by {name}; 4 ranks stopped ({kind}, code {status})"], lines
        assert launcher.leftovers() == []
    finally:
        launcher.kill_everything()


@pytest.mark.timeout(240)
def test_uncaught_interrupt_exits_143_without_a_traceback(tmp_path):
    launcher = Launcher(tmp_path, mode="raise")
    try:
        pids = launcher.wait_for_ranks()
        launcher.proc.send_signal(signal.SIGTERM)
        assert wait_gone(pids) == []
        assert launcher.proc.wait(timeout=60) == 143
        assert "Traceback" not in launcher.stderr()
    finally:
        launcher.kill_everything()


@pytest.mark.timeout(240)
def test_ranks_die_with_a_launcher_killed_by_sigkill(tmp_path):
    launcher = Launcher(tmp_path)
    try:
        pids = launcher.wait_for_ranks()
        launcher.proc.send_signal(signal.SIGKILL)
        assert launcher.proc.wait(timeout=60) == -signal.SIGKILL
        assert wait_gone(pids) == [], "PR_SET_PDEATHSIG did not take a rank down with its launcher"
        assert launcher.leftovers() == []
    finally:
        launcher.kill_everything()


# ---------------------------------------------------------------------------- naming the failure (in process)
def _kill_self(rank, world, pid_dir):
    Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # the others lose their peer here (gloo: "Connection closed/reset by peer")
    return rank


def _raise(rank, world, pid_dir):
    Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == 1:
        raise ValueError("bad thing")
    dist.barrier()
    return rank


def _exit_7(rank, world, pid_dir):
    Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == 3:
        os._exit(7)
    dist.barrier()
    return rank


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fn,rank,cause", [(_kill_self, 2, "died: killed by SIGKILL"),
                                           (_raise, 1, "raised ValueError: bad thing"),
                                           (_exit_7, 3, "exited with status 7")])
def test_failed_rank_is_named_with_pid_and_cause(tmp_path, monkeypatch, fn, rank, cause):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the report goes to tmp_path, not the shared /tmp
    with pytest.raises(RankFailure) as info:
        run_ranks(fn, 4, str(tmp_path), timeout=60, pg_timeout=30)
    e = info.value
    pid = int((tmp_path / f"rank{rank}.pid").read_text())
    assert (e.rank, e.pid, e.cause) == (rank, pid, cause)
    assert e.summary == f"rank {rank} (pid {pid}) {cause}"
    assert str(e).splitlines()[0] == e.summary
    assert e.log_path == failure_log_path() == str(tmp_path / f"hiermoe-ranks-{os.getpid()}-failure.log")
    report = Path(e.log_path).read_text()
    assert e.summary in report and f"==== rank {rank} (pid {pid})" in report
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert not any(alive(p) for p in pids)
    if fn is _raise:
        assert "ValueError: bad thing" in e.traceback and e.traceback in report
        assert e.summary.count("bad thing") == 1


def _hang(rank, world):
    dist.barrier()
    time.sleep(600)


@pytest.mark.timeout(120)
def test_timeout_stops_the_ranks_and_records_their_stacks(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    deadline = Deadline(8, "--timeout")
    with pytest.raises(RanksTimeout) as info:
        run_ranks(_hang, 4, timeout=deadline, pg_timeout=60)
    e = info.value
    assert isinstance(e, RankFailure) and e.stopped == [0, 1, 2, 3]
    assert e.summary == "--timeout of 8 s expired; 4 ranks stopped"
    report = Path(e.log_path).read_text()
    assert "Python stacks" in report and "_hang" in report
    with pytest.raises(RanksTimeout, match="expired before the ranks started"):  # a shared deadline stays spent
        run_ranks(_hang, 4, timeout=deadline)


# ---------------------------------------------------------------------------- the launcher's own state
def _sum(rank, world):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return float(t)


@pytest.mark.timeout(120)
def test_handlers_are_put_back_and_threads_work():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert run_ranks(_sum, 2, timeout=60) == [3.0, 3.0]
    assert {s: signal.getsignal(s) for s in before} == before
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", run_ranks(_sum, 2, timeout=60)))
    thread.start()
    thread.join(90)
    assert out["r"] == [3.0, 3.0]  # off the main thread: no handlers, same result
    assert {s: signal.getsignal(s) for s in before} == before


def test_exceptions_carry_status_and_survive_pickling():
    term, intr = RanksInterrupted.for_signal(signal.SIGTERM, 4), RanksInterrupted.for_signal(signal.SIGINT, 1)
    assert isinstance(term, SystemExit) and not isinstance(term, KeyboardInterrupt) and term.code == 143
    assert isinstance(intr, KeyboardInterrupt) and intr.code == 130
    assert str(term) == "interrupted by SIGTERM; 4 ranks stopped" and str(intr) == "interrupted by SIGINT; 1 rank stopped"
    failure = RankFailure("rank 2 (pid 9) died: killed by SIGKILL", rank=2, pid=9, cause="died: killed by SIGKILL",
                          log_path="/tmp/x.log")
    copy = pickle.loads(pickle.dumps(failure))
    assert (type(copy), str(copy), copy.rank, copy.pid, copy.log_path) == (RankFailure, str(failure), 2, 9, "/tmp/x.log")
    again = pickle.loads(pickle.dumps(term))
    assert (again.code, again.ranks_stopped) == (143, 4)
    with pytest.raises(ValueError, match="--timeout"):
        Deadline(0, "--timeout")
    with pytest.raises(ValueError, match="start_method"):
        run_ranks(_sum, 2, start_method="forkserver")
