"""Variants A..E: several operating points from one search (docs/design.md, "Variants A..E").

Every checkpoint the search kept is a candidate. Each is scored on the validation split only:
accuracy of the controller's greedy policies (BatchNorm recalibrated for them) and mean latency
measured end to end at batch 1 (controller plus the materialised child, for the children it
uses most; rarely used children are predicted by the table). Up to ``variants.count`` candidates
on the Pareto front of accuracy vs latency are fine-tuned; A is the most accurate, then each
letter is faster.

A candidate is a controller: by default (``variants.metagraph: final``) every one is paired
with the meta-graph weights of the search's last checkpoint, for scoring and as the start of its
fine-tuning. In a short search the shared weights improve all the way, so with each
checkpoint's own weights the later checkpoints win on training time, not on architecture
(docs/decisions.md, "Variants are scored with the search's final meta-graph"). (``own`` pairs
each controller with the weights saved alongside it.)
"""

from __future__ import annotations

import json
import logging
import string
from collections import Counter
from pathlib import Path

import torch

from ..latency.calibration import measure_children, predicted_ms
from ..latency.table import LatencyTable
from ..models.metagraph import MetaGraph
from ..run_context import RunContext
from ..search.policy import PolicyFn, calibrate, evaluate_policies, greedy_of, policy_forward
from ..space import ChildArchitecture
from ..training import EpochPlan, cosine, sgd, supervised_epoch
from ..utils import atomic_copy, write_json
from .common import (
    latency_backend,
    latency_table,
    load_candidate,
    new_models,
    search_checkpoints,
    stage_path,
)
from .policy_tuning import finetune_under_controller
from .resume import stop_if_requested

