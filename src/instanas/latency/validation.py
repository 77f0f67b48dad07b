"""Does the latency table predict what whole children cost? Measure and compare.

Each child is timed end to end at batch 1 in the table's backend as the deployed path runs it
(controller, routing, the child's modules; in onnxruntime the exported graphs), interleaved in
shuffled rounds with all other children. Its prediction is the table's: the child's units and
the fixed stem, head and controller costs on the calibration curve, fitted on other children.
Agreement is summarised by Spearman rank correlation (does the table order children correctly,
which is what the reward needs) and the median and 90th percentile of the relative error (does
it get their size right).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..models.predictor import InstaNASPredictor
from ..space import ChildArchitecture
from ..utils import atomic_write_text
from .backends import Backend, backend_info
from .calibration import measure_children, predicted_ms
from .table import LatencyTable
from .timing import device_info, quantile


@dataclass
class ChildTiming:
    child: str
    source: str  # "random", "controller" or "mbv2-path"
    images: int  # validation images that chose this child (0 for random children)
    predicted_ms: float
    measured_ms: float

    @property
    def relative_error(self) -> float:
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms


@dataclass
class TableValidation:
    children: list[ChildTiming]
    device: dict
    chain_factor: float
    chain_exponent: float
    spearman: float
    median_relative_error: float
    p90_relative_error: float

    def to_dict(self) -> dict:
        return {
            "spearman": self.spearman,
            "median_relative_error": self.median_relative_error,
            "p90_relative_error": self.p90_relative_error,
            "by_source": self.by_source(),
            "device": self.device,
            "chain_factor": self.chain_factor,
            "chain_exponent": self.chain_exponent,
            "children": [asdict(c) for c in self.children],
        }

    def by_source(self) -> dict[str, dict]:
        """Spearman and median relative error within each source: random children span the
        space, the controller's differ in a few modules and test the table's fine ranking."""
        found: dict[str, dict] = {}
        for source in sorted({c.source for c in self.children}):
            group = [c for c in self.children if c.source == source]
            found[source] = {
                "children": len(group),
                "spearman": spearman(
                    [c.predicted_ms for c in group], [c.measured_ms for c in group]
                ),  # fmt: skip
                "median_relative_error": quantile([c.relative_error for c in group], 0.5),
            }
        return found

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))


def controller_children(
    predictor: InstaNASPredictor, images: torch.Tensor
) -> dict[str, tuple[ChildArchitecture, int]]:
    """Every distinct child the controller picks for ``images``, with how many images pick it."""
    found: dict[str, tuple[ChildArchitecture, int]] = {}
    for start in range(0, len(images), 500):
        for row in predictor.policies(images[start : start + 500]):
            child = ChildArchitecture.from_policy(row)
            key = str(child)
            found[key] = (child, found.get(key, (child, 0))[1] + 1)
    return found


def validate_table(
    table: LatencyTable,
    metagraph: MetaGraph,
    controller: Controller,
    children: list[tuple[ChildArchitecture, str, int]],
    backend: Backend,
    *,
    threads: int,
    warmup: int,
    repeats: int,
    seed: int = 0,
) -> TableValidation:
    """Time ``children`` (child, source, images) end to end in ``backend`` and compare with the
    table."""
    timing = {"threads": threads, "warmup": warmup, "repeats": repeats, "seed": seed}
    stats = measure_children(metagraph, controller, [c for c, _, _ in children], backend,
                             **timing)  # fmt: skip
    timings = [
        ChildTiming(
            str(child),
            source,
            images,
            predicted_ms(table, metagraph, child),
            stats[str(child)].median_ms,
        )
        for child, source, images in children
    ]
    errors = [t.relative_error for t in timings]
    return TableValidation(
        children=timings,
        device=device_info(backend.device, threads, backend_info(backend)),
        chain_factor=table.chain_factor,
        chain_exponent=table.chain_exponent,
        spearman=spearman([t.predicted_ms for t in timings], [t.measured_ms for t in timings]),
        median_relative_error=quantile(errors, 0.5),
        p90_relative_error=quantile(errors, 0.9),
    )


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than two values."""
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else math.nan


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


_SOURCES = (("random", "o", "tab:blue"), ("controller", "^", "tab:red"),
            ("mbv2-path", "s", "tab:green"))  # fmt: skip


def plot_validation(result: TableValidation, path: str | Path) -> None:
    """Scatter of predicted vs measured child latency with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    for source, marker, colour in _SOURCES:
        points = [c for c in result.children if c.source == source]
        if not points:
            continue
        label = (
            "MobileNetV2 path" if source == "mbv2-path" else f"{source} children ({len(points)})"
        )
        xs, ys = [c.measured_ms for c in points], [c.predicted_ms for c in points]
        ax.scatter(xs, ys, marker=marker, s=22, alpha=0.75, color=colour, label=label)
    values = [v for c in result.children for v in (c.measured_ms, c.predicted_ms)]
    low, high = min(values) * 0.9, max(values) * 1.1
    ax.plot([low, high], [low, high], color="grey", linewidth=1, label="predicted = measured")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("measured latency, batch 1 (ms)")
    ax.set_ylabel("latency table prediction (ms)")
    ax.set_title(_validation_title(result), fontsize=8)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _validation_title(result: TableValidation) -> str:
    d = result.device
    return (
        f"Latency table vs measured: Spearman {result.spearman:.3f}, median error "
        f"{100 * result.median_relative_error:.1f}%, p90 "
        f"{100 * result.p90_relative_error:.1f}%\n{d['name']}, {d['threads']} "
        f"thread(s), {d.get('runtime', 'torch ' + d['torch'])}, curve "
        f"{result.chain_factor:.2f} x S^{result.chain_exponent:.2f}"
    )
