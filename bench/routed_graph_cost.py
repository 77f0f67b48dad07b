"""What the routing costs inside the deployed graph of a trained run, in onnxruntime.

    .venv/bin/python bench/routed_graph_cost.py RUN_DIR [--rounds 300]

For the run's main model (escalation left out), on a validation image the controller sends to
its most used child: that child's graph alone, the controller with the routing over every child
as a graph of its own, the child with the controller in one graph, and the routed graph with the
top 2, 8 and all children (If nodes select the child), every graph timed at batch 1 in
onnxruntime (1 thread, IO binding, warm), interleaved in shuffled rounds. The gap between the
child alone and the routed graphs is what routing costs the deployed model.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from onnx import TensorProto

from instanas.data import images_of
from instanas.deploy.inference import load
from instanas.deploy.source import run_data
from instanas.latency.backends import OnnxRuntimeBackend, image_call
from instanas.latency.timing import cpu_threads, processor_name, time_units
from instanas.models.onnx_graph import (
    INPUT,
    GraphBuilder,
    controller_logits,
    image_input,
    routed_model,
    routing_scores,
)
from instanas.space import ChildArchitecture


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--images", type=int, default=2000, help="validation images counted")
    args = parser.parse_args()
    model = load(args.run)
    predictor, space = model.predictor.without_escalation(), model.space
    _, data = run_data(args.run, space)
    images = model.normalise(images_of(data.val, torch.arange(min(args.images, len(data.val)))))
    with torch.inference_mode():
        policies = [str(ChildArchitecture.from_policy(p)) for p in predictor.policies(images)]
    counts = Counter(policies)
    children = [ChildArchitecture.from_string(c) for c, _ in counts.most_common()]
    x = images[policies.index(str(children[0])) :][:1].contiguous()
    ort = OnnxRuntimeBackend(1)

    def timed(graph):
        call = image_call(ort.session(graph))
        return lambda: call(x)

    b = GraphBuilder()
    logits = controller_logits(b, INPUT, predictor.controller, space.input_size)
    index = routing_scores(b, logits, children, space.forced_mask().tolist(), space.forced_module)
    shape = image_input(space.input_channels, space.input_size, 1)
    calls = {
        "most used child alone": timed(routed_model(predictor, children[:1])),
        f"controller + routing over {len(children)} children": timed(
            b.model([shape], [(index, TensorProto.INT64)])
        ),
        "most used child + controller, one graph": timed(
            routed_model(predictor, children[:1], keep_controller=True)
        ),
    }
    for k in sorted({min(k, len(children)) for k in (2, 8, len(children))} - {1}):
        calls[f"routed graph, top {k} children"] = timed(routed_model(predictor, children[:k]))
    with cpu_threads(1):
        stats = time_units(calls, warmup=5, repeats=args.rounds, burst=ort.burst)
    alone = stats["most used child alone"].median_ms
    top = counts.most_common(1)[0][1]
    print(f"{processor_name()}, 1 thread, onnxruntime; {len(children)} children on "
          f"{len(images)} validation images, the most used on {top}")  # fmt: skip
    print("| graph | median ms | x child alone |")
    print("|---|---|---|")
    for name, s in stats.items():
        print(f"| {name} | {s.median_ms:.4f} | {s.median_ms / alone:.2f} |")


if __name__ == "__main__":
    main()
