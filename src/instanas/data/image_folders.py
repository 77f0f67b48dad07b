"""Class-per-folder image trees (root/<class>/*.png, or root/train/<class>/... with a test or
val folder beside it). list_folder finds the files and their classes; infer_shape reads the
headers of a sample of them for the channels and side to train at; decode_rows reads them with
Pillow, centre-cropped and resized, into memory (data.streaming reads them lazily instead).

The Tiny ImageNet layout is read as it ships: train/<wnid>/images/*.JPEG, and val/images/ with
val/val_annotations.txt naming each image's class."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DataError
from .containers import ImageSet
from .subsets import TEST_SEED, pick_rows

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
# The side a tree is trained at when not one image header of the sample can be read.
DEFAULT_FOLDER_IMAGE_SIZE = 32
# Pillow modes of one-channel images: bilevel, gray (with alpha), 32-bit int, 16-bit, float.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Image headers infer_shape reads: enough to see a tree's shape, cheap for any tree.
SHAPE_SAMPLE = 512
# The sample does not follow `seed` (it takes the test rows' fixed one): every run on a tree
# infers the same shape.
_SHAPE_SEED = TEST_SEED

# A single class-per-folder tree gets this share of each class held out as its test split.
_FOLDER_TEST_FRACTION = 0.1


FileRows = list[tuple[Path, int]]  # (image file, class index), grouped by class


def list_folder(root: Path) -> tuple[list[str], FileRows, FileRows]:
    """(classes, train rows, test rows) of the tree at `root`; nothing is decoded."""
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
        test_files = _annotated_files(test_dir) or _class_files(test_dir)
        unknown = sorted(set(test_files) - set(classes))
        if unknown:
            raise DataError(
                f"{test_dir} has classes not in {train_dir}: {', '.join(unknown)}; "
                f"add them to train or remove them from test"
            )
    else:
        # The fixed-seed hold-out keeps the test split the same whatever `seed` is.
        train_files, test_files = _hold_out(train_files, torch.Generator().manual_seed(TEST_SEED))
    return classes, _rows(train_files, classes), _rows(test_files, classes)


@dataclass(frozen=True)
class FolderShape:
    """The channels (1 or 3) and side a folder tree is trained at, and why: ``channels_from``
    and ``size_from`` complete "1 channel (...)" and "28 px (...)" in the log line."""

    channels: int
    size: int
    channels_from: str
    size_from: str

    def describe(self) -> str:
        """One line: what was chosen, why, and how to choose otherwise."""
        noun = "channel" if self.channels == 1 else "channels"
        line = (
            f"folder data: {self.channels} {noun} ({self.channels_from}), "
            f"{self.size} px ({self.size_from})"
        )
        if (self.channels_from, self.size_from) == ("data.channels", "data.image_size"):
            return line
        return line + "; override with --data.channels / --data.image_size"


def infer_shape(
    rows: FileRows, channels: int | None = None, size: int | None = None
) -> FolderShape:
    """The channels and side to train a tree's images at; a given ``channels`` or ``size`` is
    kept as it is.

    Inferred from the headers only (Pillow's ``Image.open`` reads the mode and size without
    decoding the pixels) of a fixed-seed sample of up to SHAPE_SAMPLE of the ``rows``, drawn
    class by class in turn: a tree of a million images takes no longer than a small one, and
    every run on the tree infers the same. Channels: 1 when every inspected image is gray
    (GRAY_MODES, or a palette of gray entries), else 3. Side: the most common shorter side
    (images are centre-cropped to a square), the larger on a tie; DEFAULT_FOLDER_IMAGE_SIZE
    when no header can be read (decoding then names the bad file).
    """
    if channels and size:
        return FolderShape(channels, size, "data.channels", "data.image_size")
    headers = [h for h in (_header(path) for path in _shape_sample(rows)) if h is not None]
    colour = sum(1 for gray, _ in headers if not gray)
    sides = Counter(side for _, side in headers)
    if not headers:
        unread = "no image header could be read"
        channels_from, size_from = unread, f"the default: {unread}"
    else:
        channels_from = (
            f"{colour} of {len(headers)} inspected images are in colour"
            if colour
            else "every inspected image is grayscale"
        )
        size_from = f"the most common side of {len(headers)} inspected images"
    if channels:
        channels_from = "data.channels"
    else:
        channels = 1 if headers and not colour else 3
    if size:
        size_from = "data.image_size"
    else:
        size = max(sides, key=lambda side: (sides[side], side), default=DEFAULT_FOLDER_IMAGE_SIZE)
    return FolderShape(channels, size, channels_from, size_from)


def _shape_sample(rows: FileRows) -> list[Path]:
    """Up to SHAPE_SAMPLE files, each class's in a fixed-seed order, the classes taking turns."""
    by_class: dict[int, list[Path]] = {}
    for path, label in rows:
        by_class.setdefault(label, []).append(path)
    generator = torch.Generator().manual_seed(_SHAPE_SEED)
    orders = [
        [paths[i] for i in torch.randperm(len(paths), generator=generator).tolist()]
        for _, paths in sorted(by_class.items())
    ]
    sample = []
    for turn in range(max((len(o) for o in orders), default=0)):
        sample += [order[turn] for order in orders if turn < len(order)]
        if len(sample) >= SHAPE_SAMPLE:
            break
    return sample[:SHAPE_SAMPLE]


