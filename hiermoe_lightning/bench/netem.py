"""Emulate a multi-node network on one machine: one Linux network namespace per node, links limited by ``tc``.

Layout built by :class:`EmulatedNetwork` (all of it inside namespaces this object creates; nothing is added to the
caller's namespace, its routes or its interfaces)::

      node 0 netns                         hub netns                           node 1 netns
    +---------------+                +-------------------+                +---------------+
    | lo (up)       |  veth pair     |   bridge <pfx>br  |   veth pair    | lo (up)       |
    | <pfx>n0  =====|== tbf ==>  <== tbf == <pfx>h0   <pfx>h1 == tbf ==> <== tbf ===|==== <pfx>n1   |
    | 10.77.0.1/24  |                |                   |                | 10.77.0.2/24  |
    +---------------+                +-------------------+                +---------------+

* node ``i`` lives in namespace ``<prefix>-<pid>-<k>-n<i>`` with address ``10.77.0.(i+1)/24`` on its veth end;
* the other end of each veth pair sits on a bridge in the hub namespace ``<prefix>-<pid>-<k>-hub``;
* both directions of every node link are rate limited (a ``tbf`` qdisc on the egress of the node end and on the
  egress of the hub end; plus a ``netem`` delay under it when ``latency_ms > 0``), so traffic between two nodes
  crosses two shaped hops of ``inter_mbit`` Mbit/s each, and a node's link carries ``inter_mbit`` Mbit/s each way;
* traffic between processes of one node (to the node's own address or to ``127.0.0.1``) stays inside its namespace
  on the loopback device: not shaped.

A process (thread) joins node ``i`` with :meth:`EmulatedNetwork.enter` (``setns(2)``; Python 3.11 has no
``os.setns``). ``cleanup()`` removes every namespace (and with it every veth, bridge and qdisc) this object made; it
is idempotent, runs on leaving the ``with`` block whatever the reason, after a failed setup, on ``SIGINT`` /
``SIGTERM`` (handlers installed for the object's lifetime when it is created on the main thread) and at interpreter
exit. Forked children inherit the object but never clean up (only the creating process does), and get the signal
handlers that were in place before it (so e.g. a rank blocked in a collective still dies at once on ``SIGTERM``).

Needs root (``CAP_NET_ADMIN`` + ``CAP_SYS_ADMIN``), the ``ip`` and ``tc`` tools (iproute2) and, for ``latency_ms``,
the kernel's ``sch_netem``; otherwise :class:`EmulationUnavailable` is raised with the reason.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import weakref
from typing import Callable

__all__ = ["EmulatedNetwork", "EmulationUnavailable", "CLONE_NEWNET", "NETNS_DIR", "SUBNET", "remove_stale"]

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
SUBNET = ipaddress.ip_network("10.77.0.0/24")  # private, and only ever inside our own hub's bridge
MAX_NODES = 250
_CMD_TIMEOUT_S = 20.0  # per ip/tc call: bounded run time even if the kernel or a tool misbehaves
_counter = itertools.count()
_libc = None
_live: "weakref.WeakSet[EmulatedNetwork]" = weakref.WeakSet()  # instances whose signal handlers are installed
_claimed: set[str] = set()  # namespace names of this process's instances between setup and cleanup


def _after_fork_in_child() -> None:
    """A forked child is a worker, not the owner: give it back the handlers that were there before ours."""
    for net in list(_live):
        net._drop_handlers_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class EmulationUnavailable(RuntimeError):
    """Network emulation cannot run here (not root, no network namespaces, no ``ip``/``tc``, missing qdisc)."""


def _is_root() -> bool:
    """Whether this process runs as root (tests monkeypatch this)."""
    return os.geteuid() == 0


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run an iproute2 command with a time limit; raise ``RuntimeError`` with its stderr when ``check`` and it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(argv)!r} did not finish within {_CMD_TIMEOUT_S:.0f} s") from e
    if check and proc.returncode != 0:
        reason = proc.stderr.strip() or proc.stdout.strip()
        raise RuntimeError(f"{' '.join(argv)!r} failed ({proc.returncode}): {reason}")
    return proc


def _setns(fd: int, nstype: int) -> None:
    global _libc
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, nstype)
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale(prefix: str = "hmoe") -> list[str]:
    """Delete namespaces named like ours (``<prefix>-<pid>-<k>-...``) whose creating process no longer exists
    (left behind by a ``SIGKILL``; with this process's pid: a reused pid, unless one of our instances holds the name);
    return their names. Never touches other names or live owners' namespaces."""
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+-(hub|n\d+)$")
    removed = []
    for name in _list_netns():
        m = pattern.match(name)
        if not m or name in _claimed:
            continue
        owner = int(m.group(1))
        if owner == os.getpid() or not _pid_alive(owner):
            if _run(["ip", "netns", "delete", name], check=False).returncode == 0:
                removed.append(name)
    return removed


class EmulatedNetwork:
    """``num_nodes`` network namespaces joined through a hub bridge by links of ``inter_mbit`` Mbit/s each way.

    Use as a context manager (``with EmulatedNetwork(2, 500) as net: ...``) or call :meth:`setup` /
    :meth:`cleanup` yourself. Node ``i``: :meth:`namespace` (its name under ``/var/run/netns``),
    :meth:`node_address` (``10.77.0.(i+1)``), :meth:`interface` (its veth end inside its namespace, for
    ``GLOO_SOCKET_IFNAME``), :meth:`enter` (move the calling thread into it).
    """

    def __init__(self, num_nodes: int, inter_mbit: float, latency_ms: float = 0.0, prefix: str = "hmoe"):
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or not 1 <= num_nodes <= MAX_NODES:
            raise ValueError(f"num_nodes must be an int in 1 .. {MAX_NODES}, got {num_nodes!r}")
        if isinstance(inter_mbit, bool) or not isinstance(inter_mbit, (int, float)) or not inter_mbit > 0:
            raise ValueError(f"inter_mbit must be a number of Mbit/s > 0, got {inter_mbit!r}")
        if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) or not latency_ms >= 0:
            raise ValueError(f"latency_ms must be a number of milliseconds >= 0, got {latency_ms!r}")
        if not isinstance(prefix, str) or not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"prefix must be 1-8 lowercase letters/digits starting with a letter, got {prefix!r}")
        self.num_nodes = num_nodes
        self.inter_mbit = float(inter_mbit)
        self.latency_ms = float(latency_ms)
        self.prefix = prefix
        self._owner = os.getpid()
        base = f"{prefix}-{self._owner}-{next(_counter)}"  # unique per process and instance: concurrent runs coexist
        self.hub = f"{base}-hub"
        self._namespaces = [f"{base}-n{i}" for i in range(num_nodes)]
        self.bridge = f"{prefix}br"
        self._created: list[str] = []  # namespaces that exist because of us, in creation order
        self._lock = threading.RLock()
        self._old_handlers: dict[int, object] = {}
        self._atexit: Callable[[], None] | None = None
        self._active = False

    # ------------------------------------------------------------------ naming
    def _check(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_nodes:
            raise IndexError(f"node index must be in 0 .. {self.num_nodes - 1}, got {i!r}")
        return i

    def namespace(self, i: int) -> str:
        """Name of node ``i``'s network namespace (a file under ``/var/run/netns``)."""
        return self._namespaces[self._check(i)]

    def node_address(self, i: int) -> str:
        """IPv4 address of node ``i`` inside the emulated network: ``10.77.0.(i+1)``."""
        return str(SUBNET.network_address + self._check(i) + 1)

    def interface(self, i: int) -> str:
        """Name of node ``i``'s veth end inside its namespace (the same name in every node namespace)."""
        self._check(i)
        return f"{self.prefix}n{i}"

    def _hub_interface(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    @property
    def active(self) -> bool:
        """Whether :meth:`setup` completed and :meth:`cleanup` has not run yet."""
        return self._active

    def __repr__(self) -> str:
        return (f"EmulatedNetwork(num_nodes={self.num_nodes}, inter_mbit={self.inter_mbit:g}, "
                f"latency_ms={self.latency_ms:g}, hub={self.hub!r}, active={self._active})")

    def __getstate__(self):  # picklable for spawn-started children (they never own or clean anything)
        state = self.__dict__.copy()
        state["_lock"] = None
        state["_old_handlers"] = {}
        state["_atexit"] = None
        state["_created"] = []
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ entering a node
    def enter(self, i: int) -> None:
        """Move the calling thread (the whole process when it has one thread) into node ``i``'s namespace.

        Threads started afterwards inherit it. Meant for a freshly forked worker (e.g. a rank of ``run_ranks``).
        """
        path = os.path.join(NETNS_DIR, self.namespace(i))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise EmulationUnavailable(f"network namespace {path} does not exist (was the network set up / "
                                       f"already cleaned up?)") from None
        try:
            _setns(fd, CLONE_NEWNET)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "EmulatedNetwork":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def _preflight(self) -> None:
        if not _is_root():
            raise EmulationUnavailable(
                "network emulation needs root (CAP_NET_ADMIN/CAP_SYS_ADMIN to create network namespaces, veth "
                f"links and tc qdiscs); this process runs as uid {os.geteuid()}")
        missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
        if missing:
            raise EmulationUnavailable(f"network emulation needs {' and '.join(missing)} from iproute2 "
                                       "(apt-get install iproute2)")
        if not os.path.exists("/proc/self/ns/net"):
            raise EmulationUnavailable("this kernel has no network namespaces (/proc/self/ns/net is missing)")

    def setup(self) -> "EmulatedNetwork":
        """Create namespaces, bridge, veth pairs, addresses and qdiscs. On any failure removes what it made and
        raises :class:`EmulationUnavailable` with the reason."""
        with self._lock:
            if self._active:
                return self
            if os.getpid() != self._owner:
                raise RuntimeError("EmulatedNetwork.setup must run in the process that created the object")
            self._preflight()
            self._install_handlers()
            _claimed.update([self.hub, *self._namespaces])
            try:
                remove_stale(self.prefix)
                self._build()
            except BaseException as e:
                self.cleanup()
                if isinstance(e, RuntimeError) and not isinstance(e, EmulationUnavailable):
                    raise EmulationUnavailable(f"could not set up the emulated network: {e}") from e
                raise
            self._active = True
            return self

    def _add_netns(self, name: str) -> None:
        self._created.append(name)  # first: a half-made namespace is removed too (deleting a missing one is harmless)
        _run(["ip", "netns", "add", name])

    def _build(self) -> None:
        hub = self.hub
        self._add_netns(hub)
        _run(["ip", "-n", hub, "link", "set", "lo", "up"])
        _run(["ip", "-n", hub, "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "-n", hub, "link", "set", self.bridge, "up"])
        for i in range(self.num_nodes):
            ns, node_if, hub_if = self._namespaces[i], self.interface(i), self._hub_interface(i)
            self._add_netns(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # both ends are created directly inside their namespaces: nothing appears in the caller's namespace
            _run(["ip", "link", "add", node_if, "netns", ns, "type", "veth", "peer", "name", hub_if, "netns", hub])
            _run(["ip", "-n", hub, "link", "set", hub_if, "master", self.bridge])
            _run(["ip", "-n", hub, "link", "set", hub_if, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.node_address(i)}/{SUBNET.prefixlen}", "dev", node_if])
            _run(["ip", "-n", ns, "link", "set", node_if, "up"])
            self._shape(ns, node_if)  # node -> hub
            self._shape(hub, hub_if)  # hub -> node
            # no IPv6 chatter (router solicitations, DAD) on the shaped links; best effort
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"], check=False)

    def _shape(self, ns: str, dev: str) -> None:
        rate_bytes = self.inter_mbit * 1e6 / 8
        # bucket: >= 64 KiB (a GSO super-packet) and >= 4 ms of traffic (rate / HZ for any HZ >= 250)
        burst = int(max(64 * 1024, rate_bytes * 0.004))
        # queue: 200 ms of traffic (TCP keeps the link busy without drops), at least 1 MiB
        limit = int(max(1 << 20, rate_bytes * 0.2)) + burst
        rate = f"{self.inter_mbit * 1000:.0f}kbit"
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
              "rate", rate, "burst", str(burst), "limit", str(limit)])
        if self.latency_ms > 0:
            proc = _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                         "delay", f"{self.latency_ms * 1000:.0f}us", "limit", "100000"], check=False)
            if proc.returncode != 0:
                raise EmulationUnavailable(
                    f"latency emulation ({self.latency_ms:g} ms) needs the kernel's sch_netem qdisc, which is not "
                    f"available here ({proc.stderr.strip()}); use latency 0")

    def cleanup(self) -> None:
        """Delete every namespace this object created (their veths, bridge and qdiscs go with them). Idempotent;
        a no-op in any process but the creating one."""
        if os.getpid() != self._owner:
            return
        with self._lock:
            self._active = False
            # node namespaces first, the hub last; deleting a namespace destroys its interfaces (and veth peers)
            while self._created:
                name = self._created.pop()
                _run(["ip", "netns", "delete", name], check=False)
            _claimed.difference_update([self.hub, *self._namespaces])
            self._restore_handlers()

    # ------------------------------------------------------------------ signals / exit
    def _install_handlers(self) -> None:
        if self._atexit is None:
            self._atexit = self.cleanup
            atexit.register(self._atexit)
        if threading.current_thread() is not threading.main_thread() or self._old_handlers:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                if signal.getsignal(sig) == signal.SIG_IGN:  # e.g. SIGINT of a background job: stays ignored
                    continue
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # pragma: no cover - not the main thread of the main interpreter
                pass
        _live.add(self)

    def _put_back_handlers(self) -> None:
        """Reinstate the signal handlers this network replaced (where ours is still the one installed)."""
        for sig, old in list(self._old_handlers.items()):
            try:
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, old)
            except (ValueError, OSError, TypeError):  # pragma: no cover
                pass
        self._old_handlers = {}

    def _drop_handlers_in_child(self) -> None:
        self._put_back_handlers()
        self._created = []
        _live.discard(self)

    def _restore_handlers(self) -> None:
        _live.discard(self)
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if threading.current_thread() is not threading.main_thread():
            return
        self._put_back_handlers()

    def _on_signal(self, signum, frame) -> None:
        old = self._old_handlers.get(signum, signal.SIG_DFL)
        if os.getpid() == self._owner:
            self.cleanup()  # also puts the previous handlers back
        if callable(old):
            old(signum, frame)  # e.g. default_int_handler raises KeyboardInterrupt
        elif old == signal.SIG_IGN:
            return
        else:  # SIG_DFL: exit like the default action would, but through Python (finally blocks still run)
            raise SystemExit(128 + signum)
