"""Emulated multi-node network (``hiermoe_lightning.bench.netem``) and its use by ``run_ranks`` / ``bench comm``.

These tests create real network namespaces, veth pairs and tc qdiscs: they need root (CI runs them as root).
Every namespace they make is named ``hmoe-<pid>-<k>-...`` or ``hmoet-...`` and removed again.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

from hiermoe_lightning.bench import comm, netem
from hiermoe_lightning.bench.netem import EmulatedNetwork, EmulationUnavailable
from hiermoe_lightning.cli import main as cli
from hiermoe_lightning.testing import launch
from hiermoe_lightning.testing.launch import run_ranks

SMALL = ["--topology", "2x2", "--num-experts", "8", "--top-k", "2", "--hidden-size", "32",
         "--tokens-per-rank", "32", "--dispatch", "flat,hd2,auto", "--iters", "2", "--warmup", "1", "--timeout", "60"]


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _mine() -> set[str]:
    """Namespaces of EmulatedNetworks made by this process (other sessions may run emulations concurrently)."""
    return {n for n in _netns() if n.startswith(f"hmoe-{os.getpid()}-")}


def _ip(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "-n", ns, *argv], capture_output=True, text=True, timeout=10, check=True).stdout


def _tc(ns: str, dev: str) -> str:
    return subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True, timeout=10,
                          check=True).stdout


@pytest.fixture
def no_leftovers():
    before = _mine()
    yield
    assert _mine() - before == set(), "namespaces left behind"


def test_namespaces_links_and_shaping_then_fully_removed(no_leftovers):
    before = _mine()
    net = EmulatedNetwork(3, 200)
    with net as same:
        assert same is net and net.active
        names = [net.namespace(i) for i in range(3)]
        assert set(names) | {net.hub} <= _netns()
        assert len(set(names)) == 3 and all(str(os.getpid()) in n for n in names + [net.hub])
        for i, ns in enumerate(names):
            assert net.node_address(i) == f"10.77.0.{i + 1}"
            addr = _ip(ns, "-4", "addr", "show", "dev", net.interface(i))
            assert f"inet 10.77.0.{i + 1}/24" in addr
            assert "state UP" in _ip(ns, "link", "show", "lo") or "LOOPBACK,UP" in _ip(ns, "link", "show", "lo")
            assert "tbf" in _tc(ns, net.interface(i)) and "rate 200Mbit" in _tc(ns, net.interface(i))  # node -> hub
            hub_if = f"{net.prefix}h{i}"
            assert "tbf" in _tc(net.hub, hub_if) and "rate 200Mbit" in _tc(net.hub, hub_if)  # hub -> node
            assert f"master {net.bridge}" in _ip(net.hub, "link", "show", hub_if)
        # a second instance (same process) gets other names: concurrent runs do not collide
        with EmulatedNetwork(1, 10) as other:
            assert other.namespace(0) not in names and other.hub != net.hub
        # nothing of ours in the caller's namespace
        assert net.interface(0) not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert not net.active
    assert _mine() == before
    net.cleanup()  # idempotent
    with pytest.raises(IndexError):
        net.node_address(3)


def test_removed_after_exception_and_after_partial_setup(monkeypatch, no_leftovers):
    before = _mine()
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(ZeroDivisionError):
        with EmulatedNetwork(2, 100) as net:
            assert net.hub in _netns()
            1 / 0
    assert _mine() == before

    calls = []

    def failing_shape(self, ns, dev):
        calls.append(dev)
        if len(calls) == 3:  # node 1's first qdisc: node 0 is complete, node 1 half built
            raise RuntimeError("simulated tc failure")

    monkeypatch.setattr(EmulatedNetwork, "_shape", failing_shape)
    with pytest.raises(EmulationUnavailable, match="simulated tc failure"):
        with EmulatedNetwork(2, 100):
            pytest.fail("body ran after a failed setup")
    assert len(calls) == 3 and _mine() == before
    # handlers are put back
    assert signal.getsignal(signal.SIGINT) is handler


def _child_check(net, term_before, int_before):
    # the owner's handlers are gone in a forked child (a rank blocked in gloo must die on SIGTERM at once) ...
    assert signal.getsignal(signal.SIGTERM) == term_before and signal.getsignal(signal.SIGINT) == int_before
    net.cleanup()  # ... and cleanup there is a no-op


def test_forked_child_never_cleans_up_and_has_old_handlers(no_leftovers):
    term_before, int_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with EmulatedNetwork(1, 100) as net:
        assert signal.getsignal(signal.SIGTERM) == net._on_signal
        p = mp.get_context("fork").Process(target=_child_check, args=(net, term_before, int_before))
        p.start()
        p.join(10)
        assert p.exitcode == 0 and net.namespace(0) in _netns()
        assert signal.getsignal(signal.SIGTERM) == net._on_signal  # the parent keeps them
    assert signal.getsignal(signal.SIGTERM) == term_before


def test_remove_stale_only_dead_owners(no_leftovers):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"hmoe-{dead.pid}-0-n0"
    reused = f"hmoe-{os.getpid()}-999999-hub"  # our pid, but no instance of ours holds it: a reused pid's leftover
    other = f"hmoet-{dead.pid}-0-n0"  # not our naming: never touched
    for name in (stale, reused, other):
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        with EmulatedNetwork(1, 100) as net:  # setup sweeps stale namespaces of dead owners
            assert stale not in _netns() and reused not in _netns() and other in _netns() and net.hub in _netns()
            with EmulatedNetwork(1, 100) as inner:  # a live instance of this process is never swept
                assert net.hub in _netns() and inner.hub in _netns()
    finally:
        for name in (stale, reused, other):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_signal_cleans_up(sig, code, no_leftovers):
    # load netem.py alone (no package import: torch/lightning would take seconds)
    script = textwrap.dedent(f"""
        import importlib.util, signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if our runner ignores SIGINT
        spec = importlib.util.spec_from_file_location("netem_alone", {netem.__file__!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        EmulatedNetwork = mod.EmulatedNetwork
        try:
            with EmulatedNetwork(2, 100, prefix="hmoet") as net:
                print(net.hub, flush=True)
                time.sleep(30)
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        hub = proc.stdout.readline().strip()
        assert hub.startswith(f"hmoet-{proc.pid}-") and hub in _netns()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not {n for n in _netns() if n.startswith(f"hmoet-{proc.pid}-")}


def _netns_id() -> str:
    return os.readlink("/proc/self/ns/net")


def _allreduce_fn(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t), _netns_id(), os.environ.get("GLOO_SOCKET_IFNAME")


def test_run_ranks_all_reduce_across_namespaces(no_leftovers):
    env_before = os.environ.get("GLOO_SOCKET_IFNAME")
    with EmulatedNetwork(2, 100) as net:
        out = run_ranks(_allreduce_fn, 4, netns=net, ranks_per_node=2, timeout=120, pg_timeout=120)
    assert [o[0] for o in out] == [10.0] * 4
    ns = [o[1] for o in out]
    assert ns[0] == ns[1] and ns[2] == ns[3] and ns[0] != ns[2] and _netns_id() not in ns
    assert [o[2] for o in out] == [net.interface(0)] * 2 + [net.interface(1)] * 2
    assert os.environ.get("GLOO_SOCKET_IFNAME") == env_before  # the parent's environment is untouched
    with pytest.raises(ValueError, match="ranks_per_node"):
        run_ranks(_allreduce_fn, 4, netns=net, ranks_per_node=3)
    with pytest.raises(ValueError, match="only meaningful"):
        run_ranks(_allreduce_fn, 4, ranks_per_node=2)


def _tbf_sent_bytes(ns: str, dev: str) -> int:
    """Bytes that went out through the tbf qdisc (the rate limiter) of ``dev`` in namespace ``ns``."""
    out = subprocess.run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return sum(int(m.group(1)) for m in re.finditer(r"qdisc tbf .*?\n\s*Sent (\d+) bytes", out))


INTRA_REPEATS = 3


def _transfer_fn(rank, world, nbytes, shapers):
    """Rank ``a`` sends ``nbytes`` to rank ``b`` and waits for a one-float ack, per phase; rank 0 also reads how many
    bytes went through the rate limiters (every tbf of the emulated network) during each phase."""
    big = torch.zeros(nbytes // 4)
    ack = torch.zeros(1)
    times, shaped = {}, {}
    phases = [("intra", (0, 1))] * INTRA_REPEATS + [("inter", (0, 2))] + [("intra2", (2, 3))] * INTRA_REPEATS
    for name, (a, b) in phases:
        dist.barrier()
        before = sum(_tbf_sent_bytes(*s) for s in shapers) if rank == 0 else 0
        start = time.perf_counter()
        if rank == a:
            dist.send(big, b)
            dist.recv(ack, b)
        elif rank == b:
            dist.recv(big, a)
            dist.send(ack, a)
        times.setdefault(name, []).append(time.perf_counter() - start)
        dist.barrier()  # the phase's transfer is over on every rank
        if rank == 0:
            shaped.setdefault(name, []).append(sum(_tbf_sent_bytes(*s) for s in shapers) - before)
    return times, shaped


def test_rate_limit_between_nodes_not_within(no_leftovers):
    """Checked by bytes and by a lower bound, which load on the machine cannot break: the payload between nodes goes
    through both rate limiters of its path and takes at least the time the rate allows; the payload within a node
    goes through none. Its time is only compared with the inter-node time of the same payload in the same run,
    with a wide margin (the best of a few repeats: a loaded machine delays single transfers by a scheduling slice)."""
    nbytes, mbit = 2 * 1024 * 1024, 20  # 2 MiB at 20 Mbit/s: 0.84 s of payload; within a node, a few ms
    with EmulatedNetwork(2, mbit) as net:
        shapers = [(net.namespace(i), net.interface(i)) for i in range(2)]
        shapers += [(net.hub, f"{net.prefix}h{i}") for i in range(2)]
        out = run_ranks(_transfer_fn, 4, nbytes, shapers, netns=net, ranks_per_node=2, timeout=120, pg_timeout=120)
    times, shaped = out[0][0], out[0][1]
    inter, intra, intra2 = times["inter"][0], min(times["intra"]), min(out[2][0]["intra2"])
    # bytes: node 0 -> hub -> node 1 crosses two limiters; within a node nothing but barrier chatter reaches one
    assert shaped["inter"][0] >= 2 * nbytes, shaped
    assert max(shaped["intra"] + shaped["intra2"]) < nbytes // 16, shaped
    # time floor: each tbf lets its bucket (burst) through at once, the rest at the rate (TCP headers only add)
    burst = max(64 * 1024, mbit * 1e6 / 8 * 0.004)
    floor = (nbytes - 2 * burst) * 8 / (mbit * 1e6)
    assert inter >= floor, f"2 MiB crossed a {mbit} Mbit/s link in {inter:.3f} s < {floor:.3f} s: rate not limited"
    # not grossly slower than the rate (tc's configured rate string is checked exactly elsewhere): a stall or a
    # unit slip, not load, would take 10x
    assert inter < 10 * nbytes * 8 / (mbit * 1e6), f"2 MiB at {mbit} Mbit/s took {inter:.3f} s"
    # within a node: not limited, i.e. far faster than the same payload between nodes in this very run
    assert max(intra, intra2) < inter / 4, (inter, times["intra"], out[2][0]["intra2"])


def test_latency_needs_netem_or_works(no_leftovers):
    try:
        with EmulatedNetwork(2, 100, latency_ms=5) as net:
            assert "netem" in _tc(net.namespace(0), net.interface(0))
    except EmulationUnavailable as e:  # this kernel may lack sch_netem: a clear reason, nothing left behind
        assert "netem" in str(e)


def test_not_root_raises_and_cli_exits_3(monkeypatch, capsys, no_leftovers):
    monkeypatch.setattr(netem, "_is_root", lambda: False)
    before = _mine()
    with pytest.raises(EmulationUnavailable, match="needs root"):
        with EmulatedNetwork(2, 100):
            pytest.fail("ran without root")
    assert isinstance(EmulationUnavailable("x"), RuntimeError) and _mine() == before
    monkeypatch.setattr(comm, "run_ranks", lambda *a, **k: pytest.fail("spawned ranks without emulation"))
    assert cli.main(["bench", "comm", *SMALL, "--emulate-inter-mbit", "100", "--json"]) == 3
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == ""
    assert len(err) == 1 and "--emulate-inter-mbit" in err[0] and "needs root" in err[0], err


def test_bench_comm_emulated_json(capsys, no_leftovers):
    assert cli.main(["bench", "comm", *SMALL, "--emulate-inter-mbit", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["emulation"]["inter_mbit"] == 100 and report["emulation"]["latency_ms"] == 0.0
    assert report["emulation"]["ranks_per_node"] == 2
    lb_bytes = report["lower_bound"]["bytes_by_level"]["level1"]
    # 2 symmetric-ish nodes: the busiest node link carries at least half of the level-1 lower bound
    assert report["lower_bound"]["busiest_node_level1_bytes"] >= lb_bytes / 2
    assert report["lower_bound_ms"] == pytest.approx(
        report["lower_bound"]["busiest_node_level1_bytes"] * 8 / 100e6 * 1e3)
    assert "busiest" in report["lower_bound_note"]
    for name, r in report["results"].items():
        assert {"median_ms", "p90_ms", "predicted_ms", "bytes_by_level"} <= set(r)
        assert r["max_abs_err"] < 1e-4
        assert r["wire_ms"] >= report["lower_bound_ms"] - 1e-9
        assert r["vs_lower_bound"] == pytest.approx(r["median_ms"] / report["lower_bound_ms"])
    assert report["results"]["hd2"]["busiest_node_level1_bytes"] * 8 / 100e6 * 1e3 == pytest.approx(
        report["results"]["hd2"]["wire_ms"])
    with pytest.raises(ValueError, match="--emulate-latency-ms"):
        comm.run(comm.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
            [*SMALL, "--emulate-latency-ms", "5"]))


def test_sigterm_during_run_ranks_ends_ranks_and_cleans_up(no_leftovers, tmp_path):
    """A rank blocked inside a gloo collective must not outlive its parent's SIGTERM (nor keep a namespace)."""
    # netem.py and launch.py loaded alone: importing the package (lightning) would take several seconds
    script = textwrap.dedent(f"""
        import importlib.util, os, time
        import torch.distributed as dist

        def load(name, path):
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod

        EmulatedNetwork = load("netem_alone", {netem.__file__!r}).EmulatedNetwork
        run_ranks = load("launch_alone", {launch.__file__!r}).run_ranks

        def fn(rank, world):
            os.write(1, f"pid {{os.getpid()}}\\n".encode())  # one write: lines of the 4 ranks never interleave
            if rank == 0:
                dist.barrier()  # blocks in C++ until the others come: they never do
            else:
                time.sleep(60)

        with EmulatedNetwork(2, 100, prefix="hmoet") as net:
            run_ranks(fn, 4, netns=net, ranks_per_node=2, timeout=60, pg_timeout=60)
    """)
    err_path = tmp_path / "stderr.txt"
    err_file = open(err_path, "w")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, stderr=err_file)
    err_file.close()

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:  # gone, or vanished between open and read (ESRCH)
            return False

    pids = []
    try:
        while len(pids) < 4:
            line = proc.stdout.readline()
            assert line, f"the script ended early: {err_path.read_text()[-3000:]}"
            if line.startswith("pid "):
                pids.append(int(line.split()[1]))
        mine = {n for n in _netns() if n.startswith(f"hmoet-{proc.pid}-")}
        assert len(mine) == 3
        time.sleep(0.3)  # rank 0 inside the barrier
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 15
        assert not {n for n in _netns() if n.startswith(f"hmoet-{proc.pid}-")}
        deadline = time.monotonic() + 5
        while any(running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(running(p) for p in pids), "a rank outlived its parent"
    finally:  # after a failure only: our own processes by pid, our own namespaces by name
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in pids:
            if running(p):
                os.kill(p, signal.SIGKILL)
        for n in {n for n in _netns() if n.startswith(f"hmoet-{proc.pid}-")}:
            subprocess.run(["ip", "netns", "delete", n], capture_output=True, timeout=10)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="network emulation needs root")
def test_wire_floor_example_cannot_beat_the_link():
    """examples/wire_floor.py: the lower-bound traffic alone takes at least its wire time (less the tbf burst), and
    not wildly more: the floor that docs/benchmarks.md compares the dispatches against. The lower bound is the
    test (load cannot make a shaped link faster); the upper one only catches a stall or a unit slip (8x, 1000x),
    not a loaded machine."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "wire_floor", Path(__file__).resolve().parents[2] / "examples" / "wire_floor.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    median_ms, bound_ms = example.measure(1000, 2.0, iters=2, warmup=1)
    assert bound_ms == pytest.approx(2 * 2 * 2 * (1 << 20) / 125e6 * 1e3)
    assert 0.85 * bound_ms < median_ms < 10 * bound_ms, (median_ms, bound_ms)


def test_dispatch_timeline_example_splits_the_dispatch_window():
    """examples/dispatch_timeline.py on loopback: its parts sum to the dispatch window, level-1 payloads cross once per
    chunk each way, and the traced events are in time order."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "dispatch_timeline", Path(__file__).resolve().parents[2] / "examples" / "dispatch_timeline.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    ranks = example.measure("hd2", chunks=2, top_k=4, hidden=32, tokens=64, iters=2)
    assert len(ranks) == 4
    for r in ranks:
        parts = r["planning_ms"] + r["crossing_ms"] + r["after_ms"]
        assert r["dispatch_ms"] == pytest.approx(parts)
        assert min(r["planning_ms"], r["crossing_ms"], r["after_ms"]) >= 0 and r["combine_ms"] > 0
        slow_posts = [e for e in r["events"] if e[0] == "post" and e[2] == 1 and e[3] > len(e[1])]
        assert len(slow_posts) == 2 * 2  # two chunks out (dispatch), two back (combine)
        assert [e[4] for e in r["events"]] == sorted(e[4] for e in r["events"])


def _channels_fn(rank, world):
    from hiermoe_lightning import ExpertParallel

    ep = ExpertParallel("2x2", dispatch="flat")
    return {phase: ep.peer_group(phase).shm is not None for phase in ("a2a", "inter1", "intra1")}


def test_shared_memory_only_within_an_emulated_node(no_leftovers):
    # ranks of one node (one network namespace) share memory; groups spanning nodes keep to the emulated links
    with EmulatedNetwork(2, 1000) as net:
        out = run_ranks(_channels_fn, 4, netns=net, ranks_per_node=2, timeout=60, pg_timeout=30)
    assert out == [{"a2a": False, "inter1": False, "intra1": True}] * 4
    plain = run_ranks(_channels_fn, 4, timeout=60, pg_timeout=30)  # one namespace: every group shares memory
    assert plain == [{"a2a": True, "inter1": True, "intra1": True}] * 4