def _header(path: Path) -> tuple[bool, int] | None:
    """(whether the image is gray, its shorter side) from its header; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:  # lazy: the pixels are not decoded
            return _is_gray(img), min(img.size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _is_gray(img: Image.Image) -> bool:
    """A gray mode, or a palette whose entries all have equal red, green and blue."""
    if img.mode in GRAY_MODES:
        return True
    if img.mode not in ("P", "PA") or img.palette is None:
        return False
    palette = img.palette
    if palette.mode != "RGB" or palette.rawmode not in (None, "RGB"):
        return False  # other layouts are rare: count them as colour
    entries = np.frombuffer(bytes(palette.palette), dtype=np.uint8)
    if entries.size == 0 or entries.size % 3:
        return False
    rgb = entries.reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


def limit_files(rows: FileRows, limit: int | None, generator: torch.Generator) -> FileRows:
    """A seeded random `limit` of the file rows (see subsets.pick_rows), picked before any
    decoding so skipped images are never read."""
    idx = pick_rows(len(rows), limit, generator)
    return rows if idx is None else [rows[i] for i in idx.tolist()]


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    """Image files per class folder (non-recursive, sorted for determinism)."""
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"no class folders in {split_dir}: put images in {split_dir}/<class>/")
    files: dict[str, list[Path]] = {}
    for d in class_dirs:
        if (d / "images").is_dir():  # Tiny ImageNet: train/<wnid>/images/
            d = d / "images"
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
        files[d.parent.name if d.name == "images" else d.name] = images
    return files


def _annotated_files(split_dir: Path) -> dict[str, list[Path]] | None:
    """Tiny ImageNet's val/: images/ plus val_annotations.txt (file, class, box); None when the
    folder is not laid out so."""
    notes, images = split_dir / "val_annotations.txt", split_dir / "images"
    if not (notes.is_file() and images.is_dir()):
        return None
    files: dict[str, list[Path]] = {}
    for number, line in enumerate(notes.read_text().splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 2 or not (images / fields[0]).is_file():
            raise DataError(
                f"{notes} line {number} does not name an image of {images} and its "
                "class (file<TAB>class): fix or remove that line"
            )
        files.setdefault(fields[1], []).append(images / fields[0])
    return {cls: sorted(paths) for cls, paths in sorted(files.items())}


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


def _rows(files: dict[str, list[Path]], classes: list[str]) -> FileRows:
    index = {c: i for i, c in enumerate(classes)}
    return [(p, index[c]) for c in sorted(files) for p in files[c]]


def decode_rows(rows: FileRows, size: int, channels: int = 3) -> ImageSet:
    """Every row decoded at `channels` x `size` x `size` into one in-memory ImageSet."""
    pixels = np.empty((len(rows), size, size, channels), dtype=np.uint8)
    for i, (path, _) in enumerate(rows):  # load time only, never in the training loop
        pixels[i] = _read_image(path, size, channels)
    labels = torch.tensor([label for _, label in rows], dtype=torch.int64)
    return ImageSet(torch.from_numpy(pixels).permute(0, 3, 1, 2), labels)


def open_image(path: str | Path, channels: int = 3) -> Image.Image:
    """One image fully decoded to ``L`` (channels 1) or ``RGB``, as runtime's
    preprocess_image converts it; a corrupt or unreadable file raises DataError."""
    from PIL import Image  # imported lazily: only folder datasets need Pillow

    try:
        with Image.open(path) as img:
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")  # palette transparency must go via RGBA
            # convert() forces the full decode, so corrupt files fail here.
            return img.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({exc}): replace or delete the file") from None


def _read_image(path: Path, size: int, channels: int = 3) -> np.ndarray:
    """Decode, centre-crop to square and bilinear-resize one image to [size, size, channels]
    uint8."""
    from PIL import Image

    image = open_image(path, channels)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # crop() before resize(): resize(box=...) would blend in pixels from outside the box.
    square = image.crop((left, top, left + side, top + side))
    pixels = np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    return pixels.reshape(size, size, channels)
