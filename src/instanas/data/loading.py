"""load_dataset: a data set by name, read whole into memory and split into train, val and test.

Every split is decoded once into one contiguous uint8 tensor, so an epoch only slices tensors
(the machines this runs on have few CPU cores, and the datasets fit in memory many times
over). The readers for each on-disk format live in fashion_mnist, cifar and image_folders.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .augmentation import channel_stats
from .cifar import load_cifar
from .containers import DataBundle, DataError, ImageSet
from .fashion_mnist import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist
from .image_folders import DEFAULT_FOLDER_IMAGE_SIZE, load_folder
from .subsets import TEST_SEED, limit_rows, split_validation

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "folder")
# val_fraction lies in (low, high]: above low, at most high. config.DataConfig checks the
# --data.val_fraction option against the same bounds.
VAL_FRACTION_RANGE = (0.0, 0.5)

# Rows per chunk when converting whole splits to float; bounds peak memory.
_CHUNK = 2048


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DataBundle:
    """Load a dataset whole into memory and split a seeded validation set off its train rows.

    `limit_train` keeps a seeded random subset of the train rows (before the validation
    split); `limit_test` a fixed-seed random subset of the test rows. `image_size` resizes
    (folder: centre-crop + Pillow bilinear; others: antialiased bilinear on the tensors).
    """
    _check_arguments(name, root, val_fraction, image_size, limit_train, limit_test)
    train_gen = torch.Generator().manual_seed(seed)
    test_gen = torch.Generator().manual_seed(TEST_SEED)
    if name == "folder":
        # Limits pick from the file lists and the size applies while decoding.
        size = image_size or DEFAULT_FOLDER_IMAGE_SIZE
        classes, train, test = load_folder(
            Path(root).expanduser(), size, limit_train, limit_test, train_gen, test_gen
        )
    else:
        classes, train, test = _read_whole(name, root)
        # Limits first, so resizing and statistics only touch the rows that are kept.
        train = limit_rows(train, limit_train, train_gen)
        test = limit_rows(test, limit_test, test_gen)
        if image_size is not None:
            train, test = _resized(train, image_size), _resized(test, image_size)
    train, val = split_validation(train, val_fraction, train_gen, name)
    mean, std = channel_stats(train.images)
    return DataBundle(name, list(classes), train, val, test, mean, std)


def _check_arguments(
    name: str,
    root: str | os.PathLike[str] | None,
    val_fraction: float,
    image_size: int | None,
    limit_train: int | None,
    limit_test: int | None,
) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    low, high = VAL_FRACTION_RANGE
    if not low < val_fraction <= high:
        raise DataError(
            f"val_fraction must be in ({low:g}, {high:g}], got {val_fraction}: pass e.g. 0.1"
        )
    for label, value in (
        ("image_size", image_size),
        ("limit_train", limit_train),
        ("limit_test", limit_test),
    ):
        if value is not None and value < 1:
            raise DataError(f"{label} must be a positive integer, got {value}: pass e.g. 32")
    if name == "folder" and root is None:
        raise DataError("dataset 'folder' needs --data.root DIR: pass a class-per-folder tree")


def _read_whole(
    name: str, root: str | os.PathLike[str] | None
) -> tuple[Sequence[str], ImageSet, ImageSet]:
    """(classes, train, test) of Fashion-MNIST or CIFAR, every row decoded."""
    if name == "fashion-mnist":
        return load_fashion_mnist(Path(root or DEFAULT_FASHION_MNIST_DIR).expanduser())
    return load_cifar(name, root)


def _resized(data: ImageSet, size: int) -> ImageSet:
    return ImageSet(_resize(data.images, size), data.labels)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square-resize uint8 [N,C,H,W] in chunks (antialiased bilinear, like Pillow)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start : start + _CHUNK].float()
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + _CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_configured(config) -> DataBundle:
    """The data set a run's config names: its ``data`` section and ``seed`` (a Config; typed
    loosely because config imports this package)."""
    d = config.data
    limits = {"limit_train": d.limit_train, "limit_test": d.limit_test}
    return load_dataset(d.dataset, d.root, val_fraction=d.val_fraction, seed=config.seed,
                        image_size=d.image_size, **limits)  # fmt: skip
