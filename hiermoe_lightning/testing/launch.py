"""Run ``fn(rank, world_size, *args)`` on N processes joined by a gloo process group on 127.0.0.1.

Processes are forked (fast: no re-import) and every rank gets a short process-group timeout. The launcher owns its
ranks for their whole life, whatever ends the run:

* **No orphans.** Each rank runs in a process group of its own (a Ctrl-C on the terminal reaches the launcher only)
  and asks the kernel to SIGKILL it when the launcher dies (``prctl(PR_SET_PDEATHSIG)``, Linux), so even a launcher
  killed by SIGKILL leaves no rank running. SIGTERM / SIGINT to the launcher (handlers installed while
  :func:`run_ranks` runs, main thread only, the previous ones put back afterwards) kill every rank and raise
  :class:`RanksInterrupted`, a ``SystemExit`` with status 143 / 130.
* **Nothing left on disk.** Results and error reports travel through pipes, never through files: a run that is
  interrupted or killed leaves no temporary file. Only a failure writes a report, :func:`failure_log_path`.
* **The failure is named.** A rank that dies or raises ends the run at once, with a :class:`RankFailure` whose first
  line names the root cause (``rank 2 (pid 1234) died: killed by SIGKILL``); ranks that merely lost their peer (gloo
  "Connection reset by peer") are blamed only when nothing else failed. Every rank's traceback goes to the log.
* **Bounded time.** ``timeout`` (seconds, or a :class:`Deadline` shared by several launches) bounds the run; when it
  passes the launcher records every rank's Python stack (``faulthandler``, to see where it hung), kills the ranks and
  raises :class:`RanksTimeout`.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import faulthandler
import io
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

if TYPE_CHECKING:
    from ..bench.netem import EmulatedNetwork

__all__ = ["run_ranks", "free_port", "RankFailure", "RanksTimeout", "RanksInterrupted", "Deadline",
           "stop_on_signals", "failure_log_path", "PEER_LOSS_MARKERS"]

# a rank whose traceback holds one of these only lost a peer that failed first (gloo's words for a closed socket)
PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_S = 0.1  # longest wait between two looks at the signal flag and the deadline
_PEER_GRACE_S = 2.0  # after a "lost my peer" error: how long to wait for the root cause to show up
_STACK_WAIT_S = 1.0  # after asking hung ranks for their stacks: how long to collect them
_JOIN_S = 5.0  # after SIGKILL: how long to wait for a rank to be reaped
_HEADER = struct.Struct("<Q")  # length prefix of a rank's one message to the launcher


# ---------------------------------------------------------------------------- what callers see
class RankFailure(RuntimeError):
    """A rank raised, died or exited with an error status (:class:`RanksTimeout`: did not finish in time).

    ``str(e)``: the one-line :attr:`summary` (``rank 1 (pid 99) raised ValueError: bad thing``), then the path of the
    full report (:attr:`log_path`), then the failing rank's traceback. Attributes: ``summary``, ``rank``, ``pid``,
    ``cause`` (the summary without the rank and pid), ``traceback`` (the failing rank's, "" when it had none),
    ``log_path`` (None when the report could not be written).
    """

    def __init__(self, summary: str, *, rank: int | None = None, pid: int | None = None, cause: str = "",
                 traceback: str = "", log_path: str | None = None):
        self.summary, self.rank, self.pid, self.cause = summary, rank, pid, cause
        self.traceback, self.log_path = traceback, log_path
        parts = [summary]
        if log_path:
            parts.append(f"report of every rank: {log_path}")
        if traceback:
            parts.append(traceback.rstrip())
        super().__init__("\n".join(parts))

    def __reduce__(self):  # picklable despite the keyword-only arguments
        return _rebuild, (type(self), self.args, self.__dict__.copy())


class RanksTimeout(RankFailure):
    """The ranks did not finish within the timeout; the ones still running (``stopped``) were killed.

    The report at ``log_path`` holds the Python stack of every rank at the moment of the timeout.
    """

    def __init__(self, summary: str, *, stopped: list[int] | None = None, seconds: float = 0.0, **kwargs):
        self.stopped, self.seconds = list(stopped or []), float(seconds)
        super().__init__(summary, **kwargs)


def _rebuild(cls, args, state):
    obj = cls.__new__(cls, *args)
    obj.args = args
    obj.__dict__.update(state)
    return obj


class RanksInterrupted(SystemExit):
    """SIGTERM or SIGINT stopped the run: every rank was killed first, and nothing was left on disk.

    A ``SystemExit`` whose ``code`` is ``128 + signum`` (143 for SIGTERM, 130 for SIGINT): left uncaught it ends the
    program with the status a shell or scheduler expects, without a traceback. Raised for SIGINT it is also a
    ``KeyboardInterrupt`` (see :meth:`for_signal`), so code that stops on Ctrl-C (pytest, a REPL) still does.
    ``str(e)`` is ``interrupted by SIGTERM; 4 ranks stopped``; attributes ``signum``, ``signal_name``,
    ``ranks_stopped``.
    """

    def __init__(self, signum: int, ranks_stopped: int = 0):
        super().__init__(128 + int(signum))
        self.signum, self.ranks_stopped = int(signum), int(ranks_stopped)

    @property
    def signal_name(self) -> str:
        return _signal_name(self.signum)

    def __str__(self) -> str:
        stopped = self.ranks_stopped
        tail = f"; {stopped} rank{'s' if stopped != 1 else ''} stopped" if stopped else ""
        return f"interrupted by {self.signal_name}{tail}"

    def __reduce__(self):
        return type(self), (self.signum, self.ranks_stopped)

    @staticmethod
    def for_signal(signum: int, ranks_stopped: int = 0) -> "RanksInterrupted":
        """The exception to raise for ``signum``: for SIGINT one that is a ``KeyboardInterrupt`` too."""
        cls = _RanksInterruptedByKeyboard if signum == signal.SIGINT else RanksInterrupted
        return cls(signum, ranks_stopped)


class _RanksInterruptedByKeyboard(RanksInterrupted, KeyboardInterrupt):
    """:class:`RanksInterrupted` for SIGINT: also a ``KeyboardInterrupt``."""


class Deadline:
    """A fixed end time that several launches share, so one ``--timeout`` bounds a whole command.

    ``Deadline(900, "--timeout")`` ends 900 s after it was made; pass it as ``run_ranks(..., timeout=deadline)`` to
    every launch of the command. ``name`` appears in the timeout message (``--timeout of 900 s expired``).
    """

    def __init__(self, seconds: float, name: str = "timeout"):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"{name} must be a number of seconds > 0, got {seconds!r}")
        self.seconds, self.name = float(seconds), str(name)
        self._end = time.monotonic() + self.seconds

    def remaining(self) -> float:
        """Seconds left (0 once passed)."""
        return max(0.0, self._end - time.monotonic())

    def describe(self) -> str:
        return f"{self.name} of {self.seconds:g} s"

    def __repr__(self) -> str:
        return f"Deadline({self.seconds:g}, {self.name!r}, remaining={self.remaining():.1f})"


def failure_log_path(pid: int | None = None) -> str:
    """Where a failing run of process ``pid`` (default: this one) writes every rank's traceback and stack.

    ``<tempdir>/hiermoe-ranks-<pid>-failure.log``; each failure of that process overwrites it.
    """
    return os.path.join(tempfile.gettempdir(), f"hiermoe-ranks-{os.getpid() if pid is None else pid}-failure.log")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the rendezvous of the ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- signals in the launcher
class _SignalTrap:
    """SIGTERM/SIGINT handlers for the length of a ``with`` block; the previous handlers come back at its end.

    ``raise_now=False`` (inside :func:`run_ranks`): the first signal is only recorded in :attr:`signum`; the launcher
    looks at it between waits, kills its ranks and raises. ``raise_now=True`` (:func:`stop_on_signals`): the first
    signal raises :class:`RanksInterrupted` where the main thread is, so ``finally`` blocks clean up. A signal marks
    every trap that is open (nested ones included, in :data:`_OPEN_TRAPS`), and later signals are ignored while the
    cleanup runs: a second Ctrl-C never breaks into a ``finally`` block. Off the main thread nothing is installed
    (Python allows handlers only there): signals keep their previous handling. A signal that was ignored (SIG_IGN)
    stays ignored.
    """

    def __init__(self, raise_now: bool):
        self.raise_now = raise_now
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if any(trap.signum is not None for trap in _OPEN_TRAPS) or self.signum is not None:
            return
        for trap in (*_OPEN_TRAPS, self):
            trap.signum = signum
        if self.raise_now:
            raise RanksInterrupted.for_signal(signum)

    def __enter__(self) -> "_SignalTrap":
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            for sig in _STOP_SIGNALS:
                with contextlib.suppress(ValueError, OSError):  # not the main interpreter: nothing to do
                    if signal.getsignal(sig) != signal.SIG_IGN:
                        self._previous[sig] = signal.signal(sig, self._handle)
            _OPEN_TRAPS.append(self)
        except BaseException:  # an outer trap raised between the two installs: leave nothing of ours behind
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(ValueError):
            _OPEN_TRAPS.remove(self)
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


# the traps whose handlers are installed, outermost first (signal handling is per process, so is this list)
_OPEN_TRAPS: list[_SignalTrap] = []


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGINT inside the block into :class:`RanksInterrupted` (status 143 / 130).

    For commands that do more than one launch (or set up an emulated network around one): a signal between launches
    unwinds through the command's ``finally`` blocks instead of killing the process with its temporary files; a
    signal during a launch is handled by :func:`run_ranks` (ranks killed, then the same exception). Main thread only;
    elsewhere a no-op.
    """
    with _SignalTrap(raise_now=True):
        yield


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ---------------------------------------------------------------------------- the rank side
def _die_with_parent(parent_pid: int) -> None:
    """Make this rank independent of the terminal but not of its launcher.

    Its own process group (the terminal's Ctrl-C reaches the launcher only, which then stops the ranks itself); the
    kernel SIGKILLs it when the launcher dies (Linux; elsewhere nothing); if the launcher died before that was in
    place, exit now. SIGTERM/SIGINT get their default action back (a fork inherits the launcher's handlers): a
    stopped rank dies quietly, without a traceback.
    """
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    # the same as faults.supervisor.die_with_parent, written out: this file must load alone (without the package)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def _watch_stacks(stack_fd: int) -> None:
    """A crash (SIGSEGV, SIGABRT, ...) or the launcher's SIGUSR1 writes every thread's Python stack to the launcher."""
    faulthandler.enable(file=stack_fd, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=stack_fd, all_threads=True, chain=False)


def _error_report(exc: BaseException) -> dict:
    """What the launcher needs to name a failure: the exception's type and message, and the traceback."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails still has a type
        message = "<message could not be printed>"
    return {"type": type(exc).__name__, "message": message, "traceback": traceback.format_exc()}


def _send(fd: int, message: tuple) -> None:
    """Write one length-prefixed pickled message to the launcher (blocking; silently dropped if it is gone)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(fd, view):]


