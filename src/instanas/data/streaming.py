"""Class-folder splits read from disk batch by batch, for trees too large to decode into memory.

A StreamingImageSet holds file paths and labels only. stream_batches decodes each batch in
DataLoader worker processes (Pillow), with the ImageNet training recipe (random resized crop,
flip) or the evaluation one (resize, centre crop), and normalises on the training device.

Batch order matches batching.iterate_batches for the same generator, and the random crop of an
image depends only on (the epoch's seed, its row): the same seed gives the same images whatever
the worker count or the number of data-parallel ranks. See docs/streaming.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .augmentation import BatchAugmenter, channel_stats
from .batching import Batch, num_batches
from .containers import ImageSet
from .image_folders import open_image

if TYPE_CHECKING:
    from PIL import Image

# Evaluation resizes the shorter side to size / 0.875 before the centre crop (256 for 224).
EVAL_CROP_SHARE = 0.875
# Random resized crop: share of the image's area and aspect ratio (w/h) of the crop.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
# Images decoded to estimate the channel statistics (a mean over a sample is close enough).
STATS_SAMPLE = 2000
MAX_DEFAULT_WORKERS = 8
# rows() decodes up to this many images in process: starting workers costs more than it saves.
_IN_PROCESS_ROWS = 64
_ROWS_BATCH = 256


def default_workers() -> int:
    """DataLoader workers when the config leaves data.workers unset."""
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)


@dataclass(repr=False, eq=False)
class StreamingImageSet:
    """One split as image files and int64 labels; images are decoded only when batched.

    `files` is one numpy array of encoded paths rather than a list of str: forked DataLoader
    workers share its pages, where reading a million str objects (touching their reference
    counts) would copy them into every worker.
    """

    files: np.ndarray
    labels: torch.Tensor
    size: int
    mean: tuple[float, ...] | None = None  # None: 0 and 1 per channel, images left in [0, 1]
    std: tuple[float, ...] | None = None
    flip: bool = True
    workers: int | None = None
    channels: int = 3  # 1: decoded to Pillow's "L", else "RGB"

    def __post_init__(self) -> None:
        self.mean = (0.0,) * self.channels if self.mean is None else self.mean
        self.std = (1.0,) * self.channels if self.std is None else self.std
        self.labels = self.labels.to("cpu", torch.int64).contiguous()
        if self.labels.dim() != 1 or len(self.files) != self.labels.shape[0]:
            raise DataError(
                f"StreamingImageSet has {len(self.files)} files but labels of shape "
                f"{tuple(self.labels.shape)}: pass one label per file"
            )

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[tuple[Path, int]],
        size: int,
        *,
        flip: bool = True,
        workers: int | None = None,
        channels: int = 3,
    ) -> StreamingImageSet:
        """A set of (file, label) rows, e.g. image_folders.list_folder's."""
        files = np.array([os.fsencode(path) for path, _ in rows], dtype=np.bytes_)
        labels = torch.tensor([label for _, label in rows], dtype=torch.int64)
        return cls(files, labels, size, flip=flip, workers=workers, channels=channels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"StreamingImageSet({len(self)} images at {self.channels}x{self.size}px, "
            f"workers={self.workers})"
        )

    @property
    def image_size(self) -> int:
        return self.size

    def subset(self, indices: torch.Tensor) -> StreamingImageSet:
        """Rows `indices` (any int tensor) as a new StreamingImageSet."""
        idx = indices.to("cpu", torch.int64)
        return replace(self, files=self.files[idx.numpy()], labels=self.labels[idx])

    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> StreamingImageSet:
        """The same rows, normalised with these per-channel statistics."""
        return replace(self, mean=tuple(mean), std=tuple(std))

    def to(self, device: torch.device | str) -> StreamingImageSet:
        """Nothing to move: batches go to the device as they are decoded."""
        return self

    def stream_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None,
        train: bool,
        device: torch.device | str,
        drop_last: bool,
        shard: tuple[int, int] | None,
    ) -> Iterator[Batch]:
        """One epoch of normalised batches, ordered as batching.iterate_batches orders them.

        With `shard` = (rank, world) this process decodes only its slice of every global
        batch (trimmed to a multiple of world rows). train=True applies the random resized
        crop and flip, seeded per image from one draw of `generator` per epoch.
        """
        n = len(self)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = (
            torch.randperm(n, generator=generator, device=gen_device).cpu()
            if shuffle
            else torch.arange(n)
        )
        seed = _epoch_seed(generator, gen_device) if train else None
        steps = num_batches(n, batch_size, drop_last)
        batch_rows = [order[k * batch_size : (k + 1) * batch_size] for k in range(steps)]
        # A rank's share of a batch smaller than world is empty on every rank alike: skipped.
        batch_rows = [rows for rows in (_local_rows(b, shard) for b in batch_rows) if rows]
        device = torch.device(device)
        normalise = BatchAugmenter(self.mean, self.std)
        for images, rows in self._loader(batch_rows, seed, self.num_workers, device):
            x = normalise(images.to(device, non_blocking=True), train=False)
            yield Batch(x, self.labels[rows].to(device, non_blocking=True), rows)

    def rows(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """uint8 [k, C, size, size] of rows `indices`, with the evaluation transform."""
        idx = torch.as_tensor(indices, dtype=torch.int64).flatten()
        batch_rows = [idx[s : s + _ROWS_BATCH].tolist() for s in range(0, len(idx), _ROWS_BATCH)]
        workers = self.num_workers if len(idx) > _IN_PROCESS_ROWS else 0
        out = torch.empty((len(idx), self.channels, self.size, self.size), dtype=torch.uint8)
        start = 0
        for images, _ in self._loader(batch_rows, None, workers, torch.device("cpu")):
            out[start : start + len(images)] = images
            start += len(images)
        return out

    @property
    def num_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    def _loader(
        self, batch_rows: list[list[int]], seed: int | None, workers: int, device: torch.device
    ) -> DataLoader:
        decoder = _Decoder(self.files, self.size, seed, self.flip, self.channels)
        return DataLoader(
            decoder,
            batch_sampler=batch_rows,
            num_workers=min(workers, len(batch_rows)),
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
        )


def _epoch_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """One 63-bit seed for the epoch's transforms, drawn in the main process."""
    return int(torch.randint(2**63 - 1, (1,), generator=generator, device=device).item())


def _local_rows(rows: torch.Tensor, shard: tuple[int, int] | None) -> list[int]:
    """This rank's rows of one global batch (all of them when not sharded)."""
    if shard is None:
        return rows.tolist()
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got shard={shard}")
    per_rank = len(rows) // world
    return rows[rank * per_rank : (rank + 1) * per_rank].tolist()


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _ in items])
    return images, torch.tensor([row for _, row in items], dtype=torch.int64)


