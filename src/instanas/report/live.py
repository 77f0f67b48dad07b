"""Live curves for long runs: every metrics.jsonl record mirrored as TensorBoard scalars.

Optional (``tensorboard: true``, ``pip install 'instanas[tensorboard]'``); metrics.jsonl stays the
record of the run, the event files are a view of it. A tag is ``STAGE/FIELD`` and the step is
the record's epoch.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def require_tensorboard() -> None:
    """Fail in one line, before anything is written, when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "tensorboard is on but the tensorboard package is missing: pip "
            "install 'instanas[tensorboard]', or drop --tensorboard"
        ) from exc


class TensorBoardMirror:
    """Writes the numeric fields of each record; strings and lists are left to metrics.jsonl."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def write(self, record: dict) -> None:
        stage, step = record.get("stage", "run"), int(record.get("epoch", 0))
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{stage}/{key}", value, step)
        self.writer.flush()