def _child(fn, rank, world_size, port, pg_timeout, args, kwargs, result_conn, stack_conn, parent_pid,
           netns=None, ranks_per_node=None, *, backend="gloo"):
    _die_with_parent(parent_pid)
    _watch_stacks(stack_conn.fileno())
    code = 0
    try:
        torch.set_num_threads(1)
        host = "127.0.0.1"
        if netns is not None:
            node = rank // ranks_per_node
            netns.enter(node)  # this process's sockets now live in node `node`'s namespace
            os.environ["GLOO_SOCKET_IFNAME"] = netns.interface(node)  # this child's own environment only
            host = netns.node_address(0)  # rank 0 (node 0) hosts the rendezvous store
        if backend == "nccl":  # one GPU per rank; CPU tensors (routing gathers, objects) still go through gloo
            torch.cuda.set_device(rank % torch.cuda.device_count())
        torch.distributed.init_process_group(
            "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo", init_method=f"tcp://{host}:{port}", rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args, **kwargs), buffer)
        message = ("ok", buffer.getvalue())
    except BaseException as e:  # noqa: BLE001 - report everything to the launcher
        message = ("error", _error_report(e))
        code = 1
    finally:
        with contextlib.suppress(Exception):
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    _send(result_conn.fileno(), message)
    os._exit(code)


