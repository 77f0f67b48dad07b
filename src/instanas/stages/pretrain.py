"""Stage 1: one-shot pretraining of the meta-graph with a drop-path schedule (docs/design.md)."""

from __future__ import annotations

import torch

from ..models.metagraph import MetaGraph
from ..training import RunContext, accuracy, sgd, step_decay, supervised_epoch
from .common import new_models, save_stage, stage_path
from .loop import EpochLoop


def drop_path_keep(progress: float, final_keep: float) -> float:
    """Keep probability: 1 for the first half; then falls linearly to ``final_keep``."""
    if progress < 0.5:
        return 1.0
    return 1.0 - (1.0 - final_keep) * (progress - 0.5) / 0.5


def pretrain(ctx: RunContext, metagraph: MetaGraph) -> MetaGraph:
    cfg = ctx.config.pretrain
    metagraph = ctx.prepare(metagraph)
    optimizer = sgd(metagraph.parameters(), cfg.lr, cfg.weight_decay)
    drop_gen = ctx.generator("pretrain/drop-path")
    shape = (ctx.space.num_cells, ctx.space.num_modules)

    def forward(images: torch.Tensor, progress: float) -> torch.Tensor:
        keep = drop_path_keep(progress, cfg.final_keep)
        if keep >= 1.0:
            return metagraph(images)  # every module on
        # Per image and per module; outputs are not rescaled, as in the paper. Cells left empty
        # follow the empty-cell rule inside the meta-graph.
        policy = torch.rand((images.shape[0], *shape), generator=drop_gen) < keep
        return metagraph(images, policy)

    def train_epoch(epoch: int) -> dict:
        metagraph.train()
        stats = supervised_epoch(
            ctx,
            forward,
            optimizer,
            base_lr=cfg.lr,
            lr_factor=step_decay(cfg.milestones),
            epoch=epoch,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            stage="pretrain",
            lr_option="pretrain.lr",
        )
        metagraph.eval()
        return {
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "val_accuracy_all_modules": accuracy(ctx, metagraph, ctx.data.val),
            "keep_prob_end": drop_path_keep((epoch + 1) / cfg.epochs, cfg.final_keep),
            "seconds": stats.seconds,
        }

    loop = EpochLoop(
        "pretrain",
        cfg.epochs,
        {"metagraph": metagraph},
        {"sgd": optimizer},
        {"drop-path": drop_gen},
    )
    loop.run(
        ctx,
        train_epoch,
        lambda: save_stage(
            ctx, stage_path(ctx, "pretrain"), {"metagraph": metagraph}, {"stage": "pretrain"}
        ),
    )
    return metagraph


def run(ctx: RunContext) -> MetaGraph:
    metagraph, _ = new_models(ctx)
    return pretrain(ctx, metagraph)
