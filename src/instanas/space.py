"""The vocabulary of the method as plain data: the search space (cells, candidate modules,
preset shapes), child encodings, the empty-cell rule, routing summaries, and the controller's
shape.

A :class:`SearchSpace` fully describes a meta-graph (stem, 17 MobileNetV2-shaped cells with five
candidate modules each, head) and a :class:`ControllerSpec` the controller. Both are plain data,
so they are saved next to every checkpoint and in every latency-table key and compared when one
is loaded; this module imports nothing of the package, and everything else may import it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import torch


@dataclass(frozen=True)
class CandidateModule:
    """One candidate operation of a cell."""

    kind: str  # "inverted_residual" | "basic_block"
    kernel: int
    expansion: int  # only meaningful for inverted residuals

    @property
    def short_name(self) -> str:
        if self.kind == "inverted_residual":
            return f"ir_k{self.kernel}_e{self.expansion}"
        return f"basic_k{self.kernel}"


# The five candidates of the paper, in the order of their ids.
CANDIDATES: tuple[CandidateModule, ...] = (
    CandidateModule("inverted_residual", 3, 6),
    CandidateModule("inverted_residual", 3, 3),
    CandidateModule("inverted_residual", 5, 6),
    CandidateModule("inverted_residual", 5, 3),
    CandidateModule("basic_block", 3, 1),
)
# Runs in a shape-changing cell whose policy selects nothing (the empty-cell rule): the paper's
# basic block, unless a space names another (SearchSpace.forced_module).
FORCED_DEFAULT_MODULE = 4
# The MobileNetV2-like reference path: this module in every cell.
MBV2_PATH_MODULE = 0


@dataclass(frozen=True)
class CellGroup:
    """Consecutive cells with the same output channels (a MobileNetV2 "stage"; the config key
    is ``space.stages``): the first cell has ``stride``, the rest stride 1."""

    channels: int
    cells: int
    stride: int


# MobileNetV2's ImageNet stage table; the 32 px CIFAR version sets the second stage's stride to 1.
MOBILENETV2_STAGES: tuple[CellGroup, ...] = (
    CellGroup(16, 1, 1),
    CellGroup(24, 2, 2),
    CellGroup(32, 3, 2),
    CellGroup(64, 4, 2),
    CellGroup(96, 3, 1),
    CellGroup(160, 3, 2),
    CellGroup(320, 1, 1),
)
CIFAR_STAGES: tuple[CellGroup, ...] = tuple(
    CellGroup(s.channels, s.cells, 1) if i == 1 else s for i, s in enumerate(MOBILENETV2_STAGES)
)


@dataclass(frozen=True)
class CellSpec:
    """Shape facts of one cell of the meta-graph."""

    index: int
    in_channels: int
    out_channels: int
    stride: int
    input_size: int  # spatial side of the cell's input
    first_in_stage: bool = False

    @property
    def output_size(self) -> int:
        return math.ceil(self.input_size / self.stride)

    @property
    def shape_preserving(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels

    @property
    def forced_default(self) -> bool:
        """True when an empty policy runs module 4 here: a stage's first cell (docs/design.md)."""
        return self.first_in_stage or not self.shape_preserving


