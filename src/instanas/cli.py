"""The `instanas` command: the whole pipeline or one stage at a time, on one run directory."""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import logging
import sys
import time
from pathlib import Path
from typing import NoReturn

from . import distributed, stage_specs
from .config import (
    Config,
    all_keys,
    apply_overrides,
    default_value,
    help_text,
    load_config_file,
    load_preset,
    preset_names,
)
from .errors import USER_ERRORS, ConfigError, ExportError
from .nn.backend import enlarge_primitive_cache
from .utils import hidden_progress
from .version import __version__

log = logging.getLogger("instanas")
# Failures of the machine rather than the program: reported in one line, not a traceback.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}

RUN_HELP = (
    "the whole pipeline: latency table, MobileNetV2-path baseline, pretrain, search, "
    "fine-tune, random-policy model, best static child, variants A..E, other "
    "baselines, evaluate"
)
PROFILE_HELP = "measure the latency lookup table on this machine"
# These read a finished run and take none of the run or config options.
REPORT_HELP = (
    "plots, report.md and a self-contained report.html from a finished run (needs evaluate)"
)
EXPORT_HELP = (
    "the BatchNorm-folded controller and every child it uses as ONNX or TorchScript, "
    "with routing.json and manifest.json (needs finetune)"
)
PREDICT_HELP = (
    "classify PNG/JPEG files and folders with a run directory or an export folder; "
    "CSV of path, class, probability and child"
)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and suggest the closest option."""

    def error(self, message: str) -> NoReturn:
        hint, options = "", self._option_names()
        words = (w.strip(":,'\"") for w in message.split())
        for word in (w for w in words if w.startswith("--") and w not in options):
            close = difflib.get_close_matches(word, options, n=1)
            if close:
                hint = f" (did you mean {close[0]}?)"
                break
        self.exit(2, f"instanas: error: {message}{hint}; see `{self.prog} --help`\n")

    def _option_names(self) -> list[str]:
        parsers = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
        return [o for p in parsers for a in p._actions for o in a.option_strings]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="instanas", description="InstaNAS: instance-aware neural architecture search."
    )
    parser.add_argument("--version", action="version", version=f"instanas {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = {
        "run": RUN_HELP,
        **{s.name: s.help for s in stage_specs.STAGES},
        "profile": PROFILE_HELP,
    }
    for name, text in commands.items():
        p = sub.add_parser(
            name,
            help=text,
            description=text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        _add_run_options(p, name)
        _add_config_options(p)
    sub.add_parser("presets", help="list the shipped presets")
    report = sub.add_parser("report", help=REPORT_HELP, description=REPORT_HELP)
    report.add_argument("run_dir", metavar="RUN_DIR", help="directory of a finished run")
    _add_options(sub.add_parser("export", help=EXPORT_HELP, description=EXPORT_HELP),
                 EXPORT_OPTIONS)  # fmt: skip
    _add_options(sub.add_parser("predict", help=PREDICT_HELP, description=PREDICT_HELP),
                 PREDICT_OPTIONS)  # fmt: skip
    return parser


# Options as (flags, argparse keywords): one table per command, added by _add_options.
Options = list[tuple[tuple[str, ...], dict]]
EXPORT_OPTIONS: Options = [
    (("run_dir",), dict(metavar="RUN_DIR", help="directory of a run with finetune done")),
    (
        ("--model",),
        dict(
            default="instanas",
            help="instanas (the main model, the default) or a variant letter A..E",
        ),
    ),
    (
        ("--format",),
        dict(
            dest="fmt",
            choices=("onnx", "torchscript"),
            default="onnx",
            help="file format (default: %(default)s; TorchScript is deprecated in PyTorch)",
        ),
    ),
    (("--output", "-o"), dict(required=True, help="export folder (must not exist)")),
    (
        ("--children",),
        dict(
            type=int,
            default=None,
            metavar="K",
            help="export only the K "
            "children most used on the validation split (default: all); other "
            "policies run a fallback child (routing.json)",
        ),
    ),
    (
        ("--split",),
        dict(
            choices=("val", "train+val"),
            default="val",
            help="where the "
            "controller's children are counted (default: %(default)s; train+val "
            "exports more of the children new images may pick)",
        ),
    ),
    (
        ("--validate",),
        dict(
            action="store_true",
            help="compare with the eager model on the test "
            "split (routing, predictions, logits) and time both at batch 1: "
            "validation.json",
        ),
    ),
    (
        ("--threads",),
        dict(
            type=int,
            default=None,
            help="CPU threads for timing (default: the run's latency.threads)",
        ),
    ),
    (
        ("--timed-images",),
        dict(
            type=int,
            default=1000,
            help="test images timed at batch 1 by --validate (default: %(default)s; 0: all)",
        ),
    ),
    (("--quiet",), dict(action="store_true", help="no progress bars")),
]
PREDICT_OPTIONS: Options = [
    (
        ("target",),
        dict(
            metavar="RUN_DIR|EXPORT_DIR",
            help="a run directory (torch) or an export folder (onnxruntime)",
        ),
    ),
    (
        ("paths",),
        dict(
            metavar="PATH",
            nargs="+",
            help="image files, or folders searched recursively for images",
        ),
    ),
    (("--output", "-o"), dict(default=None, help="CSV file to write (default: standard output)")),
    (("--force",), dict(action="store_true", help="overwrite an existing --output file")),
    (
        ("--model",),
        dict(default=None, help="with a run directory: instanas or a variant letter A..E"),
    ),
    (("--batch-size",), dict(type=int, default=64, help="images per batch (default: %(default)s)")),
    (
        ("--threads",),
        dict(type=int, default=None, help="CPU threads (default: the runtime's own choice)"),
    ),
    (
        ("--trust-torchscript",),
        dict(
            action="store_true",
            help="allow a TorchScript export "
            "(loading TorchScript runs code stored in its files: only "
            "for exports you made)",
        ),
    ),
    (("--quiet",), dict(action="store_true", help="no progress bar")),
]
PROFILE_OPTIONS: Options = [
    (("--table-out",), dict(default=None, help="also write the table to this JSON file")),
    (
        ("--fresh",),
        dict(action="store_true", help="measure again even if a table for this setup is cached"),
    ),
    (
        ("--validate",),
        dict(
            action="store_true",
            help="time whole children end to end and "
            "compare with the table: writes latency_validation.json and .png "
            "to the run directory",
        ),
    ),
    (
        ("--shape",),
        dict(
            default=None,
            metavar="CxSxS",
            help="profile for images of this shape (channels x size x size, e.g. 1x28x28) "
            "without reading the data set: for a device that does not have it",
        ),
    ),
    (
        ("--classes",),
        dict(type=int, default=None, help="with --shape: the number of classes (default 10)"),
    ),
    (
        ("--children",),
        dict(
            type=int,
            default=50,
            help="random children for --validate (the "
            "controller's children on the validation split are added when the "
            "run has a trained one)",
        ),
    ),
]
RESUME_HELP = {
    "run": "continue an interrupted run: finished stages are skipped, the unfinished one goes "
    "on from its last completed epoch",
    "stage": "continue this stage of RUN_DIR from its last completed epoch",
}


def _add_options(parser, options: Options) -> None:
    for flags, keywords in options:
        parser.add_argument(*flags, **keywords)


def _add_run_options(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("run")
    presets = ", ".join(preset_names())
    g.add_argument("--preset", default=None, help=f"starting configuration: {presets} "
                   "(default fashion-cpu for a new run)")  # fmt: skip
    g.add_argument("--config", default=None, help="YAML config file instead of a preset")
    g.add_argument("--output", "-o", default=None, help="run directory (default "
                   "runs/PRESET-TIMESTAMP for a new run)")  # fmt: skip
    resumable = command in stage_specs.names() and stage_specs.get(command).resumable
    if command == "run" or resumable:
        text = RESUME_HELP["run" if command == "run" else "stage"]
        g.add_argument("--resume", default=None, metavar="RUN_DIR", help=text)
    if command == "profile":
        _add_options(g, PROFILE_OPTIONS)
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    sections: dict[str, argparse._ArgumentGroup] = {}
    for key in all_keys():
        if key == "preset":  # set by --preset itself
            continue
        section = key.split(".")[0] if "." in key else "general"
        if section not in sections:
            sections[section] = p.add_argument_group(f"config: {section}")
        default = default_value(key)
        sections[section].add_argument(
            f"--{key}",
            dest=f"cfg:{key}",
            default=None,
            metavar="V",
            help=f"{help_text(key)} (built-in default {default!r}; presets may differ)",
        )


def _overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}


def resolve_config(args: argparse.Namespace, run_dir: Path | None):
    from .budgets import prefer_given_epochs
    from .pipeline import existing_config

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
    overrides = _overrides(args)
    config = apply_overrides(config, overrides)
    prefer_given_epochs(config, overrides)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "presets":
        print("\n".join(preset_names()))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    enlarge_primitive_cache()
    try:
        with hidden_progress(getattr(args, "quiet", False)):
            return _command(args)
    finally:
        distributed.shutdown()


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command; user errors become one line and exit code 2."""
    try:
        if args.command == "report":
            return _report(Path(args.run_dir))
        if args.command == "export":
            return _export(args)
        if args.command == "predict":
            return _predict(args)
        return _dispatch(args)
    except USER_ERRORS as exc:
        return _fail(str(exc))
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        return _fail(
            f"{_ENVIRONMENT_ERRNOS[exc.errno]} ({exc}); files already written are "
            "whole (every write is atomic): free space or fix permissions, then "
            "continue with --resume RUN_DIR"
        )
    except KeyboardInterrupt:
        if args.command == "report":
            print(
                f"instanas: interrupted; files already written are whole: run "
                f"`instanas report {args.run_dir}` again",
                file=sys.stderr,
            )
        elif args.command in ("export", "predict"):
            print(
                f"instanas: interrupted; nothing was written: run `instanas {args.command}` again",
                file=sys.stderr,
            )
        else:
            print(
                "instanas: interrupted; finished stages and the last completed epoch are "
                "kept: continue with --resume RUN_DIR",
                file=sys.stderr,
            )
        return 130


