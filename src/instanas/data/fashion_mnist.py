"""Fashion-MNIST read from its four IDX files (gzipped or plain)."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .containers import ImageSet

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE_IMAGES = 0x00000803  # IDX magic: unsigned byte data, 3 dimensions
_IDX_UBYTE_LABELS = 0x00000801  # IDX magic: unsigned byte data, 1 dimension


def load_fashion_mnist(root: Path) -> tuple[Sequence[str], ImageSet, ImageSet]:
    """(classes, train, test) from the IDX files in `root`."""
    paths = {key: _find_idx(root, base) for key, base in _FASHION_FILES.items()}
    train = _idx_pair(paths["train_images"], paths["train_labels"])
    test = _idx_pair(paths["test_images"], paths["test_labels"])
    return FASHION_MNIST_CLASSES, train, test


def _find_idx(root: Path, base: str) -> Path:
    for candidate in (root / f"{base}.gz", root / base):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST not found in {root} (missing {base}.gz): install it with "
        "`apt-get install dataset-fashion-mnist` "
        "or pass --data.root DIR holding the four IDX files"
    )


def _idx_pair(images_path: Path, labels_path: Path) -> ImageSet:
    images = _read_idx(images_path, _IDX_UBYTE_IMAGES, 3)
    labels = _read_idx(labels_path, _IDX_UBYTE_LABELS, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path.name} holds {images.shape[0]} images but {labels_path.name} "
            f"{labels.shape[0]} labels: reinstall the dataset files"
        )
    if images.shape[1] != images.shape[2]:
        raise DataError(
            f"{images_path} images are {images.shape[1]}x{images.shape[2]}, "
            f"expected square: reinstall the dataset files"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"{labels_path} has label {labels.max()}, expected 0..9: reinstall the dataset files"
        )
    return ImageSet(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX file (gzipped or plain, detected from the content) into a uint8 array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: don't trust the file extension
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(
                f"{path} is a damaged gzip file ({exc}): reinstall the dataset files"
            ) from None
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        found = raw[:4].hex() or "empty file"
        raise DataError(
            f"{path} is not an IDX file with magic {magic:08x} (found {found}): "
            f"reinstall the dataset files"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{path} has {len(raw)} bytes but its header {dims} implies {expected}: "
            f"the file is truncated; reinstall the dataset files"
        )
    # copy(): frombuffer views the immutable bytes, and torch wants a writable array.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()
