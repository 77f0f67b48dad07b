"""Profiling the latency table: every unit timed in the backend, then the calibration.

``load_or_profile`` reuses a table whose key matches the setup (same device, backend, runtime
version, threads, space and controller); otherwise it profiles one and saves it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from .backends import Backend
from .calibration import calibrate
from .table import LatencyTable, matching_table, table_key
from .timing import TimingStats, cpu_threads, time_units

log = logging.getLogger(__name__)


def profile_table(
    metagraph: MetaGraph,
    controller: Controller,
    backend: Backend,
    *,
    threads: int,
    warmup: int = 10,
    repeats: int = 50,
    seed: int = 0,
    calibration_children: int = 30,
) -> LatencyTable:
    """Time every (cell, module), the stem, the head and the controller at batch 1, then
    calibrate the table on whole random children (0 children: the plain sum)."""
    if repeats < 30:
        raise ValueError(f"latency repeats is {repeats}: use at least 30 for a stable median")
    with cpu_threads(threads):
        units, empty_calls = timing_units(metagraph.deploy(), controller.deploy(), backend)
        stats = time_units({**units, **empty_calls}, backend.device, warmup=warmup,
                           repeats=repeats, burst=backend.burst, seed=seed,
                           desc="latency table")  # fmt: skip
    table = LatencyTable(
        table_key(metagraph, controller, backend, threads),
        *_unit_costs(metagraph, stats, bool(empty_calls)),
    )
    if calibration_children:
        timing = {"threads": threads, "warmup": warmup, "repeats": repeats, "seed": seed}
        calibrate(table, metagraph, controller, backend, calibration_children, **timing)
    return table


def timing_units(
    graph: MetaGraph, ctrl: Controller, backend: Backend
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    """The calls a table times: its units (stem, controller, every cell's modules, head) of a
    deployed meta-graph, each at its real input shape, and, where the runtime has a per-call
    cost, one empty call per input shape (``empty:C,S``)."""
    space = graph.space
    image = (1, space.input_channels, space.input_size, space.input_size)
    units = {"stem": backend.call(graph.stem, image),
             "controller": backend.controller_call(ctrl, space)}  # fmt: skip
    for c, cell in enumerate(graph.cells):
        shape = _shape(cell.spec.in_channels, cell.spec.input_size)
        for m, module in enumerate(cell.candidates):
            units[f"cell{c}/m{m}"] = backend.call(module, shape)
    last = graph.cells[-1].spec
    units["head"] = backend.call(graph.head, _shape(last.out_channels, last.output_size))
    shapes = {image} | {_shape(c.spec.in_channels, c.spec.input_size) for c in graph.cells}
    shapes.add(_shape(last.out_channels, last.output_size))
    empty = {_empty(s): call for s in shapes if (call := backend.call_overhead(s)) is not None}
    return units, empty


def _shape(channels: int, size: int) -> tuple[int, int, int, int]:
    return (1, channels, size, size)


def _empty(shape: tuple[int, ...]) -> str:
    return f"empty:{shape[1]},{shape[2]}"


def _unit_costs(
    metagraph: MetaGraph, stats: dict[str, TimingStats], has_call_cost: bool
) -> tuple[list[list[TimingStats]], dict[str, TimingStats]]:
    """Unit timings with the empty call of the same input shape taken off."""
    space = metagraph.space
    image = _shape(space.input_channels, space.input_size)

    def cost(name: str, shape: tuple[int, ...]) -> TimingStats:
        return stats[name].minus(stats[_empty(shape)]) if has_call_cost else stats[name]

    modules = [
        [cost(f"cell{c}/m{m}", _shape(spec.in_channels, spec.input_size))
         for m in range(space.num_modules)]
        for c, spec in enumerate(space.cells())
    ]  # fmt: skip
    last = space.cells()[-1]
    fixed = {
        "stem": cost("stem", image),
        "controller": cost("controller", image),
        "head": cost("head", _shape(last.out_channels, last.output_size)),
    }
    if has_call_cost:
        fixed["call"] = stats[_empty(image)]
    return modules, fixed


def load_or_profile(
    path: str | os.PathLike,
    metagraph: MetaGraph,
    controller: Controller,
    backend: Backend,
    *,
    threads: int,
    warmup: int,
    repeats: int,
    seed: int = 0,
    calibration_children: int = 30,
) -> LatencyTable:
    """Reuse the table at ``path`` when its key matches this setup; otherwise profile anew."""
    path = Path(path)
    table = matching_table(path, table_key(metagraph, controller, backend, threads))
    if table is not None:
        return table
    options = {"warmup": warmup, "repeats": repeats, "seed": seed,
               "calibration_children": calibration_children}  # fmt: skip
    table = profile_table(metagraph, controller, backend, threads=threads, **options)
    table.save(path)
    return table
