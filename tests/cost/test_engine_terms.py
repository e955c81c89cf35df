"""The cost model's engine terms (sync, pair metadata, local copies, fresh-buffer faults, byte-count modes) and the
software pipeline, against hand arithmetic. Every expected number below is worked out in the comments."""

from __future__ import annotations

import pytest
import torch

from hiermoe_lightning.cost.link_costs import LinkCosts, PhaseCost
from hiermoe_lightning.cost.model import hop_local, phase_load_bytes, pipeline_ms, predict
from hiermoe_lightning.cost.traffic import phase_rows
from hiermoe_lightning.dispatch.spec import parse_dispatch
from hiermoe_lightning.placement.placement import Placement
from hiermoe_lightning.topology import Topology

TOPO = Topology([2, 2])  # node 0 = ranks 0, 1; node 1 = ranks 2, 3


# ---------------------------------------------------------------------------------------------- byte count n
def _rows() -> torch.Tensor:
    r = torch.zeros(4, 4, dtype=torch.long)
    r[0, 0] = 5  # stays: never counts
    r[0, 1], r[0, 2], r[0, 3], r[1, 2], r[2, 0] = 1, 3, 2, 1, 1
    return r


def test_phase_load_bytes_full_half_node_by_hand():
    rows = _rows()
    # 10 bytes a row. sent: r0 60, r1 10, r2 10, r3 0; received: r0 10, r1 10, r2 40, r3 20
    assert phase_load_bytes(TOPO, rows, 10) == 60.0  # full duplex: max(sent, received) -> r0's 60
    assert phase_load_bytes(TOPO, rows, 10, duplex="half") == 70.0  # sent + received -> r0's 60 + 10
    # node links: node 0 -> node 1 carries r0->2 (3), r0->3 (2), r1->2 (1) = 60 bytes, node 1 -> node 0 r2->0 = 10;
    # busiest link direction 60 bytes over the 2 ranks of a node = 30; inside node 0 only r0->r1 (10 bytes)
    assert phase_load_bytes(TOPO, rows, 10, level1_link="node") == 30.0
    assert phase_load_bytes(TOPO, rows, 10, duplex="half", level1_link="node") == 30.0
    # inside-node traffic can dominate: 8 rows r0 -> r1 (80 bytes; half duplex counts r1's 80 received as well)
    rows[0, 1] = 8
    assert phase_load_bytes(TOPO, rows, 10, level1_link="node") == 80.0
    # metadata: 2 bytes per pair, pairs == rows (no dedup): r0 sends 13 rows + 13 pairs = 130 + 26
    assert phase_load_bytes(TOPO, rows, 10, pairs=rows, pair_bytes=2) == 156.0


def test_phase_load_bytes_defaults_equal_max_rank_bytes():
    from hiermoe_lightning.cost.traffic import max_rank_bytes

    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        rows = torch.randint(0, 50, (4, 4), generator=gen)
        assert phase_load_bytes(TOPO, rows, 7) == max_rank_bytes(rows, 7)


def test_phase_load_bytes_balanced_node_equals_rank():
    """A balanced inter-node exchange (each rank c rows to its peer on the other node) gives the same n both ways."""
    rows = torch.zeros(4, 4, dtype=torch.long)
    rows[0, 2] = rows[2, 0] = rows[1, 3] = rows[3, 1] = 5
    assert phase_load_bytes(TOPO, rows, 4) == phase_load_bytes(TOPO, rows, 4, level1_link="node") == 20.0


