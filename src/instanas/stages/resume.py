"""Mid-stage resume: a stage's whole training state after every epoch, in safetensors + JSON.

A kill -9 loses at most the epoch in progress. The state holds the modules, the optimisers, every
random-number generator (torch, numpy, Python and the stage's own torch generators) and the
stage's JSON record (the search history). Learning-rate schedules, drop-path and the reward
window are functions of the position in the stage, so the epoch number restores them. The last
two states are kept, so a state truncated by a crash falls back to the one before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..checkpoint import (
    check_identity,
    load_module_states,
    read_checkpoint,
    save_tensors,
)
from ..errors import CheckpointError
from ..run_context import RunContext, run_identity
from ..utils import atomic_write_text

log = logging.getLogger("instanas")
KEEP = 2
_PATTERN = "epoch_*.safetensors"


def state_folder(run_dir: Path, stage: str) -> Path:
    return run_dir / stage / "resume"


def saved_epochs(run_dir: Path, stage: str) -> list[Path]:
    """The stage's saved states, newest first."""
    return sorted(state_folder(run_dir, stage).glob(_PATTERN), reverse=True)


class EpochCheckpoints:
    """Saves a stage's state after each epoch and restores the newest readable one."""

    def __init__(
        self,
        ctx: RunContext,
        stage: str,
        modules: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        generators: dict[str, torch.Generator] | None = None,
    ) -> None:
        self.ctx, self.stage = ctx, stage
        self.modules, self.optimizers = modules, optimizers
        self.generators = generators or {}

    def restore(self) -> tuple[int, dict]:
        """(epochs already done, the stage's JSON record); (0, {}) when starting afresh."""
        if not self.ctx.resume:
            return 0, {}
        found = newest_readable(self.ctx, self.stage)
        if found is None:
            log.info("%s has no saved epoch yet; starting it from the beginning", self.stage)
            _drop_records_after(self.ctx, self.stage, 0)
            return 0, {}
        path, tensors, meta = found
        load_module_states(
            path,
            tensors,
            self.modules,
            key_prefix="module.",
            fix="delete it to start the stage over",
        )
        _load_optimizers(path, tensors, meta["optimizers"], self.optimizers)
        _load_rng(tensors, meta["rng"], self.generators)
        _drop_records_after(self.ctx, self.stage, meta["epoch"])
        log.info("%s: resuming after epoch %d from %s", self.stage, meta["epoch"], path)
        return int(meta["epoch"]), meta.get("record", {})

    def save(self, epoch: int, record: dict | None = None) -> None:
        """State after ``epoch`` completed epochs; older states beyond the last two go."""
        if distributed.is_main():  # every rank holds the same state (docs/distributed.md)
            self._write(epoch, record)
        if distributed.any_rank(_stop.requested):
            log.warning("%s: stopped after epoch %d, which is saved", self.stage, epoch)
            raise KeyboardInterrupt

    def _write(self, epoch: int, record: dict | None) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            for key, value in module.state_dict().items():
                tensors[f"module.{name}.{key}"] = value
        optimizers = {
            name: _optimizer_json(name, opt, tensors) for name, opt in self.optimizers.items()
        }
        rng = _rng_json(tensors, self.generators)
        meta = {
            **run_identity(self.ctx),
            "stage": self.stage,
            "epoch": epoch,
            "optimizers": optimizers,
            "rng": rng,
            "record": record or {},
        }
        folder = state_folder(self.ctx.run_dir, self.stage)
        save_tensors(folder / f"epoch_{epoch:04d}.safetensors", tensors, meta)
        for old in saved_epochs(self.ctx.run_dir, self.stage)[KEEP:]:
            old.unlink(missing_ok=True)

    def finish(self) -> None:
        """The stage's output is written: its states (and temp files a kill left) can go."""
        distributed.barrier()  # no rank reads them any more
        if distributed.is_main():
            shutil.rmtree(state_folder(self.ctx.run_dir, self.stage), ignore_errors=True)


class _StopRequest:
    requested = False


