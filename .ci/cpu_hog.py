#!/usr/bin/env python3
"""Keep every core busy for a while: one spinning process per core (``nproc``), to run the test suite beside.

    python .ci/cpu_hog.py [--procs N] [--seconds 1800] [--watch PID]

The hog always ends by itself: after ``--seconds``, as soon as the process it watches is gone (``--watch``, default
its parent: the shell of ``make test-under-load``), and on SIGTERM/SIGINT/SIGHUP. Its workers die with it (each one
also checks that its own parent is still there, and asks the kernel for SIGKILL when the hog dies). Standard library
only; Linux (``prctl``) where available, polling otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort; polling covers other systems)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError, PermissionError):
        return True


def _spin(deadline: float, parent: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getppid() != parent:  # the hog died between fork and prctl
        return
    x = 0
    while time.monotonic() < deadline:
        for i in range(200_000):  # ~10 ms of pure Python work between checks
            x ^= i
        if os.getppid() != parent:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="busy processes (default: nproc)")
    parser.add_argument("--seconds", type=float, default=1800.0, help="exit after this long (default 1800)")
    parser.add_argument("--watch", type=int, default=os.getppid(),
                        help="exit when this process is gone (default: the parent)")
    args = parser.parse_args(argv)
    if args.procs < 1 or not args.seconds > 0:
        parser.error("--procs must be >= 1 and --seconds > 0")

    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    deadline = time.monotonic() + args.seconds
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_spin, args=(deadline, os.getpid()), daemon=True) for _ in range(args.procs)]
    for w in workers:
        w.start()
    print(f"cpu_hog: {args.procs} busy process(es) for at most {args.seconds:g} s (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    try:
        while not stop and time.monotonic() < deadline and _alive(args.watch) and any(w.is_alive() for w in workers):
            time.sleep(0.2)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
        for w in workers:
            w.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
