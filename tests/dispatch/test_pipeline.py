"""Pipelined dispatch (``pipeline_chunks > 1``) and the split by first phase: the same function and the same bytes
as one pass; the runner's schedule (slowest link posted first, fastest waited for first, one tag range per
exchange); rows as blocks."""

import pytest
import torch

import hiermoe_lightning.dispatch.engine as engine
from hiermoe_lightning import ExpertParallel
from hiermoe_lightning.dispatch.comm import PeerGroup
from tests.sharded import Case, assert_matches_reference, run_sharded


@pytest.mark.parametrize("chunks", [2, 3])
def test_pipelined_dispatch_matches_reference_on_2x2(chunks):
    cases = []
    for i, name in enumerate(["flat", "2dh", "hd1", "hd2"]):
        kw = {"pipeline_chunks": chunks}
        cases += [
            Case("2x2", name, 8, 2, [6, 2, 5, 1], seed=i, parallel_kwargs=kw),   # ranks with fewer tokens than chunks
            Case("2x2", name, 16, 8, [7, 4, 0, 9], seed=i + 20, parallel_kwargs=kw),  # a rank without tokens
            Case("2x2", name, 8, 5, [3, 3, 3, 3], seed=i + 30, force_expert=2, parallel_kwargs=kw),
        ]
    results = run_sharded(4, cases)
    for i, case in enumerate(cases):
        per_rank = [r[i] for r in results]
        # one-hop routes are not pipelined; multi-hop: the chunks of pairs leaving in the first phase, the pairs
        # staying in the node, the pairs staying on the rank
        expected = 1 if case.dispatch in ("flat", "hd1") else chunks + 2
        assert all(r["num_chunks"] == expected for r in per_rank)
        assert_matches_reference(case, per_rank)


def test_pipelined_three_levels_and_bf16_match_reference():
    cases = [Case("2x2x2", name, 16, 6, [5, 0, 2, 7, 1, 3, 6, 2], seed=i, parallel_kwargs={"pipeline_chunks": 4})
             for i, name in enumerate(["2dh", "hd2", "hd3"])]
    results = run_sharded(8, cases, timeout=120)
    for i, case in enumerate(cases):
        assert_matches_reference(case, [r[i] for r in results])
    bf16 = [Case("2x2", "hd2", 8, 4, [5, 2, 4, 3], dtype=torch.bfloat16, seed=3, parallel_kwargs={"pipeline_chunks": 2})]
    results = run_sharded(4, bf16)
    assert_matches_reference(bf16[0], [r[0] for r in results], atol=3e-2, rtol=3e-2)


def test_pipelining_moves_exactly_the_bytes_of_one_pass():
    """Dedup only merges copies of one token, and a token lives in one chunk: chunking must not add bytes."""
    base = [Case("2x2", name, 16, 6, [40, 33, 0, 27], seed=5) for name in ("flat", "2dh", "hd1", "hd2")]
    piped = [Case(c.topology, c.dispatch, c.num_experts, c.top_k, c.tokens, seed=c.seed,
                  parallel_kwargs={"pipeline_chunks": 3}) for c in base]
    results = run_sharded(4, base + piped)
    n = len(base)
    for i in range(n):
        for r in results:
            assert r[i]["bytes"] == r[n + i]["bytes"], base[i].dispatch
            assert [(p["name"], p["rows_sent"], p["rows_recv"]) for p in r[i]["phases"]] == \
                   [(p["name"], p["rows_sent"], p["rows_recv"]) for p in r[n + i]["phases"]], base[i].dispatch


def test_pipeline_chunks_is_validated():
    with pytest.raises(ValueError, match="pipeline_chunks"):
        ExpertParallel("2x2", pipeline_chunks=0)
    with pytest.raises(ValueError, match="pipeline_chunks"):
        ExpertParallel("2x2", pipeline_chunks=True)


# ---------------------------------------------------------------------------- the schedule, without processes
def _program(name, groups, log, levels=None, shared=()):
    """A fake chunk program: one exchange per group in turn (groups in ``shared`` marked as shared-memory ones);
    returns what it received."""
    got = []
    for i, g in enumerate(groups):
        peers = PeerGroup(g, 1, 0, (0,), shm=object() if g in shared else None)
        level = 0 if levels is None else levels[i]
        (out,) = yield engine._Exchange(peers, [(torch.tensor([[len(got)]]), [1], [1])], level)
        log.append((name, g))
        got.append(int(out))
    return name, got


