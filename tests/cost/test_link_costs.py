"""LinkCosts: the paper preset, phase arithmetic, YAML files and their errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hiermoe_lightning import LinkCosts
from hiermoe_lightning.cost.link_costs import PRESETS, PhaseCost

PAPER = {
    "a2a": (0.722, 5.70e-7),
    "inter1": (0.497, 5.29e-7),
    "inter2": (0.301, 1.17e-7),
    "inter3": (0.149, 2.06e-8),
    "intra1": (0.571, 1.27e-7),
    "intra2": (0.114, 2.63e-8),
    "intra3": (0.204, 1.64e-8),
}


# ---------------------------------------------------------------------------------------------- preset
def test_paper_preset_equals_paper_table():
    lc = LinkCosts.preset("paper-a6000")
    assert set(lc.phases) == set(PAPER)
    for phase, (alpha, beta) in PAPER.items():
        assert lc[phase].alpha == pytest.approx(alpha, rel=1e-12)
        assert lc[phase].beta == pytest.approx(beta, rel=1e-12)
    assert lc.name == "paper-a6000"


def test_preset_is_a_fresh_equal_object():
    a, b = LinkCosts.preset("paper-a6000"), LinkCosts.preset("paper-a6000")
    assert a == b
    assert "paper-a6000" in PRESETS


@pytest.mark.parametrize("phase, nbytes", [("a2a", 0), ("a2a", 1_000_000), ("inter1", 123_456), ("intra3", 8 << 20),
                                           ("inter3", 2.5e6)])
def test_phase_ms_arithmetic(phase, nbytes):
    lc = LinkCosts.preset("paper-a6000")
    alpha, beta = PAPER[phase]
    assert lc.phase_ms(phase, nbytes) == pytest.approx(alpha + beta * nbytes, rel=1e-12)
    assert lc[phase].ms(nbytes) == pytest.approx(alpha + beta * nbytes, rel=1e-12)


def test_phase_ms_hand_value():
    # 1 MiB over a2a: 0.722 + 5.70e-7 * 1048576 = 0.722 + 0.59768832
    assert LinkCosts.preset("paper-a6000").phase_ms("a2a", 1 << 20) == pytest.approx(1.31968832, rel=1e-9)
    custom = LinkCosts({"a2a": (1.0, 0.5), "inter1": {"alpha": 2, "beta": 0.25}})
    assert custom.phase_ms("a2a", 10) == pytest.approx(6.0)
    assert custom.phase_ms("inter1", 8) == pytest.approx(4.0)


def test_constructor_accepts_forms():
    lc = LinkCosts({"a2a": (1, 2), "inter1": [0.5, 0.25], "intra1": {"alpha": 0.1, "beta": 0.2, "r2": 0.99},
                    "inter2": PhaseCost(3.0, 4.0)})
    assert lc["a2a"] == PhaseCost(1.0, 2.0)
    assert lc["inter1"] == PhaseCost(0.5, 0.25)
    assert lc["intra1"] == PhaseCost(0.1, 0.2, 0.99)
    assert lc["inter2"] == PhaseCost(3.0, 4.0)
    assert isinstance(lc["a2a"].alpha, float)


# ---------------------------------------------------------------------------------------------- YAML
def test_yaml_round_trip_preset(tmp_path):
    lc = LinkCosts.preset("paper-a6000")
    path = tmp_path / "costs.yaml"
    lc.to_yaml(path)
    back = LinkCosts.from_yaml(path)
    assert back == lc
    assert back.name == "paper-a6000"
    for phase in PAPER:
        assert back[phase].alpha == lc[phase].alpha
        assert back[phase].beta == lc[phase].beta


def test_yaml_round_trip_with_r2_and_str_path(tmp_path):
    lc = LinkCosts({"a2a": {"alpha": 0.5, "beta": 1e-7, "r2": 0.998}, "inter1": (0.25, 3e-8)}, name="mine")
    path = str(tmp_path / "c.yml")
    lc.to_yaml(path)
    back = LinkCosts.from_yaml(path)
    assert back == lc
    assert back["a2a"].r2 == pytest.approx(0.998)
    assert back["inter1"].r2 is None
    assert back.name == "mine"


def test_hand_written_yaml(tmp_path):
    path = tmp_path / "hand.yaml"
    path.write_text("phases:\n  a2a: {alpha: 1.5, beta: 2.0e-7}\n  intra1:\n    alpha: 0\n    beta: 1\n")
    lc = LinkCosts.from_yaml(path)
    assert lc["a2a"] == PhaseCost(1.5, 2.0e-7)
    assert lc.phase_ms("intra1", 3) == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_preset_lists_known():
    with pytest.raises(ValueError) as ei:
        LinkCosts.preset("paper-h100")
    msg = str(ei.value)
    assert "paper-h100" in msg
    for name in PRESETS:
        assert name in msg


def test_preset_wrong_type():
    with pytest.raises(TypeError, match="preset"):
        LinkCosts.preset(3)


@pytest.mark.parametrize("phase", ["inter4", "intra4", "inter9"])
def test_missing_phase_names_phase(phase):
    lc = LinkCosts.preset("paper-a6000")
    with pytest.raises(ValueError) as ei:
        lc.phase_ms(phase, 10)
    assert phase in str(ei.value)
    with pytest.raises(ValueError, match=phase):
        lc[phase]
    with pytest.raises(ValueError, match=phase):
        lc.require(["a2a", "inter1", phase])


def test_missing_phase_is_not_keyerror():
    lc = LinkCosts({"a2a": (1, 1)})
    with pytest.raises(ValueError):
        lc["inter1"]
    try:
        lc["inter1"]
    except KeyError:  # pragma: no cover
        pytest.fail("bare KeyError")
    except ValueError:
        pass
    lc.require(["a2a"])  # no error


def test_malformed_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("phases: [a2a: {alpha: 1\n  - : :\n")
    with pytest.raises(ValueError) as ei:
        LinkCosts.from_yaml(path)
    assert str(path) in str(ei.value)
    import yaml

    assert not isinstance(ei.value, yaml.YAMLError)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ValueError) as ei:
        LinkCosts.from_yaml(path)
    assert str(path) in str(ei.value)


def test_directory_instead_of_file(tmp_path):
    """A directory is bad input: ValueError naming the path, not an OSError."""
    with pytest.raises(ValueError) as ei:
        LinkCosts.from_yaml(tmp_path)
    assert str(tmp_path) in str(ei.value)


def test_binary_file_names_path(tmp_path):
    """Undecodable bytes: the error must name the file (the contract asks errors about files to name the path)."""
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81bad")
    with pytest.raises(ValueError) as ei:
        LinkCosts.from_yaml(path)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "phases: 3\n", "name: x\n", "just a string\n"])
def test_yaml_without_phases_mapping(tmp_path, text):
    path = tmp_path / "shape.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as ei:
        LinkCosts.from_yaml(path)
    assert str(path) in str(ei.value)
    assert "phases" in str(ei.value)


@pytest.mark.parametrize(
    "body, exc, words",
    [
        ("phases:\n  a2a: {alpha: -1, beta: 1e-7}\n", ValueError, ["alpha", "a2a"]),
        ("phases:\n  a2a: {alpha: 1, beta: fast}\n", TypeError, ["beta", "a2a"]),
        ("phases:\n  foo: {alpha: 1, beta: 1}\n", ValueError, ["foo", "a2a"]),
        ("phases:\n  a2a: {alpha: 1}\n", ValueError, ["beta", "a2a"]),
        ("phases:\n  a2a: {alpha: 1, beta: 1, gamma: 2}\n", ValueError, ["gamma", "a2a"]),
        ("phases:\n  a2a: 7\n", TypeError, ["a2a", "alpha"]),
    ],
)
def test_bad_phase_entries_in_file(tmp_path, body, exc, words):
    path = tmp_path / "entries.yaml"
    path.write_text(body)
    with pytest.raises(exc) as ei:
        LinkCosts.from_yaml(path)
    msg = str(ei.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), float("inf")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        LinkCosts({"a2a": (alpha, 1e-7)})


@pytest.mark.parametrize("beta", ["x", None, True, [1]])
def test_non_number_beta(beta):
    with pytest.raises(TypeError, match="beta"):
        LinkCosts({"a2a": (0.5, beta)})


def test_negative_beta():
    with pytest.raises(ValueError, match="beta"):
        LinkCosts({"inter1": {"alpha": 0.5, "beta": -1e-9}})


@pytest.mark.parametrize("key", ["foo", "inter0", "intra", "A2A", "inter-1", 3])
def test_bad_phase_key(key):
    with pytest.raises(ValueError) as ei:
        LinkCosts({key: (1, 1)})
    msg = str(ei.value)
    assert repr(key) in msg
    assert "a2a" in msg and "inter" in msg and "intra" in msg


@pytest.mark.parametrize("value", [(1, 2, 3), 5, "1,2"])
def test_bad_phase_value_shape(value):
    with pytest.raises(TypeError, match="a2a"):
        LinkCosts({"a2a": value})


@pytest.mark.parametrize("phases", [{}, None, [("a2a", (1, 1))]])
def test_bad_phases_container(phases):
    with pytest.raises((TypeError, ValueError), match="phase"):
        LinkCosts(phases)


def test_bad_r2_names_parameter():
    """A non-numeric r2 must fail with a message naming r2 (not a bare float() conversion message)."""
    with pytest.raises((TypeError, ValueError)) as ei:
        LinkCosts({"a2a": {"alpha": 1, "beta": 1, "r2": "abc"}})
    assert "r2" in str(ei.value)


# ---------------------------------------------------------------------------------------------- resolve
def test_resolve_forms(tmp_path):
    preset = LinkCosts.resolve("paper-a6000")
    assert preset == LinkCosts.preset("paper-a6000")
    same = LinkCosts({"a2a": (1, 2)})
    assert LinkCosts.resolve(same) is same
    path = tmp_path / "r.yaml"
    same.to_yaml(path)
    assert LinkCosts.resolve(path) == same
    assert LinkCosts.resolve(str(path)) == same
    yml = tmp_path / "r.yml"
    same.to_yaml(yml)
    assert LinkCosts.resolve(str(yml)) == same
    assert LinkCosts.resolve(Path(yml)) == same


def test_resolve_errors(tmp_path):
    with pytest.raises(ValueError, match="paper-a6000"):
        LinkCosts.resolve("not-a-preset")
    with pytest.raises(ValueError) as ei:
        LinkCosts.resolve(str(tmp_path / "missing.yaml"))
    assert "missing.yaml" in str(ei.value)
    with pytest.raises(TypeError):
        LinkCosts.resolve(42)


def test_equality_and_repr():
    a = LinkCosts({"a2a": (1, 2)}, name="a")
    b = LinkCosts({"a2a": (1, 2)}, name="b")
    assert a == b  # equality is about the numbers
    assert a != LinkCosts({"a2a": (1, 3)})
    assert a != {"a2a": (1, 2)}
    assert "a2a" in repr(a)
    assert math.isclose(a.phase_ms("a2a", 2), 5.0)


# ---------------------------------------------------------------------------------------------- engine terms
def test_engine_terms_default_to_zero_and_presets_have_none():
    lc = LinkCosts.preset("paper-a6000")
    assert lc.copy_beta == lc.pair_bytes == lc.fault_beta == lc.fault_threshold == 0.0
    assert (lc.duplex, lc.level1_link) == ("full", "rank")
    assert all(pc.sync_ms == 0.0 for pc in lc.phases.values())
    assert not lc.has_engine_terms
    assert PhaseCost(1.0, 2.0) == PhaseCost(1.0, 2.0, None, 0.0)
    assert PhaseCost(1.0, 2.0, sync_ms=3.0).ms(10) == pytest.approx(21.0)  # ms() is the payload line alone


def test_engine_terms_yaml_round_trip(tmp_path):
    lc = LinkCosts({"a2a": PhaseCost(0.5, 1e-6, 0.99, 2.5), "inter1": {"alpha": 1, "beta": 2e-6, "sync_ms": 1.25},
                    "intra1": (0.1, 3e-7)},
                   name="cal", copy_beta=1.5e-6, pair_bytes=24, duplex="half", level1_link="node",
                   fault_beta=2e-6, fault_threshold=32 << 20)
    assert lc.has_engine_terms
    path = tmp_path / "cal.yaml"
    lc.to_yaml(path)
    text = path.read_text()
    for key in ("copy_beta", "pair_bytes", "fault_beta", "fault_threshold", "duplex: half", "level1_link: node",
                "sync_ms"):
        assert key in text, key
    back = LinkCosts.from_yaml(path)
    assert back == lc and back.extras == lc.extras
    assert back["a2a"] == PhaseCost(0.5, 1e-6, 0.99, 2.5) and back["intra1"].sync_ms == 0.0
    assert "shared_memory" not in text and not back["intra1"].shared_memory
    assert back != LinkCosts(lc.phases, copy_beta=lc.copy_beta)  # the extras are part of equality


def test_shared_memory_phase_round_trips_and_is_checked(tmp_path):
    lc = LinkCosts({"inter1": (1.0, 2e-6), "intra1": {"alpha": 0.5, "beta": 5e-7, "shared_memory": True}})
    assert lc["intra1"].shared_memory and not lc["inter1"].shared_memory and lc.has_engine_terms
    path = tmp_path / "shm.yaml"
    lc.to_yaml(path)
    assert "shared_memory: true" in path.read_text()
    assert LinkCosts.from_yaml(path) == lc
    with pytest.raises(TypeError, match="shared_memory of phase 'intra1' must be true or false"):
        LinkCosts({"intra1": {"alpha": 0.5, "beta": 5e-7, "shared_memory": "yes"}})


def test_old_yaml_without_engine_terms_still_loads_and_writes_the_same(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("name: calibrated-2x2\nunits: {alpha: ms, beta: ms per byte}\n"
                    "phases:\n  a2a: {alpha: 3.48, beta: 4.907e-06, r2: 0.9675}\n  inter1: {alpha: 1.95, beta: 3.169e-06}\n")
    lc = LinkCosts.from_yaml(path)
    assert lc.extras == {"copy_beta": 0.0, "pair_bytes": 0.0, "duplex": "full", "level1_link": "rank",
                         "fault_beta": 0.0, "fault_threshold": 0.0}
    out = tmp_path / "again.yaml"
    lc.to_yaml(out)
    assert "copy_beta" not in out.read_text() and "sync_ms" not in out.read_text()  # old readers keep working


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"duplex": "simplex"}, ValueError, "duplex"), ({"level1_link": "socket"}, ValueError, "level1_link"),
    ({"copy_beta": -1.0}, ValueError, "copy_beta"), ({"copy_beta": "x"}, TypeError, "copy_beta"),
    ({"fault_beta": float("nan")}, ValueError, "fault_beta"), ({"pair_bytes": -24}, ValueError, "pair_bytes"),
])
def test_bad_engine_terms(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        LinkCosts({"a2a": (1, 1)}, **kwargs)


def test_bad_sync_ms_in_file_names_phase(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("phases:\n  a2a: {alpha: 1, beta: 1, sync_ms: -2}\n")
    with pytest.raises(ValueError) as ei:
        LinkCosts.from_yaml(path)
    assert "sync_ms" in str(ei.value) and "a2a" in str(ei.value) and str(path) in str(ei.value)
    path.write_text("phases:\n  a2a: {alpha: 1, beta: 1}\nduplex: both\n")
    with pytest.raises(ValueError, match="duplex"):
        LinkCosts.from_yaml(path)
