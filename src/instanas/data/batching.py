"""One epoch of batches sliced from an in-memory ImageSet: no DataLoader workers and no
per-image Python work in the training loop; plus per-rank shards for data-parallel runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .augmentation import BatchAugmenter
from .containers import ImageSet


@dataclass
class Batch:
    """One batch from iterate_batches."""

    images: torch.Tensor  # float32 [B,C,H,W] on device: normalised by the augmenter, else in [0,1]
    labels: torch.Tensor  # int64 [B] on device
    indices: torch.Tensor  # int64 [B] row indices into the ImageSet, on the ImageSet's device


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch for n rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    augment: BatchAugmenter | None = None,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
) -> Iterator[Batch]:
    """One epoch of batches. uint8 rows move to `device`, then `augment` turns them into
    normalised float32; with augment=None images come out as float32 in [0,1], unnormalised.

    `generator` drives both the shuffle and the augmentation. `data` may live on `device`
    already (ImageSet.to), which saves the per-batch host-to-device copy.
    """
    n = len(data)
    steps = num_batches(n, batch_size, drop_last)
    if shuffle:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(n, generator=generator, device=gen_device)
    else:
        order = torch.arange(n)
    # Slices of the order live where the rows do: no copy per batch (on a GPU each would wait).
    order = order.to(data.images.device)
    device = torch.device(device)
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        images = data.images.index_select(0, idx).to(device, non_blocking=True)
        labels = data.labels.index_select(0, idx).to(device, non_blocking=True)
        if augment is not None:
            x = augment(images, generator)
        else:
            x = images.to(torch.float32).div_(255.0)
        yield Batch(x, labels, idx)


def shard(data: ImageSet, rank: int, world_size: int) -> ImageSet:
    """Rows rank, rank+world_size, ... truncated so every rank gets the same count
    (DDP ranks must run the same number of steps)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    per_rank = len(data) // world_size
    return data.subset(torch.arange(rank, per_rank * world_size, world_size))
