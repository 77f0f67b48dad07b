"""Write Fashion-MNIST as a class-per-folder PNG tree, as a user's own data set would look.

A seeded random subset of the training images (the same share of every class) goes to
OUT/train/<class>/, the whole test set to OUT/test/<class>/, optionally resized (area) to
SIZE x SIZE. For checking what `instanas run --data.dataset folder` does on small data sets.

    python scripts/fashion_folder_tree.py --out data/fashion-8k --train 8000
    python scripts/fashion_folder_tree.py --out data/fashion-4k-20px --train 4000 --size 20
    instanas run --data.dataset folder --data.root data/fashion-4k-20px --data.flip false
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from instanas.data import FASHION_MNIST_CLASSES, load_dataset


def write_split(folder: Path, images: np.ndarray, labels: np.ndarray, size: int | None) -> None:
    for name in FASHION_MNIST_CLASSES:
        (folder / name.replace("/", "-")).mkdir(parents=True, exist_ok=True)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        image = Image.fromarray(pixels)
        if size is not None and size != image.width:
            image = image.resize((size, size), Image.BOX)
        name = FASHION_MNIST_CLASSES[int(label)].replace("/", "-")
        image.save(folder / name / f"{i:05d}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="new folder for the tree")
    parser.add_argument("--train", type=int, required=True, help="training images to keep")
    parser.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE")
    parser.add_argument(
        "--root", default=None, help="Fashion-MNIST IDX folder (default: the Debian package's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} exists and is not empty: choose a new --out", file=sys.stderr)
        return 2
    bundle = load_dataset("fashion-mnist", args.root, seed=args.seed)
    # All 60,000 training images: the loader's validation split goes back in.
    train_images = np.concatenate(
        [bundle.train.images[:, 0].cpu().numpy(), bundle.val.images[:, 0].cpu().numpy()]
    )
    train_labels = np.concatenate(
        [bundle.train.labels.cpu().numpy(), bundle.val.labels.cpu().numpy()]
    )
    if not 0 < args.train <= len(train_labels):
        print(f"--train is {args.train}: give 1 to {len(train_labels)}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    keep = []
    for c in range(len(FASHION_MNIST_CLASSES)):
        members = np.flatnonzero(train_labels == c)
        share = round(args.train * len(members) / len(train_labels))
        keep.append(rng.choice(members, size=share, replace=False))
    keep = np.sort(np.concatenate(keep))
    write_split(args.out / "train", train_images[keep], train_labels[keep], args.size)
    write_split(
        args.out / "test",
        bundle.test.images[:, 0].cpu().numpy(),
        bundle.test.labels.cpu().numpy(),
        args.size,
    )
    print(f"{args.out}: {len(keep)} training and {len(bundle.test.labels)} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