# ---------------------------------------------------------------------------------------------- local work
def test_hop_local_by_hand():
    lc = LinkCosts({"a2a": (0, 0)}, copy_beta=0.5, fault_beta=2.0, fault_threshold=50)
    rows = torch.tensor([[3, 5], [1, 0]])  # S = [8, 1] rows sent (own block included), R = [4, 5] received
    held = torch.tensor([6, 2])
    # row 10 bytes, accumulator row 20 bytes
    # rank 0: copy 8 * 10 = 80; gather 80 >= 50 and accumulator 6 * 20 = 120 >= 50 -> (80 + 120) / 2 = 100 fresh
    #         receive buffers: R 40 (< 50), combine S 80 -> 80 / 2 = 40 fresh
    # rank 1: copy 10; gather 10, accumulator 40: none; receive R 50 (>= 50) -> 25
    # ms = max(0.5 * 80 + 2 * 100, 0.5 * 10) = 240; receive faults max(2 * 40, 2 * 25) = 80; rank 0's bytes
    assert hop_local(rows, held, 10, lc, accum_row_bytes=20) == (240.0, 80.0, 140.0, 80.0)
    # two chunks: every buffer halves. rank 0: gather 40 (no), accumulator 60 (yes) -> 30; receive R 20, S 40: none
    # ms = 0.5 * 40 + 2 * 30 = 80
    assert hop_local(rows, held, 10, lc, accum_row_bytes=20, chunks=2) == (80.0, 40.0, 30.0, 0.0)
    # no fault term: copies only
    plain = LinkCosts({"a2a": (0, 0)}, copy_beta=0.5)
    assert hop_local(rows, held, 10, plain) == (40.0, 80.0, 0.0, 0.0)
    # shared memory: the dispatch gathers straight into the transport's buffers; the combine's accumulator remains.
    # rank 0: copy 80 / 2 = 40; fresh: accumulator 120 -> 60 (no gather buffer); receive buffers as before: 40
    # ms = 0.5 * 40 + 2 * 60 = 140
    assert hop_local(rows, held, 10, lc, accum_row_bytes=20, gather_in_transport=True) == (140.0, 40.0, 100.0, 80.0)


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_ms_by_hand():
    # 2 hops of 3 and 1 ms per chunk, 2 chunks: step 0 chunk 0 hop 0 (3); step 1 chunk 1 hop 0 || chunk 0 hop 1
    # (max 3, 1 = 3); step 2 chunk 1 hop 1 (1): 7
    assert pipeline_ms([3.0, 1.0], 2) == 7.0
    assert pipeline_ms([1.0, 3.0], 2) == 7.0  # 1, max(1, 3), 3
    assert pipeline_ms([3.0, 1.0], 3) == 10.0  # 3, 3, 3, 1
    assert pipeline_ms([3.0, 1.0], 1) == 4.0  # no pipeline: the sum
    assert pipeline_ms([2.0], 3) == 6.0  # one hop: chunks in sequence
    assert pipeline_ms([1.0, 2.0, 3.0], 2) == 9.0  # 1, max(1, 2), max(2, 3), 3
    assert pipeline_ms([], 4) == 0.0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunks"):
            pipeline_ms([1.0], bad)


# ---------------------------------------------------------------------------------------------- predict, by hand
# docs/cost-model.md's worked example: 2x2, E = 8 contiguous (rank r holds experts 2r, 2r + 1), only rank 0 routes
# four tokens t0 (4, 5), t1 (4, 6), t2 (1, 2), t3 (0, 7); hidden 1024 fp32 (4096-byte rows, fp32 accumulator rows
# the same); every rank holds T = 4 rows before the first hop.
PLACE = Placement.contiguous(8, 4)
IDS = torch.full((4, 4, 2), -1, dtype=torch.long)
IDS[0] = torch.tensor([[4, 5], [4, 6], [1, 2], [0, 7]])
B = 4096


def _engine_costs(**kw) -> LinkCosts:
    phases = {"a2a": PhaseCost(1.0, 0.001, None, 6.0), "inter1": PhaseCost(1.0, 0.001, None, 4.0),
              "intra1": PhaseCost(2.0, 0.002, None, 2.0)}
    args = dict(copy_beta=1e-4, pair_bytes=24, fault_beta=1e-3, fault_threshold=10_000)
    args.update(kw)
    return LinkCosts(phases, name="hand", **args)


def test_hand_rows_of_hd2():
    rows = phase_rows(TOPO, PLACE, IDS, parse_dispatch("hd2", 2))
    inter, intra = rows[0].rows, rows[1].rows
    # inter1: t2, t3 stay on rank 0 (diagonal 2); t0, t1, t3 cross to rank 2
    assert inter[0, 0] == 2 and inter[0, 2] == 3 and int(inter.sum()) == 5
    # intra1: rank 0 keeps t2 (expert 1) and t3 (expert 0), sends t2 to rank 1; rank 2 keeps t0, t1, sends t1, t3
    assert (intra[0, 0], intra[0, 1], intra[2, 2], intra[2, 3]) == (2, 1, 2, 2) and int(intra.sum()) == 7


