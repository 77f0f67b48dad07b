"""Which test images each child of a run's main model serves: one markdown row per child.

Reads RUN_DIR/test_per_image.npz (written by every run's evaluation) and, for the most used
children, prints the share of test images, accuracy, mean table latency, modules switched on
and the classes served most. Children are listed cheapest first.

python scripts/children_table.py runs/fashion-cpu [--top 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def children(per_image: dict, top: int) -> list[dict]:
    """The ``top`` most used children: images, accuracy, table ms, modules, class counts."""
    policies = per_image["policies"].reshape(len(per_image["labels"]), -1)
    keys, inverse, counts = np.unique(policies, axis=0, return_inverse=True, return_counts=True)
    rows = []
    for index in np.argsort(-counts)[:top]:
        served = inverse.reshape(-1) == index
        rows.append(
            {
                "images": int(counts[index]),
                "accuracy": float(per_image["correct"][served].mean()),
                "table_ms": float(per_image["predicted_ms"][served].mean()),
                "modules": int(keys[index].sum()),
                "classes": np.bincount(per_image["labels"][served]).tolist(),
            }
        )
    return sorted(rows, key=lambda r: r["table_ms"])


def markdown(rows: list[dict], classes: list[str], total: int) -> str:
    lines = [
        "| images | share | accuracy | table ms | modules on | classes served most |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        order = np.argsort(r["classes"])[::-1][:3]
        most = ", ".join(f"{classes[c]} {r['classes'][c]}" for c in order if r["classes"][c])
        lines.append(
            f"| {r['images']} | {100 * r['images'] / total:.1f}% | {100 * r['accuracy']:.1f}% "
            f"| {r['table_ms']:.3f} | {r['modules']} | {most} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--top", type=int, default=10, help="children to list (most used)")
    args = parser.parse_args()
    path = args.run_dir / "test_per_image.npz"
    if not path.exists():
        print(f"error: {path} not found: give a run directory that finished evaluation")
        return 2
    per_image = dict(np.load(path))
    results = json.loads((args.run_dir / "results.json").read_text())
    classes = results.get("classes") or [str(c) for c in range(per_image["labels"].max() + 1)]
    print(markdown(children(per_image, args.top), classes, len(per_image["labels"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
