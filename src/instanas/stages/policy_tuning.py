"""Fine-tuning the meta-graph under a fixed policy function: the loop behind the fine-tuning
stage, the variants, the random-policy model and the best static child (only the policy
function differs)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..models.predictor import child_policy_bits, nearest_child_policies
from ..run_context import RunContext
from ..search.policy import PolicyFn, calibrate, evaluate_policies, greedy_of, policy_forward
from ..space import ChildArchitecture
from ..training import EpochPlan, cosine, sgd, supervised_epoch
from .common import save_stage
from .loop import EpochLoop


def finetune_under_controller(
    ctx: RunContext,
    metagraph: MetaGraph,
    controller: Controller,
    table: LatencyTable,
    *,
    stage: str,
    output: Path,
    children: Sequence[ChildArchitecture] | None = None,
) -> MetaGraph:
    """Fine-tune under the frozen controller; saves meta-graph and controller to ``output``.
    ``children``: the child set the model deploys; every image then trains the child of that
    set nearest to its policy, as the deployed model runs it."""
    controller = ctx.prepare(controller)
    controller.eval()
    for p in controller.parameters():
        p.requires_grad_(False)
    policy_fn = greedy_of(controller)
    if children:
        policy_fn = routed_within(metagraph, policy_fn, children)
    return train_under_policy(
        ctx,
        metagraph,
        policy_fn,
        table,
        stage=stage,
        output=output,
        extra_modules={"controller": controller},
    )


def routed_within(
    metagraph: MetaGraph, policy_fn: PolicyFn, children: Sequence[ChildArchitecture]
) -> PolicyFn:
    """``policy_fn`` with each image's resolved policy replaced by the nearest of ``children``."""
    bits = child_policy_bits(children)
    return lambda images: nearest_child_policies(metagraph.resolve(policy_fn(images)), bits)


def train_under_policy(
    ctx: RunContext,
    metagraph: MetaGraph,
    policy_fn: PolicyFn,
    table: LatencyTable,
    *,
    stage: str,
    output: Path,
    extra_modules: dict[str, torch.nn.Module] | None = None,
    meta: dict | None = None,
    uses_controller: bool = True,
    generators: dict[str, torch.Generator] | None = None,
) -> MetaGraph:
    """``finetune.*`` epochs on the policies ``policy_fn`` picks per batch (no gradient)."""
    cfg = ctx.config.finetune
    metagraph = ctx.prepare(metagraph)
    optimizer = sgd(metagraph.parameters(), cfg.lr, cfg.weight_decay)
    forward = policy_forward(metagraph, policy_fn)
    plan = EpochPlan(stage, cfg.epochs, cfg.batch_size, cfg.lr, "finetune.lr", cosine)

    def train_epoch(epoch: int) -> dict:
        metagraph.train()
        stats = supervised_epoch(ctx, metagraph, forward, optimizer, plan, epoch)
        # Exact statistics for the final weights (the running average lags the last steps).
        calibrate(ctx, metagraph, policy_fn, purpose=f"{stage}/recalibrate", epoch=epoch)
        data = ctx.data.val
        val, _ = evaluate_policies(ctx, metagraph, policy_fn, table, data, uses_controller)
        return stats.record(val_accuracy=val.accuracy, val_total_ms=val.total_ms)

    modules = {"metagraph": metagraph, **(extra_modules or {})}
    write = partial(save_stage, ctx, output, modules, {"stage": stage, **(meta or {})})
    # ``generators``: random streams the policy draws from, restored on resume.
    loop = EpochLoop(stage, cfg.epochs, {"metagraph": metagraph}, {"sgd": optimizer}, generators)
    loop.run(ctx, train_epoch, write)
    return metagraph
