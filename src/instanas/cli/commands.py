"""What each `instanas` command does once parsed: the whole run, one stage or the latency
profile on a run directory; the report of a finished run; export and predict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import distributed, stage_specs
from ..budgets import pinned_stages
from ..deploy.predict import (
    check_output,
    collect_files,
    open_classifier,
    predict_files,
    write_predictions,
)
from ..deploy.validation import summary_line
from ..errors import ConfigError, ExportError
from ..pipeline import (
    finalize_results,
    open_run,
    run_all,
    run_stage,
    save_timings,
    validate_latency_table,
)
from ..report.document import write_report
from ..run_context import RunContext
from ..stages.common import latency_table
from .parser import config_overrides
from .run_directory import profile_shape, run_directory


def report_command(run_dir: Path) -> int:
    """`instanas report RUN_DIR`: plots, report.md and report.html of a finished run."""
    for path in write_report(run_dir):
        print(path)
    return 0


def export_command(args: argparse.Namespace) -> int:
    """`instanas export`: 1 when ``--validate`` finds the export disagreeing with the run."""
    for name, value in (("--threads", args.threads), ("--timed-images", args.timed_images)):
        if value is not None and value < (0 if name == "--timed-images" else 1):
            raise ExportError(f"{name} is {value}: pass a positive number")
    run_dir = Path(args.run_dir)
    if not (run_dir / stage_specs.get("finetune").output).exists():
        raise ExportError(
            f"{run_dir} has no fine-tuned model (finetune/model.safetensors): "
            f"pass a finished run, or run `instanas finetune --output {run_dir}`"
        )
    from ..deploy.export import export  # onnx takes a second to import: only here

    options = ("model", "children", "validate", "threads", "timed_images", "split")
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


def predict_command(args: argparse.Namespace) -> int:
    """`instanas predict`: 1 when some files could not be read (the rest are classified)."""
    if args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        raise ExportError("--batch-size and --threads must be positive: pass e.g. --batch-size 64")
    output = Path(args.output) if args.output else None
    check_output(output, args.force)
    files = collect_files(args.paths)
    if not files:
        raise ExportError(
            f"no image files in {' '.join(args.paths)}: pass PNG/JPEG files or folders holding them"
        )
    classifier = open_classifier(Path(args.target), args.model, args.threads)
    predictions = list(predict_files(classifier, files, args.batch_size))
    write_predictions(predictions, output)
    failed = sum(p.failed for p in predictions)
    where = f" to {output}" if output else ""
    print(
        f"instanas: {len(predictions) - failed} images classified{where}, {failed} unreadable",
        file=sys.stderr,
    )
    return 1 if failed else 0


def pipeline_command(args: argparse.Namespace) -> int:
    """`instanas run`, one stage's command, or `instanas profile`, on a run directory."""
    config, run_dir, resume = run_directory(args)
    pinned = pinned_stages(config_overrides(args))
    shape = profile_shape(args) if args.command == "profile" else None
    ctx = open_run(config, run_dir, resume=resume, command=args.command, pinned=pinned, shape=shape)
    if args.command == "run":
        return _run_all(ctx)
    if args.command == "profile":
        return distributed.on_main(lambda: _profile(ctx, args), 0)
    timings: dict[str, float] = {}
    run_stage(ctx, args.command, timings)
    save_timings(ctx.run_dir, timings)
    if args.command == "evaluate" and distributed.is_main():
        finalize_results(ctx)
        _print_summary(ctx.run_dir)
    return 0


def _run_all(ctx: RunContext) -> int:
    timings = run_all(ctx, resume=ctx.resume)
    if not timings and (ctx.run_dir / "results.md").exists():
        # Resumed a finished run: nothing ran, so nothing is rewritten.
        print(
            f"every stage of {ctx.run_dir} is finished; nothing to do "
            f"(`instanas report {ctx.run_dir}` redraws the plots and report)"
        )
        _print_summary(ctx.run_dir)
        return 0
    save_timings(ctx.run_dir, timings)
    if distributed.is_main():
        finalize_results(ctx)
        _print_summary(ctx.run_dir)
    return 0


def _profile(ctx: RunContext, args: argparse.Namespace) -> int:
    table = latency_table(ctx, fresh=args.fresh)
    if args.table_out:
        table.save(args.table_out)
    print(
        json.dumps(
            {
                "key": table.key,
                "fixed_ms": {k: v.median_ms for k, v in table.fixed.items()},
                "cells_ms_mbv2": table.bounds(ctx.space).mbv2_path,
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
    for source, group in check.by_source().items():
        print(f"  {source} children ({group['children']}): Spearman {group['spearman']:.3f}, "
              f"median {100 * group['median_relative_error']:.1f}%")  # fmt: skip
    return 0


def _print_summary(run_dir: Path) -> None:
    print((run_dir / "results.md").read_text())
    print(f"run directory: {run_dir}")
