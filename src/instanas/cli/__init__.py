"""The `instanas` command: the whole pipeline or one stage at a time, on one run directory.

``parser.py`` builds the command line, ``run_directory.py`` holds the rules of a run directory,
``commands.py`` what each command does. Here: the entry point, which turns a user's mistake
(:data:`~instanas.errors.USER_ERRORS`) or a full disk into one line and exit code 2, and Ctrl-C
into a line that says what was kept.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from .. import distributed
from ..config import preset_names
from ..errors import USER_ERRORS
from ..nn.backend import enlarge_primitive_cache
from ..utils import hidden_progress
from .commands import export_command, pipeline_command, predict_command, report_command
from .parser import build_parser

# Failures of the machine rather than the program: reported in one line, not a traceback.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


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
            return report_command(Path(args.run_dir))
        if args.command == "export":
            return export_command(args)
        if args.command == "predict":
            return predict_command(args)
        return pipeline_command(args)
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


def _fail(message: str) -> int:
    print(f"instanas: error: {' '.join(message.split())}", file=sys.stderr)
    return 2
