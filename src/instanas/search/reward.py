"""Per-image rewards of the search.

``window``: the paper's, correctness times a parabola of latency inside a window that shrinks
during the search. ``budget``: correctness minus a linear latency penalty whose weight is a dual
variable, raised while the batch's mean latency is over a target and lowered while under it.
The batch meets the budget on average, while a single image may spend more where extra modules
make it right and less where the cheapest child already is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ..latency.table import LatencyBounds

# The dynamic window's upper bound, and the budget's target, start at this share of L_all.
WINDOW_START = 0.7


def window_bounds(
    bounds: LatencyBounds, progress: float, schedule: str = "dynamic"
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
    start, end = WINDOW_START * bounds.all_modules, 0.5 * bounds.mbv2_path
    upper = start - (start - end) * progress
    # A window narrower than zero would make every latency "outside"; keep it valid.
    return lower, max(upper, lower * 1.05)


def latency_reward(latency: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Parabola that is 1 in the middle of [LB, UB] and 0 at and outside the bounds."""
    half_width_sq = (upper - lower) ** 2 / 4.0
    value = -(latency - upper) * (latency - lower) / half_width_sq
    return value.clamp(min=0.0)


def instance_reward(
    correct: torch.Tensor,
    latency: torch.Tensor,
    lower: float,
    upper: float,
    pos_w: float = 30.0,
    neg_w: float = 0.0,
) -> torch.Tensor:
    """R = pos_w * R_lat for a correct prediction, neg_w otherwise; one value per image."""
    lat = latency_reward(latency, lower, upper)
    return torch.where(correct, pos_w * lat, torch.full_like(lat, neg_w))


# Floor of the log-likelihood score: one hopeless image cannot outweigh a batch.
LOG_PROB_FLOOR = -5.0


def prediction_score(
    correct: torch.Tensor,
    log_prob: torch.Tensor,
    signal: str,
    pos_w: float = 30.0,
    neg_w: float = 0.0,
) -> torch.Tensor:
    """How good one child's prediction is, per image.

    ``correct``: pos_w if right, neg_w if wrong. ``log_prob``: pos_w x log p(true class),
    floored; graded, so that two children that are both right (or both wrong) still differ by
    how sure they are, which is what tells easy images (sure with few modules) from hard ones.
    """
    if signal == "log_prob":
        return pos_w * log_prob.clamp(min=LOG_PROB_FLOOR)
    if signal != "correct":
        raise ValueError(f"unknown reward signal {signal!r}: use 'correct' or 'log_prob'")
    return torch.where(correct, torch.full_like(log_prob, pos_w), torch.full_like(log_prob, neg_w))


def budget_reward(
    score: torch.Tensor, latency: torch.Tensor, weight: float, reference: float, pos_w: float = 30.0
) -> torch.Tensor:
    """R = score - pos_w x weight x latency / reference (``score``: ``prediction_score``)."""
    return score - pos_w * weight * latency / reference


def budget_target(bounds: LatencyBounds, progress: float, budget: float, warmup: float) -> float:
    """Target mean cell latency at search progress ``progress``: from the window's starting
    upper bound (0.7 L_all) down to ``budget`` x L_mbv2 over the first ``warmup`` of the
    search, then held, so the controller is not pushed from every module to the budget at once.
    """
    end = budget * bounds.mbv2_path
    if warmup <= 0 or progress >= warmup:
        return end
    start = max(WINDOW_START * bounds.all_modules, end)
    return start - (start - end) * progress / warmup


@dataclass
class DualWeight:
    """The latency weight of the budget reward, a Lagrange multiplier kept non-negative: the
    integral of the relative overshoot (``value``) plus, with a proportional gain, the last
    batch's overshoot times that gain (``proportional``), which reacts at once when the
    latency crosses the target instead of waiting for the integral to unwind."""

    value: float = 0.0
    proportional: float = 0.0

    @property
    def weight(self) -> float:
        return max(0.0, self.value + self.proportional)

    def state_dict(self) -> dict[str, float]:
        """What a search epoch's saved state keeps of it (the names resumed runs expect)."""
        return {"latency_weight": self.value, "latency_weight_p": self.proportional}

    def load_state_dict(self, state: Mapping) -> None:
        self.value = state.get("latency_weight", 0.0)
        self.proportional = state.get("latency_weight_p", 0.0)  # absent in the oldest runs

    def update(self, mean_latency: float, target: float, step: float, gain: float = 0.0) -> float:
        # The relative overshoot is clipped so one far-off batch cannot swing the weight.
        overshoot = min(max(mean_latency / target - 1.0, -1.0), 1.0)
        self.value = max(0.0, self.value + step * overshoot)
        self.proportional = gain * overshoot
        return self.weight


class RewardFunction:
    """Per-image reward of ``controller.reward`` at search progress p in [0, 1]."""

    def __init__(self, ccfg, bounds: LatencyBounds, dual: DualWeight) -> None:
        self.ccfg, self.bounds, self.dual = ccfg, bounds, dual
        self.window = window_bounds(bounds, 0.0, ccfg.window)
        self.target = budget_target(bounds, 0.0, ccfg.budget, ccfg.budget_warmup)

    def __call__(
        self, correct: torch.Tensor, log_prob: torch.Tensor, latency: torch.Tensor, progress: float
    ) -> torch.Tensor:
        c = self.ccfg
        if c.reward == "budget":
            self.target = budget_target(self.bounds, progress, c.budget, c.budget_warmup)
            score = prediction_score(correct, log_prob, c.signal, c.pos_w, c.neg_w)
            return budget_reward(score, latency, self.dual.weight, self.bounds.mbv2_path, c.pos_w)
        # The window advances per step so short searches still sweep the whole schedule.
        self.window = window_bounds(self.bounds, progress, c.window)
        return instance_reward(correct, latency, *self.window, c.pos_w, c.neg_w)

    def update(self, greedy_latency: torch.Tensor) -> None:
        """After a step: move the latency weight towards the budget (budget reward only)."""
        if self.ccfg.reward == "budget":
            mean = float(greedy_latency.mean())
            self.dual.update(mean, self.target, self.ccfg.dual_lr, self.ccfg.dual_kp)

    def describe(self) -> dict:
        if self.ccfg.reward == "budget":
            # latency_weight is the weight the next step uses; the integral alone is the part
            # that carries over between batches
            return {
                "latency_weight": self.dual.weight,
                "latency_weight_integral": self.dual.value,
                "budget_cells_ms": self.target,
            }
        return {"window_lower_ms": self.window[0], "window_upper_ms": self.window[1]}


def usage_penalty(probs: torch.Tensor, floor: float) -> torch.Tensor:
    """Keeps every module's greedy choice from being the same for the whole batch.

    The greedy policy runs a module where its logit is >= 0. Per module, the logit below
    which ``floor`` of the batch lies should be negative and the one above which ``floor``
    lies positive; the penalty is how far they are on the wrong side, summed over modules.
    A module every image runs (or none does) makes the same choice for all: it cannot route.
    """
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
    low, high = torch.quantile(
        logits.flatten(1), torch.tensor([floor, 1.0 - floor], device=logits.device), dim=0
    )
    return (torch.relu(low) + torch.relu(-high)).sum()