def stop_if_requested(what: str) -> None:
    """For stages whose unit of work is not an epoch: stop after ``what`` was saved."""
    if _stop.requested:
        log.warning("stopped after %s, which is saved", what)
        raise KeyboardInterrupt


_stop = _StopRequest()


@contextlib.contextmanager
def stop_after_epoch() -> Iterator[None]:
    """First Ctrl-C: finish the epoch, save it, then stop. Second Ctrl-C: stop at once.

    Stopping at an epoch boundary keeps resume exact; a second press is there for epochs too
    long to wait for (that epoch is then lost, the one before is on disk).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum: int, frame: object) -> None:
        if _stop.requested:
            raise KeyboardInterrupt
        _stop.requested = True
        log.warning("Ctrl-C: finishing this epoch to save it (press Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, on_interrupt)
    _stop.requested = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        requested, _stop.requested = _stop.requested, False
    if requested:  # pressed after the last epoch's save: the stage is done, stop before the next
        raise KeyboardInterrupt


def newest_readable(ctx: RunContext, stage: str) -> tuple[Path, dict, dict] | None:
    """The newest state that reads and belongs to this run; corrupt ones are skipped, loudly."""
    paths = saved_epochs(ctx.run_dir, stage)
    for i, path in enumerate(paths):
        try:
            tensors, meta = read_checkpoint(path)
        except CheckpointError:
            continue
        check_identity(path, meta, run_identity(ctx))  # another run's state is an error, not a skip
        for bad in paths[:i]:
            log.warning("%s is corrupt or truncated; resuming from %s instead", bad, path.name)
        return path, tensors, meta
    if paths:
        raise CheckpointError(
            f"no readable checkpoint in {state_folder(ctx.run_dir, stage)} "
            f"({', '.join(p.name for p in paths)} are corrupt or truncated): "
            f"delete that folder to start {stage} over"
        )
    return None


# ---------------------------------------------------------------------------------------------
# Optimisers: tensors (momentum, Adam moments, steps) in safetensors, everything else in JSON.


def _optimizer_json(
    name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> dict:
    state = optimizer.state_dict()
    values: dict[str, dict] = {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{name}.{param_id}.{key}"] = value
            else:
                values.setdefault(str(param_id), {})[key] = value
    return {"param_groups": state["param_groups"], "values": values}


def _load_optimizers(
    path: Path,
    tensors: dict[str, torch.Tensor],
    saved: dict,
    optimizers: dict[str, torch.optim.Optimizer],
) -> None:
    for name, optimizer in optimizers.items():
        if name not in saved:
            raise CheckpointError(
                f"checkpoint {path} has no state for the {name} optimiser: "
                "delete it to start the stage over"
            )
        state: dict[int, dict] = {}
        for param_id, entries in saved[name]["values"].items():
            state.setdefault(int(param_id), {}).update(entries)
        prefix = f"optimizer.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                param_id, field = key[len(prefix) :].split(".", 1)
                state.setdefault(int(param_id), {})[field] = value
        try:
            optimizer.load_state_dict({"state": state, "param_groups": saved[name]["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} does not fit the {name} optimiser ({exc}): "
                "delete it to start the stage over"
            ) from exc


# ---------------------------------------------------------------------------------------------
# Random-number generators


def _rng_json(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> dict:
    tensors["rng.torch"] = torch.get_rng_state()
    for name, generator in generators.items():
        tensors[f"rng.generator.{name}"] = generator.get_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, py_gauss = random.getstate()
    return {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }


def _load_rng(
    tensors: dict[str, torch.Tensor], saved: dict, generators: dict[str, torch.Generator]
) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.generator.{name}"])
    kind, pos, has_gauss, gauss = saved["numpy"]
    np.random.set_state(
        (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, py_state, py_gauss = saved["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def _drop_records_after(ctx: RunContext, stage: str, epoch: int) -> None:
    """Forget metric records of epochs that ran after the state being resumed (they rerun)."""
    path = ctx.run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not _is_later(line, stage, epoch)]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def _is_later(line: str, stage: str, epoch: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True  # a line cut short by the kill
    return record.get("stage") == stage and record.get("epoch", 0) > epoch
