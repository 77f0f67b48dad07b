"""Escalation: after the routed child has answered, an image it is unsure of runs a larger
network instead (a confidence cascade, the second decision of "easy images cheap, hard images
expensive").

Confidence is the child's top softmax probability. The threshold is chosen on the validation
split: among thresholds whose mean deployed latency (interpolated between the shares escalated
that were timed on a stream) stays within the latency budget, the most accurate one. Every
candidate threshold is kept as a curve (share escalated, accuracy, mean latency) so reports can
show the whole trade-off, and the same share escalated at random is the control.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# Candidate thresholds: the validation confidences at these shares escalated.
CURVE_SHARES = tuple(round(0.01 * i, 2) for i in range(0, 51))


@dataclass(frozen=True)
class CascadePoint:
    threshold: float  # escalate when the child's top probability is below this
    share: float  # share of images escalated
    accuracy: float
    latency_ms: float  # mean deployed latency per image

    def to_dict(self) -> dict:
        return asdict(self)


def confidence(probabilities: np.ndarray) -> np.ndarray:
    """The child's confidence per image: its top softmax probability [N]."""
    return probabilities.max(axis=1)


def latency_by_share(points: list[list[float]]) -> Callable[[float], float]:
    """Mean deployed latency (ms) as a function of the share escalated: piecewise linear
    through measured (share, ms) points, made non-decreasing (a larger share never costs
    less; timing noise could say otherwise)."""
    shares, ms = np.array(sorted(points), dtype=np.float64).T
    ms = np.maximum.accumulate(ms)
    return lambda share: float(np.interp(share, shares, ms))


def rule_latency(timing: dict) -> Callable[[float], float]:
    """The latency model of an escalation rule's ``timing``: its measured points on a stream,
    or (rules written before them) the straight line from never to always escalating."""
    points = timing.get("share_points") or [[0.0, timing["never_ms"]], [1.0, timing["always_ms"]]]
    return latency_by_share(points)


def cascade_point(
    threshold: float,
    confident: np.ndarray,
    small_correct: np.ndarray,
    large_correct: np.ndarray,
    latency: Callable[[float], float],
) -> CascadePoint:
    """Accuracy and mean latency when images with confidence below ``threshold`` escalate."""
    escalated = confident < threshold
    correct = np.where(escalated, large_correct, small_correct)
    share = float(escalated.mean())
    return CascadePoint(float(threshold), share, float(correct.mean()), latency(share))


def cascade_curve(
    confident: np.ndarray,
    small_correct: np.ndarray,
    large_correct: np.ndarray,
    latency: Callable[[float], float],
    thresholds: np.ndarray | None = None,
) -> list[CascadePoint]:
    """One point per threshold; by default the confidences at ``CURVE_SHARES`` escalated."""
    if thresholds is None:
        thresholds = share_thresholds(confident)
    return [cascade_point(t, confident, small_correct, large_correct, latency)
            for t in thresholds]  # fmt: skip


def share_thresholds(confident: np.ndarray, shares=CURVE_SHARES) -> np.ndarray:
    """Thresholds that escalate about each share of these images (0: none escalate)."""
    ordered = np.sort(confident)
    picks = [0.0 if s == 0 else float(ordered[min(int(s * len(ordered)), len(ordered) - 1)])
             for s in shares]  # fmt: skip
    return np.unique(np.array(picks, dtype=np.float64))


def choose_threshold(curve: list[CascadePoint], budget_ms: float) -> CascadePoint:
    """The most accurate point within the budget (ties: the cheaper); the cheapest point when
    none is within it."""
    within = [p for p in curve if p.latency_ms <= budget_ms]
    if not within:
        return min(curve, key=lambda p: p.latency_ms)
    return max(within, key=lambda p: (p.accuracy, -p.latency_ms))


def shuffled_escalation(
    escalated: np.ndarray,
    small_correct: np.ndarray,
    large_correct: np.ndarray,
    generator: np.random.Generator,
    rounds: int = 20,
) -> float:
    """Accuracy when the same number of images escalate, chosen at random (the control that
    says whether confidence picks the right images), averaged over ``rounds`` draws."""
    count, total = int(escalated.sum()), len(escalated)
    scores = []
    for _ in range(rounds):
        chosen = np.zeros(total, dtype=bool)
        chosen[generator.choice(total, size=count, replace=False)] = True
        scores.append(np.where(chosen, large_correct, small_correct).mean())
    return float(np.mean(scores))
