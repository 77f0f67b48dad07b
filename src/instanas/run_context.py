"""The run context: what every stage is handed (config, run directory, device, data, search
space), with the run's random streams, batches, metrics log, mixed precision and optimiser step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
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
from .report.live import TensorBoardMirror
from .space import SearchSpace
from .utils import append_jsonl, make_generator


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
