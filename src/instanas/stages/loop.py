"""The epoch loop every training stage shares: resume, one epoch, its metrics, its checkpoint.

A stage says what it trains (modules, optimisers, random generators, a JSON state such as the
search history, objects that keep their own JSON state such as the search's latency weight) and
what one epoch does; the loop restores the newest saved epoch, runs the
rest, logs each epoch's record to metrics.jsonl, saves the whole state after every epoch
(Ctrl-C stops at that boundary, see :mod:`.resume`), then lets the stage write its output and
clears the epoch states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import torch
from torch import nn

from .. import distributed
from ..run_context import RunContext
from .resume import EpochCheckpoints


class JsonState(Protocol):
    """An object the loop saves after every epoch and restores on resume, as JSON."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping) -> None: ...


@dataclass
class EpochLoop:
    """What a stage trains, by name, as its epoch checkpoints store it."""

    stage: str  # name in metrics.jsonl and the folder of the epoch states
    epochs: int
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # JSON kept across epochs and restored on resume
    # Objects whose JSON state is saved in the same record as ``state`` (their own keys).
    stateful: tuple[JsonState, ...] = ()

    def run(
        self,
        ctx: RunContext,
        train_epoch: Callable[[int], dict],
        write_output: Callable[[], None],
        on_fresh_start: Callable[[], None] | None = None,
    ) -> None:
        """``train_epoch(epoch)`` returns the epoch's metrics record; ``write_output`` runs after
        the last epoch; ``on_fresh_start`` before the first epoch when nothing was resumed."""
        checkpoints = EpochCheckpoints(
            ctx, self.stage, self.modules, self.optimizers, self.generators
        )
        start, saved = checkpoints.restore()
        self.restore(saved)
        # Every rank starts from rank 0's weights, whatever each built or restored.
        distributed.broadcast_modules(self.modules.values())
        if start == 0 and on_fresh_start is not None:
            on_fresh_start()
        for epoch in range(start, self.epochs):
            record = train_epoch(epoch)
            ctx.log_metrics({"stage": self.stage, "epoch": epoch + 1, **record})
            checkpoints.save(epoch + 1, self.record())
        write_output()
        checkpoints.finish()

    def record(self) -> dict:
        """The JSON saved with an epoch: ``state`` and each stateful object's keys."""
        return {
            **self.state,
            **{k: v for obj in self.stateful for k, v in obj.state_dict().items()},
        }

    def restore(self, saved: dict) -> None:
        """Back to a saved record (``{}`` when starting afresh leaves everything as it is)."""
        owned: set[str] = set()
        for obj in self.stateful:
            if saved:
                obj.load_state_dict(saved)
            owned.update(obj.state_dict())
        self.state.update({k: v for k, v in saved.items() if k not in owned})
