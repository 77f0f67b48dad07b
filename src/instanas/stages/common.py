"""What the stages share: where each keeps its output in the run directory, how it is read
back, and the loop that fine-tunes the meta-graph under a fixed policy function (fine-tuning,
the variants and the random-policy model)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (
    CheckpointError,
    check_identity,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from ..latency.table import LatencyTable
from ..models.controller import Controller
from ..models.metagraph import MetaGraph
from ..search.policy import PolicyFn, calibrate, evaluate_policies, greedy_of, policy_forward
from ..training import RunContext, cosine, run_identity, sgd, supervised_epoch
from .resume import EpochCheckpoints

STAGE_FILES = {
    "pretrain": "pretrain/metagraph.safetensors",
    "search": "search/selected.safetensors",
    "finetune": "finetune/model.safetensors",
    "baseline": "baseline/mbv2.safetensors",
    "random-policy": "random-policy/model.safetensors",
    "static-child": "static-child/model.safetensors",
    "variants": "variants/variants.json",
    "baselines": "baseline/references.json",
}
PREVIOUS = {"search": ("pretrain",), "finetune": ("search",), "random-policy": ("search",),
            "static-child": ("search",),
            "variants": ("search",), "evaluate": ("finetune", "baseline")}


def new_models(ctx: RunContext) -> tuple[MetaGraph, Controller]:
    """An untrained meta-graph and controller of this run's space and controller shape."""
    metagraph = MetaGraph(ctx.space)
    controller = Controller(ctx.space.input_channels, ctx.space.num_cells, ctx.space.num_modules,
                            ctx.config.controller_spec())
    return metagraph, controller


def stage_path(ctx: RunContext, stage: str) -> Path:
    return ctx.run_dir / STAGE_FILES[stage]


def save_stage(ctx: RunContext, path: Path, modules: dict[str, nn.Module], meta: dict) -> None:
    save_checkpoint(path, modules, {**run_identity(ctx), **meta})


def load_stage(ctx: RunContext, stage: str, modules: dict[str, nn.Module]) -> dict:
    path = stage_path(ctx, stage)
    if not path.exists():
        raise CheckpointError(f"{ctx.run_dir} has no {stage} output ({STAGE_FILES[stage]}): run "
                              f"`instanas {stage} --output {ctx.run_dir}` first")
    return load_checkpoint(path, modules, expect=run_identity(ctx))


def verify_output(ctx: RunContext, stage: str) -> None:
    """Read the stage's output, if there is one, and check that it belongs to this run."""
    path = stage_path(ctx, stage)
    if path.exists() and path.suffix == ".safetensors":
        _, meta = read_checkpoint(path)
        check_identity(path, meta, run_identity(ctx))


def require_previous(run_dir: Path, stage: str) -> None:
    """Fail before anything is written when the stages ``stage`` builds on have not run."""
    for before in PREVIOUS.get(stage, ()):
        if not (run_dir / STAGE_FILES[before]).exists():
            raise CheckpointError(f"{run_dir} has no {before} output ({STAGE_FILES[before]}): "
                                  f"run `instanas {before} --output {run_dir}` before "
                                  f"`instanas {stage}`")


def checkpoint_order(path: Path) -> tuple[int, int]:
    """Chronological sort key of search/epoch_EEE[_partK].safetensors (end of epoch last)."""
    match = re.fullmatch(r"epoch_(\d+)(?:_part(\d+))?\.safetensors", path.name)
    if match is None:
        raise ValueError(f"{path} is not a search checkpoint name")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else 1 << 30


def search_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint the search kept, in the order they were written."""
    return sorted((run_dir / "search").glob("epoch_*.safetensors"), key=checkpoint_order)


def finetune_under_controller(ctx: RunContext, metagraph: MetaGraph, controller: Controller,
                              table: LatencyTable, *, stage: str, output: Path) -> MetaGraph:
    """Fine-tune under the frozen controller; saves meta-graph and controller to ``output``."""
    controller = ctx.prepare(controller)
    controller.eval()
    for p in controller.parameters():
        p.requires_grad_(False)
    return train_under_policy(ctx, metagraph, greedy_of(controller), table, stage=stage,
                              output=output, extra_modules={"controller": controller})


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
