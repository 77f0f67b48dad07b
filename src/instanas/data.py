"""Datasets as in-memory uint8 tensors, plus batched augmentation on the training device.

Every split is decoded once into one contiguous uint8 tensor, so an epoch only slices
tensors: no DataLoader workers and no per-image Python work in the training loop (the
machines this runs on have few CPU cores, and the datasets fit in memory many times over).
Augmentation (random crop, flip, cutout) is a handful of vectorised ops on the whole
batch, applied after the uint8 batch has been moved to the device (4x less to copy).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "Batch",
    "BatchAugmenter",
    "DataBundle",
    "DataError",
    "ImageSet",
    "augmenter_for",
    "default_augmentation",
    "iterate_batches",
    "load_dataset",
    "num_batches",
    "shard",
]

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "folder")
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
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
DEFAULT_FOLDER_IMAGE_SIZE = 32

# A single class-per-folder tree gets this share of each class held out as its test split.
_FOLDER_TEST_FRACTION = 0.1
# Test rows (folder hold-out, limit_test subsets) use a fixed seed rather than `seed`, so
# runs that vary `seed` are still scored on the same test images.
_TEST_SEED = 20190104
# Rows per chunk when converting whole splits to float; bounds peak memory.
_CHUNK = 2048

_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE_IMAGES = 0x00000803  # IDX magic: unsigned byte data, 3 dimensions
_IDX_UBYTE_LABELS = 0x00000801  # IDX magic: unsigned byte data, 1 dimension


class DataError(ValueError):
    """Bad or missing data. Message is ONE line naming the problem and the fix."""

    def __init__(self, message: str) -> None:
        # The CLI prints this as-is; nested exception texts may carry newlines.
        super().__init__(" ".join(message.splitlines()))


# --------------------------------------------------------------------------- containers


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

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """Rows `indices` (any int tensor) as a new ImageSet."""
        idx = indices.to(self.images.device, torch.int64)
        return ImageSet(self.images.index_select(0, idx), self.labels.index_select(0, idx))

    def to(self, device: torch.device | str) -> ImageSet:
        """Copy to `device`; iterate_batches then slices there without host transfers."""
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class DataBundle:
    """A dataset's three splits, class names and the train split's channel statistics."""

    name: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- load_dataset


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
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if not 0.0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction}: pass e.g. 0.1")
    for label, value in (
        ("image_size", image_size),
        ("limit_train", limit_train),
        ("limit_test", limit_test),
    ):
        if value is not None and value < 1:
            raise DataError(f"{label} must be a positive integer, got {value}: pass e.g. 32")
    train_gen = torch.Generator().manual_seed(seed)
    test_gen = torch.Generator().manual_seed(_TEST_SEED)

    if name == "folder":
        if root is None:
            raise DataError("dataset 'folder' needs --data.root DIR: pass a class-per-folder tree")
        classes, train, test = _load_folder(
            Path(root).expanduser(),
            image_size or DEFAULT_FOLDER_IMAGE_SIZE,
            limit_train,
            limit_test,
            train_gen,
            test_gen,
        )
    else:
        if name == "fashion-mnist":
            classes, train, test = _load_fashion_mnist(
                Path(root or DEFAULT_FASHION_MNIST_DIR).expanduser()
            )
        else:
            classes, train, test = _load_cifar(name, root)
        # Limits first, so resizing and statistics only touch the rows that are kept.
        train = _limit(train, limit_train, train_gen)
        test = _limit(test, limit_test, test_gen)
        if image_size is not None:
            train = ImageSet(_resize(train.images, image_size), train.labels)
            test = ImageSet(_resize(test.images, image_size), test.labels)

    train, val = _split_val(train, val_fraction, train_gen, name)
    mean, std = _channel_stats(train.images)
    return DataBundle(name, list(classes), train, val, test, mean, std)


def _pick(n: int, limit: int | None, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted seeded random `limit` of range(n), or None when nothing is dropped."""
    if limit is None or limit >= n:
        return None
    # Sorting keeps the source order (e.g. folder rows grouped by class) stable.
    return torch.randperm(n, generator=generator)[:limit].sort().values


def _limit(data: ImageSet, limit: int | None, generator: torch.Generator) -> ImageSet:
    idx = _pick(len(data), limit, generator)
    return data if idx is None else data.subset(idx)


def _split_val(
    data: ImageSet, val_fraction: float, generator: torch.Generator, name: str
) -> tuple[ImageSet, ImageSet]:
    n = len(data)
    if n < 2:
        raise DataError(
            f"{name} has {n} training rows, need at least 2: add data or raise limit_train"
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=generator)
    return data.subset(perm[n_val:].sort().values), data.subset(perm[:n_val].sort().values)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0,1] units via 256-bin histograms of the uint8 values."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1).cpu(), minlength=256).to(torch.float64)
        count = hist.sum()
        mean = (hist * values).sum() / count
        var = (hist * (values - mean).square()).sum() / count
        means.append(float(mean) / 255.0)
        # Floor at one grey level: a constant channel would otherwise divide by zero.
        stds.append(max(float(var.sqrt()), 1.0) / 255.0)
    return tuple(means), tuple(stds)


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


