"""What can escalation give? Test accuracy of the routed child with a share of images escalated.

For a finished run, the fine-tuned main model's routed child (escalation off) and the run's
MobileNetV2 path answer every test image. Per share s, the s least confident images (top
softmax probability of the child) are escalated in two forms: the larger network's answer
replaces the child's (what the run deploys), or the two softmax outputs are averaged; and the
same share escalated at random (seeded), both forms. Also printed: each network alone and the
two averaged on every image (the bound of the averaging form). Accuracy only: no timing.

``ceiling`` says what any escalation to this larger network can give: the share of test images
only the larger network gets right (all that replacing can fix) and only the child gets right
(what replacing can break); per share, both networks' accuracy on the images escalated by
confidence, and the best any rule could do with that share (an oracle that escalates only
images the larger network fixes).

    .venv/bin/python bench/escalation_forms.py runs/q0 --shares 0.02 0.04 0.06 0.1 0.2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from instanas.config import load_config_file
from instanas.deploy.inference import load_network
from instanas.pipeline import open_run
from instanas.stages.common import finetuned_predictor


@torch.inference_mode()
def test_probabilities(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax of the routed child and of the MobileNetV2 path on the test split, and labels."""
    config = load_config_file(run_dir / "config.yaml")
    ctx = open_run(config, run_dir, command="escalation-forms").on_cpu()
    child = finetuned_predictor(ctx, escalate=False)
    larger = load_network(ctx.run_dir, "mbv2-path", ctx.space).deploy().eval()
    small, large, labels = [], [], []
    for batch in ctx.batches(ctx.data.test, 500, train=False):
        small.append(torch.softmax(child(batch.images), 1))
        large.append(torch.softmax(larger(batch.images), 1))
        labels.append(batch.labels)
    return tuple(torch.cat(x).cpu().numpy() for x in (small, large, labels))


def accuracies(small, large, labels, escalated: np.ndarray) -> dict[str, float]:
    """Accuracy (%) when the ``escalated`` rows are replaced by, or averaged with, ``large``."""
    replaced = np.where(escalated, large.argmax(1), small.argmax(1))
    averaged = np.where(escalated, (small + large).argmax(1), small.argmax(1))
    return {
        "replace": 100 * float((replaced == labels).mean()),
        "average": 100 * float((averaged == labels).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.02, 0.04, 0.06, 0.1, 0.2])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random escalation")
    args = parser.parse_args()
    small, large, labels = test_probabilities(args.run_dir)
    unsure_first = np.argsort(small.max(1), kind="stable")
    rng = np.random.default_rng(args.seed)
    rows = {}
    for share in args.shares:
        count = int(round(share * len(labels)))
        by_confidence = np.zeros(len(labels), bool)
        by_confidence[unsure_first[:count]] = True
        at_random = np.zeros(len(labels), bool)
        at_random[rng.choice(len(labels), count, replace=False)] = True
        rows[f"{share:g}"] = {
            "by_confidence": accuracies(small, large, labels, by_confidence),
            "at_random": accuracies(small, large, labels, at_random),
        }
    rows_ceiling = ceiling(small, large, labels, unsure_first, args.shares)
    alone = {
        "child": 100 * float((small.argmax(1) == labels).mean()),
        "mbv2_path": 100 * float((large.argmax(1) == labels).mean()),
        "both_averaged": 100 * float(((small + large).argmax(1) == labels).mean()),
    }
    report = {"run": str(args.run_dir), "alone": alone, "shares": rows, "ceiling": rows_ceiling}
    print(json.dumps(report, indent=1))


def ceiling(small, large, labels, unsure_first: np.ndarray, shares) -> dict:
    """What escalating to ``large`` can give at all, and what confidence gets of it."""
    child_right, large_right = small.argmax(1) == labels, large.argmax(1) == labels
    fixable = float((~child_right & large_right).mean())
    per_share = {}
    for share in shares:
        escalated = unsure_first[: int(round(share * len(labels)))]
        per_share[f"{share:g}"] = {
            "child_on_escalated": 100 * float(child_right[escalated].mean()),
            "larger_on_escalated": 100 * float(large_right[escalated].mean()),
            "oracle_gain_points": 100 * min(share, fixable),
        }
    return {
        "only_larger_right": 100 * fixable,
        "only_child_right": 100 * float((child_right & ~large_right).mean()),
        "both_wrong": 100 * float((~child_right & ~large_right).mean()),
        "by_confidence": per_share,
    }


if __name__ == "__main__":
    main()
