"""The random-policy baseline: what instance-awareness adds over chance at the same cost.

Every module of every cell is switched on independently with one rate ``p``, chosen so that the
mean table latency of the random children (no controller to pay for) equals the mean latency of
the searched controller's children on the validation split, controller included. The searched
meta-graph is then fine-tuned on fresh random policies with the same budget and schedule as the
InstaNAS fine-tuning, and evaluated on random policies drawn per test image.
"""

from __future__ import annotations

import logging

import torch

from ..latency.table import LatencyTable
from ..models.metagraph import MetaGraph
from ..run_context import RunContext
from ..search.policy import RandomPolicy, evaluate_policies, greedy_of
from ..space import SearchSpace, apply_empty_cell_rule
from .common import latency_table, searched_models, stage_path
from .policy_tuning import train_under_policy

log = logging.getLogger("instanas")
_MATCH_SAMPLES = 8192


def mean_random_ms(table: LatencyTable, space: SearchSpace, rate: float, seed: int) -> float:
    """Mean table latency (cells, stem, head) of resolved random children at ``rate``."""
    noise = torch.rand(
        (_MATCH_SAMPLES, space.num_cells, space.num_modules),
        generator=torch.Generator().manual_seed(seed),
    )
    # The same noise for every rate: the mean is then monotone in the rate, so bisection works.
    resolved = apply_empty_cell_rule(noise < rate, space.forced_mask(), space.forced_module)
    return float(table.predict_ms(resolved, include_controller=False).mean())


def matching_rate(table: LatencyTable, space: SearchSpace, target_ms: float, seed: int) -> float:
    """The selection rate whose random children cost ``target_ms`` on average (bisection)."""
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        if mean_random_ms(table, space, middle, seed) < target_ms:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def train_random_policy(
    ctx: RunContext, metagraph: MetaGraph, controller: torch.nn.Module, table: LatencyTable
) -> dict:
    """Match the searched controller's mean latency, then fine-tune on random policies."""
    metagraph, controller = ctx.prepare(metagraph), ctx.prepare(controller)
    controller.eval()
    target, _ = evaluate_policies(ctx, metagraph, greedy_of(controller), table, ctx.data.val)
    rate = matching_rate(table, ctx.space, target.total_ms, ctx.config.seed)
    achieved = mean_random_ms(table, ctx.space, rate, ctx.config.seed)
    log.info(
        "random policy: rate %.4f gives %.3f ms (table) against the controller's %.3f ms",
        rate,
        achieved,
        target.total_ms,
    )
    info = {"rate": rate, "table_ms": achieved, "controller_table_ms": target.total_ms}
    policy = RandomPolicy(ctx.space, rate, ctx.config.seed + 1)
    train_under_policy(
        ctx,
        metagraph,
        policy,
        table,
        stage="random-policy",
        output=stage_path(ctx, "random-policy"),
        meta=info,
        uses_controller=False,
        generators={"policies": policy.generator},
    )
    return info


def run(ctx: RunContext) -> dict:
    metagraph, controller = searched_models(ctx)
    return train_random_policy(ctx, metagraph, controller, latency_table(ctx))
