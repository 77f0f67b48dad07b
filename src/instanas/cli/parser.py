"""The `instanas` command's parser: one subcommand per stage (from ``stage_specs``) plus run,
profile, presets, report, export and predict; every config key as ``--section.field``; option
tables for the commands that take their own options. Errors are one line with the closest
option suggested.
"""

from __future__ import annotations

import argparse
import difflib
from typing import NoReturn

from .. import stage_specs
from ..config import all_keys, default_value, help_text, preset_names
from ..version import __version__

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
    "a model of a run as one ONNX graph (controller, routing, the children it uses, "
    "escalation) with routing.json and manifest.json (needs finetune)"
)
PREDICT_HELP = (
    "classify PNG/JPEG files and folders with a run directory or an export folder; "
    "CSV of path, class, probability, child and whether it escalated"
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
            help="instanas (the main model, the default), a variant letter A..E, or a static "
            "network of the run: mbv2-path, mbv2-peer, mbv2-0.5x (other widths), "
            "static-child, min-net",
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


def config_overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
