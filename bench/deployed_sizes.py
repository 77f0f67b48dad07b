"""What architecture costs in the deployed runtime at each width (behind fashion-cpu's size).

    .venv/bin/python bench/deployed_sizes.py [--widths 0.25 0.5 1.0] [--rounds 100]

For the fashion-cpu space (28 px, stride-2 stem) at each width, the MobileNetV2 path, the minimum
network with each candidate as the forced module, the child with one module in every cell, and
the controllers fashion-cpu could use, each written as the ONNX graph an export holds and timed
at batch 1 in onnxruntime (1 thread, IO binding, warm, every graph interleaved in shuffled
rounds). Prints ms and the ratio to the MobileNetV2 path of the same width, and eager PyTorch for
the path and the minimum network beside it. Untrained weights: latency does not depend on them.
"""

from __future__ import annotations

import argparse

import torch

from instanas.config import load_preset
from instanas.latency.backends import EagerBackend, OnnxRuntimeBackend
from instanas.latency.timing import cpu_threads, processor_name, time_units
from instanas.models import build_models
from instanas.models.metagraph import mbv2_path
from instanas.models.onnx_graph import controller_model
from instanas.space import ChildArchitecture, ControllerSpec

CONTROLLERS = {
    "linear, 14 px": ControllerSpec(14, ()),
    "1 block (8), 7 px": ControllerSpec(7, (8,)),
    "2 blocks (8, 16), 7 px": ControllerSpec(7, (8, 16)),
}


def networks(width: float) -> tuple[dict, dict]:
    """(name -> deployed child network, name -> deployed controller) at ``width``."""
    config = load_preset("fashion-cpu")
    config.space.width = width
    space = config.search_space(1, 28, 10)
    metagraph, _ = build_models(space, ControllerSpec(14, ()))
    forced = [c.forced_default for c in space.cells()]
    children = {"mbv2-path": mbv2_path(space)}
    for module in range(space.num_modules):
        children[f"min-net, forced {module}"] = ChildArchitecture(
            tuple((module,) if f else () for f in forced), space.num_modules
        )
        children[f"module {module} in every cell"] = ChildArchitecture.uniform(
            space.num_cells, module, space.num_modules
        )
    nets = {n: metagraph.eval().materialize(c).deploy() for n, c in children.items()}
    ctrls = {n: build_models(space, spec)[1].eval().deploy() for n, spec in CONTROLLERS.items()}
    return nets, ctrls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    ort, eager = OnnxRuntimeBackend(1), EagerBackend()
    image = (1, 1, 28, 28)
    calls, eager_calls = {}, {}
    for width in args.widths:
        nets, ctrls = networks(width)
        for name, net in nets.items():
            calls[(width, name)] = ort.call(net, image)
            if name in ("mbv2-path", "min-net, forced 1", "min-net, forced 4"):
                eager_calls[(width, name)] = eager.call(net, image)
        for name, ctrl in ctrls.items():
            calls[(width, f"controller: {name}")] = ort.model_call(
                controller_model(ctrl, 28), image
            )
    with cpu_threads(1):
        deployed = time_units(calls, warmup=5, repeats=args.rounds, burst=ort.burst)
        eagerly = time_units(eager_calls, warmup=5, repeats=args.rounds // 2)
    print(f"{processor_name()}, 1 thread, onnxruntime (CPU provider, IO binding, warm)")
    print("| width | graph | onnxruntime ms | x MobileNetV2 path | eager ms |")
    print("|---|---|---|---|---|")
    for (width, name), stats in deployed.items():
        path = deployed[(width, "mbv2-path")].median_ms
        e = eagerly.get((width, name))
        print(f"| {width:g} | {name} | {stats.median_ms:.4f} | {stats.median_ms / path:.2f} | "
              f"{'' if e is None else f'{e.median_ms:.3f}'} |")  # fmt: skip


if __name__ == "__main__":
    main()
