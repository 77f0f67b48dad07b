"""CIFAR-10 and CIFAR-100 read from the python version's pickled batches.

The batches are Python pickles, so they are read with _ArrayUnpickler, which rebuilds numpy
arrays and refuses every other global (tests/test_no_pickle.py allows pickle here only).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .containers import ImageSet


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    labels_key: str
    archive: str


_CIFAR = {
    "cifar10": _CifarSpec(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "label_names",
        "labels",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": _CifarSpec(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_label_names",
        "fine_labels",
        "cifar-100-python.tar.gz",
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays.

    CIFAR batches hold nothing else, so refusing every other global means a tampered or
    mislabelled file raises instead of running code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def load_cifar(
    name: str, root: str | os.PathLike[str] | None
) -> tuple[list[str], ImageSet, ImageSet]:
    """(classes, train, test) of "cifar10" or "cifar100" from `root`: the batch folder or
    its parent."""
    spec = _CIFAR[name]
    if root is None:
        raise DataError(
            f"{spec.title} needs --data.root DIR: pass the {spec.folder} folder "
            f"(or its parent) from the python version of the dataset"
        )
    base = Path(root).expanduser()
    folder = base / spec.folder if (base / spec.folder).is_dir() else base
    meta = _read_cifar_pickle(folder, spec.meta_file, spec)
    classes = [
        n.decode() if isinstance(n, bytes) else str(n)
        for n in _field(meta, spec.names_key, folder / spec.meta_file)
    ]
    train = _cifar_split(folder, spec.train_files, spec, len(classes))
    test = _cifar_split(folder, spec.test_files, spec, len(classes))
    return classes, train, test


def _read_cifar_pickle(folder: Path, filename: str, spec: _CifarSpec) -> dict:
    path = folder / filename
    if not path.is_file():
        raise DataError(
            f"{spec.title} file {filename} missing in {folder}: download and extract the python "
            f"version ({spec.archive}) or point --data.root at {spec.folder} or its parent"
        )
    try:
        with path.open("rb") as fh:
            # latin1: the batches are Python 2 pickles; latin1 maps their byte strings 1:1.
            obj = _ArrayUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError) as exc:
        raise DataError(
            f"{path} is not a readable {spec.title} python batch ({exc}): re-extract {spec.archive}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, not a dict: re-extract {spec.archive}"
        )
    return obj


def _field(batch: dict, key: str, path: Path) -> object:
    # Keys are str when loaded with latin1 but bytes in files re-pickled under Python 3.
    for k in (key, key.encode()):
        if k in batch:
            return batch[k]
    raise DataError(
        f"{path} has no {key!r} entry: it is not a CIFAR python batch; "
        f"re-extract the python version of the dataset"
    )


def _cifar_split(
    folder: Path, files: Sequence[str], spec: _CifarSpec, num_classes: int
) -> ImageSet:
    images, labels = [], []
    for filename in files:
        batch = _read_cifar_pickle(folder, filename, spec)
        data = np.asarray(_field(batch, "data", folder / filename))
        targets = np.asarray(_field(batch, spec.labels_key, folder / filename), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{folder / filename} data is {data.dtype} {data.shape}, expected "
                f"uint8 [N, 3072]: re-extract {spec.archive}"
            )
        if targets.shape != (data.shape[0],) or (
            targets.size and not 0 <= targets.min() <= targets.max() < num_classes
        ):
            raise DataError(
                f"{folder / filename} labels do not match its {data.shape[0]} images "
                f"and {num_classes} classes: re-extract {spec.archive}"
            )
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
        labels.append(targets)
    return ImageSet(
        torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    )
