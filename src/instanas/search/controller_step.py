"""One controller update on a batch, the search's core: score children on the frozen meta-graph,
reward them, step the controller and the budget's latency weight.

One class per objective (``controller.objective``): :class:`ReinforceStep`, the policy gradient
of sampled children against the greedy ones, and :class:`ImitateStep`, the binary cross-entropy
of the controller's probabilities against each image's best sampled child. Everything the config
decides is settled when a step is made (:func:`controller_step`), not on every call.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import distributed
from ..models.controller import (
    Controller,
    bound_probabilities,
    greedy_policy,
    policy_entropy,
    policy_log_prob,
    sample_policy,
)
from ..models.metagraph import MetaGraph
from ..run_context import RunContext
from ..training import check_finite, finite_check_due
from .reward import RewardFunction, usage_penalty


@dataclass
class StepSums:
    """Sums over a controller epoch's images, named as the epoch's metrics.jsonl record names
    their means (``sampled`` children are the controller's draws, ``greedy`` its choice)."""

    reward: torch.Tensor  # the sampled children's reward
    sampled_cells_ms: torch.Tensor
    greedy_cells_ms: torch.Tensor
    greedy_train_accuracy: torch.Tensor  # correct predictions, a mean once divided
    sampled_train_accuracy: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> StepSums:
        return cls(*(torch.zeros((), device=device) for _ in fields(cls)))

    def add(self, other: StepSums) -> None:
        for f in fields(self):
            getattr(self, f.name).add_(getattr(other, f.name))

    def epoch_means(self, seen: int, hard_count: torch.Tensor | None = None) -> dict[str, float]:
        """Per-image means over every rank's ``seen`` images (each rank saw as many) and, with
        the difficulty form, ``hard_train_share``: the share of images its target called hard."""
        names = [f.name for f in fields(self)]
        totals = torch.stack([getattr(self, name) for name in names])
        if hard_count is not None:
            names.append("hard_train_share")
            totals = torch.cat([totals, hard_count.view(1)])
        means = (distributed.all_sum(totals) / (seen * distributed.world_size())).tolist()
        return dict(zip(names, means))


@dataclass
class Outcomes:
    """Per image of one set of children: right or wrong, table cell latency and reward."""

    correct: torch.Tensor
    cells_ms: torch.Tensor
    reward: torch.Tensor

    def rows(self, rows: slice | torch.Tensor) -> Outcomes:
        return Outcomes(self.correct[rows], self.cells_ms[rows], self.reward[rows])


class ControllerStep:
    """What both objectives share: children scored on the frozen meta-graph, the optimiser
    step with the usage penalty, the budget's dual step and the batch's sums. Calling a step
    with a batch and the search progress in [0, 1] updates the controller once and returns
    the batch's :class:`StepSums`."""

    def __init__(
        self,
        ctx: RunContext,
        metagraph: MetaGraph,
        controller: Controller,
        optimizer: torch.optim.Optimizer,
        module_ms: torch.Tensor,
        reward_of: RewardFunction,
        generator: torch.Generator,
    ) -> None:
        self.ctx, self.metagraph, self.controller = ctx, metagraph, controller
        self.optimizer, self.reward_of, self.generator = optimizer, reward_of, generator
        self.settings = ctx.config.controller
        self.module_ms = module_ms.to(ctx.device)  # table cost of each (cell, module)
        # batch: each set of children normalised with its own statistics (search.controller_norm)
        self.own_statistics = ctx.config.search.controller_norm == "batch"
        self.steps = ctx.steps_per_epoch(ctx.config.search.batch_size)
        self.taken = 0  # updates so far this epoch
        self.hard_count: torch.Tensor | None = None  # images labelled hard (difficulty form)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, progress: float) -> StepSums:
        raise NotImplementedError

    def score(
        self, images: torch.Tensor, labels: torch.Tensor, policies: torch.Tensor, progress: float
    ) -> Outcomes:
        """Stacked sets of children for ``images`` (:meth:`MetaGraph.score_policy_sets`) in the
        run's precision, with their cell latency and reward."""
        correct, log_prob, cells_ms = self.evaluate(images, labels, policies)
        reward = self.reward_of(correct, log_prob, cells_ms, progress)
        return Outcomes(correct, cells_ms, reward)

    def evaluate(
        self, images: torch.Tensor, labels: torch.Tensor, policies: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(correct, log-likelihood of the label, table cell latency) per stacked child."""
        with torch.no_grad(), self.ctx.autocast():
            scores = self.metagraph.score_policy_sets(images, labels, policies, self.own_statistics)
        cells_ms = (scores.resolved.float() * self.module_ms).flatten(1).sum(1)
        return scores.correct, scores.log_prob, cells_ms

    def update(
        self, loss: torch.Tensor, probs: torch.Tensor, sampled: Outcomes, greedy: Outcomes
    ) -> StepSums:
        """Optimiser step and the budget's dual step; the batch's sums for the epoch record."""
        floor = self.settings.usage_floor
        if floor > 0:
            loss = loss + self.settings.pos_w * usage_penalty(probs, floor)
        if finite_check_due(self.ctx.device, self.taken, self.steps):
            check_finite(loss, "controller", "controller.lr")
        self.ctx.optimizer_step(loss, self.optimizer)
        self.taken += 1
        # The budget's dual variable follows the global batch's mean greedy latency.
        self.reward_of.update(distributed.global_mean(greedy.cells_ms))
        return StepSums(
            sampled.reward.sum(),
            sampled.cells_ms.sum(),
            greedy.cells_ms.sum(),
            greedy.correct.float().sum(),
            sampled.correct.float().sum(),
        )


class ReinforceStep(ControllerStep):
    """REINFORCE with the greedy children as the baseline: each sampled child's log-probability
    weighted by its reward minus the greedy child's, plus the entropy bonus. With the difficulty
    form, the controller's difficulty logit also learns which images are hard
    (:data:`HARD_IMAGES`)."""

    def __init__(self, *args: Any, hard: HardImages | None = None) -> None:
        super().__init__(*args)
        self.hard = hard  # the difficulty form's target; None in the free form
        if hard is not None:
            self.hard_count = torch.zeros((), device=self.ctx.device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, progress: float) -> StepSums:
        s = self.settings
        with self.ctx.autocast():
            logits, difficulty = self.controller.logits_and_difficulty(images)
        probs = torch.sigmoid(logits.float())
        bounded = bound_probabilities(probs, s.alpha)
        size = len(labels)
        with torch.no_grad():
            sampled = sample_policy(bounded, self.generator)
            both = self.score(images, labels, torch.cat([sampled, greedy_policy(probs)]), progress)
            advantage = both.reward[:size] - both.reward[size:]
        loss = (
            -(policy_log_prob(bounded, sampled) * advantage).sum()
            - s.beta * policy_entropy(bounded, s.entropy).sum()
        ) / size
        if difficulty is not None:
            hard = self.hard(both.correct[size:], lambda: self.every_module_correct(images, labels))
            self.hard_count += hard.sum()
            loss = loss + difficulty_loss(difficulty, hard)
        return self.update(loss, probs, both.rows(slice(None, size)), both.rows(slice(size, None)))

    def every_module_correct(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Whether the child with every module gets each image right (one more forward)."""
        every = torch.ones(
            len(labels), *self.module_ms.shape, dtype=torch.bool, device=labels.device
        )
        return self.evaluate(images, labels, every)[0]


class ImitateStep(ControllerStep):
    """Each image's best of ``controller.candidates`` sampled children (and the greedy one)
    under the reward becomes its target policy; the loss is the binary cross-entropy of the
    controller's probabilities against it."""

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, progress: float) -> StepSums:
        s = self.settings
        with self.ctx.autocast():
            logits = self.controller.policy_logits(images).float()
        probs = torch.sigmoid(logits)
        size = len(labels)
        with torch.no_grad():
            bounded = bound_probabilities(probs, s.alpha)
            samples = (sample_policy(bounded, self.generator) for _ in range(s.candidates))
            policies = torch.cat([*samples, greedy_policy(probs)])
            every = self.score(images, labels, policies, progress)
            target = best_children(policies, every.reward, size).float()
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / size
        # The epoch's statistics describe the first sample and the greedy child.
        first = torch.cat([torch.arange(size), torch.arange(len(policies) - size, len(policies))])
        described = every.rows(first)
        return self.update(
            loss, probs, described.rows(slice(None, size)), described.rows(slice(size, None))
        )


def controller_step(
    ctx: RunContext,
    metagraph: MetaGraph,
    controller: Controller,
    optimizer: torch.optim.Optimizer,
    module_ms: torch.Tensor,
    reward_of: RewardFunction,
    generator: torch.Generator,
) -> ControllerStep:
    """The step of ``controller.objective``, with the difficulty form's target when the
    controller has that form."""
    args = (ctx, metagraph, controller, optimizer, module_ms, reward_of, generator)
    settings = ctx.config.controller
    if settings.objective == "imitate":
        return ImitateStep(*args)
    hard = HARD_IMAGES[settings.difficulty_target] if settings.form == "difficulty" else None
    return ReinforceStep(*args, hard=hard)


# The difficulty form's target: which images are hard, from the greedy children's correctness
# and, when the target needs it, that of the children with every module (computed on demand).
HardImages = Callable[[torch.Tensor, Callable[[], torch.Tensor]], torch.Tensor]


def wrong_images(
    greedy_correct: torch.Tensor, every_correct: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``controller.difficulty_target wrong``: the greedy child is wrong."""
    return ~greedy_correct


def helped_images(
    greedy_correct: torch.Tensor, every_correct: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``controller.difficulty_target helped``: the greedy child is wrong where the child with
    every module is right, so images more modules fix count as hard and those no child gets
    right do not."""
    return ~greedy_correct & every_correct()


HARD_IMAGES: dict[str, HardImages] = {"wrong": wrong_images, "helped": helped_images}


def difficulty_loss(difficulty: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the controller's difficulty logits against ``hard``."""
    return F.binary_cross_entropy_with_logits(difficulty.float(), hard.float())


def best_children(policies: torch.Tensor, reward: torch.Tensor, size: int) -> torch.Tensor:
    """Per image, the candidate policy with the highest reward; ``policies`` [K*size, ...] and
    ``reward`` [K*size] stack K candidate sets for the same ``size`` images."""
    best = reward.view(-1, size).argmax(0)
    return policies.view(-1, size, *policies.shape[1:])[best, torch.arange(size)]