def test_predict_engine_terms_by_hand():
    pred = predict(TOPO, PLACE, IDS, 1024, 4, _engine_costs(), dispatches=["hd2"])
    inter, intra = pred.dispatch["hd2"].phases
    # inter1. n: rows only 3 * 4096 = 12288 (rank 0 sends, rank 2 receives); the dispatch also carries the 5 pairs
    # that cross (t0 x2, t1 x2, t3's expert 7) at 24 bytes: 12408; one way the mean, 12348.
    #   payload 1 + 0.001 * 12348 = 13.348; sync 4 / 2 = 2 (one count exchange per round trip)
    #   local (held 4 rows everywhere): rank 0 sends S = 5 rows (2 kept + 3), copies 5 * 4096 = 20480 -> 2.048;
    #   fresh (>= 10000 bytes): gather 20480 and accumulator 4 * 4096 = 16384 -> 18432 -> 18.432; total 20.48
    #   (ranks 1-3: accumulator 16384 -> 8192 -> 8.192). Receive buffers: rank 0 R = 2 rows (8192, no), combine
    #   S 20480 -> 10240 -> 10.24; rank 2 R = 3 rows (12288) -> 6144 -> 6.144: 10.24, added to the exchange.
    assert inter.cost_bytes == 12348 and inter.sync_ms == 2.0
    assert inter.copy_bytes == 20480 and inter.fresh_bytes == 18432 + 10240
    assert inter.ms == pytest.approx(2 + 1 + 12.348 + 10.24 + 20.48)
    # intra1. n: rank 2 sends 2 rows to rank 3 (8192) + 2 pairs (48): (8192 + 8240) / 2 = 8216 -> 2 + 16.432;
    #   sync 1. held: rank 0 2 rows, rank 2 3 rows. rank 0: S = 3 (12288 copied -> 1.2288; gather 12288 fresh,
    #   accumulator 8192 not -> 6144 -> 6.144); rank 2: S = 4 (16384 -> 1.6384; gather 16384 + accumulator 12288
    #   fresh -> 14336 -> 14.336): local 15.9744. Receive: rank 0 combine S 12288 -> 6144; rank 2 combine S 16384 ->
    #   8192 (R = 2 rows, 8192, no): 8.192.
    assert intra.cost_bytes == 8216 and intra.sync_ms == 1.0
    assert intra.ms == pytest.approx(1 + 2 + 16.432 + 8.192 + 15.9744)
    assert pred.dispatch["hd2"].predicted_ms == pytest.approx(46.068 + 43.5984)
    assert pred.dispatch["hd2"].to_json_dict()["phases"][0]["sync_ms"] == 2.0


def test_predict_shared_memory_phase_has_no_count_exchange_and_no_separate_gather():
    costs = _engine_costs()
    costs.phases["intra1"] = PhaseCost(2.0, 0.002, None, 2.0, shared_memory=True)
    intra = predict(TOPO, PLACE, IDS, 1024, 4, costs, dispatches=["hd2"]).dispatch["hd2"].phases[1]
    # as in test_predict_engine_terms_by_hand, but no sync, and the gather is the transport's: rank 0 copies
    # 12288 / 2 = 6144 -> 0.6144, fresh accumulator 8192 (no) -> 0; rank 2 copies 8192 -> 0.8192, fresh accumulator
    # 12288 -> 6144 -> 6.144: local 6.9632. The receive buffers fault as before: 8.192.
    assert intra.sync_ms == 0.0
    assert intra.ms == pytest.approx(2 + 16.432 + 8.192 + 6.9632)


def test_predict_node_links_hide_receive_faults_on_inter_phases():
    pred = predict(TOPO, PLACE, IDS, 1024, 4, _engine_costs(level1_link="node"), dispatches=["hd2"])
    inter, intra = pred.dispatch["hd2"].phases
    # inter1 with node links: node 0 -> node 1 carries 12288 (12408 with pairs) over its 2 ranks: n = (6144 + 6204)
    # / 2 = 6174; the receive buffers fill while the link is busy: exchange max(6.174, 10.24) = 10.24
    assert inter.cost_bytes == 6174
    assert inter.ms == pytest.approx(2 + 1 + 10.24 + 20.48)
    # intra1 stays inside nodes: as with rank links
    assert intra.ms == pytest.approx(1 + 2 + 16.432 + 8.192 + 15.9744)


