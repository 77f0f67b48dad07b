"""Latency lookup table: every (cell, module), the stem, the head and the controller timed at
batch 1 in the latency backend (onnxruntime by default, eager PyTorch on request).

Modules are timed in their deployed form (BatchNorm folded), each with its cell's real input
shape. In onnxruntime every call also pays the runtime's own per-call work (binding, the
executor's start), so each unit is timed beside an empty graph of the same input shape and the
table keeps the difference; the per-call cost is the ``call`` entry, paid once per image.

A sum over units misses what chaining changes (caches hold a unit's weights when it runs alone,
not inside a network), so the table is calibrated on whole random children timed right after
the units (profiling: :mod:`instanas.latency.profiling`, the curve:
:mod:`instanas.latency.calibration`); a whole network is predicted as
``call + chain_factor * S * (S / reference) ** (chain_exponent - 1)``, S the sum of its units.
The search prices modules additively with ``chain_factor`` (exact for networks the size of the
MobileNetV2 path, the reference); ``predict_ms`` applies the whole curve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..space import MBV2_PATH_MODULE, SearchSpace
from ..utils import atomic_write_text
from .backends import Backend
from .timing import TimingStats, device_name

log = logging.getLogger(__name__)
TABLE_FORMAT = 4  # 3: backends, per-call cost, calibration curve; 4: routing in the runtime


@dataclass(frozen=True)
class LatencyBounds:
    """Reference latencies (ms, summed over cells) of the table, from which the search's reward
    sets its window and its budget."""

    all_modules: float  # L_all: every module of every cell
    mbv2_path: float  # L_mbv2: module 0 in every cell (the MobileNetV2 path)
    minimum: float  # L_min: only the forced defaults


@dataclass
class LatencyTable:
    """Per-unit batch-1 timings and the calibration that turns their sum into a prediction."""

    key: dict
    modules: list[list[TimingStats]]  # [cells][modules], unit cost beyond an empty call
    fixed: dict[str, TimingStats]  # stem, head, controller (with routing), call
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    chain_factor: float = 1.0
    chain_exponent: float = 1.0
    reference_ms: float = 1.0  # unit sum of the MobileNetV2 path with the controller

    def module_ms(self) -> torch.Tensor:
        """Price of each (cell, module) inside a network (ms): the search's additive cost."""
        raw = torch.tensor([[s.median_ms for s in row] for row in self.modules])
        return raw * self.chain_factor

    def call_ms(self) -> float:
        """What the runtime costs per call with no work (0 in eager PyTorch)."""
        return self.fixed["call"].median_ms if "call" in self.fixed else 0.0

    def unit_ms(self, name: str) -> float:
        """Price of one fixed unit (``stem``, ``head`` or ``controller``)."""
        return self.fixed[name].median_ms * self.chain_factor

    def fixed_ms(self, include_controller: bool = True) -> float:
        """Per-call cost + stem + head (+ controller), additively priced (ms)."""
        names = ["stem", "head"] + (["controller"] if include_controller else [])
        return self.call_ms() + sum(self.unit_ms(n) for n in names)

    def cells_ms(self, resolved_policy: torch.Tensor) -> torch.Tensor:
        """Additive price of the cells for resolved policies [..., cells, modules] (ms)."""
        table = self.module_ms().to(resolved_policy.device)
        return (resolved_policy.float() * table).flatten(-2).sum(-1)

    def predict_ms(
        self, resolved_policy: torch.Tensor, include_controller: bool = True
    ) -> torch.Tensor:
        """Predicted batch-1 latency of whole networks [...] for resolved policies [...,
        cells, modules]: stem, the cells, head (and the controller), on the calibration
        curve."""
        raw_fixed = sum(self.fixed[n].median_ms for n in ("stem", "head"))
        if include_controller:
            raw_fixed += self.fixed["controller"].median_ms
        units = self.cells_ms(resolved_policy) / self.chain_factor + raw_fixed
        return self.curve(units)

    def curve(self, units: torch.Tensor | float) -> torch.Tensor:
        """The calibration curve: a sum of unit timings -> the predicted latency (ms)."""
        units = torch.as_tensor(units, dtype=torch.float64).clamp_min(1e-9)
        bend = (units / self.reference_ms) ** (self.chain_exponent - 1.0)
        return (self.call_ms() + self.chain_factor * units * bend).float()

    def bounds(self, space: SearchSpace) -> LatencyBounds:
        table = self.module_ms()
        return LatencyBounds(
            all_modules=float(table.sum()),
            mbv2_path=float(table[:, MBV2_PATH_MODULE].sum()),
            minimum=float(table[space.forced_mask(), space.forced_module].sum()),
        )

    @property
    def backend(self) -> str:
        return self.key.get("backend", "eager")

    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "key": self.key,
            "created": self.created,
            "chain_factor": self.chain_factor,
            "chain_exponent": self.chain_exponent,
            "reference_ms": self.reference_ms,
            "modules": [[asdict(s) for s in row] for row in self.modules],
            "fixed": {k: asdict(v) for k, v in self.fixed.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        return cls(
            key=data["key"],
            modules=[[TimingStats(**s) for s in row] for row in data["modules"]],
            fixed={k: TimingStats(**v) for k, v in data["fixed"].items()},
            created=data.get("created", ""),
            chain_factor=float(data.get("chain_factor", 1.0)),
            chain_exponent=float(data.get("chain_exponent", 1.0)),
            reference_ms=float(data.get("reference_ms", 1.0)),
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_dict(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"latency table {path} is unreadable ({exc}): delete it or run "
                "`instanas profile` again"
            ) from exc


def table_key(
    metagraph: MetaGraph,
    controller: Controller,
    backend: Backend,
    threads: int,
    dtype: torch.dtype = torch.float32,
) -> dict:
    space = metagraph.space
    key = {
        "device": device_name(backend.device),
        "device_type": backend.device.type,
        "backend": backend.name,
        "runtime": backend.runtime_version(),
        "torch": torch.__version__,
        "threads": threads,
        "dtype": str(dtype).replace("torch.", ""),
        "input_shape": [1, space.input_channels, space.input_size, space.input_size],
        "space": space.fingerprint(),
        "controller": controller.spec.to_dict(),
        "format": TABLE_FORMAT,  # tables of an older format are measured again
    }
    return json.loads(json.dumps(key))  # the form it has after a JSON round trip


def matching_table(path: Path, key: dict) -> LatencyTable | None:
    """The table at ``path`` if it exists, reads and was made for ``key``; else None (logged)."""
    if not path.exists():
        return None
    try:
        table = LatencyTable.load(path)
    except ValueError as exc:
        log.warning("%s; profiling again", exc)
        return None
    if table.key == key:
        log.info("reusing latency table %s", path)
        return table
    changed = ", ".join(sorted(k for k in key if table.key.get(k) != key[k]))
    log.warning("latency table %s was made for another setup (%s differ); profiling again",
                path, changed)  # fmt: skip
    return None


def default_cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("INSTANAS_CACHE", Path.home() / ".cache" / "instanas"))
    return root / "latency" / f"{digest}.json"
