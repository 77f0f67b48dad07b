"""load_dataset: a data set by name, read into memory and split into train, val and test.

Every split is decoded once into one contiguous uint8 tensor, so an epoch only slices tensors
(the machines this runs on have few CPU cores, and most data sets fit in memory many times
over). A class-folder tree too large for that is streamed instead (data.streaming: files
decoded per batch by DataLoader workers). The readers for each on-disk format live in
fashion_mnist, cifar and image_folders.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError
from .augmentation import channel_stats
from .cifar import load_cifar
from .containers import DataBundle, ImageSet
from .fashion_mnist import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist
from .image_folders import decode_rows, infer_shape, limit_files, list_folder
from .streaming import StreamingImageSet, estimate_stats
from .subsets import TEST_SEED, limit_rows, split_validation

log = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "folder")
# val_fraction lies in (low, high]: above low, at most high. config.DataConfig checks the
# --data.val_fraction option against the same bounds.
VAL_FRACTION_RANGE = (0.0, 0.5)

# Rows per chunk when converting whole splits to float; bounds peak memory.
_CHUNK = 2048
# stream=None streams a folder tree whose decoded train split (uint8) would need more than
# this share of the physical memory: the rest is left to the model, workers and the OS cache.
STREAM_MEMORY_SHARE = 0.25


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    stream: bool | None = None,
    workers: int | None = None,
    flip: bool | None = None,
    channels: int | None = None,
) -> DataBundle:
    """Load a dataset and split a seeded validation set off its train rows.

    `limit_train` keeps a seeded random subset of the train rows (before the validation split),
    `limit_test` a fixed-seed one of the test rows. `image_size` resizes (folder: centre-crop +
    Pillow bilinear; others: antialiased bilinear on the tensors); a folder tree's `image_size` and
    `channels` (1: gray, 3: RGB) default to image_folders.infer_shape's. `stream` (folder trees
    only; None: if the decoded train split would not fit STREAM_MEMORY_SHARE of memory) decodes per
    batch in `workers` processes, flipping unless `flip` is False (docs/streaming.md).
    """
    _check_arguments(name, root, val_fraction, image_size, limit_train, limit_test)
    _check_folder_options(name, stream, workers, channels)
    train_gen, test_gen = _generators(seed)
    if name == "folder":
        options = {"flip": flip is not False, "workers": workers}
        limits, generators = (limit_train, limit_test), (train_gen, test_gen)
        classes, train, test = _load_folder(Path(root).expanduser(), (channels, image_size),
                                            limits, generators, stream, options)  # fmt: skip
    else:
        classes, train, test = _read_whole(name, root, channels)
        # Limits first, so resizing and statistics only touch the rows that are kept.
        train = limit_rows(train, limit_train, train_gen)
        test = limit_rows(test, limit_test, test_gen)
        if image_size is not None:
            train, test = _resized(train, image_size), _resized(test, image_size)
    train, val = split_validation(train, val_fraction, train_gen, name)
    return _with_statistics(DataBundle(name, list(classes), train, val, test, (), ()), seed)


def _generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(train, test) generators: train rows follow `seed`, test rows the fixed TEST_SEED."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(TEST_SEED)


def _with_statistics(bundle: DataBundle, seed: int) -> DataBundle:
    """The bundle with its train split's channel statistics: exact for in-memory splits, from
    a seeded sample for streamed ones (which also normalise their batches with them)."""
    if not isinstance(bundle.train, StreamingImageSet):
        bundle.mean, bundle.std = channel_stats(bundle.train.images)
        return bundle
    # Its own generator, so the sample does not shift any other seeded choice.
    mean, std = estimate_stats(bundle.train, torch.Generator().manual_seed(seed))
    splits = (s.with_stats(mean, std) for s in (bundle.train, bundle.val, bundle.test))
    return DataBundle(bundle.name, bundle.classes, *splits, mean, std)


def _load_folder(
    root: Path,
    shape: tuple[int | None, int | None],
    limits: tuple[int | None, int | None],
    generators: tuple[torch.Generator, torch.Generator],
    stream: bool | None,
    options: dict,
) -> tuple[list[str], ImageSet | StreamingImageSet, ImageSet | StreamingImageSet]:
    """(classes, train, test) of a class-folder tree at `shape` (channels, size; None:
    inferred from the whole train split, so limits do not change it), decoded or streamed.
    Limits pick from the file lists, so skipped images are never read."""
    classes, train_rows, test_rows = list_folder(root)
    inferred = infer_shape(train_rows, *shape)
    log.info("%s", inferred.describe())
    channels, size = inferred.channels, inferred.size
    train_rows = limit_files(train_rows, limits[0], generators[0])
    test_rows = limit_files(test_rows, limits[1], generators[1])
    if _should_stream(stream, len(train_rows), channels * size * size):
        streamed = (
            StreamingImageSet.from_rows(r, size, channels=channels, **options)
            for r in (train_rows, test_rows)
        )
        return classes, *streamed
    return classes, *(decode_rows(r, size, channels) for r in (train_rows, test_rows))


def _should_stream(stream: bool | None, rows: int, row_bytes: int) -> bool:
    """The caller's choice, or (None) whether the decoded train rows of `row_bytes` each would
    need more than STREAM_MEMORY_SHARE of the physical memory; logs the path taken."""
    need = rows * row_bytes
    memory = physical_memory()
    if stream is None:
        stream = memory is not None and need > STREAM_MEMORY_SHARE * memory
        how = f"automatic, {STREAM_MEMORY_SHARE:.0%} of {_gib(memory)} memory"
    else:
        how = "data.stream"
    path = "streaming images from disk" if stream else "decoding into memory"
    log.info("data: %s (%d training images, %s decoded; %s)", path, rows, _gib(need), how)
    return stream


def physical_memory() -> int | None:
    """Bytes of physical memory, None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 2**30:.1f} GiB"


def _check_folder_options(
    name: str, stream: bool | None, workers: int | None, channels: int | None
) -> None:
    """The options of how class-folder trees are read."""
    if stream and name != "folder":
        raise DataError(
            f"data.stream true reads class-folder trees, not {name}: drop --data.stream or "
            "use --data.dataset folder"
        )
    if workers is not None and workers < 0:
        raise DataError(f"workers must be 0 or more, got {workers}: pass e.g. 4 (0: in process)")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 (gray) or 3 (colour), got {channels}: pass 1 or 3")


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
    name: str, root: str | os.PathLike[str] | None, channels: int | None = None
) -> tuple[Sequence[str], ImageSet, ImageSet]:
    """(classes, train, test) of Fashion-MNIST or CIFAR, every row decoded, in their own
    channels whatever `channels` (which chooses how folder trees are decoded) says."""
    if name == "fashion-mnist":
        whole = load_fashion_mnist(Path(root or DEFAULT_FASHION_MNIST_DIR).expanduser())
    else:
        whole = load_cifar(name, root)
    own = whole[1].channels
    if channels is not None and channels != own:
        log.warning("data.channels %d ignored: %s images have %d", channels, name, own)
    return whole


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
    streaming = {"stream": d.stream, "workers": d.workers, "flip": d.flip}
    return load_dataset(d.dataset, d.root, val_fraction=d.val_fraction, seed=config.seed,
                        image_size=d.image_size, channels=d.channels, **limits,
                        **streaming)  # fmt: skip
