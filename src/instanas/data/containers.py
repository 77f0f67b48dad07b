"""What the loaders return: one split held whole in memory (ImageSet; data.streaming has the
on-disk kind), a dataset's three splits with its class names and channel statistics
(DataBundle), and DataError for bad or missing data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError


@dataclass
class ImageSet:
    """One split held whole in memory: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"ImageSet images must be a uint8 [N,C,H,W] tensor, got {self.images.dtype} "
                f"{tuple(self.images.shape)}: convert the images before wrapping them"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"ImageSet has {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}: pass one label per image"
            )
        self.images = self.images.contiguous()
        self.labels = self.labels.to(torch.int64).contiguous()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """Rows `indices` (any int tensor) as a new ImageSet."""
        idx = indices.to(self.images.device, torch.int64)
        return ImageSet(self.images.index_select(0, idx), self.labels.index_select(0, idx))

    def to(self, device: torch.device | str) -> ImageSet:
        """Copy to `device`; iterate_batches then slices there without host transfers."""
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class DataBundle:
    """A dataset's three splits, class names and the train split's channel statistics.

    The splits are ImageSets, or data.streaming.StreamingImageSets (same interface, images
    read from disk per batch) for trees too large to hold in memory."""

    name: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return int(self.train.channels)

    @property
    def image_size(self) -> int:
        return int(self.train.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def shape_only(cls, channels: int, size: int, classes: int) -> DataBundle:
        """Three empty splits of ``channels`` x ``size`` x ``size`` images: the model's shape
        without any data (profiling on a device that does not have the data set)."""

        def empty() -> ImageSet:
            images = torch.empty((0, channels, size, size), dtype=torch.uint8)
            return ImageSet(images, torch.empty(0, dtype=torch.int64))

        names = [str(k) for k in range(classes)]
        mid = (0.5,) * channels
        return cls(f"shape {channels}x{size}x{size}", names, empty(), empty(), empty(), mid, mid)
