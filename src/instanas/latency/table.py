"""Latency lookup table: every (cell, module) timed at batch 1 on the target device.

Modules are timed in their deployed form (BatchNorm folded), the same form the measured batch-1
inference runs, with each cell's real input shape. Timings are interleaved in rounds over all
units, so background load on a noisy machine spreads evenly over the table instead of inflating
whichever module happened to be timed at a bad moment.

Whole children are timed end to end here too (``measure_children``): the table's chain factor
is calibrated on them, the variants' latency is measured with them, and
:mod:`instanas.latency.validation` compares them with the table's predictions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..space import FORCED_DEFAULT_MODULE, MBV2_PATH_MODULE, ChildArchitecture
from ..utils import atomic_write_text, progress_bar

log = logging.getLogger(__name__)
TABLE_FORMAT = 2  # 2: chain_factor calibrated against whole children
CALIBRATION_SEED_OFFSET = 7919  # keeps calibration children apart from validation children


@dataclass(frozen=True)
class TimingStats:
    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "TimingStats":
        t = torch.tensor(samples_ms, dtype=torch.float64)
        q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        std = float(t.std()) if len(samples_ms) > 1 else 0.0
        return cls(q[1], float(t.mean()), std, q[0], q[2], len(samples_ms))


@dataclass(frozen=True)
class LatencyBounds:
    """Reference latencies (ms, summed over cells) of the table, from which the search's reward
    sets its window and its budget."""

    all_modules: float  # L_all: every module of every cell
    mbv2_path: float  # L_mbv2: module 0 in every cell (the MobileNetV2 path)
    minimum: float  # L_min: only the forced defaults


CPU = torch.device("cpu")


def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return processor_name()


def device_info(device: torch.device, threads: int) -> dict:
    """What every latency figure is recorded next to."""
    return {
        "type": device.type,
        "name": device_name(device),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_units(
    units: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    seed: int = 0,
    desc: str = "profiling",
) -> dict[str, TimingStats]:
    """Median-based timing of zero-argument callables, interleaved in shuffled rounds."""
    names = list(units)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                units[name]()
        synchronize(device)
        samples: dict[str, list[float]] = {name: [] for name in names}
        order = random.Random(seed)
        for _ in progress_bar(range(repeats), desc=desc, unit="round"):
            order.shuffle(names)
            for name in names:
                start = time.perf_counter_ns()
                units[name]()
                synchronize(device)
                samples[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: TimingStats.from_samples(s) for name, s in samples.items()}


@dataclass
class LatencyTable:
    """Per-unit batch-1 timings; predictions are ``chain_factor`` times their additive sum.

    Units timed one by one, each on its own hot input, run faster than the same units chained
    into a network: whole children take longer than their table sum, by a share that depends on
    the machine and is about the same over the whole range. ``chain_factor`` is the median ratio
    measured/sum over random calibration children timed end to end right after the units;
    ``instanas profile --validate`` checks it on other children (docs/benchmarks.md, "Latency
    table check").
    """

    key: dict
    modules: list[list[TimingStats]]  # [cells][modules], raw unit timings
    fixed: dict[str, TimingStats]  # stem, head, controller, raw unit timings
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    chain_factor: float = 1.0

    def module_ms(self) -> torch.Tensor:
        """Predicted cost of each (cell, module) inside a network (ms)."""
        return (
            torch.tensor([[s.median_ms for s in row] for row in self.modules]) * self.chain_factor
        )

    def fixed_ms(self, include_controller: bool = True) -> float:
        """Predicted stem + head (+ controller) cost (ms)."""
        names = ["stem", "head"] + (["controller"] if include_controller else [])
        return sum(self.fixed[n].median_ms for n in names) * self.chain_factor

    def unit_ms(self, name: str) -> float:
        """Predicted cost of one fixed unit (``stem``, ``head`` or ``controller``)."""
        return self.fixed[name].median_ms * self.chain_factor

    def cells_ms(self, resolved_policy: torch.Tensor) -> torch.Tensor:
        """Table latency of the cells for resolved policies [..., cells, modules] (ms)."""
        table = self.module_ms().to(resolved_policy.device)
        return (resolved_policy.float() * table).flatten(-2).sum(-1)

    def bounds(self, forced: torch.Tensor) -> LatencyBounds:
        table = self.module_ms()
        minimum = float(table[forced, FORCED_DEFAULT_MODULE].sum())
        return LatencyBounds(
            all_modules=float(table.sum()),
            mbv2_path=float(table[:, MBV2_PATH_MODULE].sum()),
            minimum=minimum,
        )

    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "key": self.key,
            "created": self.created,
            "chain_factor": self.chain_factor,
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
    device: torch.device,
    threads: int,
    dtype: torch.dtype = torch.float32,
) -> dict:
    space = metagraph.space
    key = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": threads,
        "dtype": str(dtype).replace("torch.", ""),
        "input_shape": [1, space.input_channels, space.input_size, space.input_size],
        "space": space.fingerprint(),
        "controller": controller.spec.to_dict(),
        "format": TABLE_FORMAT,  # tables of an older format are measured again
    }
    return json.loads(json.dumps(key))  # the form it has after a JSON round trip


def profile_table(
    metagraph: MetaGraph,
    controller: Controller,
    device: torch.device,
    *,
    threads: int,
    warmup: int = 10,
    repeats: int = 50,
    seed: int = 0,
    calibration_children: int = 30,
) -> LatencyTable:
    """Time every (cell, module), the stem, the head and the controller at batch 1, then
    calibrate the table's ``chain_factor`` on whole random children (0 children: no factor)."""
    if repeats < 30:
        raise ValueError(f"latency repeats is {repeats}: use at least 30 for a stable median")
    with cpu_threads(threads):
        graph = metagraph.deploy().to(device)
        ctrl = controller.deploy().to(device)
        units = timing_units(graph, ctrl, device)
        stats = time_units(
            units, device, warmup=warmup, repeats=repeats, seed=seed, desc="latency table"
        )
    modules = [
        [stats[f"cell{c}/m{m}"] for m in range(metagraph.space.num_modules)]
        for c in range(metagraph.space.num_cells)
    ]
    fixed = {name: stats[name] for name in ("stem", "head", "controller")}
    table = LatencyTable(table_key(metagraph, controller, device, threads), modules, fixed)
    if calibration_children:
        timing = {"threads": threads, "warmup": warmup, "repeats": repeats, "seed": seed}
        table.chain_factor = calibrate_chain_factor(
            table, metagraph, controller, calibration_children, device=device, **timing
        )
    return table


def timing_units(
    graph: MetaGraph, ctrl: Controller, device: torch.device
) -> dict[str, Callable[[], object]]:
    """The units a table holds (stem, controller, every cell's modules, head) of a deployed
    meta-graph, each a batch-1 forward on a random input of its real shape."""
    space = graph.space
    units: dict[str, Callable[[], object]] = {}

    def bind(module: torch.nn.Module, shape: tuple[int, ...]) -> Callable[[], object]:
        x = torch.randn(shape, device=device)
        return lambda: module(x)

    image = (1, space.input_channels, space.input_size, space.input_size)
    units["stem"] = bind(graph.stem, image)
    units["controller"] = bind(ctrl, image)
    for c, cell in enumerate(graph.cells):
        spec = cell.spec
        for m, module in enumerate(cell.candidates):
            units[f"cell{c}/m{m}"] = bind(
                module, (1, spec.in_channels, spec.input_size, spec.input_size)
            )
    last = graph.cells[-1].spec
    units["head"] = bind(graph.head, (1, last.out_channels, last.output_size, last.output_size))
    return units


def load_or_profile(
    path: str | os.PathLike,
    metagraph: MetaGraph,
    controller: Controller,
    device: torch.device,
    *,
    threads: int,
    warmup: int,
    repeats: int,
    seed: int = 0,
    calibration_children: int = 30,
) -> LatencyTable:
    """Reuse the table at ``path`` when its key matches this setup; otherwise profile anew."""
    path = Path(path)
    table = _matching_table(path, table_key(metagraph, controller, device, threads))
    if table is not None:
        return table
    options = {"warmup": warmup, "repeats": repeats, "seed": seed,
               "calibration_children": calibration_children}  # fmt: skip
    table = profile_table(metagraph, controller, device, threads=threads, **options)
    table.save(path)
    return table


def _matching_table(path: Path, key: dict) -> LatencyTable | None:
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


# ---------------------------------------------------------------------------------------------
# Whole children timed end to end: the table's chain factor, ``profile --validate`` and the
# variants' measured latency


def random_children(metagraph: MetaGraph, count: int, seed: int) -> list[ChildArchitecture]:
    """``count`` distinct resolved children spread over the whole latency range.

    Each child draws its own selection rate (uniform in [0.05, 0.8]) so that cheap, medium and
    expensive children are all represented, not only children near 50 % density.
    """
    generator = torch.Generator().manual_seed(seed)
    space = metagraph.space
    children: dict[str, ChildArchitecture] = {}
    while len(children) < count:
        rate = 0.05 + 0.75 * float(torch.rand((), generator=generator))
        draw = torch.rand((1, space.num_cells, space.num_modules), generator=generator) < rate
        child = ChildArchitecture.from_policy(metagraph.resolve(draw)[0])
        children.setdefault(str(child), child)
    return list(children.values())


def measure_children(
    metagraph: MetaGraph,
    controller: Controller,
    children: list[ChildArchitecture],
    *,
    threads: int,
    warmup: int,
    repeats: int,
    seed: int = 0,
    device: torch.device = CPU,
) -> dict[str, TimingStats]:
    """Batch-1 time of controller + materialised, BN-folded child on ``device``, interleaved
    rounds (synchronised after each call on a GPU)."""
    space = metagraph.space
    ctrl = controller.deploy().to(device)
    image = torch.randn(1, space.input_channels, space.input_size, space.input_size, device=device)
    units = {
        str(child): _end_to_end(ctrl, metagraph.cpu().materialize(child).deploy().to(device), image)
        for child in children
    }
    with cpu_threads(threads):
        return time_units(units, device, warmup=warmup, repeats=repeats, seed=seed,
                          desc="children")  # fmt: skip


def predicted_ms(table: LatencyTable, metagraph: MetaGraph, child: ChildArchitecture) -> float:
    """Table prediction for the deployed batch-1 path: controller + child."""
    return float(table.cells_ms(metagraph.resolve(child.to_policy()))) + table.fixed_ms()


def calibrate_chain_factor(
    table: LatencyTable,
    metagraph: MetaGraph,
    controller: Controller,
    count: int,
    *,
    threads: int,
    warmup: int,
    repeats: int,
    seed: int = 0,
    device: torch.device = CPU,
) -> float:
    """Median of measured / additive-sum over ``count`` random children (see LatencyTable).

    The children come from a different random stream than the validation children, so
    ``profile --validate`` checks the factor on children it was not fitted to.
    """
    children = random_children(metagraph, count, seed=CALIBRATION_SEED_OFFSET + seed)
    raw = LatencyTable(table.key, table.modules, table.fixed, chain_factor=1.0)
    timing = {"threads": threads, "warmup": warmup, "repeats": repeats, "seed": seed}
    stats = measure_children(metagraph, controller, children, device=device, **timing)
    ratios = [stats[str(c)].median_ms / predicted_ms(raw, metagraph, c) for c in children]
    return quantile(ratios, 0.5)


def _end_to_end(controller: torch.nn.Module, network: torch.nn.Module, image: torch.Tensor):
    def run() -> torch.Tensor:
        controller(image)  # the deployed path always pays for the controller first
        return network(image)

    return run


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))