# ---------------------------------------------------------------------------- the launcher side
class _Rank:
    """One rank as the launcher sees it: its process, the pipes it writes to, and what arrived from it.

    (A plain class, not a dataclass: this module must load on its own, outside the package, e.g. in a test.)
    """

    def __init__(self, rank: int, proc, result_fd: int, stack_fd: int, pid: int, conns: tuple):
        self.rank, self.proc, self.pid = rank, proc, pid
        self.result_fd, self.stack_fd = result_fd, stack_fd
        self.conns = conns  # the launcher's read ends (Connection objects), open while the rank object lives
        self.data = bytearray()  # the rank's message, as far as it has arrived
        self.stacks = bytearray()  # faulthandler output (a crash, or the stacks asked for at a timeout)
        self.message: tuple | None = None  # ("ok", torch.save bytes) or ("error", report)
        self.exited = False
        self.exitcode: int | None = None  # once reaped
        self.killed = False  # stopped by the launcher while still running
        self.seen: int | None = None  # order in which its failure was noticed

    @property
    def ok(self) -> bool:
        return self.message is not None and self.message[0] == "ok"

    def drain(self) -> None:
        """Read whatever the rank has written so far (non-blocking) and decode its message once complete."""
        self.data += _read_available(self.result_fd)
        self.stacks += _read_available(self.stack_fd)
        if self.message is None and len(self.data) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.data)
            if len(self.data) >= _HEADER.size + size:
                self.message = pickle.loads(bytes(self.data[_HEADER.size:_HEADER.size + size]))

    def failure(self) -> "tuple[int, str, str] | None":
        """(priority, cause, traceback) if this rank failed, else None; priority 0 = a root cause, 1 = lost a peer,
        2 = killed by the launcher (never the cause)."""
        if self.ok:
            return None
        if self.message is not None:
            report = self.message[1]
            text = " ".join(report["message"].split())
            text = text if len(text) <= 300 else text[:297] + "..."
            cause = f"raised {report['type']}" + (f": {text}" if text else "")
            lost_peer = any(m in report["traceback"] for m in PEER_LOSS_MARKERS)
            return (1 if lost_peer else 0), cause, report["traceback"]
        if not self.exited:
            return None
        if self.killed:
            return 2, "was stopped by the launcher", ""
        code = self.exitcode
        if code is not None and code < 0:
            return 0, f"died: killed by {_signal_name(-code)}", ""
        if code:
            return 0, f"exited with status {code}", ""
        return 0, "exited with status 0 without returning a result", ""


