"""The rules of a run directory on the command line: which config a command runs with (a new
run's preset or file, or the one a run directory already holds, plus overrides), which directory
it uses, and what must (not) be there yet for a run or a stage command. Every check runs before
anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import distributed, stage_specs
from ..budgets import prefer_given_epochs
from ..config import Config, apply_overrides, load_config_file, load_preset
from ..errors import ConfigError
from ..pipeline import default_run_dir, existing_config
from ..stages.common import require_previous
from ..stages.resume import saved_epochs
from .parser import config_overrides


def resolve_config(args: argparse.Namespace, run_dir: Path | None) -> Config:
    """The config a command runs with: the run directory's own, else --config or --preset
    (fashion-cpu for a new run), with the command line's overrides."""
    stored = existing_config(run_dir) if run_dir is not None else None
    if stored is not None and (args.preset or args.config):
        raise ConfigError(
            f"{run_dir} already has a config.yaml: drop --preset/--config to "
            "continue it, or choose a new --output"
        )
    if stored is not None:
        config = stored
    elif args.config:
        config = load_config_file(args.config)
    else:
        config = load_preset(args.preset or "fashion-cpu")
    overrides = config_overrides(args)
    config = apply_overrides(config, overrides)
    prefer_given_epochs(config, overrides)
    return config


def run_directory(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    """(config, run directory, resume) of a run or stage command, checked before anything
    is written."""
    resume = getattr(args, "resume", None)
    if resume and args.output:
        raise ConfigError("give either --output or --resume, not both")
    run_dir = Path(resume or args.output) if (resume or args.output) else None
    if resume and not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml): check the path")
    config = resolve_config(args, run_dir)
    if run_dir is None and distributed.launched():
        raise ConfigError(
            "under torchrun give --output DIR (or --resume DIR): every process must "
            "use the same run directory"
        )
    if run_dir is None:
        run_dir = default_run_dir(config)
    if args.command == "run" and not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already exists: choose a new --output or "
            f"continue it with --resume {run_dir}"
        )
    if args.command in stage_specs.names():
        if stage_specs.get(args.command).resumable:
            check_stage_unfinished(run_dir, args.command, bool(resume))
        require_previous(run_dir, args.command)
    return config, run_dir, bool(resume)


def check_stage_unfinished(run_dir: Path, stage: str, resume: bool) -> None:
    """A stage command needs a stage that has not finished; a started one needs --resume."""
    if (run_dir / stage_specs.get(stage).output).exists():
        raise ConfigError(
            f"{run_dir} already has {stage} output: choose a new --output "
            "or delete that stage's folder to redo it"
        )
    if not resume and saved_epochs(run_dir, stage):
        raise ConfigError(
            f"{run_dir} has an unfinished {stage}: continue it with `instanas "
            f"{stage} --resume {run_dir}`"
        )


def profile_shape(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """(channels, size, classes) of ``profile --shape CxSxS [--classes K]``, else None."""
    if args.shape is None:
        if args.classes is not None:
            raise ConfigError("--classes goes with --shape: add e.g. --shape 1x28x28")
        return None
    parts = args.shape.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--shape {args.shape!r} is not CxSxS: pass e.g. 1x28x28 or 3x32x32")
    channels, height, width = (int(p) for p in parts)
    if height != width:
        raise ConfigError(f"--shape {args.shape}: images are square here: pass e.g. "
                          f"{channels}x{max(height, width)}x{max(height, width)}")  # fmt: skip
    classes = 10 if args.classes is None else args.classes
    if classes < 2:
        raise ConfigError(f"--classes is {classes}: a classifier needs at least 2 classes")
    return channels, height, classes