log = logging.getLogger("instanas")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (latency, accuracy) points no other point beats on one axis without losing
    on the other."""

    def dominated(i: int) -> bool:
        lat, acc = points[i]
        return any(
            o_lat <= lat and o_acc >= acc and (o_lat, o_acc) != (lat, acc)
            for o_lat, o_acc in points
        )

    return [i for i in range(len(points)) if not dominated(i)]


def pick_spread(points: list[tuple[float, float]], front: list[int], count: int) -> list[int]:
    """Up to ``count`` front points spread over latency: both ends first, then each time the
    point farthest (in latency) from those already picked. Returned slowest first."""
    if count <= 0 or not front:
        return []
    by_latency = sorted(front, key=lambda i: (points[i][0], -points[i][1]))
    picked = [by_latency[-1], by_latency[0]][:count] if len(by_latency) > 1 else by_latency[:1]
    picked = list(dict.fromkeys(picked))
    while len(picked) < min(count, len(by_latency)):
        rest = [i for i in by_latency if i not in picked]
        picked.append(
            max(rest, key=lambda i: min(abs(points[i][0] - points[j][0]) for j in picked))
        )
    return sorted(picked, key=lambda i: (-points[i][0], -points[i][1]))


def candidate_weights(ctx: RunContext, path: Path) -> Path:
    """The checkpoint whose meta-graph weights go with the controller of ``path``."""
    if ctx.config.variants.metagraph == "own":
        return path
    return search_checkpoints(ctx.run_dir)[-1]


def child_counts(policies: torch.Tensor, num_modules: int) -> dict[str, int]:
    """{child string: images} for resolved policies, most used first."""
    counts = Counter(tuple(row.flatten().tolist()) for row in policies.to(torch.uint8))
    return {
        str(ChildArchitecture.from_bits(bits, num_modules)): n for bits, n in counts.most_common()
    }


def measure_candidates(ctx: RunContext, table: LatencyTable, scored: list[dict]) -> None:
    """Mean batch-1 latency of each candidate on its validation images, in place.

    The children of all candidates are timed together, interleaved (controller plus the
    materialised child), so a child two candidates share gets one time and drift on the machine
    hits every candidate alike. Children beyond ``variants.max_timed_children`` (by images,
    over all candidates) are predicted by the table.
    """
    cfg = ctx.config.latency
    totals: Counter = Counter()
    for c in scored:
        totals.update(c["children"])
    timed = [name for name, _ in totals.most_common(ctx.config.variants.max_timed_children)]
    metagraph, controller = new_models(ctx)  # timing does not depend on the weights
    metagraph.eval()
    controller.eval()
    children = {n: ChildArchitecture.from_string(n, ctx.space.num_modules) for n in totals}
    timing = {"threads": cfg.threads, "warmup": cfg.warmup, "repeats": cfg.repeats,
              "seed": ctx.config.seed}  # fmt: skip
    stats = measure_children(
        metagraph, controller, [children[n] for n in timed], latency_backend(ctx), **timing
    )
    for c in scored:
        total = sum(
            n
            * (
                stats[name].median_ms
                if name in stats
                else predicted_ms(table, metagraph, children[name])
            )
            for name, n in c["children"].items()
        )
        c["val_latency_ms"] = total / sum(c["children"].values())
        c["timed_share"] = sum(n for name, n in c["children"].items() if name in stats) / sum(
            c["children"].values()
        )


def score_candidate(ctx: RunContext, table: LatencyTable, path: Path, index: int) -> dict:
    """Validation accuracy of one candidate, after ``variants.score_epochs`` of fine-tuning."""
    weights = candidate_weights(ctx, path)
    metagraph, controller = load_candidate(ctx, path, weights)
    policy = greedy_of(controller)
    epochs = ctx.config.variants.score_epochs
    if epochs:
        quick_finetune(ctx, metagraph, policy, epochs, stage=f"variants/score-{path.stem}")
    calibrate(ctx, metagraph, policy, purpose="variants/recalibrate", epoch=index)
    stats, policies = evaluate_policies(ctx, metagraph, policy, table, ctx.data.val)
    log.info(
        "candidate %s: val accuracy %.4f after %d fine-tuning epoch(s), %.3f ms table, %d children",
        path.stem,
        stats.accuracy,
        epochs,
        stats.total_ms,
        stats.distinct_children,
    )
    return {
        "name": path.stem,
        "checkpoint": str(path.relative_to(ctx.run_dir)),
        "weights": str(weights.relative_to(ctx.run_dir)),
        "score_epochs": epochs,
        "val_accuracy": stats.accuracy,
        "val_table_ms": stats.total_ms,
        "distinct_children": stats.distinct_children,
        "mean_active_modules": stats.mean_active_modules,
        "children": child_counts(policies, ctx.space.num_modules),
    }


def quick_finetune(
    ctx: RunContext, metagraph: MetaGraph, policy: PolicyFn, epochs: int, *, stage: str
) -> None:
    """The first ``epochs`` of the fine-tuning schedule, for scoring only (nothing is saved)."""
    cfg = ctx.config.finetune
    optimizer = sgd(metagraph.parameters(), cfg.lr, cfg.weight_decay)
    forward = policy_forward(metagraph, policy)
    length = max(cfg.epochs, epochs)
    plan = EpochPlan(stage, length, cfg.batch_size, cfg.lr, "finetune.lr", cosine)
    metagraph.train()
    for epoch in range(epochs):
        supervised_epoch(ctx, metagraph, forward, optimizer, plan, epoch)


def score_candidates(ctx: RunContext, table: LatencyTable) -> list[dict]:
    """Validation accuracy and measured latency of every search checkpoint; the Pareto front.

    Each candidate's score is kept as soon as it is known, so an interrupted stage resumes
    with the next candidate.
    """
    partial = ctx.run_dir / "variants" / "scores_partial.json"
    scored = json.loads(partial.read_text()) if partial.exists() and ctx.resume else []
    done = {c["checkpoint"] for c in scored}
    for index, path in enumerate(search_checkpoints(ctx.run_dir)):
        if str(path.relative_to(ctx.run_dir)) in done:
            continue
        scored.append(score_candidate(ctx, table, path, index))
        write_json(partial, scored)
        stop_if_requested(f"scoring candidate {path.stem}")
    measure_candidates(ctx, table, scored)
    points = [(c["val_latency_ms"], c["val_accuracy"]) for c in scored]
    front = set(pareto_front(points))
    picked = pick_spread(points, sorted(front), ctx.config.variants.count)
    for i, c in enumerate(scored):
        c["pareto"] = i in front
        c["variant"] = string.ascii_uppercase[picked.index(i)] if i in picked else None
        log.info(
            "candidate %s: val accuracy %.4f, %.3f ms measured%s",
            c["name"],
            c["val_accuracy"],
            c["val_latency_ms"],
            f", variant {c['variant']}" if c["variant"] else "",
        )
    return scored


def variant_path(ctx: RunContext, letter: str) -> Path:
    return ctx.run_dir / "variants" / letter / "model.safetensors"


def build_variants(ctx: RunContext, table: LatencyTable) -> dict:
    """Score the candidates (once), then fine-tune each chosen variant not done yet."""
    scores_path = ctx.run_dir / "variants" / "candidates.json"
    if scores_path.exists():
        candidates = json.loads(scores_path.read_text())["candidates"]
    else:
        candidates = score_candidates(ctx, table)
        write_json(scores_path, {"candidates": candidates})
        (ctx.run_dir / "variants" / "scores_partial.json").unlink(missing_ok=True)
    chosen = {c["variant"]: c for c in candidates if c["variant"]}
    for letter, candidate in sorted(chosen.items()):
        if not variant_path(ctx, letter).exists():
            finetune_variant(ctx, table, letter, candidate)
    summary = {
        letter: {**c, "model": str(variant_path(ctx, letter).relative_to(ctx.run_dir))}
        for letter, c in sorted(chosen.items())
    }
    write_json(stage_path(ctx, "variants"), summary)
    return summary


def finetune_variant(ctx: RunContext, table: LatencyTable, letter: str, candidate: dict) -> None:
    """Fine-tune one chosen candidate, or reuse the main model's fine-tuning when it is the
    very checkpoint the main model started from (same start, same result)."""
    output = variant_path(ctx, letter)
    selected = json.loads((ctx.run_dir / "search" / "selected.json").read_text())["chosen"]
    main_start = candidate["checkpoint"] == selected["checkpoint"] == candidate["weights"]
    if main_start and stage_path(ctx, "finetune").exists():
        log.info("variant %s is the main model's checkpoint; reusing its fine-tuning", letter)
        atomic_copy(stage_path(ctx, "finetune"), output)
        return
    controller_of, weights_of = candidate["checkpoint"], candidate["weights"]
    log.info("fine-tuning variant %s: controller of %s, meta-graph of %s", letter, controller_of,
             weights_of)  # fmt: skip
    metagraph, controller = load_candidate(
        ctx, ctx.run_dir / controller_of, ctx.run_dir / weights_of
    )
    stage = f"variants/{letter}"
    finetune_under_controller(ctx, metagraph, controller, table, stage=stage, output=output)


def run(ctx: RunContext) -> dict:
    return build_variants(ctx, latency_table(ctx))
