"""Where each stage keeps its output in the run directory, and how it is read back."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..checkpoint import (
    CheckpointError,
    check_identity,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from ..controller import Controller
from ..metagraph import MetaGraph
from ..training import RunContext

STAGE_FILES = {
    "pretrain": "pretrain/metagraph.safetensors",
    "search": "search/selected.safetensors",
    "finetune": "finetune/model.safetensors",
    "baseline": "baseline/mbv2.safetensors",
    "random-policy": "random-policy/model.safetensors",
    "variants": "variants/variants.json",
    "baselines": "baseline/references.json",
}
PREVIOUS = {"search": ("pretrain",), "finetune": ("search",), "random-policy": ("search",),
            "variants": ("search",), "evaluate": ("finetune", "baseline")}


def new_models(ctx: RunContext) -> tuple[MetaGraph, Controller]:
    """An untrained meta-graph and controller of this run's space and controller shape."""
    metagraph = MetaGraph(ctx.space)
    controller = Controller(ctx.space.input_channels, ctx.space.num_cells, ctx.space.num_modules,
                            ctx.config.controller_spec())
    return metagraph, controller


def stage_path(ctx: RunContext, stage: str) -> Path:
    return ctx.run_dir / STAGE_FILES[stage]


def identity(ctx: RunContext) -> dict:
    """What a checkpoint must agree on with the run that loads it."""
    facts = {"preset": ctx.config.preset, "space": ctx.space.to_dict(),
             "classes": list(ctx.data.classes),
             "controller": ctx.config.controller_spec().to_dict(),
             "normalization": {"mean": list(ctx.data.mean), "std": list(ctx.data.std)}}
    return json.loads(json.dumps(facts))  # tuples become lists, as they come back from JSON


def save_stage(ctx: RunContext, path: Path, modules: dict[str, nn.Module], meta: dict) -> None:
    save_checkpoint(path, modules, {**identity(ctx), **meta})


def load_stage(ctx: RunContext, stage: str, modules: dict[str, nn.Module]) -> dict:
    path = stage_path(ctx, stage)
    if not path.exists():
        raise CheckpointError(f"{ctx.run_dir} has no {stage} output ({STAGE_FILES[stage]}): run "
                              f"`instanas {stage} --output {ctx.run_dir}` first")
    return load_checkpoint(path, modules, expect=identity(ctx))


def verify_output(ctx: RunContext, stage: str) -> None:
    """Read the stage's output, if there is one, and check that it belongs to this run."""
    path = stage_path(ctx, stage)
    if path.exists() and path.suffix == ".safetensors":
        _, meta = read_checkpoint(path)
        check_identity(path, meta, identity(ctx))


def require_previous(run_dir: Path, stage: str) -> None:
    """Fail before anything is written when the stages ``stage`` builds on have not run."""
    for before in PREVIOUS.get(stage, ()):
        if not (run_dir / STAGE_FILES[before]).exists():
            raise CheckpointError(f"{run_dir} has no {before} output ({STAGE_FILES[before]}): "
                                  f"run `instanas {before} --output {run_dir}` before "
                                  f"`instanas {stage}`")
