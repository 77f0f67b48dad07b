"""Fine-tuning the meta-graph under a fixed policy function: the loop behind the fine-tuning
stage, the variants, the random-policy model and the best static child (only the policy
function differs)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..search.policy import PolicyFn, calibrate, evaluate_policies, greedy_of, policy_forward
from ..training import RunContext, cosine, sgd, supervised_epoch
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
) -> MetaGraph:
    """Fine-tune under the frozen controller; saves meta-graph and controller to ``output``."""
    controller = ctx.prepare(controller)
    controller.eval()
    for p in controller.parameters():
        p.requires_grad_(False)
    return train_under_policy(
        ctx,
        metagraph,
        greedy_of(controller),
        table,
        stage=stage,
        output=output,
        extra_modules={"controller": controller},
    )


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

    def train_epoch(epoch: int) -> dict:
        metagraph.train()
        stats = supervised_epoch(
            ctx,
            forward,
            optimizer,
            base_lr=cfg.lr,
            lr_factor=cosine,
            epoch=epoch,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            stage=stage,
            lr_option="finetune.lr",
        )
        # Exact statistics for the final weights (the running average lags the last steps).
        calibrate(ctx, metagraph, policy_fn, purpose=f"{stage}/recalibrate", epoch=epoch)
        val, _ = evaluate_policies(
            ctx, metagraph, policy_fn, table, ctx.data.val, include_controller=uses_controller
        )
        return {
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "val_accuracy": val.accuracy,
            "val_total_ms": val.total_ms,
            "seconds": stats.seconds,
        }

    def write_output() -> None:
        save_stage(
            ctx,
            output,
            {"metagraph": metagraph, **(extra_modules or {})},
            {"stage": stage, **(meta or {})},
        )

    # ``generators``: random streams the policy draws from, restored on resume.
    EpochLoop(
        stage, cfg.epochs, {"metagraph": metagraph}, {"sgd": optimizer}, generators or {}
    ).run(ctx, train_epoch, write_output)
    return metagraph
