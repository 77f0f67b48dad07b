"""Stage 3: fine-tune the meta-graph on each image's greedy policy, controller frozen.

The same loop trains the random-policy baseline: only the policy function differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..controller import Controller
from ..latency import LatencyTable
from ..metagraph import MetaGraph
from ..training import RunContext, cosine, sgd, supervised_epoch
from .common import save_stage, stage_path
from .resume import EpochCheckpoints
from .search import PolicyFn, calibrate, evaluate_policies, greedy_of


def finetune(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
             table: LatencyTable, *, stage: str = "finetune",
             output: Path | None = None) -> MetaGraph:
    """Fine-tune under the frozen controller; saves meta-graph and controller to ``output``."""
    controller = ctx.prepare(controller)
    controller.eval()
    for p in controller.parameters():
        p.requires_grad_(False)
    return train_under_policy(ctx, metagraph, greedy_of(controller), table, stage=stage,
                              output=output or stage_path(ctx, "finetune"),
                              extra_modules={"controller": controller})


def policy_forward(metagraph: MetaGraph, policy_fn: PolicyFn
                   ) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The training forward: logits under the policies ``policy_fn`` picks (no gradient)."""
    def forward(images: torch.Tensor, progress: float) -> torch.Tensor:
        with torch.no_grad():
            policy = policy_fn(images)
        return metagraph(images, policy)
    return forward


def train_under_policy(ctx: RunContext, metagraph: MetaGraph, policy_fn: PolicyFn,
                       table: LatencyTable, *, stage: str, output: Path,
                       extra_modules: dict[str, torch.nn.Module] | None = None,
                       meta: dict | None = None, uses_controller: bool = True,
                       generators: dict[str, torch.Generator] | None = None) -> MetaGraph:
    """``finetune.*`` epochs on the policies ``policy_fn`` picks per batch (no gradient)."""
    cfg = ctx.config.finetune
    metagraph = ctx.prepare(metagraph)
    optimizer = sgd(metagraph.parameters(), cfg.lr, cfg.weight_decay)
    forward = policy_forward(metagraph, policy_fn)

    # ``generators``: random streams the policy draws from, restored on resume.
    checkpoints = EpochCheckpoints(ctx, stage, {"metagraph": metagraph}, {"sgd": optimizer},
                                   generators)
    start, _ = checkpoints.restore()
    for epoch in range(start, cfg.epochs):
        metagraph.train()
        stats = supervised_epoch(ctx, forward, optimizer, base_lr=cfg.lr, lr_factor=cosine,
                                 epoch=epoch, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                 stage=stage)
        # Exact statistics for the final weights (the running average lags the last steps).
        calibrate(ctx, metagraph, policy_fn, purpose=f"{stage}/recalibrate", epoch=epoch)
        val, _ = evaluate_policies(ctx, metagraph, policy_fn, table, ctx.data.val,
                                   include_controller=uses_controller)
        ctx.log_metrics({"stage": stage, "epoch": epoch + 1, "train_loss": stats.loss,
                         "train_accuracy": stats.accuracy, "val_accuracy": val.accuracy,
                         "val_total_ms": val.total_ms, "seconds": stats.seconds})
        checkpoints.save(epoch + 1)
    save_stage(ctx, output, {"metagraph": metagraph, **(extra_modules or {})},
               {"stage": stage, **(meta or {})})
    checkpoints.finish()
    return metagraph