def _read_available(fd: int) -> bytes:
    """Everything readable from the non-blocking pipe ``fd`` right now."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except OSError:  # BlockingIOError: nothing more for now
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _start(ranks: list[_Rank], ctx, fn, world_size, port, pg_timeout, args, kwargs, child_extra, trap,
           backend: str = "gloo") -> None:
    """Fork the ranks into ``ranks`` (one by one: whatever goes wrong, the caller knows every process started), each
    with a result pipe and a stack pipe; stop starting more once a signal came."""
    parent = os.getpid()
    for r in range(world_size):
        if trap.signum is not None:
            break
        result_read, result_write = ctx.Pipe(duplex=False)
        stack_read, stack_write = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(fn, r, world_size, port, pg_timeout, args, kwargs, result_write,
                                                stack_write, parent, *child_extra),
                           kwargs={"backend": backend}, daemon=True)
        proc.start()
        rank = _Rank(r, proc, result_read.fileno(), stack_read.fileno(), pid=proc.pid, conns=(result_read, stack_read))
        ranks.append(rank)
        with contextlib.suppress(OSError):
            os.setpgid(proc.pid, proc.pid)  # the child does the same: whichever runs first, no window
        result_write.close()  # later ranks must not inherit this rank's write ends
        stack_write.close()
        os.set_blocking(rank.result_fd, False)
        os.set_blocking(rank.stack_fd, False)


def _supervise(ranks: list[_Rank], deadline: Deadline, trap: _SignalTrap) -> str:
    """Wait until every rank has exited (``"done"``), one failed (``"failed"``), the deadline passed (``"timeout"``)
    or a signal came (``"signal"``); read the ranks' messages meanwhile."""
    counter = 0
    grace_end = None  # set when the only failure so far is a rank that lost its peer
    while True:
        if trap.signum is not None:
            return "signal"
        failures = [r.failure() for r in ranks]
        if any(f is not None and f[0] == 0 for f in failures):
            return "failed"
        if any(f is not None for f in failures):
            grace_end = grace_end or time.monotonic() + _PEER_GRACE_S
            if time.monotonic() >= grace_end:
                return "failed"
        pending = [r for r in ranks if not r.exited]
        if not pending:
            return "failed" if any(f is not None for f in failures) else "done"
        remaining = deadline.remaining()
        if remaining <= 0:
            return "timeout"
        by_fd = {}
        for r in pending:
            by_fd.update({r.result_fd: r, r.stack_fd: r, r.proc.sentinel: r})
        wait = min(_POLL_S, remaining, grace_end - time.monotonic() if grace_end else _POLL_S)
        ready = {by_fd[fd].rank for fd in multiprocessing.connection.wait(list(by_fd), timeout=max(wait, 0.0))}
        for rank in pending:
            # exit by waitpid, not only the sentinel: a child the rank left behind may hold the sentinel's pipe
            exitcode = rank.proc.exitcode
            if rank.rank in ready or exitcode is not None:
                rank.drain()  # an exited rank's whole message is in the pipe by now
            if exitcode is not None:
                rank.exited, rank.exitcode = True, exitcode
            if rank.seen is None and rank.failure() is not None:
                rank.seen = counter
                counter += 1


