"""Alpha-beta costs of the all-to-all phase kinds: ``t = alpha + beta * bytes`` (alpha in ms, beta in ms/byte).

Phase kinds: ``a2a`` (one all-to-all over every rank), ``inter1 .. inter{D-1}`` and ``intra1 .. intra{D-1}``
(the phases of the hierarchical dispatch, see ``docs/cost-model.md``).

Besides the payload line, a hop of the real dispatch pays terms that a calibration measures and a preset leaves at 0
(so the ``paper-a6000`` predictions are the paper's plain lines):

* ``PhaseCost.sync_ms``: the latency of the count exchange that precedes every payload of that phase;
* ``LinkCosts.copy_beta``: ms per byte of rows a rank copies locally in a hop (the gather of the rows it sends, the
  zero-filled accumulator and ``index_add`` of the combine);
* ``LinkCosts.fault_beta`` and ``fault_threshold``: ms per byte of a freshly mapped buffer (page faults on first
  touch), charged for every buffer of a hop of at least ``fault_threshold`` bytes (glibc maps those fresh from the
  kernel on every allocation and unmaps them on free);
* ``LinkCosts.pair_bytes``: metadata bytes per (token, expert) pair that travel in the same exchange as the rows;
* ``LinkCosts.duplex`` and ``LinkCosts.level1_link``: how the busiest load ``n`` is counted (``"full"``: a rank's
  max(sent, received), ``"half"``: sent + received; ``level1_link="node"``: level-1 bytes are limited per node link,
  shared by the node's ranks). See ``docs/cost-model.md``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

import yaml

from ..dispatch.spec import Phase

__all__ = ["LinkCosts", "PhaseCost", "PRESETS", "DUPLEX_MODES", "LEVEL1_LINK_MODES"]

DUPLEX_MODES = ("full", "half")
LEVEL1_LINK_MODES = ("rank", "node")


# Fitted on 4 nodes x 8 RTX A6000 ("4x2x2x2") in the HierMoE paper (arXiv 2508.09591), r^2 >= 0.997.
PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "paper-a6000": {
        "a2a": (0.722, 5.70e-7),
        "inter1": (0.497, 5.29e-7),
        "inter2": (0.301, 1.17e-7),
        "inter3": (0.149, 2.06e-8),
        "intra1": (0.571, 1.27e-7),
        "intra2": (0.114, 2.63e-8),
        "intra3": (0.204, 1.64e-8),
    },
}


@dataclass(frozen=True)
class PhaseCost:
    """One phase kind's fitted payload line ``alpha + beta * n``; ``r2`` is the fit quality when calibrated (None for
    presets); ``sync_ms`` the measured latency of the count exchange that precedes each payload (0 for presets);
    ``shared_memory``: the phase's groups exchange through shared memory (calibrated on one host), where a hop
    gathers its rows straight into the transport's buffers and needs no count exchange first."""

    alpha: float
    beta: float
    r2: float | None = None
    sync_ms: float = 0.0
    shared_memory: bool = False

    def ms(self, num_bytes: float) -> float:
        """The payload exchange alone: ``alpha + beta * num_bytes`` (no ``sync_ms``)."""
        return self.alpha + self.beta * float(num_bytes)


def _check_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {value}")
    return value