def scale_channels(channels: int, width: float) -> int:
    """Width-multiplied channel count, rounded to a multiple of 8 (4 for tiny widths)."""
    divisor = 8 if width >= 0.5 else 4
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class SearchSpace:
    """Everything that fixes the meta-graph's shapes."""

    input_channels: int = 3
    input_size: int = 32
    num_classes: int = 10
    width: float = 1.0
    stem_channels: int = 32
    stem_stride: int = 1
    stages: tuple[CellGroup, ...] = field(default=CIFAR_STAGES)
    head_channels: int = 1280
    scale_head: bool = False  # MobileNetV2 keeps 1280 head channels for widths <= 1
    candidates: tuple[CandidateModule, ...] = field(default=CANDIDATES)
    # The module an empty shape-changing cell runs (the empty-cell rule).
    forced_module: int = FORCED_DEFAULT_MODULE

    def __post_init__(self) -> None:
        if not 0 <= self.forced_module < len(self.candidates):
            raise ValueError(
                f"space.forced_module is {self.forced_module}: use a module id 0.."
                f"{len(self.candidates) - 1}"
            )
        object.__setattr__(
            self,
            "stages",
            tuple(
                s
                if isinstance(s, CellGroup)
                else CellGroup(*s)
                if isinstance(s, (list, tuple))
                else CellGroup(**s)
                for s in self.stages
            ),
        )
        object.__setattr__(
            self,
            "candidates",
            tuple(
                c if isinstance(c, CandidateModule) else CandidateModule(**c)
                for c in self.candidates
            ),
        )

    @property
    def num_cells(self) -> int:
        return sum(s.cells for s in self.stages)

    @property
    def num_modules(self) -> int:
        return len(self.candidates)

    @property
    def stem_out_channels(self) -> int:
        return scale_channels(self.stem_channels, self.width)

    @property
    def head_out_channels(self) -> int:
        if self.scale_head or self.width > 1.0:
            return scale_channels(self.head_channels, self.width)
        return self.head_channels

    @property
    def stem_output_size(self) -> int:
        return math.ceil(self.input_size / self.stem_stride)

    def cells(self) -> tuple[CellSpec, ...]:
        specs = []
        channels, size = self.stem_out_channels, self.stem_output_size
        for stage in self.stages:
            out = scale_channels(stage.channels, self.width)
            for i in range(stage.cells):
                stride = stage.stride if i == 0 else 1
                spec = CellSpec(len(specs), channels, out, stride, size, first_in_stage=i == 0)
                specs.append(spec)
                channels, size = out, spec.output_size
        return tuple(specs)

    @property
    def final_size(self) -> int:
        return self.cells()[-1].output_size

    def forced_mask(self) -> torch.Tensor:
        """Bool [cells]: cells whose empty policy runs the forced default module."""
        return torch.tensor([c.forced_default for c in self.cells()], dtype=torch.bool)

    def to_dict(self) -> dict:
        # The paper's forced module is left out, so checkpoints and cached latency tables made
        # before it could be chosen keep matching.
        data = asdict(self)
        if data["forced_module"] == FORCED_DEFAULT_MODULE:
            del data["forced_module"]
        return data

    def minimum_child(self) -> "ChildArchitecture":
        """The cheapest child: nothing selected, so only the forced cells run their module."""
        return ChildArchitecture(
            tuple((self.forced_module,) if c.forced_default else () for c in self.cells()),
            self.num_modules,
        )

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSpace":
        return cls(**data)

    def fingerprint(self) -> str:
        """Short stable hash of the space, used to key latency tables and check checkpoints."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def describe(self) -> str:
        rows = [f"{'cell':>4} {'in':>4} {'out':>4} {'stride':>6} {'size':>5}  empty->"]
        for c in self.cells():
            rows.append(
                f"{c.index:>4} {c.in_channels:>4} {c.out_channels:>4} {c.stride:>6} "
                f"{c.input_size:>5}  "
                + (f"module {self.forced_module}" if c.forced_default else "identity")
            )
        return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Child architectures


@dataclass(frozen=True)
class ChildArchitecture:
    """The set of modules one image runs: per cell, the sorted ids of the selected modules.

    String form: cells joined by ``-``; each cell is its module ids as digits, ``_`` when empty.
    Example for a 4-cell space: ``"0-13-_-4"``. Bit form: a row-major tuple of cells*modules
    0/1 values, identical to the flattened policy matrix.
    """

    cells: tuple[tuple[int, ...], ...]
    num_modules: int = len(CANDIDATES)

    def to_string(self) -> str:
        return "-".join("".join(str(m) for m in cell) or "_" for cell in self.cells)

    @classmethod
    def from_string(cls, text: str, num_modules: int = len(CANDIDATES)) -> "ChildArchitecture":
        cells = []
        for part in text.strip().split("-"):
            if part == "_":
                cells.append(())
                continue
            if not part.isdigit() or any(int(ch) >= num_modules for ch in part):
                raise ValueError(
                    f"bad cell {part!r} in architecture string {text!r}: use module "
                    f"ids 0..{num_modules - 1} or '_' for an empty cell"
                )
            cells.append(tuple(sorted({int(ch) for ch in part})))
        return cls(tuple(cells), num_modules)

    def module_pairs(self) -> frozenset[tuple[int, int]]:
        """The (cell, module) pairs this child runs."""
        return frozenset((c, m) for c, cell in enumerate(self.cells) for m in cell)

    def to_bits(self) -> tuple[int, ...]:
        bits = []
        for cell in self.cells:
            bits.extend(1 if m in cell else 0 for m in range(self.num_modules))
        return tuple(bits)

    @classmethod
    def from_bits(
        cls, bits: Sequence[int], num_modules: int = len(CANDIDATES)
    ) -> "ChildArchitecture":
        if len(bits) % num_modules:
            raise ValueError(f"{len(bits)} bits is not a multiple of {num_modules} modules")
        cells = tuple(
            tuple(m for m in range(num_modules) if bits[c * num_modules + m])
            for c in range(len(bits) // num_modules)
        )
        return cls(cells, num_modules)

    def to_policy(self) -> torch.Tensor:
        """Bool [cells, modules]."""
        bits = torch.tensor(self.to_bits(), dtype=torch.bool)
        return bits.view(len(self.cells), self.num_modules)

    @classmethod
    def from_policy(cls, policy: torch.Tensor) -> "ChildArchitecture":
        rows = policy.bool().tolist()
        return cls(
            tuple(tuple(m for m, on in enumerate(row) if on) for row in rows), policy.shape[-1]
        )

    @classmethod
    def uniform(
        cls, num_cells: int, module: int, num_modules: int = len(CANDIDATES)
    ) -> "ChildArchitecture":
        return cls(tuple((module,) for _ in range(num_cells)), num_modules)

    def active_modules(self) -> int:
        return sum(len(c) for c in self.cells)

    def __str__(self) -> str:
        return self.to_string()


@dataclass(frozen=True)
class ControllerSpec:
    """Shape of the controller network (reference: ResNet-8 with widths 16/32/64 at 32 px)."""

    input_size: int = 32  # images are resized (area) to this side before the controller sees them
    widths: tuple[int, ...] = (16, 32, 64)
    # free: every logit a linear read-out of the features | difficulty: one scalar read-out,
    # the image's difficulty, along which each module's logit is placed (see models.Controller)
    form: str = "free"

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict:
        # The free form is left out, so checkpoints and cached latency tables made before the
        # form existed keep matching.
        return {k: v for k, v in asdict(self).items() if not (k == "form" and v == "free")}


def apply_empty_cell_rule(
    policy: torch.Tensor, forced: torch.Tensor, module: int = FORCED_DEFAULT_MODULE
) -> torch.Tensor:
    """The one empty-cell rule (docs/design.md), for any leading batch shape.

    ``policy`` is bool [..., cells, modules]; ``forced`` bool [cells]. Returns a bool policy where
    every shape-changing cell with nothing selected selects ``module`` (the space's forced
    module). Empty shape-preserving cells stay empty and act as the identity.
    """
    policy = policy.bool()
    empty = ~policy.any(dim=-1)
    needs_default = empty & forced.to(policy.device)
    resolved = policy.clone()  # always: checking first would wait for the device
    resolved[..., module] |= needs_default
    return resolved


def nearest_child(child: str, exported: Sequence[str]) -> str:
    """The child of ``exported`` that runs for ``child`` in an export: itself when exported,
    else the one differing in the fewest (cell, module) entries, ties to the earlier (more
    used). The exported graph computes the same choice (models/onnx_graph.py)."""
    wanted = ChildArchitecture.from_string(child).module_pairs()

    def distance(other: str) -> int:
        return len(wanted ^ ChildArchitecture.from_string(other).module_pairs())

    return min(exported, key=distance)


def all_on_policy(space: SearchSpace) -> torch.Tensor:
    return torch.ones(space.num_cells, space.num_modules, dtype=torch.bool)


def child_counts(policies: Iterable[torch.Tensor]) -> Counter[bytes]:
    """How many rows of the [N, cells, modules] policy batches run each distinct child."""
    counts: Counter[bytes] = Counter()
    for batch in policies:
        flat = batch.bool().flatten(1).to(torch.uint8).cpu().numpy()
        counts.update(row.tobytes() for row in flat)
    return counts


def ranked_children(
    policies: torch.Tensor, limit: int | None = None
) -> list[tuple["ChildArchitecture", int]]:
    """The distinct children of ``policies`` [N, cells, modules] with their counts, most used
    first (at most ``limit``)."""
    shape = policies.shape[1:]
    ranked = child_counts([policies]).most_common(limit)
    as_policy = [torch.frombuffer(bytearray(key), dtype=torch.uint8).view(shape).bool()
                 for key, _ in ranked]  # fmt: skip
    return [(ChildArchitecture.from_policy(p), n) for p, (_, n) in zip(as_policy, ranked)]


def distinct_children(policies: Iterable[torch.Tensor]) -> int:
    """Number of distinct rows among [N, cells, modules] policy batches."""
    return len(child_counts(policies))


def routing_summary(policies: torch.Tensor) -> dict[str, float]:
    """How spread the routing is over children: distinct children, the effective number of
    children exp(entropy of the child distribution), and the most used child's share."""
    counts = torch.tensor(list(child_counts([policies]).values()), dtype=torch.float64)
    share = counts / counts.sum()
    entropy = float(-(share * share.log()).sum())
    return {
        "distinct_children": len(counts),
        "effective_children": math.exp(entropy),
        "top_child_share": float(share.max()),
    }