# --------------------------------------------------------------------------- Fashion-MNIST


def _load_fashion_mnist(root: Path) -> tuple[Sequence[str], ImageSet, ImageSet]:
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


# --------------------------------------------------------------------------- CIFAR


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


def _load_cifar(
    name: str, root: str | os.PathLike[str] | None
) -> tuple[list[str], ImageSet, ImageSet]:
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


# --------------------------------------------------------------------------- image folders


def _load_folder(
    root: Path,
    size: int,
    limit_train: int | None,
    limit_test: int | None,
    train_gen: torch.Generator,
    test_gen: torch.Generator,
) -> tuple[list[str], ImageSet, ImageSet]:
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist: pass --data.root pointing at a "
            f"class-per-folder tree (root/<class>/*.png or root/train/<class>/...)"
        )
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next(
        (root / s for s in ("test", "val") if train_dir != root and (root / s).is_dir()), None
    )
    train_files = _class_files(train_dir)
    classes = sorted(train_files)
    if len(classes) < 2:
        raise DataError(
            f"only one class folder ({classes[0]}) in {train_dir}: "
            f"a classifier needs at least 2 class folders"
        )
    if test_dir is not None:
        test_files = _class_files(test_dir)
        unknown = sorted(set(test_files) - set(classes))
        if unknown:
            raise DataError(
                f"{test_dir} has classes not in {train_dir}: {', '.join(unknown)}; "
                f"add them to train or remove them from test"
            )
    else:
        # The fixed-seed hold-out keeps the test split the same whatever `seed` is.
        train_files, test_files = _hold_out(train_files, torch.Generator().manual_seed(_TEST_SEED))
    train = _decode_rows(_rows(train_files, classes), size, limit_train, train_gen)
    test = _decode_rows(_rows(test_files, classes), size, limit_test, test_gen)
    return classes, train, test


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Image files per class folder (non-recursive, sorted for determinism)."""
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"no class folders in {split_dir}: put images in {split_dir}/<class>/")
    files: dict[str, list[Path]] = {}
    for d in class_dirs:
        images = sorted(
            p
            for p in d.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images:
            raise DataError(
                f"class folder {d} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                f"add images or remove the folder"
            )
        files[d.name] = images
    return files


def _hold_out(
    files: dict[str, list[Path]], generator: torch.Generator
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Split `_FOLDER_TEST_FRACTION` of every class (at least 1 if it has 2+ images) to test."""
    train: dict[str, list[Path]] = {}
    test: dict[str, list[Path]] = {}
    for cls, paths in files.items():
        n_test = max(1, round(len(paths) * _FOLDER_TEST_FRACTION)) if len(paths) > 1 else 0
        perm = torch.randperm(len(paths), generator=generator).tolist()
        test[cls] = [paths[i] for i in sorted(perm[:n_test])]
        train[cls] = [paths[i] for i in sorted(perm[n_test:])]
    return train, test


def _rows(files: dict[str, list[Path]], classes: list[str]) -> list[tuple[Path, int]]:
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[c]) for c in sorted(files) for p in files[c]]


def _decode_rows(
    rows: list[tuple[Path, int]], size: int, limit: int | None, generator: torch.Generator
) -> ImageSet:
    # Apply the limit to the file list so skipped images are never decoded.
    idx = _pick(len(rows), limit, generator)
    if idx is not None:
        rows = [rows[i] for i in idx.tolist()]
    pixels = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(rows):  # load time only, never in the training loop
        pixels[i] = _read_image(path, size)
    labels = torch.tensor([label for _, label in rows], dtype=torch.int64)
    return ImageSet(torch.from_numpy(pixels).permute(0, 3, 1, 2), labels)


def _read_image(path: Path, size: int) -> np.ndarray:
    """Decode, centre-crop to square and bilinear-resize one image to [size, size, 3] uint8."""
    from PIL import Image  # imported lazily: only folder datasets need Pillow

    try:
        with Image.open(path) as img:
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")  # palette transparency must go via RGBA
            rgb = img.convert("RGB")  # forces the full decode, so corrupt files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({exc}): replace or delete the file") from None
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # crop() before resize(): resize(box=...) would blend in pixels from outside the box.
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


# --------------------------------------------------------------------------- augmentation


