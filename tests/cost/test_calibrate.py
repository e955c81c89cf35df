"""Calibration: the alpha-beta fit (pure) and ``calibrate`` on live gloo groups (every rank, same LinkCosts)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hiermoe_lightning import ExpertParallel, LinkCosts
from hiermoe_lightning.cost.calibrate import (
    DEFAULT_SIZES,
    ENGINE_PAIR_BYTES,
    GLIBC_MMAP_THRESHOLD_MAX,
    ROW_BYTES,
    calibrate,
    calibration_bytes,
    fit_alpha_beta,
    measure_copy_beta,
    measure_fault_beta,
    mmap_threshold,
)
from hiermoe_lightning.cost.link_costs import PhaseCost
from hiermoe_lightning.testing import run_ranks
from hiermoe_lightning.topology import Topology

SIZES = np.geomspace(4096, 4 << 20, 8)


# ---------------------------------------------------------------------------------------------- fit
def test_fit_recovers_clean_line_exactly():
    alpha, beta = 0.5, 3e-6
    pc = fit_alpha_beta(SIZES, alpha + beta * SIZES)
    assert isinstance(pc, PhaseCost)
    assert pc.alpha == pytest.approx(alpha, rel=1e-9)
    assert pc.beta == pytest.approx(beta, rel=1e-9)
    assert pc.r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_recovers_line_from_noisy_timings_and_r2_drops_with_noise():
    rng = np.random.default_rng(0)
    alpha, beta = 0.7, 5.7e-7
    sizes = np.repeat(np.geomspace(1 << 12, 1 << 24, 10), 5)
    clean = alpha + beta * sizes
    small = fit_alpha_beta(sizes, clean * (1 + 0.01 * rng.standard_normal(sizes.size)))
    assert small.alpha == pytest.approx(alpha, rel=0.03)
    assert small.beta == pytest.approx(beta, rel=0.03)
    assert 0.999 < small.r2 < 1.0
    big = fit_alpha_beta(sizes, clean + 1.5 * rng.standard_normal(sizes.size))
    assert big.r2 < small.r2
    assert big.r2 < 0.95
    assert big.beta == pytest.approx(beta, rel=0.15)


def test_fit_clamps_negative_alpha_and_negative_beta():
    sizes = np.array([1000.0, 2000.0, 3000.0, 4000.0])
    pc = fit_alpha_beta(sizes, -0.5 + 1e-3 * sizes)  # unconstrained alpha = -0.5
    assert pc.alpha == 0.0
    assert pc.beta > 0
    assert pc.beta == pytest.approx(np.dot(sizes, -0.5 + 1e-3 * sizes) / np.dot(sizes, sizes))
    assert pc.r2 < 1.0

    times = 3.0 - 1e-4 * sizes  # unconstrained beta < 0: refit as a constant (the mean)
    pc = fit_alpha_beta(sizes, times)
    assert pc.beta == 0.0
    assert pc.alpha == pytest.approx(times.mean())
    assert pc.r2 == pytest.approx(0.0, abs=1e-12)

    pc = fit_alpha_beta(sizes, -1.0 - 1e-4 * sizes)  # both negative: both end at 0
    assert (pc.alpha, pc.beta) == (0.0, 0.0)
    assert pc.r2 is not None and math.isfinite(pc.r2)


def test_fit_constant_times_and_bad_input():
    sizes, times = [1, 2, 3], [2.0, 2.0, 2.0]
    pc = fit_alpha_beta(sizes, times)
    # a least-squares fit, not an exact one: the BLAS in use may leave rounding residue (beta 3.4e-17 was seen); the
    # tolerances are relative to the data's scale (2 ms; 2 ms / 3 bytes for the slope), far below any real slope
    scale = max(times)
    assert pc.alpha == pytest.approx(2.0, rel=1e-9)
    assert pc.beta >= 0.0 and pc.beta == pytest.approx(0.0, abs=1e-9 * scale / max(sizes))
    assert pc.r2 == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="two distinct sizes"):
        fit_alpha_beta([5, 5, 5], [1, 2, 3])
    with pytest.raises(ValueError, match="differ in length"):
        fit_alpha_beta([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        fit_alpha_beta([-1, 2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        fit_alpha_beta([1, 2], [1, float("nan")])
    with pytest.raises(TypeError):
        fit_alpha_beta([1, "x"], [1, 2])


def test_default_sizes_are_geometric_64kib_to_32mib():
    assert len(DEFAULT_SIZES) == 8
    assert DEFAULT_SIZES[0] == 64 << 10 and DEFAULT_SIZES[-1] == 32 << 20
    ratios = np.array(DEFAULT_SIZES[1:]) / np.array(DEFAULT_SIZES[:-1])
    assert np.allclose(ratios, ratios[0], rtol=1e-3)


# ---------------------------------------------------------------------------------------------- live groups
def _calibrate_rank(rank, world, topology, how, kwargs, shared_memory=True):
    ep = ExpertParallel(topology, dispatch="flat", shared_memory=shared_memory)
    if how == "classmethod":
        return LinkCosts.calibrate(ep, **kwargs)
    return calibrate(ep, **kwargs)


def _assert_calibrated(results, phases):
    first = results[0]
    assert isinstance(first, LinkCosts)
    assert all(r == first for r in results[1:]), "ranks returned different LinkCosts"
    assert all(r.name == first.name for r in results)
    assert set(first.phases) == set(phases)
    for phase in phases:
        pc = first[phase]
        assert math.isfinite(pc.alpha) and pc.alpha >= 0
        assert math.isfinite(pc.beta) and pc.beta > 0, f"{phase}: {pc}"
        assert isinstance(pc.r2, float) and math.isfinite(pc.r2) and pc.r2 <= 1.0


def test_calibrate_2x2_identical_on_every_rank_and_yaml_round_trip(tmp_path):
    results = run_ranks(_calibrate_rank, 4, "2x2", "classmethod", {"name": "cal-2x2"}, timeout=180,
                        pg_timeout=180)
    _assert_calibrated(results, ["a2a", "inter1", "intra1"])
    costs = results[0]
    assert costs.name == "cal-2x2"
    # the engine's terms, measured from primitives: count exchange, local copies, fresh-buffer faults
    assert all(costs[p].sync_ms > 0 for p in ("a2a", "inter1", "intra1"))
    assert all(costs[p].shared_memory for p in ("a2a", "inter1", "intra1"))  # one host: the transport is recorded
    assert costs.copy_beta > 0 and costs.pair_bytes == ENGINE_PAIR_BYTES
    assert (costs.duplex, costs.level1_link) == ("full", "rank")
    if mmap_threshold() > 0:
        # the fault slope is a difference of two timed touches: on a loaded machine it can fit to 0, and then no
        # threshold is recorded (nothing to charge above it); otherwise the threshold is the allocator's
        assert costs.fault_beta >= 0
        assert costs.fault_threshold == (mmap_threshold() if costs.fault_beta > 0 else 0.0), costs
    path = tmp_path / "cal.yaml"
    costs.to_yaml(path)
    back = LinkCosts.from_yaml(path)
    assert back == costs and back.name == "cal-2x2"
    assert all(back[p].r2 == costs[p].r2 for p in costs.phases)
    assert LinkCosts.resolve(str(path)) == costs
    # a calibrated file drives ExpertParallel's auto dispatch like a preset
    same = run_ranks(lambda r, w, p: ExpertParallel("2x2", link_costs=p).link_costs == costs, 4, str(path))
    assert same == [True] * 4


def test_calibrate_flat_world_of_4():
    results = run_ranks(_calibrate_rank, 4, "4", "function", {"repeats": 3}, timeout=120, pg_timeout=120)
    _assert_calibrated(results, ["a2a"])
    assert results[0].name == "calibrated"


def test_calibrate_payload_only_and_byte_modes():
    """Without the engine terms the result is the plain lines of before; the byte modes are stored. Through the
    process group, up to 16 MiB, median of 5: with a few small sizes (or shared memory) the slope stays inside the
    timing noise of a loaded machine (beta fitted to 0 beside alpha 7.3 ms was seen at 2 MiB, 2 repeats)."""
    kwargs = {"repeats": 5, "sync": False, "copy_sizes": None, "faults": False, "duplex": "half",
              "level1_link": "node", "sizes": [1 << 16, 1 << 21, 1 << 24]}
    results = run_ranks(_calibrate_rank, 4, "2x2", "function", kwargs, False, timeout=120, pg_timeout=120)
    _assert_calibrated(results, ["a2a", "inter1", "intra1"])
    costs = results[0]
    assert (costs.duplex, costs.level1_link) == ("half", "node")
    assert costs.copy_beta == costs.fault_beta == costs.pair_bytes == 0.0
    assert all(costs[p].sync_ms == 0.0 for p in costs.phases)


def test_calibrate_through_the_process_group_records_no_shared_memory():
    kwargs = {"repeats": 2, "copy_sizes": None, "faults": False, "sizes": [1 << 16, 1 << 19]}
    results = run_ranks(_calibrate_rank, 4, "2x2", "function", kwargs, False, timeout=60)
    assert not any(results[0][p].shared_memory for p in ("a2a", "inter1", "intra1"))


def test_calibration_bytes_by_hand():
    topo = Topology.parse("2x2")
    # a2a, 2 rows of 1 KiB to each of the 4 ranks: full duplex 3 peers x 2 KiB = 6144; half duplex 12288
    assert calibration_bytes(topo, "a2a", 2) == 6144
    assert calibration_bytes(topo, "a2a", 2, duplex="half") == 12288
    # node links: node 0 sends 2 ranks x 2 peers x 2 KiB = 8192 over 2 ranks = 4096; inside r0 <-> r1 2 KiB each way
    assert calibration_bytes(topo, "a2a", 2, level1_link="node") == 4096
    assert calibration_bytes(topo, "a2a", 2, duplex="half", level1_link="node") == 4096  # inside 2048 + 2048
    # inter1 (peer on the other node): node link 2 x 2 KiB over 2 ranks = 2048 = one rank's bytes
    assert calibration_bytes(topo, "inter1", 2) == calibration_bytes(topo, "inter1", 2, level1_link="node") == 2048
    # intra1 stays inside a node
    assert calibration_bytes(topo, "intra1", 2, duplex="half", level1_link="node") == 4096


def test_mmap_threshold_and_local_primitives(monkeypatch):
    import platform

    if platform.libc_ver()[0] == "glibc":
        monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
        assert mmap_threshold() == GLIBC_MMAP_THRESHOLD_MAX == 32 << 20
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        assert mmap_threshold() == 1 << 20
    # outside torch.distributed the primitives run on this process alone
    beta, r2, medians = measure_copy_beta([64, 256], repeats=2, warmup=0)
    assert beta >= 0 and len(medians) == 2 and all(m >= 0 for m in medians)
    beta, r2, medians = measure_fault_beta(1 << 20, repeats=2, warmup=0)
    assert beta >= 0 and len(medians) == 3
    with pytest.raises(ValueError, match="two distinct"):
        measure_copy_beta([8, 8])
    with pytest.raises(ValueError, match="threshold"):
        measure_fault_beta(1 << 20, factors=(0.5, 2.0))


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0,
                    reason="network emulation needs root")
def test_example_calibrates_under_emulation(tmp_path, capsys):
    """examples/calibrate_links.py on the emulated 2-node network: the node link's beta is its tbf rate."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "calibrate_links", Path(__file__).resolve().parents[2] / "examples" / "calibrate_links.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "emu.yaml"
    costs = example.main(["--topology", "2x2", "--emulate-inter-mbit", "1000", "--repeats", "5",
                          "--sizes", f"{1 << 20},{4 << 20}", "--copy-rows", "64,256", "--out", str(out)])
    assert LinkCosts.from_yaml(out) == costs and costs.name == "calibrated-2x2-1000mbit"
    assert (costs.duplex, costs.level1_link) == ("half", "node")
    # inter1 n = a node link's bytes per direction / 2 ranks: beta = 2 / (1000 Mbit/s), less TCP/IP headers.
    # A slope of medians over 5 interleaved rounds (a delay on one point must repeat in most rounds to bend it);
    # the upper bound is loose: load slows the big exchanges more than the small ones, a wrong rate is 8x or 1000x
    wire = 2 * 8 / 1000e6 * 1e3
    assert 0.8 * wire < costs["inter1"].beta < 6 * wire, costs["inter1"]
    assert "emulated 2 nodes" in capsys.readouterr().out


