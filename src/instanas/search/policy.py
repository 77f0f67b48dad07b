"""Policies: which modules each image runs, and what a meta-graph scores under them.

A policy function maps a batch of images to a [batch, cells, modules] boolean policy. The
stages use two kinds: a controller's greedy policy (``greedy_of``) and independent random
draws (``RandomPolicy``, the random-policy baseline). Search, fine-tuning, the variants and the
random-policy stage all score a policy with ``evaluate_policies`` and recalibrate BatchNorm for
it with ``calibrate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..distributed import uniform
from ..latency.table import LatencyTable
from ..models.controller import Controller, bound_probabilities, greedy_policy, sample_policy
from ..models.metagraph import MetaGraph
from ..nn.batchnorm import recalibrate_batchnorm
from ..run_context import RunContext
from ..space import SearchSpace, routing_summary
from ..training import training_images


@dataclass
class PolicyStats:
    accuracy: float
    cells_ms: float  # mean table latency of the cells
    total_ms: float  # plus stem, head and controller
    distinct_children: int
    mean_active_modules: float
    effective_children: float  # exp(entropy of the child distribution)
    top_child_share: float  # share of the images the most used child serves


PolicyFn = Callable[[torch.Tensor], torch.Tensor]


def greedy_of(controller: Controller) -> PolicyFn:
    """The controller's greedy policy for a batch of images (raw, before the empty-cell rule)."""
    return lambda images: greedy_policy(controller(images))


def sampled_of(controller: Controller, alpha: float, generator: torch.Generator) -> PolicyFn:
    """The controller's sampled (bounded) policies, as a policy function."""
    return lambda images: sample_policy(bound_probabilities(controller(images), alpha), generator)


class RandomPolicy:
    """Independent Bernoulli(rate) per (cell, module), from its own seeded generator."""

    def __init__(self, space: SearchSpace, rate: float, seed: int) -> None:
        self.shape = (space.num_cells, space.num_modules)
        self.rate = rate
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        draw = uniform((images.shape[0], *self.shape), self.generator)
        return (draw < self.rate).to(images.device)


def policy_forward(
    metagraph: MetaGraph, policy_fn: PolicyFn
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The training forward: logits under the policies ``policy_fn`` picks (no gradient)."""

    def forward(images: torch.Tensor, progress: float) -> torch.Tensor:
        with torch.no_grad():
            policy = policy_fn(images)
        return metagraph(images, policy)

    return forward


@torch.no_grad()
def evaluate_policies(
    ctx: RunContext,
    metagraph: MetaGraph,
    policy_fn: PolicyFn,
    table: LatencyTable,
    data,
    include_controller: bool = True,
) -> tuple[PolicyStats, torch.Tensor]:
    """Accuracy and table latency on ``data`` under ``policy_fn`` (e.g. the controller's greedy
    policy); also returns the resolved policies. ``include_controller``: whether the policy
    costs a controller pass (not for random policies)."""
    metagraph.eval()
    correct, policies = 0, []
    for batch in ctx.batches(data, 500, train=False):
        policy = metagraph.resolve(policy_fn(batch.images))
        correct += int((metagraph(batch.images, policy).argmax(1) == batch.labels).sum())
        policies.append(policy.cpu())
    resolved = torch.cat(policies)
    cells = table.cells_ms(resolved)
    routing = routing_summary(resolved)
    stats = PolicyStats(
        correct / len(data),
        float(cells.mean()),
        float(table.predict_ms(resolved, include_controller).mean()),
        routing["distinct_children"],
        float(resolved.sum(dim=(1, 2)).float().mean()),
        routing["effective_children"],
        routing["top_child_share"],
    )
    return stats, resolved


def calibrate(
    ctx: RunContext, metagraph: MetaGraph, policy_fn: PolicyFn, *, purpose: str, epoch: int
) -> None:
    """Recalibrate the meta-graph's BatchNorm for the policies ``policy_fn`` now picks."""
    cfg = ctx.config.search
    recalibrate_batchnorm(
        metagraph,
        lambda x: metagraph(x, policy_fn(x)),
        training_images(ctx, cfg.batch_size, cfg.recalibrate_batches, purpose, epoch),
    )
    metagraph.eval()


@torch.no_grad()
def accuracy_under(
    ctx: RunContext, metagraph: MetaGraph, policies: torch.Tensor, data, batch_size: int = 500
) -> float:
    """Accuracy on ``data`` when its i-th image runs ``policies[i]`` (in the data's order)."""
    metagraph.eval()
    correct, start = 0, 0
    for batch in ctx.batches(data, batch_size, train=False):
        rows = policies[start : start + len(batch.labels)].to(batch.images.device)
        correct += int((metagraph(batch.images, rows).argmax(1) == batch.labels).sum())
        start += len(batch.labels)
    return correct / len(data)


def shuffled_routing_accuracy(
    ctx: RunContext, metagraph: MetaGraph, policies: torch.Tensor, data, seed: int
) -> float:
    """Accuracy with the policies permuted across images: the same children in the same
    proportions, the per-image choice removed. The gap to the routed accuracy is what routing
    each image to its own child is worth."""
    order = torch.randperm(len(policies), generator=torch.Generator().manual_seed(seed))
    return accuracy_under(ctx, metagraph, policies[order], data)


def mix_random_children(
    policy: torch.Tensor, share: float, generator: torch.Generator
) -> torch.Tensor:
    """The first ``share`` of the rows get random children, each row its own rate in [0, 1]:
    small and large children alike keep being trained, not only the controller's favourites."""
    rows = round(share * len(policy))
    if rows == 0:
        return policy
    rates = uniform((rows, 1, 1), generator)
    draw = uniform((rows, *policy.shape[1:]), generator) < rates
    policy = policy.clone()
    policy[:rows] = draw.to(policy.device)
    return policy
