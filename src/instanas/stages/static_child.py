"""The best static child: what the main model's per-image routing is worth against the one
child that costs about as much.

Among the children the search's controllers pick on the validation split (the selected one's
first, the most used first, up to ``variants.max_timed_children``) and a ladder of larger
children of the selected controller (its most used child with more modules added in the order
of their mean probability, one child per step of table latency: the controllers' picks can leave
a wide gap right where escalation puts the main model), each is timed at batch 1 in the run's
latency backend side by side with the main model as deployed (controller, routing, escalation);
the child whose measured latency is closest to and not below the main model's mean is chosen
(the slowest one if every child is faster). It is then fine-tuned alone from the
searched meta-graph with the InstaNAS fine-tuning budget and schedule.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import torch

from ..latency.side_by_side import measure_per_image
from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..models.predictor import InstaNASPredictor
from ..run_context import RunContext
from ..space import ChildArchitecture, ranked_children
from ..utils import write_json
from .common import (
    CHOICE_TIMED_IMAGES,
    closest_not_below,
    finetuned_predictor,
    latency_backend,
    latency_table,
    load_candidate,
    search_checkpoints,
    searched_models,
    stage_path,
    validation_children,
    validation_images,
)
from .policy_tuning import train_under_policy

log = logging.getLogger("instanas")

# Table latency of the ladder's children relative to the controller's most used child.
LADDER_STEPS = tuple(round(1 + 0.1 * k, 1) for k in range(1, 11))


def candidate_children(ctx: RunContext, limit: int) -> list[tuple[ChildArchitecture, int, str]]:
    """The children the controller of every search checkpoint picks on the validation split
    (the selected one first), most used first, with how many images pick them: the selected
    controller's own children and, from the checkpoints before it, costlier ones, so that
    there are children at the main model's latency when escalation raises it; then the
    selected controller's ladder. Each with its source, ``controller`` or ``ladder``."""
    counts: Counter[str] = Counter()
    children: dict[str, ChildArchitecture] = {}
    images = validation_images(ctx)
    paths = [stage_path(ctx, "search"), *reversed(search_checkpoints(ctx.run_dir))]
    selected = None
    for path in paths:
        graph, controller = load_candidate(ctx, path)
        predictor = InstaNASPredictor(graph.cpu(), controller.cpu())
        selected = selected or predictor
        policies = torch.cat([predictor.policies(images[i : i + 500])
                              for i in range(0, len(images), 500)])  # fmt: skip
        for child, count in ranked_children(policies):
            children.setdefault(str(child), child)
            counts[str(child)] += count if path == paths[0] else 0
            if len(children) >= limit:
                break
    ranked = sorted(children, key=lambda c: -counts[c])
    found = [(children[c], counts[c], "controller") for c in ranked]
    ladder = ladder_children(selected.metagraph, selected.controller, images,
                             latency_table(ctx), found[0][0])  # fmt: skip
    return found + [(child, 0, "ladder") for child in ladder if str(child) not in children]


@torch.inference_mode()
def ladder_children(
    graph: MetaGraph,
    controller: Controller,
    images: torch.Tensor,
    table: LatencyTable,
    start: ChildArchitecture,
) -> list[ChildArchitecture]:
    """Larger children along the controller's own preference: ``start`` with the modules it
    lacks added one at a time, most probable first (mean probability over ``images``); the
    first child whose table latency reaches each of LADDER_STEPS x ``start``'s is kept."""
    probs = torch.cat([torch.sigmoid(controller.policy_logits(images[i : i + 500]))
                       for i in range(0, len(images), 500)]).mean(0)  # fmt: skip
    policy = graph.resolve(start.to_policy().unsqueeze(0))[0]
    base_ms = float(table.predict_ms(policy, include_controller=False))
    steps, ladder = list(LADDER_STEPS), []
    for flat in torch.argsort(probs.flatten(), descending=True).tolist():
        cell, module = divmod(flat, policy.shape[1])
        if policy[cell, module]:
            continue
        policy[cell, module] = True  # from_policy below copies it
        ms = float(table.predict_ms(policy, include_controller=False))
        if steps and ms >= steps[0] * base_ms:
            ladder.append(ChildArchitecture.from_policy(policy))
            steps = [s for s in steps if ms < s * base_ms]
    return ladder


def choose_static_child(ctx: RunContext) -> tuple[ChildArchitecture, dict]:
    """Time the candidates and the main model as deployed; pick the child to compare with."""
    limit = ctx.config.variants.max_timed_children
    candidates = candidate_children(ctx, limit)
    if stage_path(ctx, "finetune").exists():
        predictor = finetuned_predictor(ctx)  # the main model, escalation included
    else:
        predictor = InstaNASPredictor(*(m.cpu() for m in searched_models(ctx)))
    backend = latency_backend(ctx)
    graph = predictor.metagraph
    calls = {f"child-{i}": backend.model_image_call(graph.materialize(child).eval())
             for i, (child, _, _) in enumerate(candidates)}  # fmt: skip
    exported = validation_children(ctx, predictor, limit)
    calls["instanas"] = backend.model_image_call(predictor, exported)
    cfg = ctx.config.latency
    images = validation_images(ctx, CHOICE_TIMED_IMAGES)
    measured = measure_per_image(calls, images, cfg.threads, cfg.warmup, ctx.config.seed,
                                 burst=backend.burst, retries=cfg.noisy_retries)  # fmt: skip
    times = {i: measured[f"child-{i}"]["mean"] for i in range(len(candidates))}
    target = measured["instanas"]["mean"]
    chosen = closest_not_below(times, target)
    child, count, source = candidates[chosen]
    info = {
        "child": [list(m) for m in child.cells],
        "val_share": count / len(ctx.data.val),
        "source": source,
        "measured_ms": times[chosen],
        "instanas_measured_ms": target,
        "candidates": len(candidates),
        "timed_images": len(images),
        "backend": backend.name,
    }
    log.info("static child: %d of %d candidates, %.3f ms measured against the main model's "
             "%.3f ms (%.1f%% of validation images use it)", chosen + 1, len(candidates),
             times[chosen], target, 100 * info["val_share"])  # fmt: skip
    return child, info


def train_static_child(
    ctx: RunContext, metagraph: MetaGraph, controller: Controller, table: LatencyTable
) -> dict:
    """Choose the child, then fine-tune the searched meta-graph on it alone. The choice is kept
    before training, so a resumed run trains the child it chose."""
    choice_path = ctx.run_dir / "static-child" / "choice.json"
    if choice_path.exists():
        info = json.loads(choice_path.read_text())
        cells = tuple(tuple(m) for m in info["child"])
        child = ChildArchitecture(cells, ctx.space.num_modules)
    else:
        child, info = choose_static_child(ctx.on_cpu())
        write_json(choice_path, info)
    metagraph, controller = ctx.prepare(metagraph), ctx.prepare(controller)
    controller.eval()
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