class _Decoder(Dataset):
    """Decodes and transforms one row in a DataLoader worker: uint8 [C, size, size]."""

    def __init__(
        self, files: np.ndarray, size: int, seed: int | None, flip: bool, channels: int
    ) -> None:
        self.files, self.size, self.seed, self.flip = files, size, seed, flip
        self.channels = channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, int]:
        image = open_image(os.fsdecode(self.files[row]), self.channels)
        if self.seed is None:
            pixels = eval_transform(image, self.size)
        else:
            # Seeded by (epoch, row): independent of which worker decodes the image.
            rng = np.random.default_rng((self.seed, int(row)))
            pixels = train_transform(image, self.size, self.flip, rng)
        pixels = pixels.reshape(self.size, self.size, self.channels)  # "L" decodes to [H, W]
        return torch.from_numpy(pixels).permute(2, 0, 1), int(row)


def eval_transform(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side resized to round(size / 0.875), then the centre size x size: [H, W, 3]
    ([H, W] for a gray image)."""
    from PIL import Image

    w, h = image.size
    scale = round(size / EVAL_CROP_SHARE) / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def train_transform(
    image: Image.Image, size: int, flip: bool, rng: np.random.Generator
) -> np.ndarray:
    """Random resized crop to size x size, then a horizontal flip half the time: [H, W, 3]
    ([H, W] for a gray image)."""
    from PIL import Image

    left, top, w, h = random_crop_box(image.size[0], image.size[1], rng)
    # crop() before resize(): resize(box=...) would blend in pixels from outside the box.
    image = image.crop((left, top, left + w, top + h)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(image, dtype=np.uint8)


def random_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) covering CROP_SCALE of the area at an aspect ratio in CROP_RATIO;
    after CROP_TRIES misses, the centre crop at the nearest allowed ratio (as torchvision)."""
    area = width * height
    log_low, log_high = np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = float(np.exp(rng.uniform(log_low, log_high)))
        w, h = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def estimate_stats(
    data: StreamingImageSet, generator: torch.Generator, sample: int = STATS_SAMPLE
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0,1] units over a seeded sample of rows (evaluation transform)."""
    idx = torch.randperm(len(data), generator=generator)[:sample].sort().values
    return channel_stats(data.rows(idx))


def images_of(
    split: ImageSet | StreamingImageSet, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [k, C, H, W] of rows `indices` (all rows when None) of either kind of split;
    a streaming split decodes them (evaluation transform), so ask for what is needed."""
    if isinstance(split, StreamingImageSet):
        return split.rows(torch.arange(len(split)) if indices is None else indices)
    if indices is None:
        return split.images
    return split.images.index_select(0, indices.to(split.images.device, torch.int64))
