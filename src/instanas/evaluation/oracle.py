"""The oracle bound: per test image the cheapest child that gets it right, among the
controller's greedy child and children sampled from its bounded probabilities.
"""

from __future__ import annotations

import torch

from ..latency.side_by_side import latency_summary
from ..latency.table import LatencyTable
from ..models.controller import Controller, bound_probabilities, sample_policy
from ..models.metagraph import MetaGraph
from ..run_context import RunContext


def cheapest_correct(costs: torch.Tensor, hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of [images, children] costs and correctness: the cheapest correct child's cost
    (column 0's cost when none is correct) and whether any is correct."""
    solved = hits.any(1)
    best = torch.where(hits, costs, torch.full_like(costs, float("inf"))).min(1).values
    return torch.where(solved, best, costs[:, 0]), solved


@torch.no_grad()
def oracle(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, table: LatencyTable, samples: int
) -> dict:
    """Per test image, the cheapest correct child among the greedy child and ``samples - 1``
    children drawn from the controller's bounded probabilities; images no child gets right
    count as errors at the greedy child's cost. Latency is the table's prediction: a bound to
    aim at, not a deployable model (it needs the label to choose)."""
    graph = metagraph.cpu().eval().deploy()
    controller = controller.cpu().eval()
    generator = torch.Generator().manual_seed(ctx.config.seed + 3)
    alpha = ctx.config.controller.alpha
    costs, solved = [], []
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        images = batch.images.cpu().contiguous()
        probs = controller(images)
        draws = [probs >= 0.5] + [
            sample_policy(bound_probabilities(probs, alpha), generator) for _ in range(samples - 1)
        ]
        cost, hit = [], []
        for draw in draws:
            policy = graph.resolve(draw)
            hit.append(graph(images, policy).argmax(1) == batch.labels.cpu())
            cost.append(table.predict_ms(policy))
        cost, ok = cheapest_correct(torch.stack(cost, 1), torch.stack(hit, 1))
        costs.append(cost)
        solved.append(ok)
    costs_ms = torch.cat(costs)
    return {
        "kind": "oracle",
        "test_accuracy": int(torch.cat(solved).sum()) / len(ctx.data.test),
        "latency_ms": latency_summary(costs_ms.tolist()),
        "latency_source": "table",
        "table_latency_ms": float(costs_ms.mean()),
        "children_sampled": samples,
    }
