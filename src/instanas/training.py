"""Supervised training as every stage runs it: SGD, learning-rate schedules, the divergence
check, the supervised epoch and its statistics, accuracy, and the training batches that
recalibrate BatchNorm."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import ImageSet
from .errors import TrainingError as TrainingError  # raised here; importable here too
from .run_context import RunContext
from .utils import progress_bar

log = logging.getLogger(__name__)


# On a GPU the loss is checked for NaN every this many steps (and the last of an epoch).
_GPU_FINITE_EVERY = 50


def sgd(params, lr: float, weight_decay: float) -> torch.optim.SGD:
    # foreach: one kernel per operation over all parameters instead of one per parameter, a
    # fixed cost off every step (bench/train_step.py times steps with this optimiser)
    return torch.optim.SGD(
        params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay, foreach=True
    )


def step_decay(milestones: list[float]) -> Callable[[float], float]:
    """Learning-rate factor x0.1 after each milestone fraction of training."""
    return lambda progress: 0.1 ** sum(progress >= m for m in milestones)


def cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(loss: torch.Tensor, stage: str, lr_option: str) -> None:
    """``lr_option``: the config option of the learning rate that trains what diverged."""
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{stage}: the loss became {loss.item()}, training stopped and the "
            f"last completed epoch is kept: lower --{lr_option} and continue "
            "with --resume RUN_DIR"
        )


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    steps: int  # optimiser steps taken (the same for one process and for N ranks)

    def record(self, **validation: float) -> dict:
        """The epoch's metrics record: training loss and accuracy, ``validation``, steps and
        seconds."""
        return {
            "train_loss": self.loss,
            "train_accuracy": self.accuracy,
            **validation,
            "steps": self.steps,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class EpochPlan:
    """How a stage's supervised epochs run: its name, length, batch and learning rate."""

    stage: str  # name in metrics.jsonl and of the data order's random stream
    epochs: int
    batch_size: int
    base_lr: float
    lr_option: str  # the config option of ``base_lr``, named when the loss diverges
    lr_factor: Callable[[float], float] = lambda progress: 1.0  # schedule over progress


def supervised_epoch(
    ctx: RunContext,
    model: nn.Module,
    forward: Callable[[torch.Tensor, float], torch.Tensor],
    params_optimizer: torch.optim.Optimizer,
    plan: EpochPlan,
    epoch: int,
) -> EpochStats:
    """One epoch of cross-entropy training of ``model``; ``forward(images, progress)`` returns
    logits.

    ``progress`` in [0, 1] is the position in the whole stage, per step, for schedules such as
    drop-path and the learning rate.
    """
    steps = ctx.steps_per_epoch(plan.batch_size)
    sums = torch.zeros(3, device=ctx.device)  # loss x rows, correct rows, rows
    start, taken = time.perf_counter(), 0
    order = ctx.generator(plan.stage, epoch)
    batches = ctx.batches(ctx.data.train, plan.batch_size, train=True, generator=order)
    title = f"{plan.stage} {epoch + 1}/{plan.epochs}"
    for step, batch in enumerate(progress_bar(batches, desc=title, total=steps, unit="batch")):
        progress = (epoch * steps + step) / (plan.epochs * steps)
        set_lr(params_optimizer, plan.base_lr * plan.lr_factor(progress))
        with ctx.autocast():
            logits = forward(batch.images, progress)
        loss = F.cross_entropy(logits.float(), batch.labels)
        if finite_check_due(ctx.device, step, steps):
            check_finite(loss, plan.stage, plan.lr_option)
        ctx.optimizer_step(loss, params_optimizer)
        rows = len(batch.labels)
        hits = (logits.argmax(1) == batch.labels).sum().to(sums.dtype)
        sums += torch.stack([loss.detach() * rows, hits, sums.new_tensor(rows)])
        taken += 1
    distributed.average_batchnorm_statistics([model])
    # Sums over every rank's rows: the epoch's figures are the global batch's.
    total_loss, correct, seen = distributed.all_sum(sums).tolist()
    return EpochStats(total_loss / seen, correct / seen, time.perf_counter() - start, taken)


def finite_check_due(device: torch.device, step: int, steps: int) -> bool:
    """Whether to check this step's loss for NaN: every step on the CPU (free there), every
    ``_GPU_FINITE_EVERY`` steps and the last on a GPU, where each check waits for the device."""
    return device.type == "cpu" or step % _GPU_FINITE_EVERY == 0 or step == steps - 1


@torch.no_grad()
def accuracy(
    ctx: RunContext,
    forward: Callable[[torch.Tensor], torch.Tensor],
    data: ImageSet,
    batch_size: int = 500,
) -> float:
    correct = 0
    for batch in ctx.batches(data, batch_size, train=False):
        correct += int((forward(batch.images).argmax(1) == batch.labels).sum())
    return correct / len(data)


def training_images(
    ctx: RunContext, batch_size: int, count: int, purpose: str, epoch: int = 0
) -> Iterator[torch.Tensor]:
    """``count`` augmented training batches, for BatchNorm recalibration."""
    batches = ctx.batches(
        ctx.data.train, batch_size, train=True, generator=ctx.generator(purpose, epoch)
    )
    for i, batch in enumerate(batches):
        if i >= count:
            return
        yield batch.images
