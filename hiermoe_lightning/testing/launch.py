"""Run ``fn(rank, world_size, *args)`` on N processes joined by a gloo process group on 127.0.0.1.

Processes are forked (fast: no re-import) and every rank gets a short process-group timeout; the parent kills all
ranks when one fails or the wall-clock ``timeout`` passes, so a hang fails fast instead of blocking a test run.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from ..bench.netem import EmulatedNetwork

__all__ = ["run_ranks", "free_port", "RankFailure"]


class RankFailure(RuntimeError):
    """A rank raised, crashed or timed out; the message holds its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, pg_timeout, outdir, args, kwargs, netns=None, ranks_per_node=None):
    code = 0
    try:
        torch.set_num_threads(1)
        host = "127.0.0.1"
        if netns is not None:
            node = rank // ranks_per_node
            netns.enter(node)  # this process's sockets now live in node `node`'s namespace
            os.environ["GLOO_SOCKET_IFNAME"] = netns.interface(node)  # this child's own environment only
            host = netns.node_address(0)  # rank 0 (node 0) hosts the rendezvous store
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        result = fn(rank, world_size, *args, **kwargs)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        code = 1
    finally:
        try:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 60.0, pg_timeout: float = 30.0,
              start_method: str = "fork", netns: "EmulatedNetwork | None" = None, ranks_per_node: int | None = None,
              **kwargs) -> list[Any]:
    """Run ``fn`` on ``world_size`` ranks; return each rank's return value (torch.save-able), rank order.

    Raises ``RankFailure`` with the first failing rank's traceback (or a timeout message) after killing the others.

    With ``netns`` (an active :class:`~hiermoe_lightning.bench.netem.EmulatedNetwork`) rank ``r`` first joins node
    ``r // ranks_per_node``'s network namespace, binds gloo to that node's interface and meets the others at
    ``tcp://<node 0's address>:<port>``: ranks of one node talk over their namespace's loopback, ranks of different
    nodes over the emulated (rate-limited) links.
    """
    child_extra: tuple = ()
    if netns is not None:
        if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be an int >= 1 with netns, got {ranks_per_node!r}")
        if world_size % ranks_per_node or world_size // ranks_per_node != netns.num_nodes:
            raise ValueError(f"world_size {world_size} must be ranks_per_node {ranks_per_node} x the emulated "
                             f"network's {netns.num_nodes} nodes")
        child_extra = (netns, ranks_per_node)
    elif ranks_per_node is not None:
        raise ValueError("ranks_per_node is only meaningful together with netns")
    ctx = mp.get_context(start_method)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hiermoe-ranks-") as outdir:
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, pg_timeout, outdir, args, kwargs,
                                                  *child_extra), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed = None
        while time.monotonic() < deadline:
            alive = [p for p in procs if p.exitcode is None]
            bad = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if not alive:
                break
            time.sleep(0.005)
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
        errors = {r: open(os.path.join(outdir, f"rank{r}.err")).read()
                  for r in range(world_size) if os.path.exists(os.path.join(outdir, f"rank{r}.err"))}
        if errors:
            # the root cause is usually the rank whose error is not a peer's disconnect
            primary = [r for r, e in errors.items() if "Connection closed by peer" not in e and "Connection reset" not in e]
            r = min(primary or errors)
            raise RankFailure(f"rank {r} of {world_size} failed (ranks with errors: {sorted(errors)}):\n{errors[r]}")
        if failed is not None:
            raise RankFailure(f"rank {failed} of {world_size} exited with code {procs[failed].exitcode}")
        missing = [r for r in range(world_size) if not os.path.exists(os.path.join(outdir, f"rank{r}.pt"))]
        if missing:
            raise RankFailure(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