class LinkCosts:
    """Per phase kind ``(alpha, beta)``; ``phase_ms(name, bytes)`` gives the predicted time of one phase."""

    def __init__(self, phases: Mapping[str, "PhaseCost | tuple[float, float] | Mapping"], name: str = "custom",
                 copy_beta: float = 0.0, pair_bytes: float = 0.0, duplex: str = "full", level1_link: str = "rank",
                 fault_beta: float = 0.0, fault_threshold: float = 0.0):
        if not isinstance(phases, Mapping) or not phases:
            raise TypeError("link cost phases must be a non-empty mapping of phase name -> (alpha, beta)")
        parsed: dict[str, PhaseCost] = {}
        for key, value in phases.items():
            if not _is_phase(key):
                raise ValueError(f"link cost phase {key!r} is not valid: allowed 'a2a', 'inter<i>', 'intra<i>' (i >= 1)")
            sync, shared = 0.0, False
            if isinstance(value, PhaseCost):
                alpha, beta, r2, sync, shared = value.alpha, value.beta, value.r2, value.sync_ms, value.shared_memory
            elif isinstance(value, Mapping):
                unknown = set(value) - {"alpha", "beta", "r2", "sync_ms", "shared_memory"}
                if unknown or not {"alpha", "beta"} <= set(value):
                    raise ValueError(f"link cost phase {key!r} needs keys 'alpha' and 'beta' (optional 'r2', "
                                     f"'sync_ms', 'shared_memory'), got {sorted(value)}")
                alpha, beta, r2, sync = value["alpha"], value["beta"], value.get("r2"), value.get("sync_ms", 0.0)
                shared = value.get("shared_memory", False)
            elif isinstance(value, (tuple, list)) and len(value) == 2:
                (alpha, beta), r2 = value, None
            else:
                raise TypeError(f"link cost phase {key!r} must be (alpha, beta) or {{alpha:, beta:}}, got {value!r}")
            if r2 is not None and (isinstance(r2, bool) or not isinstance(r2, (int, float))):
                raise TypeError(f"r2 of phase {key!r} must be a number or null, got {r2!r}")
            if not isinstance(shared, bool):
                raise TypeError(f"shared_memory of phase {key!r} must be true or false, got {shared!r}")
            parsed[str(key)] = PhaseCost(  # a plain str key: yaml.safe_dump writes no str subclass
                _check_number(alpha, f"alpha of phase {key!r}"),
                _check_number(beta, f"beta of phase {key!r}"),
                None if r2 is None else float(r2),
                _check_number(sync, f"sync_ms of phase {key!r}"),
                shared,
            )
        self.phases: dict[str, PhaseCost] = parsed
        self.name = name
        self.copy_beta = _check_number(copy_beta, "copy_beta")
        self.pair_bytes = _check_number(pair_bytes, "pair_bytes")
        self.fault_beta = _check_number(fault_beta, "fault_beta")
        self.fault_threshold = _check_number(fault_threshold, "fault_threshold")
        if duplex not in DUPLEX_MODES:
            raise ValueError(f"duplex must be one of {', '.join(map(repr, DUPLEX_MODES))}, got {duplex!r}")
        if level1_link not in LEVEL1_LINK_MODES:
            raise ValueError(f"level1_link must be one of {', '.join(map(repr, LEVEL1_LINK_MODES))}, "
                             f"got {level1_link!r}")
        self.duplex, self.level1_link = duplex, level1_link

    @property
    def extras(self) -> dict:
        """The LinkCosts-wide terms (``copy_beta``, ``pair_bytes``, ``duplex``, ``level1_link``, ``fault_beta``,
        ``fault_threshold``), as keywords of the constructor."""
        return {"copy_beta": self.copy_beta, "pair_bytes": self.pair_bytes, "duplex": self.duplex,
                "level1_link": self.level1_link, "fault_beta": self.fault_beta,
                "fault_threshold": self.fault_threshold}

    @property
    def has_engine_terms(self) -> bool:
        """Whether any term beyond the plain payload lines is set (sync, copies, metadata, byte-count mode)."""
        return (self.copy_beta > 0 or self.pair_bytes > 0 or self.duplex != "full" or self.level1_link != "rank"
                or self.fault_beta > 0 or any(pc.sync_ms > 0 or pc.shared_memory for pc in self.phases.values()))

    # ------------------------------------------------------------------ construction
    @classmethod
    def preset(cls, name: str) -> "LinkCosts":
        if not isinstance(name, str):
            raise TypeError(f"link_costs preset must be a string, got {name!r}")
        if name not in PRESETS:
            raise ValueError(f"unknown link_costs preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(PRESETS[name], name=name)

    @classmethod
    def resolve(cls, spec: "LinkCosts | str | os.PathLike") -> "LinkCosts":
        """A LinkCosts, a preset name, or a path to a YAML file (``*.yaml`` / ``*.yml``)."""
        if isinstance(spec, LinkCosts):
            return spec
        if isinstance(spec, os.PathLike) or (
            isinstance(spec, str) and (spec.endswith((".yaml", ".yml")) or (spec not in PRESETS and os.path.isfile(spec)))
        ):
            return cls.from_yaml(spec)
        return cls.preset(spec)

    @classmethod
    def from_yaml(cls, path: "str | os.PathLike") -> "LinkCosts":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise ValueError(f"link_costs file {path!r} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"link_costs file {path!r} is a directory, not a YAML file") from None
        except UnicodeDecodeError as e:  # a ValueError subclass: must come before YAMLError
            raise ValueError(f"link_costs file {path!r} is not UTF-8 text: {e.reason}") from None
        except OSError as e:
            raise ValueError(f"link_costs file {path!r} cannot be read: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"link_costs file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("phases"), dict):
            raise ValueError(
                f"link_costs file {path!r} must hold a mapping with a 'phases' mapping, e.g. "
                "'phases: {a2a: {alpha: 0.7, beta: 5.7e-7}}' (alpha in ms, beta in ms per byte)"
            )
        extras = {}
        for key, default in (("copy_beta", 0.0), ("pair_bytes", 0.0), ("duplex", "full"), ("level1_link", "rank"),
                             ("fault_beta", 0.0), ("fault_threshold", 0.0)):
            extras[key] = data.get(key, default)
        try:
            return cls(data["phases"], name=str(data.get("name", os.path.basename(path))), **extras)
        except (TypeError, ValueError) as e:
            raise type(e)(f"link_costs file {path!r}: {e}") from None

    def to_yaml(self, path: "str | os.PathLike") -> None:
        """Write the costs; the terms beyond ``alpha``/``beta``/``r2`` only when set (old readers still load it)."""
        phases = {}
        for key, pc in sorted(self.phases.items(), key=lambda kv: _phase_sort_key(kv[0])):
            entry = {"alpha": pc.alpha, "beta": pc.beta}
            if pc.r2 is not None:
                entry["r2"] = pc.r2
            if pc.sync_ms:
                entry["sync_ms"] = pc.sync_ms
            if pc.shared_memory:
                entry["shared_memory"] = True
            phases[key] = entry
        units = {"alpha": "ms", "beta": "ms per byte"}
        doc: dict = {"name": self.name, "units": units}
        if any(pc.sync_ms for pc in self.phases.values()):
            units["sync_ms"] = "ms per count exchange"
        if self.copy_beta:
            units["copy_beta"] = "ms per byte copied locally"
            doc["copy_beta"] = self.copy_beta
        if self.pair_bytes:
            units["pair_bytes"] = "bytes of metadata per (token, expert) pair"
            doc["pair_bytes"] = self.pair_bytes
        if self.fault_beta or self.fault_threshold:
            units["fault_beta"] = "ms per byte of a freshly mapped buffer"
            units["fault_threshold"] = "bytes"
            doc["fault_beta"] = self.fault_beta
            doc["fault_threshold"] = self.fault_threshold
        if self.duplex != "full":
            doc["duplex"] = self.duplex
        if self.level1_link != "rank":
            doc["level1_link"] = self.level1_link
        doc["phases"] = phases
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(doc, f, sort_keys=False)

    # ------------------------------------------------------------------ use
    def __getitem__(self, phase: str) -> PhaseCost:
        try:
            return self.phases[phase]
        except KeyError:
            raise ValueError(
                f"link costs {self.name!r} have no entry for phase {phase!r} (they cover: "
                f"{', '.join(sorted(self.phases, key=_phase_sort_key))}); calibrate or give a YAML file with it"
            ) from None

    def phase_ms(self, phase: str, num_bytes: float) -> float:
        return self[phase].ms(num_bytes)

    def require(self, phase_names) -> None:
        """Raise ``ValueError`` naming the first phase that these costs lack."""
        for p in phase_names:
            self[p]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinkCosts) and other.phases == self.phases and other.extras == self.extras

    def __repr__(self) -> str:
        return f"LinkCosts(name={self.name!r}, phases={sorted(self.phases, key=_phase_sort_key)})"

    @classmethod
    def calibrate(cls, expert_parallel, sizes=None, repeats=5, **kwargs) -> "LinkCosts":
        """Measure the phase kinds of ``expert_parallel`` on its live process groups: ``(alpha, beta)`` of the payload,
        ``sync_ms`` of the count exchange per phase, and ``copy_beta`` of the local copies.

        Collective over the expert-parallel ranks; see ``hiermoe_lightning.cost.calibrate.calibrate``
        (``sizes=None``: its ``DEFAULT_SIZES``; other keywords: ``warmup``, ``phases``, ``name``, ``duplex``,
        ``level1_link``, ``copy_sizes``).
        """
        from .calibrate import calibrate

        return calibrate(expert_parallel, sizes=sizes, repeats=repeats, **kwargs)


def _phase_sort_key(name: str) -> tuple[int, int]:
    return Phase.parse(name).sort_key


def _is_phase(key: object) -> bool:
    """Whether ``key`` names a phase (``a2a``, ``inter<i>``, ``intra<i>``)."""
    try:
        Phase.parse(key)
    except ValueError:
        return False
    return True
