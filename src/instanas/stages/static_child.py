"""The best static child: what the main model's per-image routing is worth against the one
child that costs about as much.

Among the children the searched controller picks on the validation split (the most used first,
up to ``variants.max_timed_children``), each is timed at batch 1 side by side with the main model
(controller included); the child whose measured latency is closest to and not below the main
model's mean is chosen (the slowest one if every child is faster). It is then fine-tuned alone
from the searched meta-graph with the InstaNAS fine-tuning budget and schedule, so the two
differ only in routing.
"""

from __future__ import annotations

import copy
import logging

import torch

from ..latency.side_by_side import measure_per_image
from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..models.predictor import InstaNASPredictor
from ..run_context import RunContext
from ..search.policy import evaluate_policies, greedy_of
from ..space import ChildArchitecture, child_counts
from .common import latency_table, searched_models, stage_path
from .policy_tuning import train_under_policy

log = logging.getLogger("instanas")
_TIMED_IMAGES = 300


def used_children(policies: torch.Tensor, limit: int) -> list[tuple[ChildArchitecture, int]]:
    """The distinct resolved children of ``policies`` with their counts, most used first."""
    shape = policies.shape[1:]
    ranked = child_counts([policies]).most_common(limit)
    return [
        (
            ChildArchitecture.from_policy(
                torch.frombuffer(bytearray(key), dtype=torch.uint8).view(shape).bool()
            ),
            count,
        )
        for key, count in ranked
    ]


def closest_not_below(times: dict[int, float], target: float) -> int:
    """Index whose time is the smallest at or above ``target``; else the largest."""
    above = {i: t for i, t in times.items() if t >= target}
    if above:
        return min(above, key=above.get)
    return max(times, key=times.get)


def choose_static_child(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, table: LatencyTable
) -> tuple[ChildArchitecture, dict]:
    """Time the controller's children and the main model; pick the child to compare with."""
    _, policies = evaluate_policies(ctx, metagraph, greedy_of(controller), table, ctx.data.val)
    candidates = used_children(policies, ctx.config.variants.max_timed_children)
    # Timed on the CPU, from copies: the caller's modules stay on their device.
    graph = copy.deepcopy(metagraph).cpu().eval()
    models = {
        "instanas": InstaNASPredictor(graph, copy.deepcopy(controller).cpu().eval()).logits_one
    }
    for i, (child, _) in enumerate(candidates):
        models[f"child-{i}"] = graph.materialize(child).eval().deploy()
    images = torch.cat([b.images.cpu() for b in ctx.batches(ctx.data.val, 500, train=False)])
    cfg = ctx.config.latency
    measured = measure_per_image(
        models, images[:_TIMED_IMAGES].contiguous(), cfg.threads, cfg.warmup, ctx.config.seed
    )
    times = {i: measured[f"child-{i}"]["mean"] for i in range(len(candidates))}
    target = measured["instanas"]["mean"]
    chosen = closest_not_below(times, target)
    child, count = candidates[chosen]
    info = {
        "child": [list(m) for m in child.cells],
        "val_share": count / len(policies),
        "measured_ms": times[chosen],
        "instanas_measured_ms": target,
        "candidates": len(candidates),
        "timed_images": min(_TIMED_IMAGES, len(images)),
    }
    log.info(
        "static child: %d of %d candidates, %.3f ms measured against the main model's "
        "%.3f ms (%.1f%% of validation images use it)",
        chosen + 1,
        len(candidates),
        times[chosen],
        target,
        100 * info["val_share"],
    )
    return child, info


def train_static_child(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, table: LatencyTable
) -> dict:
    """Choose the child, then fine-tune the searched meta-graph on it alone."""
    metagraph, controller = ctx.prepare(metagraph), ctx.prepare(controller)
    controller.eval()
    child, info = choose_static_child(ctx, metagraph, controller, table)
    policy = child.to_policy()

    def constant(images: torch.Tensor) -> torch.Tensor:
        return policy.to(images.device).expand(images.shape[0], *policy.shape)

    output = stage_path(ctx, "static-child")
    train_under_policy(ctx, metagraph, constant, table, stage="static-child", output=output,
                       meta=info, uses_controller=False)  # fmt: skip
    return info


def run(ctx: RunContext) -> dict:
    metagraph, controller = searched_models(ctx)
    return train_static_child(ctx, metagraph, controller, latency_table(ctx))
