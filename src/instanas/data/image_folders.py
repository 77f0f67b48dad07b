"""Class-per-folder image trees (root/<class>/*.png, or root/train/<class>/... with a test or
val folder beside it). list_folder finds the files and their classes; decode_rows reads them
with Pillow, centre-cropped and resized, into memory (data.streaming reads them lazily instead).

The Tiny ImageNet layout is read as it ships: train/<wnid>/images/*.JPEG, and val/images/ with
val/val_annotations.txt naming each image's class."""

from __future__ import annotations

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
DEFAULT_FOLDER_IMAGE_SIZE = 32

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


def decode_rows(rows: FileRows, size: int) -> ImageSet:
    """Every row decoded at `size` x `size` into one in-memory ImageSet."""
    pixels = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(rows):  # load time only, never in the training loop
        pixels[i] = _read_image(path, size)
    labels = torch.tensor([label for _, label in rows], dtype=torch.int64)
    return ImageSet(torch.from_numpy(pixels).permute(0, 3, 1, 2), labels)


def open_rgb(path: str | Path) -> Image.Image:
    """One image fully decoded to RGB; a corrupt or unreadable file raises DataError."""
    from PIL import Image  # imported lazily: only folder datasets need Pillow

    try:
        with Image.open(path) as img:
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")  # palette transparency must go via RGBA
            return img.convert("RGB")  # forces the full decode, so corrupt files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({exc}): replace or delete the file") from None


def _read_image(path: Path, size: int) -> np.ndarray:
    """Decode, centre-crop to square and bilinear-resize one image to [size, size, 3] uint8."""
    from PIL import Image

    rgb = open_rgb(path)
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # crop() before resize(): resize(box=...) would blend in pixels from outside the box.
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