class BatchAugmenter:
    """Batched augmentation on the training device; input uint8 [B,C,H,W] on any device.

    Output is float32 normalised with (x/255 - mean) / std. With train=True it also applies
    a random crop from a zero-padded image (`crop_padding`), a random horizontal flip and
    cutout (a `cutout`-sided square set to 0 after normalisation, clipped at the borders).
    Random numbers come from `generator` (CPU or the images' device) and are moved over.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        crop_padding: int = 0,
        flip: bool = False,
        cutout: int = 0,
    ) -> None:
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        if crop_padding < 0 or cutout < 0:
            raise ValueError(f"crop_padding and cutout must be >= 0, got {crop_padding}, {cutout}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.cutout = int(cutout)
        # (x/255 - mean)/std folded into one multiply and one subtract: x*scale - shift.
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(1, -1, 1, 1)
        self._shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)]).view(
            1, -1, 1, 1
        )

    def __repr__(self) -> str:
        return (
            f"BatchAugmenter(channels={len(self.mean)}, crop_padding={self.crop_padding}, "
            f"flip={self.flip}, cutout={self.cutout})"
        )

    @property
    def augments(self) -> bool:
        """Whether train=True does anything beyond normalisation."""
        return self.crop_padding > 0 or self.flip or self.cutout > 0

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None, train: bool = True
    ) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(self.mean):
            raise ValueError(
                f"expected uint8 [B,{len(self.mean)},H,W] images, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if train and (self.crop_padding or self.flip):
            images = self._crop_flip(images, generator)  # on uint8: 4x less memory traffic
        x = images.to(torch.float32)
        x.mul_(self._scale.to(x.device)).sub_(self._shift.to(x.device))
        if train and self.cutout:
            x = self._cutout(x, generator)
        return x

    def _crop_flip(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, c, h, w = images.shape
        p, dev = self.crop_padding, images.device
        if p:
            images = F.pad(images, (p, p, p, p))  # zero padding, as black pixels
        top = _randint(2 * p + 1, b, generator, dev)
        left = _randint(2 * p + 1, b, generator, dev)
        rows = top[:, None] + torch.arange(h, device=dev)  # [B, H] source rows
        cols = left[:, None] + torch.arange(w, device=dev)  # [B, W] source columns
        if self.flip:
            # A mirrored crop is the same window read right-to-left: flip the column index.
            flip = _randint(2, b, generator, dev).bool()
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        return images[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]

    def _cutout(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        top = _randint(h, b, generator, dev) - self.cutout // 2  # centre anywhere, then clip
        left = _randint(w, b, generator, dev) - self.cutout // 2
        ys = torch.arange(h, device=dev)
        xs = torch.arange(w, device=dev)
        in_rows = (ys >= top[:, None]) & (ys < top[:, None] + self.cutout)  # [B, H]
        in_cols = (xs >= left[:, None]) & (xs < left[:, None] + self.cutout)  # [B, W]
        return x.masked_fill_(in_rows[:, None, :, None] & in_cols[:, None, None, :], 0.0)


def _randint(
    high: int, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """n ints in [0, high) drawn on the generator's device, returned on `device`."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(high, (n,), generator=generator, device=gen_device).to(device)


def default_augmentation(bundle: DataBundle) -> dict[str, int | bool]:
    """The data set's standard training augmentation: flip, crop padding, cutout side."""
    if bundle.name == "fashion-mnist":
        return {"flip": True, "crop_padding": 2, "cutout": 0}
    if bundle.name in ("cifar10", "cifar100"):
        # Cutout sizes from DeVries & Taylor (2017): 16 for CIFAR-10, 8 for CIFAR-100.
        return {"flip": True, "crop_padding": 4, "cutout": 16 if bundle.name == "cifar10" else 8}
    return {"flip": True, "crop_padding": bundle.image_size // 8, "cutout": 0}


def augmenter_for(bundle: DataBundle, *, train: bool, flip: bool | None = None,
                  crop_padding: int | None = None, cutout: int | None = None) -> BatchAugmenter:
    """Training augmentation of the bundle (None: the data set's default, see
    ``default_augmentation``); train=False only normalises."""
    if not train:
        return BatchAugmenter(bundle.mean, bundle.std)
    given = {"flip": flip, "crop_padding": crop_padding, "cutout": cutout}
    settings = {k: v if given[k] is None else given[k]
                for k, v in default_augmentation(bundle).items()}
    return BatchAugmenter(bundle.mean, bundle.std, **settings)


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    images: torch.Tensor  # float32 [B,C,H,W] on device: normalised by the augmenter, else in [0,1]
    labels: torch.Tensor  # int64 [B] on device
    indices: torch.Tensor  # int64 [B] row indices into the ImageSet, on CPU


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
        order = torch.randperm(n, generator=generator, device=gen_device).cpu()
    else:
        order = torch.arange(n)
    device = torch.device(device)
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        src_idx = idx.to(data.images.device)
        images = data.images.index_select(0, src_idx).to(device, non_blocking=True)
        labels = data.labels.index_select(0, src_idx).to(device, non_blocking=True)
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
