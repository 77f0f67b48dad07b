"""Variants A..E: several operating points from one search (spec section 6.2).

Every checkpoint the search kept is a candidate. Each is scored on the validation split only:
accuracy of the controller's greedy policies (BatchNorm recalibrated for them) and mean latency
measured end to end at batch 1 (controller plus the materialised child, for the children it
uses most; rarely used children are predicted by the table). Up to ``variants.count`` candidates
on the Pareto front of accuracy vs latency are fine-tuned; A is the most accurate, then each
letter is faster.
"""

from __future__ import annotations

import json
import logging
import string
from collections import Counter
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..controller import Controller
from ..latency import LatencyTable
from ..latency_check import measure_children, predicted_ms
from ..metagraph import MetaGraph
from ..space import ChildArchitecture
from ..training import RunContext
from ..utils import atomic_copy, write_json
from .common import identity, stage_path
from .finetune import finetune
from .search import calibrate, evaluate_policies, greedy_of, search_checkpoints

log = logging.getLogger("instanas")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (latency, accuracy) points no other point beats on one axis without losing
    on the other."""
    def dominated(i: int) -> bool:
        lat, acc = points[i]
        return any(o_lat <= lat and o_acc >= acc and (o_lat, o_acc) != (lat, acc)
                   for o_lat, o_acc in points)
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
        picked.append(max(rest, key=lambda i: min(abs(points[i][0] - points[j][0])
                                                   for j in picked)))
    return sorted(picked, key=lambda i: (-points[i][0], -points[i][1]))


def load_candidate(ctx: RunContext, path: Path) -> tuple[MetaGraph, Controller]:
    metagraph = MetaGraph(ctx.space)
    controller = Controller(ctx.space.input_channels, ctx.space.num_cells, ctx.space.num_modules,
                            ctx.config.controller_spec())
    load_checkpoint(path, {"metagraph": metagraph, "controller": controller},
                    expect=identity(ctx))
    return ctx.prepare(metagraph), ctx.prepare(controller).eval()


def measured_mean_ms(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
                     policies: torch.Tensor, table: LatencyTable) -> float:
    """Mean batch-1 latency over the images of ``policies``: the most used children timed end
    to end, the rest predicted by the table."""
    cfg = ctx.config.latency
    counts = Counter(tuple(row.flatten().tolist()) for row in policies.to(torch.uint8))
    ranked = [(ChildArchitecture.from_bits(bits, ctx.space.num_modules), n)
              for bits, n in counts.most_common()]
    timed = ranked[:ctx.config.variants.max_timed_children]
    stats = measure_children(metagraph.cpu().eval(), controller.cpu(), [c for c, _ in timed],
                             threads=cfg.threads, warmup=cfg.warmup, repeats=cfg.repeats,
                             seed=ctx.config.seed)
    total = sum(stats[str(c)].median_ms * n for c, n in timed)
    total += sum(predicted_ms(table, metagraph, c) * n for c, n in ranked[len(timed):])
    return total / len(policies)


def score_candidates(ctx: RunContext, table: LatencyTable) -> list[dict]:
    """Validation accuracy and measured latency of every search checkpoint."""
    scored = []
    for index, path in enumerate(search_checkpoints(ctx.run_dir)):
        metagraph, controller = load_candidate(ctx, path)
        policy = greedy_of(controller)
        calibrate(ctx, metagraph, policy, purpose="variants/recalibrate", epoch=index)
        stats, policies = evaluate_policies(ctx, metagraph, policy, table, ctx.data.val)
        latency = measured_mean_ms(ctx, metagraph, controller, policies, table)
        scored.append({"name": path.stem, "checkpoint": str(path.relative_to(ctx.run_dir)),
                       "val_accuracy": stats.accuracy, "val_latency_ms": latency,
                       "val_table_ms": stats.total_ms,
                       "distinct_children": stats.distinct_children,
                       "mean_active_modules": stats.mean_active_modules})
        log.info("candidate %s: val accuracy %.4f, %.3f ms measured (%.3f table), %d children",
                 path.stem, stats.accuracy, latency, stats.total_ms, stats.distinct_children)
    points = [(c["val_latency_ms"], c["val_accuracy"]) for c in scored]
    front = set(pareto_front(points))
    picked = pick_spread(points, sorted(front), ctx.config.variants.count)
    for i, c in enumerate(scored):
        c["pareto"] = i in front
        c["variant"] = string.ascii_uppercase[picked.index(i)] if i in picked else None
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
    selected = json.loads((ctx.run_dir / "search" / "selected.json").read_text())["chosen"]
    chosen = {c["variant"]: c for c in candidates if c["variant"]}
    for letter, candidate in sorted(chosen.items()):
        output = variant_path(ctx, letter)
        if output.exists():
            continue
        if candidate["checkpoint"] == selected["checkpoint"] and \
                stage_path(ctx, "finetune").exists():
            # The main model started from this very checkpoint: same start, same result.
            log.info("variant %s is the main model's checkpoint; reusing its fine-tuning", letter)
            atomic_copy(stage_path(ctx, "finetune"), output)
            continue
        log.info("fine-tuning variant %s from %s", letter, candidate["checkpoint"])
        metagraph, controller = load_candidate(ctx, ctx.run_dir / candidate["checkpoint"])
        finetune(ctx, metagraph, controller, table, stage=f"variants/{letter}", output=output)
    summary = {letter: {**c, "model": str(variant_path(ctx, letter).relative_to(ctx.run_dir))}
               for letter, c in sorted(chosen.items())}
    write_json(stage_path(ctx, "variants"), summary)
    return summary
