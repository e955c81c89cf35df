"""Calibration: the alpha-beta fit (pure) and ``calibrate`` on live gloo groups (every rank, same LinkCosts)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hiermoe_lightning import ExpertParallel, LinkCosts
from hiermoe_lightning.cost.calibrate import DEFAULT_SIZES, ROW_BYTES, calibrate, fit_alpha_beta
from hiermoe_lightning.cost.link_costs import PhaseCost
from hiermoe_lightning.testing import run_ranks

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
    pc = fit_alpha_beta([1, 2, 3], [2.0, 2.0, 2.0])
    assert (pc.alpha, pc.beta, pc.r2) == (2.0, 0.0, 1.0)
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
def _calibrate_rank(rank, world, topology, how, kwargs):
    ep = ExpertParallel(topology, dispatch="flat")
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
    results = run_ranks(_calibrate_rank, 4, "2x2", "classmethod", {"name": "cal-2x2"}, timeout=60)
    _assert_calibrated(results, ["a2a", "inter1", "intra1"])
    costs = results[0]
    assert costs.name == "cal-2x2"
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
    results = run_ranks(_calibrate_rank, 4, "4", "function", {"repeats": 3}, timeout=60)
    _assert_calibrated(results, ["a2a"])
    assert results[0].name == "calibrated"


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
