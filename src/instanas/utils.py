"""Small shared helpers: atomic files, progress bars, seeding, metric logs."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

from .distributed import is_main

T = TypeVar("T")
_show_progress: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "instanas_progress", default=True
)
# Read once (it can only be read by setting it): the permissions new files get by default.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush, fsync, then rename into place.

    Under torchrun only rank 0 writes: every rank computes the same content.
    """
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp creates 0600 files; a shared run directory must stay readable by others.
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable: after a power cut the name points at the new file."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the data itself is synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy so that ``target`` is either its old self or a whole copy, never a torn one."""
    if not is_main():  # the source may be rank 0's, still being written
        return
    atomic_write_bytes(target, Path(source).read_bytes())


def write_json(path: str | os.PathLike, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    if not is_main():
        return
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def hidden_progress(hidden: bool = True) -> Iterator[None]:
    """No progress bars inside the block when ``hidden`` (``--quiet``)."""
    token = _show_progress.set(not hidden)
    try:
        yield
    finally:
        _show_progress.reset(token)


def progress_bar(
    iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """tqdm with ETA; quieter refresh when the output is not a terminal (CI logs)."""
    from tqdm.auto import tqdm

    quiet = os.environ.get("INSTANAS_NO_PROGRESS") == "1" or not _show_progress.get()
    quiet = quiet or not is_main()  # one bar per run, not one per process
    interactive = sys.stderr.isatty()
    return iter(
        tqdm(
            iterable,
            desc=desc,
            total=total,
            unit=unit,
            disable=quiet,
            mininterval=0.5 if interactive else 15.0,
            leave=interactive,
            dynamic_ncols=True,
        )
    )


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed every generator we use; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
