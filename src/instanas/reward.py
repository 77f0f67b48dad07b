"""Per-image reward: correctness times a latency window that shrinks during search."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatencyBounds:
    """Reference latencies (ms, summed over cells) the window is defined from."""

    all_modules: float  # L_all: every module of every cell
    mbv2: float  # L_mbv2: module 0 in every cell
    minimum: float  # L_min: only the forced defaults


def window_bounds(bounds: LatencyBounds, progress: float, schedule: str = "dynamic"
                  ) -> tuple[float, float]:
    """(LB, UB) at search progress ``progress`` = epoch / search_epochs in [0, 1].

    dynamic: UB falls linearly from 0.7*L_all to 0.5*L_mbv2, LB = L_min.
    static: UB = L_all, LB = L_min (the paper's ablation).
    """
    progress = min(max(progress, 0.0), 1.0)
    lower = bounds.minimum
    if schedule == "static":
        return lower, bounds.all_modules
    if schedule != "dynamic":
        raise ValueError(f"unknown window schedule {schedule!r}: use 'dynamic' or 'static'")
    start, end = 0.7 * bounds.all_modules, 0.5 * bounds.mbv2
    upper = start - (start - end) * progress
    # A window narrower than zero would make every latency "outside"; keep it valid.
    return lower, max(upper, lower * 1.05)


def latency_reward(latency: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Parabola that is 1 in the middle of [LB, UB] and 0 at and outside the bounds."""
    half_width_sq = (upper - lower) ** 2 / 4.0
    value = -(latency - upper) * (latency - lower) / half_width_sq
    return value.clamp(min=0.0)


def instance_reward(correct: torch.Tensor, latency: torch.Tensor, lower: float, upper: float,
                    pos_w: float = 30.0, neg_w: float = 0.0) -> torch.Tensor:
    """R = pos_w * R_lat for a correct prediction, neg_w otherwise; one value per image."""
    lat = latency_reward(latency, lower, upper)
    return torch.where(correct, pos_w * lat, torch.full_like(lat, neg_w))