def test_predict_pipeline_two_hops_by_hand():
    pred = predict(TOPO, PLACE, IDS, 1024, 4, _engine_costs(), dispatches=["hd2"], pipeline_chunks=2)
    d = pred.dispatch["hd2"]
    inter, intra = d.phases
    # a chunk carries half the bytes, with the full sync and alpha. inter1: 2 + 1 + 12.348 / 2; rank 0's gather
    # 10240 (fresh) + accumulator 8192 (not) -> 5120 -> 5.12, copy 10240 -> 1.024; receive: combine S 10240 -> 5.12
    assert inter.chunk_ms == pytest.approx(2 + 1 + 6.174 + 5.12 + 6.144)
    # intra1: 1 + 2 + 16.432 / 2; no buffer reaches 10000 bytes; copies: rank 2 8192 -> 0.8192
    assert intra.chunk_ms == pytest.approx(1 + 2 + 8.216 + 0.8192)
    # steps: chunk 0 inter1; chunk 1 inter1 || chunk 0 intra1; chunk 1 intra1
    assert d.predicted_ms == pytest.approx(20.438 + max(20.438, 12.0352) + 12.0352)
    assert d.pipeline_chunks == 2 and d.to_json_dict()["pipeline_chunks"] == 2
    # the phases' unpipelined ms are unchanged
    assert inter.ms == pytest.approx(46.068)
    # one-hop dispatches are not chunked by the engine, so they are priced unchunked
    flat = predict(TOPO, PLACE, IDS, 1024, 4, _engine_costs(), dispatches=["flat"], pipeline_chunks=3).dispatch["flat"]
    assert flat.predicted_ms == pytest.approx(flat.phases[0].ms)
    assert flat.predicted_ms != pytest.approx(3 * flat.phases[0].chunk_ms)


def test_paper_preset_unchanged_and_pipeline_with_plain_lines():
    plain = predict(TOPO, PLACE, IDS, 1024, 4, "paper-a6000")
    # docs/cost-model.md's table: hd2 = 0.504 + 0.572 (inter1 3 rows, intra1 2 rows of 4096 bytes)
    assert plain.dispatch["hd2"].predicted_ms == pytest.approx(0.497 + 5.29e-7 * 12288 + 0.571 + 1.27e-7 * 8192)
    assert plain.dispatch["hd2"].to_json_dict()["phases"][0] == {
        "name": "inter1", "max_rank_bytes": 12288, "ms": pytest.approx(0.497 + 5.29e-7 * 12288)}
    piped = predict(TOPO, PLACE, IDS, 1024, 4, "paper-a6000", pipeline_chunks=2)
    i1, a1 = 0.497 + 5.29e-7 * 12288 / 2, 0.571 + 1.27e-7 * 8192 / 2
    assert piped.dispatch["hd2"].predicted_ms == pytest.approx(i1 + max(i1, a1) + a1)
    with pytest.raises(ValueError, match="pipeline_chunks"):
        predict(TOPO, PLACE, IDS, 1024, 4, "paper-a6000", pipeline_chunks=0)


def test_single_rank_phases_are_skipped_in_the_pipeline():
    # "4x1": intra1's groups hold one rank each, so hd2 is inter1 alone: one hop, which the engine does not chunk
    topo = Topology([4, 1])
    lc = LinkCosts({"a2a": (1.0, 0.0), "inter1": (1.0, 0.001), "intra1": (5.0, 0.0)})
    pred = predict(topo, Placement.contiguous(8, 4), IDS, 1024, 4, lc, dispatches=["hd2"], pipeline_chunks=2)
    inter, intra = pred.dispatch["hd2"].phases
    assert intra.skipped and intra.ms == 0.0 and not inter.skipped
    assert pred.dispatch["hd2"].predicted_ms == pytest.approx(inter.ms)
