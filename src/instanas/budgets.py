"""Training budgets in the unit that matters: optimiser steps, whatever the data set's size.

Each training stage takes ``epochs`` or ``steps``. A config with ``budget_images`` (the presets
sized for one data set) keeps each stage's number of optimiser steps on a smaller training
split, so 7,000 images get as many steps as 54,000 did instead of an eighth of them. The
resolved budget is written back (``steps`` and ``epochs``), so ``config.yaml`` shows what ran
and a resumed run resolves to the same epochs.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from . import stage_specs
from .config import Config
from .data import num_batches

# The stages whose budget is an epoch count of their own.
BUDGETED = ("pretrain", "search", "finetune", "baseline")


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Optimiser steps in one epoch (the last partial batch is dropped, as in training)."""
    return num_batches(train_images, batch_size, drop_last=train_images > batch_size)


def resolve_budgets(config: Config, train_images: int, pinned: Collection[str] = ()) -> None:
    """Set every stage's ``epochs`` (and ``steps``) for ``train_images`` training images.

    ``pinned``: stages whose epochs or steps the user gave explicitly; they are not scaled.
    Every stage with a budget leaves with ``steps`` set, so resolving again (a resumed run, the
    next stage command) gives the same epochs.
    """
    for stage in BUDGETED:
        cfg = getattr(config, stage)
        per_epoch = steps_per_epoch(train_images, cfg.batch_size)
        if cfg.steps is None and _scales(config, stage, train_images, pinned):
            cfg.steps = cfg.epochs * steps_per_epoch(config.budget_images, cfg.batch_size)
        elif cfg.steps is None and cfg.epochs is not None:
            cfg.steps = cfg.epochs * per_epoch  # as given; recorded so it stays so
        if cfg.steps is not None:
            cfg.epochs = max(1, math.ceil(cfg.steps / per_epoch))


def _scales(config: Config, stage: str, train_images: int, pinned: Collection[str]) -> bool:
    cfg = getattr(config, stage)
    return (
        config.budget_images is not None
        and train_images < config.budget_images
        and stage not in pinned
        and cfg.epochs is not None
    )


def describe(config: Config, stage: str, train_images: int) -> str | None:
    """'baseline: 14 epochs = 2,950 steps of 256 images' for a training stage, else None."""
    section = stage_specs.get(stage).budget
    if section is None:
        return None
    cfg = getattr(config, section)
    epochs = config.baseline_epochs() if section == "baseline" else cfg.epochs
    steps = epochs * steps_per_epoch(train_images, cfg.batch_size)
    return (
        f"{stage}: {epochs} epochs = {steps:,} steps of {cfg.batch_size} images "
        f"({train_images:,} training images)"
    )


def prefer_given_epochs(config: Config, overrides: Collection[str]) -> None:
    """Epochs given on the command line win over steps recorded in a config file."""
    for stage in BUDGETED:
        if f"{stage}.epochs" in overrides and f"{stage}.steps" not in overrides:
            getattr(config, stage).steps = None


def pinned_stages(overrides: Collection[str]) -> set[str]:
    """The stages whose ``epochs`` or ``steps`` appear among the override keys."""
    return {
        key.split(".")[0]
        for key in overrides
        if key.split(".")[0] in BUDGETED and key.split(".")[-1] in ("epochs", "steps")
    }