def _ask_for_stacks(ranks: list[_Rank]) -> None:
    """SIGUSR1 to every running rank (its faulthandler writes all thread stacks), then collect them: until every
    rank has written and the pipes are quiet, at most :data:`_STACK_WAIT_S`."""
    live = [r for r in ranks if not r.exited]
    for r in live:
        with contextlib.suppress(OSError):
            os.kill(r.pid, signal.SIGUSR1)
    end = time.monotonic() + _STACK_WAIT_S
    while live and time.monotonic() < end:
        ready = multiprocessing.connection.wait([r.stack_fd for r in live], timeout=0.2)
        for r in live:
            r.drain()
        if not ready and all(r.stacks for r in live):
            break


def _stop(ranks: list[_Rank]) -> int:
    """SIGKILL every rank still running (its whole process group), reap them all; return how many were killed."""
    killed = 0
    for r in ranks:
        if r.proc.exitcode is None:  # alive (or a zombie not reaped yet): its pid and group id are still ours
            try:
                os.killpg(r.pid, signal.SIGKILL)
            except OSError:
                with contextlib.suppress(OSError):
                    os.kill(r.pid, signal.SIGKILL)
            r.killed = not r.ok and r.message is None
            killed += 1
    for r in ranks:
        r.proc.join(_JOIN_S)
        r.drain()
        r.exited, r.exitcode = True, r.proc.exitcode
    return killed


def _close(ranks: list[_Rank]) -> None:
    for r in ranks:
        for conn in r.conns:
            conn.close()
        with contextlib.suppress(ValueError, AttributeError):
            r.proc.close()


def _write_log(summary: str, ranks: list[_Rank], world_size: int) -> str | None:
    """Every rank's outcome, traceback and stacks in :func:`failure_log_path`; its path, or None if unwritable."""
    path = failure_log_path()
    lines = [f"hiermoe run_ranks: {summary}",
             f"launcher pid {os.getpid()}, world size {world_size}, {datetime.datetime.now().isoformat(' ', 'seconds')}",
             ""]
    for r in ranks:
        failure = r.failure()
        state = "returned its result" if failure is None else failure[1]
        if failure is None and not r.ok:
            state = "was still running when the launcher stopped it"
        lines.append(f"==== rank {r.rank} (pid {r.pid}) {state}")
        if failure is not None and failure[2]:
            lines.append(failure[2].rstrip())
        if r.stacks:
            lines += ["-- Python stacks (faulthandler):", r.stacks.decode(errors="replace").rstrip()]
        lines.append("")
    try:
        with open(path, "w") as f:
            f.write("\n".join(lines))
    except OSError:
        return None
    return path


def _root_cause(ranks: list[_Rank], world_size: int) -> RankFailure:
    """The failure to report: a rank that died or raised on its own before one that lost its peer, the first noticed
    before later ones, lower ranks on ties."""
    failed = [(f[0], r.seen if r.seen is not None else 1 << 30, r.rank, f, r)
              for r in ranks if (f := r.failure()) is not None and f[0] < 2]
    if not failed:
        stopped = [r for r in ranks if not r.ok]
        r = stopped[0] if stopped else ranks[0]
        summary = f"rank {r.rank} (pid {r.pid}) did not return a result"
        return RankFailure(summary, rank=r.rank, pid=r.pid, cause="did not return a result",
                           log_path=_write_log(summary, ranks, world_size))
    *_, (_, cause, tb), r = min(failed, key=lambda t: t[:3])
    summary = f"rank {r.rank} (pid {r.pid}) {cause}"
    return RankFailure(summary, rank=r.rank, pid=r.pid, cause=cause, traceback=tb,
                       log_path=_write_log(summary, ranks, world_size))


