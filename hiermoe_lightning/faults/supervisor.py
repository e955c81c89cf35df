"""The launcher of ``hiermoe fit``'s rank processes: it watches them, names the one that died, and leaves none behind.

Lightning's script launcher (``start_method="popen"``) re-runs the command once per extra local rank; rank 0 is the
launching process itself. Its own observer polls every 5 s and, when a child fails, SIGKILLs every process, the
launcher included, so the last thing the terminal shows is the survivors' gloo tracebacks and nothing names the rank
that died. Here:

* each child gets ``PR_SET_PDEATHSIG = SIGKILL`` (set by the child itself, see :func:`die_with_parent`), so no rank
  outlives the launcher, even one killed by SIGKILL;
* a watcher thread polls the children every 0.1 s; when one fails it kills the others and records a
  :class:`~hiermoe_lightning.faults.errors.RankDied` (rank, pid, cause, step, log) from the child's report;
* when rank 0's own training raises (usually the gloo error that the death caused), the launcher waits briefly for
  the watcher's verdict and raises the *root cause* instead; if rank 0 is stuck, the watcher prints the one line and
  ends the process itself after a grace period;
* children never print tracebacks: they write a report (:mod:`.reports`) and exit; only rank 0 prints, once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from .errors import Preempted, RankDied
from .reports import DETERMINISTIC_ERRORS, cause_of, is_peer_loss, read_report

__all__ = ["die_with_parent", "RankWatcher", "SUPERVISOR_ENV", "CHILD_EXIT_STATUS", "exit_status_for"]

# set by the launcher for the processes it starts (like Lightning's own LOCAL_RANK): where to write failure reports
SUPERVISOR_ENV = "HIERMOE_SUPERVISOR_DIR"
_PR_SET_PDEATHSIG = 1
CHILD_EXIT_STATUS = {"deterministic": 2, "other": 1}


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux); False where unsupported.

    Called in the child right after it starts; if the parent (``parent_pid`` when known, else the current parent) is
    already gone by then (the race the flag cannot cover), the child exits at once.
    """
    parent = os.getppid() if parent_pid is None else parent_pid
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if parent == 1 or os.getppid() != parent:
        os._exit(1)
    return armed


def exit_status_for(exc: BaseException) -> int:
    """The exit status of a child that ends with ``exc``: 143 preempted, 2 bad input, 1 anything else."""
    if isinstance(exc, Preempted):
        return exc.code
    if type(exc).__name__ in DETERMINISTIC_ERRORS or isinstance(exc, (ValueError, TypeError)):
        return CHILD_EXIT_STATUS["deterministic"]
    return CHILD_EXIT_STATUS["other"]


class RankWatcher(threading.Thread):
    """Poll ``procs`` (the children, global ranks ``ranks``) until all exit; on the first failure kill the rest.

    ``step`` returns the launcher's current global step (for the message). After a failure the launcher's main thread
    has ``grace_s`` to report it (it is normally on its way, failing on the dead peer); after that the watcher prints
    the one line itself and ends the process with status 1.
    """

    def __init__(self, procs: list[subprocess.Popen], ranks: list[int], report_dir: str,
                 step: Callable[[], int | None], poll_s: float = 0.1, grace_s: float = 20.0):
        super().__init__(daemon=True, name="hiermoe-rank-watcher")
        self.procs, self.ranks, self.report_dir, self.step = procs, ranks, report_dir, step
        self.poll_s, self.grace_s = poll_s, grace_s
        self.failure: RankDied | None = None
        self._failed = threading.Event()
        self._stop = threading.Event()
        self._main_handles_it = threading.Event()

    # ------------------------------------------------------------------ watching
    def run(self) -> None:
        while not self._stop.is_set():
            codes = [p.poll() for p in self.procs]
            if all(c == 0 for c in codes):
                return
            for rank, proc, code in zip(self.ranks, self.procs, codes):
                if code in (None, 0):
                    continue
                report = read_report(self.report_dir, rank)
                if report is not None and report.get("type") == "Preempted":
                    continue  # it stopped on the agreed step boundary, as every rank will
                self._fail(rank, proc, code, report)
                return
            time.sleep(self.poll_s)

    def _fail(self, rank: int, proc: subprocess.Popen, code: int, report: dict | None) -> None:
        # a rank that only lost its peer is not the root cause: give the real one a moment to show up
        if report is not None and report.get("peer_loss"):
            time.sleep(0.5)
            for other_rank, other in zip(self.ranks, self.procs):
                other_code = other.poll()
                other_report = read_report(self.report_dir, other_rank)
                if other_code not in (None, 0) and not (other_report or {}).get("peer_loss"):
                    rank, proc, code, report = other_rank, other, other_code, other_report
                    break
        step = report.get("step") if report and report.get("step") is not None else self._safe_step()
        self.failure = RankDied(rank, proc.pid, cause_of(report, code), step,
                                (report or {}).get("log"))
        self.kill_all()
        self._failed.set()
        if not self._main_handles_it.wait(self.grace_s):
            # rank 0 is stuck (e.g. in a collective that will only time out): say what happened and end it
            print(f"hiermoe: error: {self.failure}", file=sys.stderr, flush=True)
            os._exit(1)

    def _safe_step(self) -> int | None:
        try:
            return self.step()
        except Exception:  # noqa: BLE001 - the step is only decoration for the message
            return None

    # ------------------------------------------------------------------ used by the launcher's main thread
    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def root_cause(self, timeout: float) -> RankDied | None:
        """The failure the watcher saw, waiting up to ``timeout`` s for one; the main thread takes over reporting."""
        self._failed.wait(timeout)
        self._main_handles_it.set()
        return self.failure

    def wait_children(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for every child to exit, then SIGKILL and reap whatever is left."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        self._main_handles_it.set()
        self._stop.set()


def resolve_failure(exc: BaseException, root: RankDied | None, rank: int, step: int | None,
                    log: str | None) -> BaseException:
    """What the launcher raises after ``exc`` ended its own training: ``exc`` itself when every rank fails alike
    (preemption, bad input, non-finite values, Ctrl-C), else the dead rank's :class:`RankDied` when there is one,
    else a :class:`RankDied` for this rank's own exception (one line; the traceback is in ``log``)."""
    if isinstance(exc, (Preempted, KeyboardInterrupt)) or type(exc).__name__ in DETERMINISTIC_ERRORS \
            or isinstance(exc, (ValueError, TypeError, FloatingPointError)):
        return exc
    if root is not None:
        return root
    if isinstance(exc, SystemExit):
        return exc
    text = " ".join(str(exc).split())
    return RankDied(rank, os.getpid(), f"raised {type(exc).__name__}: {text}", step, log)


def looks_like_peer_loss(exc: BaseException) -> bool:
    return is_peer_loss(f"{type(exc).__name__}: {exc}")

