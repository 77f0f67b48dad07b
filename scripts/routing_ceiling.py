"""Where does a routed model lose to its best static child, and what could routing buy at best?

For a finished run with a best static child (``instanas run`` with ``baseline.static_child``),
this script scores the static child and the MobileNetV2 path image by image on the test split
and sets them beside the main model's own per-image results (``test_per_image.npz``):

* ``by_route``: the test images split by the child the main model sends them to (its most used
  child against the others), with each model's accuracy on each part. It tells whether the
  routed model loses on the images of its main route or on those it sends elsewhere.
* ``two_model_routing``: a router that sends a share of the images to the MobileNetV2 path and
  the rest to the static child, two networks trained apart, so nothing is shared between what
  the two routes learn. The images sent on are chosen by the main model's controller (its
  expected latency, highest first), by an oracle (images the static child gets wrong and the
  MobileNetV2 path gets right first) and at random. Latency is by the run's table, the
  controller's fixed cost added to every image. ``only_mbv2_right`` and ``only_static_right``
  are the shares of images only one of the two gets right: what a router could gain at most,
  and what it loses by sending the wrong images on.

Prints one JSON object; ``--table`` turns saved outputs into markdown rows.

    python scripts/routing_ceiling.py runs/fashion-cpu-... > routing-ceiling.json
    python scripts/routing_ceiling.py --table docs/runs/*/routing-ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from instanas.config import load_config_file
from instanas.models.metagraph import mbv2_path_network
from instanas.pipeline import open_run
from instanas.stages.common import latency_table, load_stage, stage_path
from instanas.stages.evaluate import static_child_network

SHARES = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)


@torch.no_grad()
def correct_per_image(ctx, network) -> tuple[np.ndarray, np.ndarray]:
    """Whether ``network`` classifies each test image correctly, and the labels, in the
    split's order."""
    network = network.cpu().eval().deploy()
    hits, labels = [], []
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        hits.append((network(batch.images.contiguous()).argmax(1) == batch.labels).numpy())
        labels.append(batch.labels.numpy())
    return np.concatenate(hits), np.concatenate(labels)


def by_route(per_image: dict, static: np.ndarray, mbv2: np.ndarray) -> list[dict]:
    """Each model's accuracy on the images of the main model's most used child and the rest."""
    children, child_of = np.unique(
        per_image["policies"].reshape(len(static), -1), axis=0, return_inverse=True
    )
    top = child_of.reshape(-1) == np.bincount(child_of.reshape(-1)).argmax()
    parts = []
    for name, rows in (("main model's most used child", top), ("its other children", ~top)):
        if not rows.any():
            continue
        parts.append(
            {
                "images": name,
                "share": float(rows.mean()),
                "main_model_table_ms": float(per_image["predicted_ms"][rows].mean()),
                "accuracy": {
                    "instanas": float(per_image["correct"][rows].mean()),
                    "static-child": float(static[rows].mean()),
                    "mbv2-path": float(mbv2[rows].mean()),
                },
            }
        )
    return parts


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a random positive scores above a random negative."""
    if positive.all() or not positive.any():
        return None
    ranks = score.argsort(kind="stable").argsort() + 1.0
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def two_model_routing(
    orders: dict[str, np.ndarray], static: np.ndarray, mbv2: np.ndarray, ms: dict[str, float]
) -> dict:
    """Accuracy and table ms when the first ``share`` of each order runs the MobileNetV2 path."""
    curves = {}
    for router, order in orders.items():
        points = []
        for share in SHARES:
            routed = np.zeros(len(static), dtype=bool)
            routed[order[: round(share * len(static))]] = True
            accuracy = np.where(routed, mbv2, static).mean()
            table_ms = ms["static"] + share * (ms["mbv2"] - ms["static"]) + ms["controller"]
            points.append({"share": share, "accuracy": float(accuracy), "table_ms": table_ms})
        curves[router] = points
    return curves


def table_rows(paths: list[Path], share: float = 0.2) -> str:
    """Markdown rows of saved outputs: accuracies, the disagreement, the router's AUCs and the
    two-model routing at ``share`` by the controller and at random."""
    rows = []
    for path in paths:
        report = json.loads(path.read_text())
        acc, ms = report["test_accuracy"], report["table_ms"]
        at = {
            router: next(p["accuracy"] for p in curve if p["share"] == share)
            for router, curve in report["two_model_routing"].items()
        }
        cells = [
            path.parent.name,
            " / ".join(f"{100 * acc[m]:.2f}%" for m in ("instanas", "static-child", "mbv2-path")),
            f"{ms['static']:.3f} / {ms['mbv2']:.3f}",
            f"{100 * report['only_mbv2_right']:.1f}% / {100 * report['only_static_right']:.1f}%",
            " / ".join(
                "n/a" if auc is None else f"{auc:.2f}"
                for auc in (
                    report["auc_only_mbv2_right_by_controller"],
                    report["auc_only_static_right_by_controller"],
                )
            ),
            f"{100 * at['controller_expected_ms']:.2f}% / {100 * at['random']:.2f}%",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def reference_correctness(ctx, run_dir: Path, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per test image: is the best static child right, is the MobileNetV2 path right."""
    if not stage_path(ctx, "static-child").exists():
        raise SystemExit(f"{run_dir} has no best static child: run it with static_child on")
    mbv2_path_net = mbv2_path_network(ctx.space)
    load_stage(ctx, "baseline", {"network": mbv2_path_net})
    static, order = correct_per_image(ctx, static_child_network(ctx))
    if not np.array_equal(order, labels):
        raise SystemExit("test_per_image.npz lists the test images in another order")
    return {"static": static, "mbv2": correct_per_image(ctx, mbv2_path_net)[0]}


