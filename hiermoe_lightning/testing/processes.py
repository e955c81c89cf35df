"""Look at and clean up the processes a fault test starts: is a pid alive, whose children are these, wait for a
condition, and a command run in a session of its own that a test can always kill whole (used by the fault tests of
``run_ranks``, the benches and ``hiermoe fit``, and by ``examples/fault_timings.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["alive", "children", "wait_for", "wait_gone", "kill_session", "SessionCommand", "session_alive"]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # gone: no /proc entry, or it vanished between open and read (ESRCH)
        return False


def session_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` (a session started with ``start_new_session``) still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def children(pid: int) -> list[int]:
    """The live direct children of ``pid`` (from /proc, whichever thread started them)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return sorted(out)


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds passed; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def wait_gone(pids: Sequence[int], within: float) -> list[int]:
    """Wait until every pid is gone or ``within`` seconds passed; return the ones still running."""
    wait_for(lambda: not any(alive(p) for p in pids), within, poll=0.02)
    return [p for p in pids if alive(p)]


def kill_session(proc: subprocess.Popen, pids: Sequence[int] = ()) -> None:
    """Whatever happened, leave nothing behind: SIGKILL ``proc``'s session and every pid in ``pids``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class SessionCommand:
    """``argv`` in a session of its own, stderr to ``<tmp_path>/stderr.txt`` and ``TMPDIR`` a fresh
    ``<tmp_path>/tmp`` (so what it leaves there can be listed); ``rank_pids`` are killed with it."""

    def __init__(self, tmp_path: Path, argv: Sequence[str], cwd=None, env: dict | None = None):
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        self.stderr_path = tmp_path / "stderr.txt"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(list(argv), cwd=cwd, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True,
                                         env={**(env or os.environ), "TMPDIR": str(self.tmp),
                                              "PYTHONWARNINGS": "ignore"})
        self.rank_pids: list[int] = []

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def leftovers(self) -> list[str]:
        """Files of ours in the command's temporary directory."""
        return [name for name in os.listdir(self.tmp) if name.startswith("hiermoe")]

    def kill_everything(self) -> None:
        kill_session(self.proc, self.rank_pids)
