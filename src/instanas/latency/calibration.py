"""Whole children timed end to end: the table's calibration curve, ``profile --validate`` and
the variants' measured latency.

A child is timed as the deployed batch-1 path runs it (controller, routing, the child) in the
table's backend, interleaved in shuffled rounds with the other children.

Calibration: units timed alone keep their weights in the caches; inside a larger network they
do not, so a network's latency grows faster than the sum S of its units. Over random children
spanning the whole range, ``latency - call`` against S is close to a power law; its exponent
and its value at the MobileNetV2 path (the reference) are fitted by least squares on logs.
``instanas profile --validate`` checks the curve on children it was not fitted to.
"""

from __future__ import annotations

import math

import torch

from ..models.controller import Controller
from ..models.metagraph import MetaGraph, mbv2_path
from ..models.predictor import InstaNASPredictor
from ..space import ChildArchitecture
from .backends import Backend
from .table import LatencyTable
from .timing import TimingStats, cpu_threads, time_units

CALIBRATION_SEED_OFFSET = 7919  # keeps calibration children apart from validation children


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
    backend: Backend,
    *,
    threads: int,
    warmup: int,
    repeats: int,
    seed: int = 0,
) -> dict[str, TimingStats]:
    """Batch-1 time of the deployed path (controller, routing, child) of each child."""
    predictor = InstaNASPredictor(metagraph.cpu(), controller.cpu())
    with cpu_threads(threads):
        calls = {str(child): backend.routed_call(predictor, child) for child in children}
        return time_units(calls, backend.device, warmup=warmup, repeats=repeats,
                          burst=backend.burst, seed=seed, desc="children")  # fmt: skip


def predicted_ms(table: LatencyTable, metagraph: MetaGraph, child: ChildArchitecture) -> float:
    """Table prediction for the deployed batch-1 path: controller + child."""
    return float(table.predict_ms(metagraph.resolve(child.to_policy())))


def unit_sum(table: LatencyTable, metagraph: MetaGraph, child: ChildArchitecture) -> float:
    """Sum of the raw unit timings of controller + child (the curve's argument)."""
    policy = metagraph.resolve(child.to_policy())
    raw = float(table.cells_ms(policy)) / table.chain_factor
    return raw + sum(table.fixed[n].median_ms for n in ("stem", "head", "controller"))


def calibrate(
    table: LatencyTable,
    metagraph: MetaGraph,
    controller: Controller,
    backend: Backend,
    count: int,
    *,
    threads: int,
    warmup: int,
    repeats: int,
    seed: int = 0,
) -> None:
    """Fit ``table``'s curve on ``count`` random children and the MobileNetV2 path.

    The children come from a different random stream than the validation children, so
    ``profile --validate`` checks the curve on children it was not fitted to.
    """
    table.chain_factor, table.chain_exponent = 1.0, 1.0
    children = random_children(metagraph, count, seed=CALIBRATION_SEED_OFFSET + seed)
    children.append(mbv2_path(metagraph.space))
    timing = {"threads": threads, "warmup": warmup, "repeats": repeats, "seed": seed}
    stats = measure_children(metagraph, controller, children, backend, **timing)
    sums = [unit_sum(table, metagraph, c) for c in children]
    work = [max(stats[str(c)].median_ms - table.call_ms(), 1e-6) for c in children]
    table.reference_ms = sums[-1]
    table.chain_exponent, table.chain_factor = fit_power_law(sums, work, table.reference_ms)


def fit_power_law(units: list[float], work: list[float], reference: float) -> tuple[float, float]:
    """(k, f) of ``work = f * units * (units / reference) ** (k - 1)``, least squares on logs.

    With fewer than three points, or points too close together to place a slope, k is 1 and
    f the median ratio.
    """
    xs = [math.log(u / reference) for u in units]
    ys = [math.log(w / u) for u, w in zip(units, work)]  # log(f) + (k - 1) x
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if len(xs) < 3 or spread < 1e-6:
        ratios = sorted(w / u for u, w in zip(units, work))
        return 1.0, ratios[len(ratios) // 2]
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    return 1.0 + slope, math.exp(mean_y - slope * mean_x)
