"""Wall-clock latency of several models at batch 1, measured side by side: image by image, the
models in a shuffled order per image, so that drift of the machine hits every model alike."""

from __future__ import annotations

import random
import time
from typing import Callable

import torch

from ..utils import progress_bar
from .timing import TimingStats, cpu_threads


def latency_summary(samples_ms: list[float]) -> dict:
    stats = TimingStats.from_samples(samples_ms)
    return {
        "mean": stats.mean_ms,
        "std": stats.std_ms,
        "p50": stats.median_ms,
        "p90": stats.p90_ms,
        "images": stats.repeats,
    }


def measure_per_image(
    models: dict[str, Callable[[torch.Tensor], object]],
    images: torch.Tensor,
    threads: int,
    warmup: int,
    seed: int = 0,
    samples_out: dict[str, list[float]] | None = None,
    burst: int = 1,
) -> dict[str, dict]:
    """Wall-clock per image at batch 1, the models interleaved image by image (same conditions).

    With ``burst`` > 1 each model runs each image that many times in a row and the last run is
    timed: the model's weights are in the caches, as in a service answering one request after
    another (the onnxruntime backend's way). ``samples_out`` receives every model's per-image
    times (ms) in image order.
    """
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(seed)
    with cpu_threads(threads), torch.inference_mode():
        for i in range(min(warmup, len(images))):
            for name in names:
                models[name](images[i : i + 1])
        for i in progress_bar(range(len(images)), desc="batch-1 latency", unit="image"):
            x = images[i : i + 1]
            order.shuffle(names)
            for name in names:
                for _ in range(burst - 1):
                    models[name](x)
                start = time.perf_counter_ns()
                models[name](x)
                samples[name].append((time.perf_counter_ns() - start) / 1e6)
    if samples_out is not None:
        samples_out.update(samples)
    return {n: latency_summary(s) for n, s in samples.items()}