def _recording(monkeypatch) -> list:
    posted = []
    real = engine.start_exchange

    def recording(payloads, peers, tag=0):
        posted.append((peers.group, tag))
        return real(payloads, peers, tag)

    monkeypatch.setattr(engine, "start_exchange", recording)
    return posted


INTER, INTRA = "inter", "intra"


@pytest.mark.parametrize("hops, levels, posted_expected, log_expected", [
    # dispatch-like: both chunks' inter-node payloads leave at once, back to back (each exchange on a group has its
    # own tags, 8 per exchange, numbered alike on every rank); the staying program's hop starts meanwhile; the
    # fastest link is waited for first: the staying hop, then chunk 0's intra-node hop before chunk 1 lands
    ([INTER, INTRA], [1, 2], [(INTER, 0), (INTER, 8), (INTRA, 0), (INTRA, 8), (INTRA, 16)],
     [(2, INTRA), (0, INTER), (0, INTRA), (1, INTER), (1, INTRA)]),
    # combine-like: one exchange in flight on the fast group, so chunk 0's relay goes alone first; then its
    # inter-node hop and chunk 1's relay; chunk 1's inter-node hop queues behind chunk 0's while the staying hop runs
    ([INTRA, INTER], [2, 1], [(INTRA, 0), (INTER, 0), (INTRA, 8), (INTER, 8), (INTRA, 16)],
     [(0, INTRA), (1, INTRA), (2, INTRA), (0, INTER), (1, INTER)]),
])
def test_runner_posts_slowest_link_first_waits_fastest_first_and_tags_each_exchange(
        monkeypatch, hops, levels, posted_expected, log_expected):
    posted = _recording(monkeypatch)
    log = []
    handle = engine.DispatchHandle("hd2", 2, 4)
    programs = [_program(c, hops, log, levels=levels) for c in range(2)]
    programs.append(_program(2, [INTRA], log, levels=[2]))  # the program of pairs staying in the node
    assert engine._run_pipeline(programs, handle) == [(0, [0, 1]), (1, [0, 1]), (2, [0])]
    assert posted == posted_expected
    assert log == log_expected


def test_runner_keeps_one_exchange_in_flight_on_a_shared_memory_group_even_on_the_slowest_link(monkeypatch):
    # as the dispatch-like case above, but the inter-node group is a shared-memory one (a single host): chunk 1's
    # hop waits until chunk 0's is done (its buffers may be reused two exchanges later: dispatch/shm.py)
    posted = _recording(monkeypatch)
    log = []
    handle = engine.DispatchHandle("hd2", 2, 4)
    programs = [_program(c, [INTER, INTRA], log, levels=[1, 2], shared={INTER}) for c in range(2)]
    programs.append(_program(2, [INTRA], log, levels=[2]))
    assert engine._run_pipeline(programs, handle) == [(0, [0, 1]), (1, [0, 1]), (2, [0])]
    assert posted == [(INTER, 0), (INTRA, 0), (INTER, 8), (INTRA, 8), (INTRA, 16)]
    assert log == [(2, INTRA), (0, INTER), (0, INTRA), (1, INTER), (1, INTRA)]


def _program_marking_last(name, groups, levels, log):
    """Like :func:`_program`, its last exchange marked ``last`` (as a combine's final hop is)."""
    for i, g in enumerate(groups):
        peers = PeerGroup(g, 1, 0, (0,))
        yield engine._Exchange(peers, [(torch.tensor([[i]]), [1], [1])], levels[i], last=i == len(groups) - 1)
        log.append((name, g))
    return name


def _compute_only(name, log, at_drain):
    if at_drain:
        yield engine.DRAIN
    log.append((name, "compute"))
    return name


