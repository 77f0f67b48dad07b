"""Budgets in optimiser steps: a smaller data set keeps the preset's steps; steps and epochs
agree where they coincide; explicit epochs are left alone."""

import math

from instanas.budgets import describe, pinned_stages, resolve_budgets, steps_per_epoch
from instanas.config import apply_overrides, load_preset


def test_full_data_keeps_the_preset_epochs():
    config = load_preset("fashion-cpu")
    before = {s: getattr(config, s).epochs for s in ("pretrain", "search", "finetune")}
    resolve_budgets(config, 54000)
    assert {s: getattr(config, s).epochs for s in before} == before
    assert config.pretrain.steps == config.pretrain.epochs * steps_per_epoch(54000, 256)


def test_a_smaller_data_set_keeps_the_preset_step_count():
    config = load_preset("fashion-cpu")
    full = {
        s: getattr(config, s).epochs * steps_per_epoch(54000, getattr(config, s).batch_size)
        for s in ("pretrain", "search", "finetune")
    }
    full_baseline = config.baseline_epochs() * steps_per_epoch(54000, 256)
    resolve_budgets(config, 7200)
    for stage, steps in full.items():
        cfg = getattr(config, stage)
        assert cfg.steps == steps
        assert cfg.epochs == math.ceil(steps / steps_per_epoch(7200, cfg.batch_size))
        assert cfg.epochs * steps_per_epoch(7200, cfg.batch_size) >= steps
    assert config.baseline_epochs() * steps_per_epoch(7200, 256) >= full_baseline
    again = config.pretrain.epochs
    resolve_budgets(config, 7200)  # a resumed run resolves to the same epochs
    assert config.pretrain.epochs == again


def test_steps_and_epochs_coincide():
    by_epochs = apply_overrides(load_preset("fashion-cpu"), {"finetune.epochs": "3"})
    by_steps = apply_overrides(
        load_preset("fashion-cpu"), {"finetune.steps": str(3 * steps_per_epoch(7200, 256))}
    )
    resolve_budgets(by_epochs, 7200, pinned={"finetune"})
    resolve_budgets(by_steps, 7200, pinned={"finetune"})
    assert by_epochs.finetune.epochs == by_steps.finetune.epochs == 3


def test_explicit_epochs_are_pinned():
    assert pinned_stages(["pretrain.epochs", "search.steps", "finetune.lr", "data.root"]) == {
        "pretrain",
        "search",
    }
    config = apply_overrides(load_preset("fashion-cpu"), {"pretrain.epochs": "1"})
    resolve_budgets(config, 600, pinned={"pretrain"})
    assert config.pretrain.epochs == 1 and config.pretrain.steps == steps_per_epoch(600, 256)
    assert config.search.epochs > 3  # not pinned: scaled
    resolve_budgets(config, 600)  # resumed without the override: still one epoch
    assert config.pretrain.epochs == 1


def test_epochs_on_the_command_line_win_over_recorded_steps():
    from instanas.budgets import prefer_given_epochs

    config = load_preset("fashion-cpu")
    resolve_budgets(config, 7200)  # as a first run records it
    config = apply_overrides(config, {"pretrain.epochs": "3"})
    prefer_given_epochs(config, ["pretrain.epochs"])
    resolve_budgets(config, 7200, pinned={"pretrain"})
    assert config.pretrain.epochs == 3


def test_the_log_line_says_epochs_and_steps():
    config = load_preset("fashion-cpu")
    line = describe(config, "baseline", 54000)
    epochs = config.baseline_epochs()
    assert line == (
        f"baseline: {epochs} epochs = {epochs * 210:,} steps of 256 images (54,000 training images)"
    )
    assert describe(config, "static-child", 54000).startswith(
        f"static-child: {config.finetune.epochs} epochs"
    )
    assert describe(config, "evaluate", 54000) is None
