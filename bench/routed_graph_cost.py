"""What the controller and the routing cost the deployed path of a trained run, in onnxruntime.

    .venv/bin/python bench/routed_graph_cost.py RUN_DIR [--rounds 300]

For the run's main model (escalation left out), on a validation image the controller sends to
its most used child: that child's graph alone, the controller's graph alone and with the
runtime's routing over every child (``instanas.runtime.Router``), and the deployed path
(``instanas.runtime.RoutedSessions``: the controller's session, the routing, the child's
session) with the top 1, 8, 32 and all children exported, each timed at batch 1 in onnxruntime
(1 thread, IO binding, warm), interleaved in shuffled rounds. The gap between the child alone
and the deployed path is what the controller and the routing cost. (At commit 743b000 this
script timed the one-graph form, the child selected by If nodes; at e32b311 the routing was
ten nodes inside the controller's graph.)
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from instanas.data import images_of
from instanas.deploy.inference import load
from instanas.deploy.source import run_data
from instanas.latency.backends import OnnxRuntimeBackend, image_call
from instanas.latency.timing import cpu_threads, processor_name, time_units
from instanas.models.onnx_graph import (
    deployed_controller_model,
    routed_graphs,
    router_for,
    static_model,
)
from instanas.runtime import BoundSession
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

    def deployed(graphs):
        path = ort.routed_sessions(graphs)
        return lambda: path(x.numpy())

    controller = BoundSession(ort.session(deployed_controller_model(predictor.controller, space)))
    router, image = router_for(space, children), x.numpy()
    calls = {
        "most used child alone": timed(
            static_model(predictor.metagraph.materialize(children[0]).eval().deploy())
        ),
        "controller graph alone": lambda: controller(image),
        f"controller + routing over {len(children)} children": lambda: router(*controller(image)),
        "deployed path, top 1 child (controller kept)": deployed(
            routed_graphs(predictor, children[:1], keep_controller=True)
        ),
    }
    for k in sorted({min(k, len(children)) for k in (8, 32, len(children))} - {1}):
        calls[f"deployed path, top {k} children"] = deployed(routed_graphs(predictor, children[:k]))
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
