"""Stage 1: one-shot pretraining of the meta-graph with a drop-path schedule (docs/design.md)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..config import PretrainConfig
from ..distributed import uniform
from ..models.metagraph import MetaGraph
from ..run_context import RunContext
from ..training import EpochPlan, accuracy, cosine, sgd, step_decay, supervised_epoch
from .common import new_models, save_stage, stage_path
from .loop import EpochLoop


def drop_path_keep(progress: float, final_keep: float, start: float = 0.5) -> float:
    """Keep probability: 1 until ``start``; then falls linearly to ``final_keep`` at the end."""
    if progress < start:
        return 1.0
    return 1.0 - (1.0 - final_keep) * (progress - start) / (1.0 - start)


def lr_schedule(cfg: PretrainConfig) -> Callable[[float], float]:
    """The learning-rate factor over pretraining progress that ``pretrain.schedule`` names."""
    return cosine if cfg.schedule == "cosine" else step_decay(cfg.milestones)


def pretrain(ctx: RunContext, metagraph: MetaGraph) -> MetaGraph:
    cfg = ctx.config.pretrain
    metagraph = ctx.prepare(metagraph)
    optimizer = sgd(metagraph.parameters(), cfg.lr, cfg.weight_decay)
    drop_gen = ctx.generator("pretrain/drop-path")
    shape = (ctx.space.num_cells, ctx.space.num_modules)
    plan = EpochPlan(
        "pretrain", cfg.epochs, cfg.batch_size, cfg.lr, "pretrain.lr", lr_schedule(cfg)
    )
    keep_at = partial(drop_path_keep, final_keep=cfg.final_keep, start=cfg.drop_path_start)

    def forward(images: torch.Tensor, progress: float) -> torch.Tensor:
        keep = keep_at(progress)
        if keep >= 1.0:
            return metagraph(images)  # every module on
        # Per image and per module; outputs are not rescaled, as in the paper. Cells left empty
        # follow the empty-cell rule inside the meta-graph.
        policy = uniform((images.shape[0], *shape), drop_gen) < keep
        return metagraph(images, policy)

    def train_epoch(epoch: int) -> dict:
        metagraph.train()
        stats = supervised_epoch(ctx, metagraph, forward, optimizer, plan, epoch)
        metagraph.eval()
        return stats.record(
            val_accuracy_all_modules=accuracy(ctx, metagraph, ctx.data.val),
            keep_prob_end=keep_at((epoch + 1) / cfg.epochs),
        )

    modules = {"metagraph": metagraph}
    write = partial(save_stage, ctx, stage_path(ctx, "pretrain"), modules, {"stage": "pretrain"})
    generators = {"drop-path": drop_gen}
    EpochLoop("pretrain", cfg.epochs, modules, {"sgd": optimizer}, generators).run(
        ctx, train_epoch, write
    )
    return metagraph


def run(ctx: RunContext) -> MetaGraph:
    metagraph, _ = new_models(ctx)
    return pretrain(ctx, metagraph)
