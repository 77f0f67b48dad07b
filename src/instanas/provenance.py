"""Where a file came from: package versions, the code's git commit, UTC timestamps."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path

from .version import __version__

# Packages whose versions change what an export or a result means.
_TRACKED = ("torch", "numpy", "onnx", "onnxruntime", "pillow")


def utc_now() -> str:
    """ISO 8601 UTC timestamp to the second, e.g. ``2026-12-01T12:00:00Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def code_commit() -> dict:
    """The git commit of the instanas source when it runs from a git checkout.

    ``{"commit": None}`` when installed from a wheel or git is missing; ``dirty`` says whether
    tracked files differ from that commit (the numbers may then not be reproducible from it).
    """
    source = Path(__file__).resolve().parent
    try:
        commit = _git(source, "rev-parse", "HEAD")
        dirty = bool(_git(source, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()


def versions() -> dict:
    """Versions of instanas, Python and the packages in ``_TRACKED`` that are installed."""
    found = {"instanas": __version__, "python": platform.python_version()}
    for name in _TRACKED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