def _report(run_dir: Path) -> int:
    from .report.document import write_report

    for path in write_report(run_dir):
        print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .deploy.export import export
    from .deploy.validation import summary_line

    for name, value in (("--threads", args.threads), ("--timed-images", args.timed_images)):
        if value is not None and value < (0 if name == "--timed-images" else 1):
            raise ExportError(f"{name} is {value}: pass a positive number")
    run_dir = Path(args.run_dir)
    if not (run_dir / stage_specs.get("finetune").output).exists():
        raise ExportError(
            f"{run_dir} has no fine-tuned model (finetune/model.safetensors): "
            f"pass a finished run, or run `instanas finetune --output {run_dir}`"
        )
    options = ("model", "fmt", "children", "validate", "threads", "timed_images", "split")
    result = export(run_dir, args.output, **{name: getattr(args, name) for name in options})
    children = result.routing["children"]
    share = result.routing["fallback"]["counted_share_exported"]
    print(
        f"exported {len(children)} children covering {100 * share:.2f}% of the "
        f"{args.split} images to {result.folder}"
    )
    if result.validation is None:
        return 0
    print(summary_line(result.validation))
    return 0 if result.validation["passed"] else 1


def _predict(args: argparse.Namespace) -> int:
    from .deploy.predict import (
        check_output,
        collect_files,
        open_classifier,
        predict_files,
        write_predictions,
    )

    if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        raise ExportError("--batch-size and --threads must be positive: pass e.g. --batch-size 64")
    output = Path(args.output) if args.output else None
    check_output(output, args.force)
    files = collect_files(args.paths)
    if not files:
        raise ExportError(
            f"no image files in {' '.join(args.paths)}: pass PNG/JPEG files or folders holding them"
        )
    classifier = open_classifier(
        Path(args.target), args.model, args.threads, args.trust_torchscript
    )
    predictions = list(predict_files(classifier, files, args.batch_size))
    write_predictions(predictions, output)
    failed = sum(p.failed for p in predictions)
    where = f" to {output}" if output else ""
    print(
        f"instanas: {len(predictions) - failed} images classified{where}, {failed} unreadable",
        file=sys.stderr,
    )
    return 1 if failed else 0


