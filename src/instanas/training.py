"""What every stage shares: the run context, optimisers, schedules and the supervised epoch."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import Config
from .data import (
    Batch,
    BatchAugmenter,
    DataBundle,
    ImageSet,
    augmenter_for,
    iterate_batches,
    num_batches,
)
from .errors import TrainingError as TrainingError  # raised here; importable here too
from .report.live import TensorBoardMirror
from .space import SearchSpace
from .utils import append_jsonl, make_generator, progress_bar

log = logging.getLogger(__name__)


# On a GPU the loss is checked for NaN every this many steps (and the last of an epoch).
_GPU_FINITE_EVERY = 50


@dataclass
class RunContext:
    """Everything a stage needs: config, run directory, device, data and the search space."""

    config: Config
    run_dir: Path
    device: torch.device
    data: DataBundle
    space: SearchSpace
    resume: bool = False  # continue each stage from its newest saved epoch
    train_augment: BatchAugmenter = field(init=False)
    eval_augment: BatchAugmenter = field(init=False)
    live: TensorBoardMirror | None = field(init=False, default=None)  # made at the first record
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)  # made at first step

    def __post_init__(self) -> None:
        d = self.config.data
        self.train_augment = augmenter_for(
            self.data, train=True, flip=d.flip, crop_padding=d.crop_padding, cutout=d.cutout
        )
        self.eval_augment = augmenter_for(self.data, train=False)

    def generator(self, purpose: str, epoch: int = 0) -> torch.Generator:
        """A generator seeded from (seed, purpose, epoch): stages do not share random streams.
        On a GPU it lives there, so per-step draws need no copies from the host."""
        salt = zlib.crc32(f"{purpose}/{epoch}".encode())
        place = self.device if self.device.type == "cuda" else "cpu"
        return make_generator((self.config.seed * 1_000_003 + salt) % 2**63, place)

    def log_metrics(self, record: dict) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        if self.config.tensorboard:
            self.live = self.live or TensorBoardMirror(self.run_dir / "tensorboard")
            self.live.write(record)

    def prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.config.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def batches(self, data: ImageSet, batch_size: int, *, train: bool, generator=None):
        """One epoch of batches. In training under torchrun each rank gets its slice of every
        global batch of ``batch_size`` rows (augmented whole, so the random draws match one
        process's); evaluation batches are whole on every rank."""
        shard = train and distributed.active()
        if hasattr(data, "stream_batches"):  # a data set streamed from disk (data.streaming)
            source = data.stream_batches(
                batch_size,
                shuffle=train,
                generator=generator,
                train=train,
                device=self.device,
                drop_last=train and len(data) > batch_size,
                shard=(distributed.rank(), distributed.world_size()) if shard else None,
            )
        else:
            source = iterate_batches(
                data,
                batch_size,
                shuffle=train,
                generator=generator,
                augment=self.train_augment if train else self.eval_augment,
                device=self.device,
                drop_last=train and len(data) > batch_size,
            )
            source = map(local_rows, source) if shard else source
        for batch in source:
            if self.config.channels_last:
                batch.images = batch.images.contiguous(memory_format=torch.channels_last)
            if shard:
                with distributed.sharded_rows():
                    yield batch
            else:
                yield batch

    def on_cpu(self) -> RunContext:
        """This context with its device and data on the CPU: evaluation times CPU models."""
        if self.device.type == "cpu":
            return self
        splits = {name: getattr(self.data, name).to("cpu") for name in ("train", "val", "test")}
        data = dataclasses.replace(self.data, **splits)
        return dataclasses.replace(self, device=torch.device("cpu"), data=data)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for training forwards as ``amp`` says (off: no change)."""
        amp = self.config.amp
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=amp != "off")

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward, gradients averaged over the ranks, one step; with ``amp fp16`` the loss
        is scaled and a step whose gradients overflowed is skipped."""
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.amp == "fp16")
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        distributed.average_gradients(distributed.optimizer_params(optimizer))
        self.scaler.step(optimizer)
        self.scaler.update()

    def steps_per_epoch(self, batch_size: int) -> int:
        n = len(self.data.train)
        return num_batches(n, batch_size, drop_last=n > batch_size)


def local_rows(batch: Batch) -> Batch:
    """This rank's rows of a global batch; a batch the ranks cannot share equally (a data set
    smaller than one batch) loses its last few rows."""
    world = distributed.world_size()
    rows = distributed.local_slice(len(batch.labels) // world * world)
    return Batch(batch.images[rows], batch.labels[rows], batch.indices[rows])


def run_identity(ctx: RunContext) -> dict:
    """What a checkpoint must agree on with the run that loads it."""
    facts = {
        "preset": ctx.config.preset,
        "space": ctx.space.to_dict(),
        "classes": list(ctx.data.classes),
        "controller": ctx.config.controller_spec().to_dict(),
        "normalization": {"mean": list(ctx.data.mean), "std": list(ctx.data.std)},
    }
    return json.loads(json.dumps(facts))  # tuples become lists, as they come back from JSON


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


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, forward: Callable[[torch.Tensor], object], batches: Iterable[torch.Tensor]
) -> None:
    """Re-estimate BatchNorm running statistics for the policies ``forward`` now runs.

    A weight-sharing module sees very different inputs under different policies (a cell that sums
    five modules vs one), so running statistics gathered under one policy distribution are wrong
    under another and eval-mode accuracy collapses. This replaces them with the exact average
    over ``batches``; modules that no batch selects keep their previous statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = model.training
    model.train()
    for images in batches:
        forward(images)
    for m, (mean, var, momentum) in zip(norms, saved):
        if int(m.num_batches_tracked) == 0:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        m.momentum = momentum
    distributed.average_batchnorm_statistics([model])
    model.train(was_training)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Frozen model whose BatchNorm normalises with each batch's own statistics.

    Used where the meta-graph is frozen but the policies change every step (controller epochs):
    each forward normalises for exactly the children it runs. Momentum 0 leaves the running
    statistics untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum


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