def _check_netns(world_size, netns, ranks_per_node) -> tuple:
    if netns is None:
        if ranks_per_node is not None:
            raise ValueError("ranks_per_node is only meaningful together with netns")
        return ()
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
        raise ValueError(f"ranks_per_node must be an int >= 1 with netns, got {ranks_per_node!r}")
    if world_size % ranks_per_node or world_size // ranks_per_node != netns.num_nodes:
        raise ValueError(f"world_size {world_size} must be ranks_per_node {ranks_per_node} x the emulated "
                         f"network's {netns.num_nodes} nodes")
    return (netns, ranks_per_node)


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: "float | Deadline" = 60.0,
              pg_timeout: float = 30.0, start_method: str = "fork", netns: "EmulatedNetwork | None" = None,
              ranks_per_node: int | None = None, backend: str = "gloo", **kwargs) -> list[Any]:
    """Run ``fn`` on ``world_size`` ranks; return each rank's return value (torch.save-able), rank order.

    ``timeout``: seconds, or a :class:`Deadline` shared with other launches. Raises (always after every rank is gone):
    :class:`RankFailure` naming the root-cause rank, its pid and cause (full report: :func:`failure_log_path`);
    :class:`RanksTimeout` when the timeout passes; :class:`RanksInterrupted` on SIGTERM / SIGINT (main thread).
    ``start_method``: ``"fork"`` (default) or ``"spawn"`` (``fn`` and the arguments must then be picklable).
    ``backend``: ``"gloo"`` (default) or ``"nccl"``: rank ``r`` uses GPU ``r % device_count`` and a process group
    with NCCL for CUDA tensors and gloo for CPU ones (the parent must not have initialised CUDA before a fork).

    With ``netns`` (an active :class:`~hiermoe_lightning.bench.netem.EmulatedNetwork`) rank ``r`` first joins node
    ``r // ranks_per_node``'s network namespace, binds gloo to that node's interface and meets the others at
    ``tcp://<node 0's address>:<port>``: ranks of one node talk over their namespace's loopback, ranks of different
    nodes over the emulated (rate-limited) links.
    """
    child_extra = _check_netns(world_size, netns, ranks_per_node)
    if start_method not in ("fork", "spawn"):
        raise ValueError(f"start_method must be 'fork' or 'spawn', got {start_method!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    deadline = timeout if isinstance(timeout, Deadline) else Deadline(timeout)
    if deadline.remaining() <= 0:
        raise RanksTimeout(f"{deadline.describe()} expired before the ranks started", seconds=deadline.seconds,
                           cause="timed out")
    ctx = mp.get_context(start_method)
    ranks: list[_Rank] = []
    with _SignalTrap(raise_now=False) as trap:
        try:
            _start(ranks, ctx, fn, world_size, free_port(), pg_timeout, args, kwargs, child_extra, trap, backend)
            outcome = _supervise(ranks, deadline, trap) if trap.signum is None else "signal"
            if outcome == "timeout":
                _ask_for_stacks(ranks)
        finally:  # whatever happened, and before anything is raised: no rank outlives this call
            stopped = _stop(ranks)
            _close(ranks)
    if trap.signum is not None:  # a signal wins over whatever else happened meanwhile
        raise RanksInterrupted.for_signal(trap.signum, stopped)
    if outcome == "timeout":
        running = [r.rank for r in ranks if r.killed]
        summary = f"{deadline.describe()} expired; {len(running)} rank{'s' if len(running) != 1 else ''} stopped"
        raise RanksTimeout(summary, stopped=running, seconds=deadline.seconds, cause="timed out",
                           log_path=_write_log(summary, ranks, world_size))
    if outcome == "failed":
        raise _root_cause(ranks, world_size)
    return [torch.load(io.BytesIO(r.message[1]), weights_only=False) for r in ranks]
