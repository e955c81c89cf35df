"""Migration executor: experts move with their weights, gradients and optimizer moments; nothing is lost on failure."""

import torch

from hiermoe_lightning import ExpertParallel, MoELayer
from hiermoe_lightning.checkpoint import gather_full
from hiermoe_lightning.placement import Placement
from hiermoe_lightning.placement.migrate import migrate_
from hiermoe_lightning.testing import run_ranks


def _trained_layer(rank, opt_cls=torch.optim.Adam):
    layer = MoELayer(8, 12, 8, 3, seed=4)
    ExpertParallel("2x2", dispatch="hd2").shard_(layer)
    opt = opt_cls(layer.parameters(), lr=1e-2, **({"momentum": 0.9} if opt_cls is torch.optim.SGD else {}))
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        layer(torch.randn(6, 8, generator=g)).pow(2).sum().backward()
        opt.step()
    layer(torch.randn(6, 8, generator=g)).pow(2).sum().backward()  # leave gradients in place too
    return layer, opt


def _full_state(layer, opt):
    out = {}
    for name in ("w_gate", "w_up", "w_down"):
        p = getattr(layer.experts, name)
        out[name] = gather_full(p.data, layer)
        out[name + ".grad"] = gather_full(p.grad, layer)
        for key, t in opt.state[p].items():
            if t.dim() > 0:
                out[f"{name}.{key}"] = gather_full(t, layer)
    return out


def _migrate(rank, world, opt_name):
    opt_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[opt_name]
    layer, opt = _trained_layer(rank, opt_cls)
    probe = torch.randn(5, 8, generator=torch.Generator().manual_seed(99))
    before_out = layer(probe).detach()
    before = _full_state(layer, opt)
    params = [id(p) for p in layer.experts.slot_parameters()]
    new = Placement.from_ranks(torch.tensor([3, 2, 1, 0, 0, 1, 2, 3]), 4).swapped(0, 5)
    stats = migrate_([layer], [new], opt)
    after = _full_state(layer, opt)
    return {
        "moved": stats.moved_experts,
        "same_state": all(torch.equal(before[k], after[k]) for k in before),
        "keys": sorted(before),
        "same_params": params == [id(p) for p in layer.experts.slot_parameters()]
        and all(any(p is q for q in opt.param_groups[0]["params"]) for p in layer.experts.slot_parameters()),
        "same_output": torch.allclose(layer(probe).detach(), before_out, atol=1e-6),
        "local": layer.local_expert_ids().tolist(),
    }


def test_migration_moves_weights_grads_and_optimizer_state_in_place():
    for opt_name, state_key in (("adam", "w_gate.exp_avg_sq"), ("sgd", "w_gate.momentum_buffer")):
        res = run_ranks(_migrate, 4, opt_name)
        for rank, r in enumerate(res):
            assert r["same_state"] and r["same_params"] and r["same_output"], (opt_name, rank, r)
            assert state_key in r["keys"] and "w_up.grad" in r["keys"]
            assert r["moved"] == 6  # experts 0, 1, 3, 4, 5, 6 change rank
        assert sorted(e for r in res for e in r["local"]) == list(range(8))


def _failure(rank, world):
    import hiermoe_lightning.placement.migrate as mig

    layer, opt = _trained_layer(rank)
    before = {n: getattr(layer.experts, n).detach().clone() for n in ("w_gate", "w_up", "w_down")}
    old_placement = layer.placement
    real = mig.start_exchange

    class _Broken:
        def wait(self):  # the exchange was posted, then a link failed: every rank alike
            raise RuntimeError("link down")

    def flaky(payloads, peers):
        real(payloads, peers).wait()  # keep the ranks in step, then fail before anything is committed
        return _Broken()

    mig.start_exchange = flaky
    try:
        migrate_([layer], [Placement.contiguous(8, 4).swapped(0, 7)], opt)
    except RuntimeError as e:
        err = str(e)
    finally:
        mig.start_exchange = real
    unchanged = all(torch.equal(before[n], getattr(layer.experts, n)) for n in before)
    try:
        migrate_([layer], [Placement.contiguous(8, 4)], torch.optim.RMSprop(layer.parameters()))
        unsupported = None
    except ValueError as e:
        unsupported = str(e)
    return {"err": err, "unchanged": unchanged, "placement_kept": layer.placement is old_placement,
            "unsupported": unsupported}


def test_failed_migration_leaves_old_placement_and_weights_and_unknown_optimizer_is_refused():
    for r in run_ranks(_failure, 4):
        assert r["err"] == "link down" and r["unchanged"] and r["placement_kept"]
        assert "RMSprop" in r["unsupported"] and "Adam" in r["unsupported"]


