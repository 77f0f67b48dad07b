"""How predictable is "the cheapest child is already right" from what the controller sees?

Instance-aware routing can only pay where an image's difficulty can be told from the
controller's input before the network runs. For a run with a searched (or fine-tuned) model this
script labels every validation and test image by whether the cheapest child (only the forced
defaults, BatchNorm re-estimated for it) classifies it correctly, then reports ROC AUCs on the
test split for predicting the *hard* images (cheapest child wrong):

* ``controller_expected_ms``: the trained controller's expected cell latency, sum of p x cost;
* ``thumbnail_logistic``: a logistic regression on the controller's input (the resized
  thumbnail), fitted on the validation split: what any controller of that input could learn
  with a linear read-out;
* ``cheapest_child_confidence``: 1 - the cheapest child's own top softmax probability, a
  reference that needs the child to run first (a cascade), not available to the controller.

An AUC of 0.5 means no signal. It also reports how much the controller's probabilities vary
from image to image (``controller_probability_spread``: the standard deviation of each module's
probability over the test images, largest and mean over the modules): a controller whose
probabilities hardly move picks the same child for every image, whatever its input tells.
Prints one JSON object.

    python scripts/routing_signal.py runs/fashion-cpu-...
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from instanas.config import load_config_file
from instanas.pipeline import open_run
from instanas.search.policy import calibrate
from instanas.stages.common import latency_table, load_stage, new_models, stage_path


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = score[positive].double(), score[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1
    # Average ranks of ties are approximated by the sort order; scores here are continuous.
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def cheapest_child_pass(ctx, metagraph, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness and top softmax probability of the forced-defaults-only child."""
    correct, confidence = [], []
    for batch in ctx.batches(data, 500, train=False):
        empty = torch.zeros(
            len(batch.labels), ctx.space.num_cells, ctx.space.num_modules, dtype=torch.bool
        )
        probs = F.softmax(metagraph(batch.images, empty), 1)
        correct.append((probs.argmax(1) == batch.labels).cpu())
        confidence.append(probs.max(1).values.cpu())
    return torch.cat(correct), torch.cat(confidence)


@torch.no_grad()
def controller_views(ctx, controller, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The controller's probabilities per image and the thumbnail it sees (flattened)."""
    probs, thumbs = [], []
    size = controller.spec.input_size
    for batch in ctx.batches(data, 500, train=False):
        probs.append(controller(batch.images).cpu())
        thumbs.append(F.adaptive_avg_pool2d(batch.images.float(), size).flatten(1).cpu())
    return torch.cat(probs), torch.cat(thumbs)


def logistic_scores(train_x, train_y, test_x, steps: int = 200) -> torch.Tensor:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, t = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps)

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight + bias, train_y.float())
        loss = loss + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (t @ weight + bias).detach()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    config = load_config_file(args.run_dir / "config.yaml")
    ctx = open_run(config, args.run_dir, command="routing-signal")
    stage = "finetune" if stage_path(ctx, "finetune").exists() else "search"
    metagraph, controller = new_models(ctx)
    load_stage(ctx, stage, {"metagraph": metagraph, "controller": controller})
    metagraph, controller = ctx.prepare(metagraph), ctx.prepare(controller).eval()
    cheapest = copy.deepcopy(metagraph)
    calibrate(
        ctx,
        cheapest,
        lambda x: torch.zeros(len(x), ctx.space.num_cells, ctx.space.num_modules, dtype=torch.bool),
        purpose="routing-signal/calibrate",
        epoch=0,
    )
    module_ms = latency_table(ctx).module_ms()
    views = {}
    for split in ("val", "test"):
        data = getattr(ctx.data, split)
        correct, confidence = cheapest_child_pass(ctx, cheapest, data)
        probs, thumbs = controller_views(ctx, controller, data)
        views[split] = (correct, confidence, probs, thumbs)
    correct, confidence, probs, thumbs = views["test"]
    expected = (probs * module_ms).flatten(1).sum(1)
    spread = probs.flatten(1).std(0)
    hard = ~correct
    val_hard = ~views["val"][0]
    logistic = logistic_scores(views["val"][3], val_hard, thumbs)
    print(
        json.dumps(
            {
                "run": str(args.run_dir),
                "weights": stage,
                "cheapest_child_test_accuracy": float(correct.float().mean()),
                "controller_probability_spread": {
                    "max": float(spread.max()),
                    "mean": float(spread.mean()),
                },
                "auc_hard_images": {
                    "controller_expected_ms": roc_auc(expected, hard),
                    "thumbnail_logistic": roc_auc(logistic, hard),
                    "cheapest_child_confidence": roc_auc(1 - confidence, hard),
                },
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