def _fail(message: str) -> int:
    print(f"instanas: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _dispatch(args: argparse.Namespace) -> int:
    from .budgets import pinned_stages
    from .pipeline import open_run, save_timings

    config, run_dir, resume = _run_directory(args)
    pinned = pinned_stages(_overrides(args))
    shape = profile_shape(args) if args.command == "profile" else None
    ctx = open_run(config, run_dir, resume=resume, command=args.command, pinned=pinned, shape=shape)
    if args.command == "run":
        return _run_all(ctx)
    if args.command == "profile":
        return distributed.on_main(lambda: _profile(ctx, args), 0)
    from .pipeline import finalize_results, run_stage

    timings: dict[str, float] = {}
    run_stage(ctx, args.command, timings)
    save_timings(ctx.run_dir, timings)
    if args.command == "evaluate" and distributed.is_main():
        finalize_results(ctx)
        _print_summary(ctx.run_dir)
    return 0


def _run_directory(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    """(config, run directory, resume) of a run or stage command, checked before anything
    is written."""
    from .pipeline import default_run_dir
    from .stages.common import require_previous

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


def _run_all(ctx) -> int:
    from .pipeline import finalize_results, run_all, save_timings

    start = time.perf_counter()
    timings = run_all(ctx, resume=ctx.resume)
    if not timings and (ctx.run_dir / "results.md").exists():
        # Resumed a finished run: nothing ran, so nothing is rewritten.
        print(
            f"every stage of {ctx.run_dir} is finished; nothing to do "
            f"(`instanas report {ctx.run_dir}` redraws the plots and report)"
        )
        _print_summary(ctx.run_dir)
        return 0
    timings["total"] = time.perf_counter() - start
    save_timings(ctx.run_dir, timings)
    if distributed.is_main():
        finalize_results(ctx)
        _print_summary(ctx.run_dir)
    return 0


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


def _profile(ctx, args: argparse.Namespace) -> int:
    from .pipeline import validate_latency_table
    from .stages.common import latency_table

    table = latency_table(ctx, fresh=args.fresh)
    if args.table_out:
        table.save(args.table_out)
    print(
        json.dumps(
            {
                "key": table.key,
                "fixed_ms": {k: v.median_ms for k, v in table.fixed.items()},
                "cells_ms_mbv2": table.bounds(ctx.space.forced_mask()).mbv2,
            },
            indent=1,
        )
    )
    if not args.validate:
        return 0
    if args.children < 2:
        raise ConfigError(
            f"--children is {args.children}: validating the table needs at least "
            "2 random children (50 recommended)"
        )
    check = validate_latency_table(ctx, table, args.children)
    print(
        f"latency table vs {len(check.children)} children measured end to end: Spearman "
        f"{check.spearman:.3f}, relative error median {100 * check.median_relative_error:.1f}%"
        f", p90 {100 * check.p90_relative_error:.1f}% "
        f"({ctx.run_dir / 'latency_validation.png'})"
    )
    return 0


def check_stage_unfinished(run_dir: Path, stage: str, resume: bool) -> None:
    """A stage command needs a stage that has not finished; a started one needs --resume."""
    from .stages.resume import saved_epochs

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


def _print_summary(run_dir: Path) -> None:
    print((run_dir / "results.md").read_text())
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    sys.exit(main())
