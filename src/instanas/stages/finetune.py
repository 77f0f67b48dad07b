"""Stage 3: fine-tune the meta-graph on each image's greedy policy, controller frozen."""

from __future__ import annotations

import torch

from ..controller import Controller, greedy_policy
from ..latency import LatencyTable
from ..metagraph import MetaGraph
from ..training import RunContext, cosine, sgd, supervised_epoch
from .common import save_stage, stage_path
from .resume import EpochCheckpoints
from .search import calibrate, evaluate_policies


def finetune(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
             table: LatencyTable) -> MetaGraph:
    cfg = ctx.config.finetune
    metagraph, controller = ctx.prepare(metagraph), ctx.prepare(controller)
    controller.eval()
    for p in controller.parameters():
        p.requires_grad_(False)
    optimizer = sgd(metagraph.parameters(), cfg.lr, cfg.weight_decay)

    def forward(images: torch.Tensor, progress: float) -> torch.Tensor:
        with torch.no_grad():
            policy = greedy_policy(controller(images))
        return metagraph(images, policy)

    checkpoints = EpochCheckpoints(ctx, "finetune", {"metagraph": metagraph}, {"sgd": optimizer})
    start, _ = checkpoints.restore()
    for epoch in range(start, cfg.epochs):
        metagraph.train()
        stats = supervised_epoch(ctx, forward, optimizer, base_lr=cfg.lr, lr_factor=cosine,
                                 epoch=epoch, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                 stage="finetune")
        # Exact statistics for the final weights (the running average lags the last steps).
        calibrate(ctx, metagraph, controller, purpose="finetune/recalibrate",
                  epoch=epoch)
        val, _ = evaluate_policies(ctx, metagraph, controller, table, ctx.data.val)
        ctx.log_metrics({"stage": "finetune", "epoch": epoch + 1, "train_loss": stats.loss,
                         "train_accuracy": stats.accuracy, "val_accuracy": val.accuracy,
                         "val_total_ms": val.total_ms, "seconds": stats.seconds})
        checkpoints.save(epoch + 1)
    save_stage(ctx, stage_path(ctx, "finetune"), {"metagraph": metagraph, "controller": controller},
               {"stage": "finetune"})
    checkpoints.finish()
    return metagraph