def ceiling_report(run_dir: Path, seed: int) -> dict:
    ctx = open_run(load_config_file(run_dir / "config.yaml"), run_dir, command="routing-ceiling")
    per_image = dict(np.load(run_dir / "test_per_image.npz"))
    right = reference_correctness(ctx, run_dir, per_image["labels"])
    static, mbv2 = right["static"], right["mbv2"]
    results = json.loads((run_dir / "results.json").read_text())["models"]
    ms = {
        "static": results["static-child"]["table_latency_ms"],
        "mbv2": results["mbv2-path"]["table_latency_ms"],
        "controller": latency_table(ctx).unit_ms("controller"),
    }
    gain = mbv2.astype(int) - static.astype(int)  # +1: only the MobileNetV2 path is right
    score = per_image["expected_ms"]
    orders = {
        "controller_expected_ms": np.argsort(-score, kind="stable"),
        "oracle": np.argsort(-gain, kind="stable"),
        "random": np.random.default_rng(seed).permutation(len(static)),
    }
    accuracy = {"instanas": per_image["correct"], "static-child": static, "mbv2-path": mbv2}
    return {
        "run": str(run_dir),
        "test_accuracy": {name: float(hits.mean()) for name, hits in accuracy.items()},
        "table_ms": {"instanas": results["instanas"]["table_latency_ms"], **ms},
        "only_mbv2_right": float((gain > 0).mean()),
        "only_static_right": float((gain < 0).mean()),
        # Does the controller's score pick out the images the costlier network fixes?
        "auc_only_mbv2_right_by_controller": roc_auc(score, gain > 0),
        "auc_only_static_right_by_controller": roc_auc(score, gain < 0),
        "by_route": by_route(per_image, static, mbv2),
        "two_model_routing": two_model_routing(orders, static, mbv2, ms),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random router")
    parser.add_argument(
        "--table", type=Path, nargs="+", help="print markdown rows of saved outputs instead"
    )
    args = parser.parse_args()
    if args.table:
        print(table_rows(args.table))
    elif args.run_dir is None:
        parser.error("give RUN_DIR, or --table JSON ...")
    else:
        print(json.dumps(ceiling_report(args.run_dir, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