def _single_rank_phases_and_errors(rank, world):
    ep = ExpertParallel("4x1", dispatch="flat")
    errors = {}
    for key, kwargs in {
        "phase": {"phases": ["inter2"]},
        "sizes": {"sizes": [0, 100]},
        "narrow": {"sizes": [4096, 4100]},
        "repeats": {"repeats": 0},
    }.items():
        try:
            calibrate(ep, **kwargs)
            errors[key] = None
        except (ValueError, TypeError) as e:
            errors[key] = str(e)
    # after the refused calls (they fail before any collective) the groups still work
    costs = calibrate(ep, repeats=2, phases=["inter1", "intra1"])
    return errors, costs


def test_single_rank_phases_get_zero_cost_and_bad_arguments_fail_everywhere():
    results = run_ranks(_single_rank_phases_and_errors, 4, timeout=60)
    for errors, costs in results:
        assert "inter2" in errors["phase"] and "positive" in errors["sizes"]
        assert "two distinct" in errors["narrow"] and "repeats" in errors["repeats"]
        assert costs == results[0][1]
        assert set(costs.phases) == {"inter1", "intra1"}
        assert costs["intra1"] == PhaseCost(0.0, 0.0, None)  # groups of one rank move nothing
        assert costs["inter1"].beta >= 0 and isinstance(costs["inter1"].r2, float)


def test_byte_count_excludes_own_rows():
    # n = (P - 1) * rows * ROW_BYTES: with 4 peers, 3 KiB is one 1 KiB row to each of the 3 others
    assert ROW_BYTES == 1024
    from hiermoe_lightning.cost.calibrate import _rows_per_peer

    assert _rows_per_peer(3 * 1024, 4) == 1
    assert _rows_per_peer(4 << 20, 4) * 3 * 1024 == pytest.approx(4 << 20, rel=1e-3)
    assert _rows_per_peer(4 << 20, 2) == 4096
