"""Timing zero-argument calls on a noisy machine, and the facts recorded next to every figure.

Calls are timed in interleaved rounds, shuffled per round, so load on the machine spreads over
every call instead of inflating whichever was timed at a bad moment. Within a round each call
runs ``burst`` times back to back and only the last ``burst - 1`` are timed: the first brings
the call's weights into the caches, as repeated inference in deployment does, and the rest
measure that warm state (``burst=1`` times every call cold, straight after the others).
"""

from __future__ import annotations

import contextlib
import math
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..utils import progress_bar

CPU = torch.device("cpu")


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

    def minus(self, other: "TimingStats") -> "TimingStats":
        """These timings with ``other``'s median taken off (a unit's cost beyond an empty call);
        never below zero, which is where a unit cheaper than the timing noise lands."""
        shift = other.median_ms

        def less(value: float) -> float:
            return max(value - shift, 0.0)

        return TimingStats(less(self.median_ms), less(self.mean_ms), self.std_ms,
                           less(self.p10_ms), less(self.p90_ms), self.repeats)  # fmt: skip


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


def device_info(device: torch.device, threads: int, backend: dict | None = None) -> dict:
    """What every latency figure is recorded next to (``backend``: which runtime timed it)."""
    info = {
        "type": device.type,
        "name": device_name(device),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return {**info, **(backend or {})}


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
    device: torch.device = CPU,
    *,
    warmup: int,
    repeats: int,
    burst: int = 1,
    seed: int = 0,
    desc: str = "profiling",
) -> dict[str, TimingStats]:
    """Median-based timing of zero-argument calls, interleaved in shuffled rounds of bursts."""
    names = list(units)
    timed = max(burst - 1, 1)
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
                call = units[name]
                if burst > 1:
                    call()  # warms the caches for the timed calls
                for _ in range(timed):
                    start = time.perf_counter_ns()
                    call()
                    synchronize(device)
                    samples[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: TimingStats.from_samples(s) for name, s in samples.items()}


def quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))