def _packed(rank, world):
    import hiermoe_lightning.placement.migrate as mig
    from hiermoe_lightning import ExpertParallel
    from hiermoe_lightning.dispatch.comm import all_to_all_rows

    peers = ExpertParallel(str(world), dispatch="flat").peer_group("a2a")
    g = torch.Generator().manual_seed(rank)
    pieces = []
    for shape, dtype in (((3, 2), torch.float32), ((5,), torch.bfloat16), ((2, 2, 2), torch.float64),
                         ((4,), torch.float32)):
        send = [(rank + p + len(shape)) % 3 for p in range(world)]  # rows to peer p (0 included)
        recv = [(p + rank + len(shape)) % 3 for p in range(world)]  # what peer p sends here
        pieces.append((torch.randn(sum(send), *shape, generator=g).to(dtype), send, recv))
    got = mig._exchange_packed(pieces, peers)
    want = [all_to_all_rows(x, s, r, peers) for x, s, r in pieces]
    return [(a.dtype == b.dtype, a.shape == b.shape, torch.equal(a, b)) for a, b in zip(got, want)]


def test_one_packed_exchange_per_dtype_delivers_what_one_all_to_all_per_tensor_does():
    for rank_result in run_ranks(_packed, 4):
        assert rank_result == [(True, True, True)] * 4


def _started(rank, world, end):
    """A migration started and left in flight, then ended by ``end``: a forward, a state_dict, an explicit settle,
    or abandon."""
    from hiermoe_lightning.placement.migrate import start_migration

    layer, opt = _trained_layer(rank)
    probe = torch.randn(5, 8, generator=torch.Generator().manual_seed(99))
    before_out = layer(probe).detach()
    before = _full_state(layer, opt)
    raw = {n: getattr(layer.experts, n).detach().clone() for n in ("w_gate", "w_up", "w_down")}
    old_placement = layer.placement
    new = Placement.from_ranks(torch.tensor([3, 2, 1, 0, 0, 1, 2, 3]), 4).swapped(0, 5)
    flight = start_migration([layer], [new], opt)
    # in flight: the payload has left, nothing of the model has changed
    untouched = (layer.placement is old_placement and layer.expert_parallel.migration_in_flight is flight
                 and all(torch.equal(raw[n], getattr(layer.experts, n)) for n in raw))
    out = {"untouched_in_flight": untouched}
    if end == "forward":
        out["same_output"] = torch.allclose(layer(probe).detach(), before_out, atol=1e-6)
    elif end == "state_dict":
        out["keys"] = len(layer.state_dict())
    elif end == "settle":
        first = flight.settle()
        out["idempotent"] = flight.settle() is first
        out["exposed_le_wall"] = 0.0 < first.exposed_seconds <= first.seconds
    elif end == "abandon":
        flight.abandon()
        try:
            flight.settle()
            out["settle_after_abandon"] = None
        except RuntimeError as e:
            out["settle_after_abandon"] = str(e)
        out["old_kept"] = (layer.placement is old_placement
                           and all(torch.equal(raw[n], getattr(layer.experts, n)) for n in raw))
        return out
    out["settled"] = flight.settled and layer.expert_parallel.migration_in_flight is None
    out["moved"] = layer.placement == new
    after = _full_state(layer, opt)
    out["same_state"] = all(torch.equal(before[k], after[k]) for k in before)
    return out


def test_migration_in_flight_changes_nothing_until_something_needs_the_experts():
    """``start_migration`` posts the payload and returns; the layer keeps its old placement and tensors until its
    forward, its ``state_dict`` or an explicit ``settle`` commits the move, after which the full state (weights,
    gradients, Adam moments, gathered unsharded) and the layer's function are those before the move. ``abandon``
    keeps the old placement and a later settle says why it cannot."""
    for end in ("forward", "state_dict", "settle"):
        for rank, r in enumerate(run_ranks(_started, 4, end)):
            assert r["untouched_in_flight"] and r["settled"] and r["moved"] and r["same_state"], (end, rank, r)
            if end == "forward":
                assert r["same_output"], rank
            if end == "settle":
                assert r["idempotent"] and r["exposed_le_wall"], r
    for r in run_ranks(_started, 4, "abandon"):
        assert r["untouched_in_flight"] and r["old_kept"], r
        assert "abandoned" in r["settle_after_abandon"] and "old placement stayed" in r["settle_after_abandon"]


def _disagree(rank, world):
    from hiermoe_lightning.placement.migrate import start_migration

    layer, opt = _trained_layer(rank)
    if rank == 1:
        layer.experts.w_up.grad = None  # this rank alone has no gradient to move: the payload layouts would differ
    old = layer.placement
    try:
        start_migration([layer], [Placement.contiguous(8, 4).swapped(0, 7)], opt)
        return None
    except ValueError as e:
        return {"err": str(e), "kept": layer.placement is old and layer.expert_parallel.migration_in_flight is None}


def test_ranks_that_disagree_on_which_tensors_exist_refuse_before_any_payload_moves():
    for r in run_ranks(_disagree, 4):
        assert r is not None and r["kept"], r
        assert "ranks disagree on which gradients / optimizer states exist" in r["err"]
