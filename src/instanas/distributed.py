"""Data parallelism over ``torch.distributed``, for runs launched by ``torchrun``.

One process per device. Every rank holds the whole model, reads the same seeded permutation of
the training set and trains on its own slice of each global batch; gradients are averaged
before every optimiser step, so N ranks take the same steps as one process with the same
global batch. Random draws made per training row (drop-path, sampled children, random policies,
augmentation) are drawn for the whole global batch and sliced, so every rank's generators stay
in step and a checkpoint written by rank 0 restores every rank. Rank 0 alone writes files; the
design and its limits are in docs/distributed.md.

Without torchrun (``WORLD_SIZE`` unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("instanas")
T = TypeVar("T")

# True inside alone(): this rank works by itself, as if it were the only process.
_alone: contextvars.ContextVar[bool] = contextvars.ContextVar("instanas_alone", default=False)
# (rank, world size) while the rows being processed are this rank's slice of a global training
# batch; None otherwise (evaluation, or one process).
_row_shard: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "instanas_row_shard", default=None
)


def launched() -> bool:
    """Whether torchrun (or another launcher) asked for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether ranks train together here (several processes, and not inside :func:`alone`)."""
    if _alone.get():
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes files and logs to the run's log (also inside
    :func:`alone`, where only rank 0 runs)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Work inside runs on this rank only: whole batches, no collective operations."""
    token = _alone.set(True)
    try:
        yield
    finally:
        _alone.reset(token)


def on_main(work: Callable[[], T], others: T) -> T:
    """``work`` on rank 0 alone while the other ranks wait; they return ``others``."""
    if not active():
        return work()
    result = others
    if is_main():
        with alone():
            result = work()
    barrier()
    return result


def main_first(work: Callable[[], T]) -> T:
    """Rank 0 does ``work`` alone (e.g. profiles and saves the latency table), then the other
    ranks do it, finding what rank 0 saved."""
    if not active():
        return work()
    if is_main():
        with alone():
            result = work()
        barrier()
        return result
    barrier()
    with alone():
        return work()


def init_from_environment(device: str) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPUs) and return this
    rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    target = torch.device(device)
    if not launched():
        return target
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if target.type == "cuda":
            torch.cuda.set_device(target)
        backend = "nccl" if target.type == "cuda" else "gloo"
        # Rank 0 profiles the latency table and evaluates while the others wait at a barrier.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
        log.info("rank %d of %d (%s) on %s", rank(), world_size(), backend, target)
    return target


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _reduce_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (a new tensor on ``tensor``'s device)."""
    if not active():
        return tensor
    buffer = tensor.detach().to(_reduce_device(), copy=True)
    dist.all_reduce(buffer)
    return buffer.to(tensor.device)


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor``'s elements over every rank's (equally many) elements."""
    if not active():
        return tensor.mean()
    return all_sum(tensor.sum()) / (tensor.numel() * world_size())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank (e.g. a stop request that reached one rank)."""
    return bool(all_sum(torch.tensor([float(flag)])).item() > 0) if active() else flag


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average every parameter's gradient over ranks in one all-reduce.

    Sparse execution leaves a module no row on this rank selected without a gradient (None)
    while another rank has one: it counts as zero here, so the average is the gradient of the
    global batch's mean loss. A parameter without a gradient on every rank keeps None, as in
    one process, so the optimiser leaves it alone (no weight decay, no momentum step).
    """
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = next((p.grad.device for p in params if p.grad is not None), params[0].device)
    parts = [
        p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=device)
        for p in params
    ]
    flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
    flat = all_sum(torch.cat([*parts, flags]))
    grads, has_grad = flat[: -len(params)], flat[-len(params) :].tolist()
    grads.div_(world_size())
    offset = 0
    for p, present in zip(params, has_grad):
        chunk = grads[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        p.grad = chunk.to(p.dtype).clone() if present else None


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def broadcast_modules(modules: Iterable[nn.Module]) -> None:
    """Rank 0's parameters and buffers on every rank (the start of a stage)."""
    if not active():
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            buffer = tensor.detach().to(_reduce_device(), copy=True)
            dist.broadcast(buffer, 0)
            tensor.data.copy_(buffer.to(tensor.device))


def average_batchnorm_statistics(modules: Iterable[nn.Module]) -> None:
    """Each rank normalised its own rows during training (per-rank statistics, see
    docs/distributed.md): the running means and variances become the average over ranks, so
    every rank evaluates, and rank 0 saves, the same model."""
    if not active():
        return
    norms = [
        m
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    if not norms:
        return
    stats = torch.cat([torch.cat([m.running_mean, m.running_var]).float() for m in norms])
    stats = all_sum(stats) / world_size()
    offset = 0
    for m in norms:
        n = m.running_mean.numel()
        m.running_mean.copy_(stats[offset : offset + n])
        m.running_var.copy_(stats[offset + n : offset + 2 * n])
        offset += 2 * n


def local_slice(rows: int) -> slice:
    """This rank's rows of a global training batch of ``rows`` (equal shares; the first ranks
    take one more when ``rows`` does not divide)."""
    n, r = world_size(), rank()
    return slice(r * rows // n, (r + 1) * rows // n)


@contextlib.contextmanager
def sharded_rows() -> Iterator[None]:
    """Mark the rows processed inside as this rank's slice of a global training batch."""
    token = _row_shard.set((rank(), world_size()) if active() else None)
    try:
        yield
    finally:
        _row_shard.reset(token)


def uniform(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``torch.rand(shape)`` for per-row draws (rows first) on the generator's device.

    Inside :func:`sharded_rows` the draw covers the whole global batch and this rank keeps its
    own rows: ranks see different random numbers, exactly those one process would give the
    same rows, and every rank's generator advances alike.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    shard = _row_shard.get()
    if shard is None:
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    rank_, world = shard
    rows = shape[0]
    full = torch.rand((rows * world, *shape[1:]), generator=generator, device=device, dtype=dtype)
    return full[rank_ * rows : (rank_ + 1) * rows]
