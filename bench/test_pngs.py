"""Write a run's test images as PNG files, or score an ``instanas predict`` CSV against them.

    .venv/bin/python bench/test_pngs.py write RUN_DIR OUT_DIR [--count 1000]
    .venv/bin/instanas predict RUN_DIR|EXPORT_DIR OUT_DIR -o predictions.csv
    .venv/bin/python bench/test_pngs.py score OUT_DIR predictions.csv [--run RUN_DIR]

Files are named ``INDEX_LABEL.png`` (index in the test split, label index) and stored exactly
as the data set holds them (uint8, the model's input size, gray or RGB), so that predict's
preprocessing must give back the training pixels. ``score`` prints accuracy against the
labels and, with ``--run``, agreement with the eager model on the same test images.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from PIL import Image

from instanas.deploy.export import run_data


def write(run_dir: Path, out: Path, count: int) -> None:
    _, data = run_data(run_dir)
    images, labels = data.test.images[:count], data.test.labels[:count]
    out.mkdir(parents=True, exist_ok=False)  # never mix with files already there
    for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(pixels).save(out / f"{i:05d}_{label}.png")
    print(f"wrote {len(images)} PNGs to {out}")


def score(folder: Path, predictions: Path, run_dir: Path | None) -> None:
    rows = list(csv.DictReader(predictions.open()))
    good = [r for r in rows if r["class_index"]]
    truth = [int(Path(r["path"]).stem.split("_")[1]) for r in good]
    hits = sum(int(r["class_index"]) == t for r, t in zip(good, truth))
    print(
        f"{len(rows)} rows, {len(rows) - len(good)} unreadable, accuracy "
        f"{100 * hits / max(len(good), 1):.2f}% on {len(good)} images"
    )
    if run_dir is None:
        return
    import instanas

    model = instanas.load(run_dir)
    _, data = run_data(run_dir)
    index = [int(Path(r["path"]).stem.split("_")[0]) for r in good]
    with torch.inference_mode():
        eager = model.predict(data.test.images[index]).tolist()
    same = sum(int(r["class_index"]) == e for r, e in zip(good, eager))
    print(f"predictions equal to the eager model on the in-memory test images: {same}/{len(good)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write")
    w.add_argument("run_dir", type=Path)
    w.add_argument("out", type=Path)
    w.add_argument("--count", type=int, default=1000)
    s = sub.add_parser("score")
    s.add_argument("folder", type=Path)
    s.add_argument("predictions", type=Path)
    s.add_argument("--run", type=Path, default=None)
    args = parser.parse_args()
    if args.command == "write":
        write(args.run_dir, args.out, args.count)
    else:
        score(args.folder, args.predictions, args.run)


if __name__ == "__main__":
    main()