def test_a_drain_program_runs_once_every_other_program_only_waits_for_its_last_exchange():
    """The fill's compute runs at once, while the first exchanges are in flight; the drain's when no program has
    anything left to post and each exchange in flight is its program's last (here: chunk 1's last hop), so it runs
    before those complete, not after."""
    log = []
    handle = engine.DispatchHandle("hd2", 2, 4)
    programs = [_program_marking_last(c, [INTER, INTRA, INTER], [1, 2, 1], log) for c in range(2)]
    programs += [_compute_only("fill", log, False), _compute_only("drain", log, True)]
    assert engine._run_pipeline(programs, handle) == [0, 1, "fill", "drain"]
    assert log.index(("fill", "compute")) == 0
    drain = log.index(("drain", "compute"))
    # every exchange but the last ones had completed; the last ones complete after the drain's compute
    assert log[:drain] == [("fill", "compute"), (0, INTER), (0, INTRA), (0, INTER), (1, INTER), (1, INTRA)], log
    assert log[drain + 1:] == [(1, INTER)], log
    # with nothing in flight at all, a drain program still runs (at the end)
    log.clear()
    assert engine._run_pipeline([_compute_only("drain", log, True)], handle) == ["drain"]
    assert log == [("drain", "compute")]


def test_trace_records_every_post_and_wait_in_the_runners_order():
    log = []
    handle = engine.DispatchHandle("hd2", 2, 4, trace=[])
    programs = [_program(c, [INTER, INTRA], log, levels=[1, 2]) for c in range(2)]
    programs.append(_program(2, [INTRA], log, levels=[2]))
    engine._run_pipeline(programs, handle)
    # both inter-node posts, the staying hop's post; then waits fastest first, each program posting its next hop
    assert [(e.kind, e.level) for e in handle.trace] == [
        ("post", 1), ("post", 1), ("post", 2), ("wait", 2), ("wait", 1), ("post", 2), ("wait", 2), ("wait", 1),
        ("post", 2), ("wait", 2)]
    assert all(e.rows == 1 and e.ranks == (0,) and e.start <= e.end for e in handle.trace)
    starts = [e.start for e in handle.trace]
    assert starts == sorted(starts)
    untraced = engine.DispatchHandle("hd2", 2, 4)  # the default: nothing recorded
    engine._run_pipeline([_program(0, [INTER], [], levels=[1])], untraced)
    assert untraced.trace is None


def test_runner_on_one_level_runs_chunks_in_order(monkeypatch):
    posted = _recording(monkeypatch)
    log = []
    handle = engine.DispatchHandle("hd1", 1, 4)
    programs = [_program(c, ["a2a", "a2a"], log) for c in range(3)]
    assert engine._run_pipeline(programs, handle) == [(c, [0, 1]) for c in range(3)]
    assert [tag for _, tag in posted] == [0, 8, 16, 24, 32, 40]
    assert [c for c, _ in log] == [0, 0, 1, 1, 2, 2]


def test_first_hop_counts_of_every_chunk_travel_in_one_exchange(monkeypatch):
    """Chunk c's first count exchange must not queue behind chunk c-1's payload on the slow link."""
    from hiermoe_lightning.dispatch.spec import parse_dispatch

    exchanged = []
    real = engine.start_exchange

    def recording(payloads, peers, tag=0):
        exchanged.append([tuple(p[0].shape) if isinstance(p[0], torch.Tensor) else ("rows", p[0].num_rows)
                          for p in payloads])
        return real(payloads, peers, tag)

    monkeypatch.setattr(engine, "start_exchange", recording)
    peers = PeerGroup(None, 1, 0, (0,))
    phase = engine.PhaseRoute("a2a", peers, torch.zeros(4, dtype=torch.long), (0,))
    route = engine.Route(parse_dispatch("hd1", 1), (phase,), 1)
    handle = engine.DispatchHandle("hd1", 1, 16)
    x, pair_row = torch.randn(6, 4), torch.arange(6).repeat_interleave(2)
    first = engine._plan_first_hops(route, handle, [(x[:3], pair_row[:6], pair_row[:6] % 4),
                                                    (x[3:], pair_row[6:] - 3, pair_row[6:] % 4)])
    assert exchanged == [[(1, 4)]]  # [peers, 2 columns (rows, pairs) x 2 chunks], once
    assert [c.tolist() for _, c in first] == [[[3, 6]], [[3, 6]]]


