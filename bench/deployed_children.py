"""How many children should the main model deploy? Accuracy and deployed latency per count.

For a finished run, the fine-tuned controller's policies on the validation split rank its
children; for each count K the main model deploys the K most used and routes every other
policy to the nearest of them (``controller.deployed_children``). Printed per K: test
accuracy (every test image through its mapped child), the share of test images whose own
policy is deployed, and the routed model's deployed latency (onnxruntime, 1 thread, as
``instanas predict`` runs it) on a stream of test images, timed side by side with the
MobileNetV2 path of the run in one loop; the ratio to it is what to compare between runs. K = 0
is every child the controller picks on the validation split (at most 64).

    .venv/bin/python bench/deployed_children.py runs/m0 --counts 1 2 4 8 0 --images 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from instanas.config import load_config_file
from instanas.deploy.inference import load_network
from instanas.latency.backends import OnnxRuntimeBackend
from instanas.latency.side_by_side import measure_per_image
from instanas.pipeline import open_run
from instanas.space import ChildArchitecture
from instanas.stages.common import finetuned_predictor, validation_children

_ALL = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8, 0])
    parser.add_argument("--images", type=int, default=1000, help="test images timed")
    args = parser.parse_args()
    config = load_config_file(args.run_dir / "config.yaml")
    ctx = open_run(config, args.run_dir, command="deployed-children").on_cpu()
    predictor = finetuned_predictor(ctx, escalate=False)
    predictor.set_children(None)
    ranked = validation_children(ctx, predictor, _ALL)
    test = [(b.images.cpu(), b.labels.cpu()) for b in ctx.batches(ctx.data.test, 500, train=False)]
    backend = OnnxRuntimeBackend(config.latency.threads)
    calls = {
        "mbv2-path": backend.model_image_call(load_network(ctx.run_dir, "mbv2-path", ctx.space))
    }
    free = [str(ChildArchitecture.from_policy(p)) for images, _ in test
            for p in predictor.policies(images)]  # fmt: skip
    total = len(free)
    rows = {}
    for count in args.counts:
        children = ranked[:count] if count else ranked
        predictor.set_children(children)
        names = {str(c) for c in children}
        own = sum(c in names for c in free)
        correct = sum(int((predictor(images).argmax(1) == labels).sum()) for images, labels in test)
        rows[count] = {"children": len(children), "test_accuracy": correct / total,
                       "own_policy_share": own / total}  # fmt: skip
        calls[f"K={count}"] = backend.model_image_call(predictor.without_escalation(), children)
    timed = torch.cat([images for images, _ in test])[: args.images].contiguous()
    cfg = config.latency
    measured = measure_per_image(calls, timed, cfg.threads, cfg.warmup, config.seed,
                                 burst=backend.burst)  # fmt: skip
    reference = measured["mbv2-path"]["mean"]
    for count, row in rows.items():
        ms = measured[f"K={count}"]["mean"]
        row.update(latency_ms=ms, vs_mbv2_path=ms / reference)
    print(json.dumps({"run": str(args.run_dir), "mbv2_path_ms": reference,
                      "runtime": backend.runtime_version(), "counts": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