# ---------------------------------------------------------------------------- the split by first phase
def _programs_of_hd2(rank, world, chunks):
    from hiermoe_lightning.dispatch.engine import DispatchHandle, dispatch
    from hiermoe_lightning.placement import Placement

    ep = ExpertParallel("2x2", pipeline_chunks=chunks)
    placement = Placement.contiguous(8, 4)
    g = torch.Generator().manual_seed(rank)
    T, K = 9, 3
    ids = torch.stack([torch.randperm(8, generator=g)[:K] for _ in range(T)])
    pair_row, pair_expert = torch.arange(T).repeat_interleave(K), ids.reshape(-1)
    handle = DispatchHandle("hd2", 2, 4 * 4)
    dispatch(torch.randn(T, 4), torch.rand(T * K), pair_row, pair_expert, ep.build_route("hd2", placement), handle)
    expert_rank = placement.expert_to_rank[pair_expert]
    return {
        "leaving_pairs": int((expert_rank // 2 != rank // 2).sum()),
        "node_pairs": int(((expert_rank // 2 == rank // 2) & (expert_rank != rank)).sum()),
        "rank_pairs": int((expert_rank == rank).sum()),
        "programs": [(c.first_phase, c.token_start, c.token_end, [h.phase for h in c.hops],
                      None if c.pair_index is None else c.pair_index.numel(),
                      c.hops[0].send_splits[c.hops[0].peers.index] if c.hops else None) for c in handle.chunks],
    }


def test_pairs_split_by_first_phase_into_chunks_a_node_program_and_a_local_program():
    from hiermoe_lightning.testing.launch import run_ranks

    for rank, res in enumerate(run_ranks(_programs_of_hd2, 4, 2, timeout=60)):
        programs = res["programs"]
        assert [p[0] for p in programs] == [0, 0, 1, 2]
        assert [p[3] for p in programs] == [["inter1", "intra1"], ["inter1", "intra1"], ["intra1"], []]
        assert [(p[1], p[2]) for p in programs] == [(0, 6), (6, 9), (0, 9), (0, 9)]  # 2/3 + 1/3, then every token
        # the chunks carry exactly the pairs whose expert is on the other node, the staying program those on the
        # other rank of this node, the program without hops those on this rank
        assert programs[0][4] + programs[1][4] == res["leaving_pairs"]
        assert programs[2][4] == res["node_pairs"] and programs[3][4] == res["rank_pairs"]
        assert sum(p[4] for p in programs) == 9 * 3
        # a leaving pair never stays, a node pair never stays on this rank: no own blocks
        assert programs[0][5] == programs[1][5] == programs[2][5] == 0


# ---------------------------------------------------------------------------- rows as blocks, never concatenated
def test_gather_rows_reads_blocks_like_their_concatenation_and_keeps_every_block_in_autograd():
    blocks = [torch.randn(3, 4, requires_grad=True), torch.randn(0, 4, requires_grad=True),
              torch.randn(5, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)]
    index = torch.tensor([7, 0, 2, 3, 3, 9, 4])  # nothing from the last block but row 9; nothing from block 1 (empty)
    got = engine.gather_rows(blocks, index)
    cat = torch.cat([b.detach() for b in blocks])
    assert torch.equal(got, cat[index])
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    expected = torch.zeros_like(cat).index_add_(0, index, weights)
    assert torch.equal(torch.cat([b.grad for b in blocks]), expected)
    # a block none of whose rows is read still gets a (zero) gradient: the dispatch backward must run on every rank
    unused = [torch.randn(2, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    engine.gather_rows(unused, torch.tensor([0, 1])).sum().backward()
    assert unused[1].grad is not None and not unused[1].grad.any()


def test_chunk_bounds_halve_and_cover_every_token():
    assert engine.chunk_bounds(9, 1) == [0, 9]
    assert engine.chunk_bounds(9, 2) == [0, 6, 9]
    assert engine.chunk_bounds(70, 3) == [0, 40, 60, 70]
    assert engine.chunk_bounds(2, 3) == [0, 1, 1, 2]  # fewer tokens than chunks: some chunks are empty
    assert engine.chunk_bounds(0, 4) == [0, 0, 0, 0, 0]
    for T in range(0, 50):
        for C in range(1, 7):
            b = engine.chunk_bounds(T, C)
            assert len(b) == C + 1 and b[0] == 0 and b[-1] == T and all(x <= y for x, y in zip(b, b[1:]))
