"""Training-step time: sparse execution vs the dense masked reference, side by side.

    .venv/bin/python bench/train_step.py [--steps 12] [--batch 256] [--preset fashion-cpu]

For each policy density, both paths train the same meta-graph on the same random batch with a
fresh random policy every step (as in search), alternating step by step, and the median step
times are compared. Prints the machine, thread count and sparse/dense speed ratios.

The last column is a floor no execution strategy of this network can beat: a step of the whole
meta-graph on ``density * batch`` images (every module, no gathers), i.e. the work of the selected
rows with no overhead. Where it is far above ``density`` times the full-batch step, the step is
dominated by per-operator costs that do not shrink with the number of rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from instanas.config import load_preset
from instanas.latency import processor_name
from instanas.metagraph import MetaGraph


def step_time(graph: MetaGraph, optimizer, x, y, policy, execution: str) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(graph(x, policy, execution=execution), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fashion-cpu")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_preset(args.preset)
    space = config.search_space(1, 28, 10)
    graph = MetaGraph(space).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(graph.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    shape = (args.batch, space.num_cells, space.num_modules)
    print(f"machine: {processor_name()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, preset {args.preset}, batch {args.batch}")
    print(f"{'density':>8} {'sparse ms':>10} {'dense ms':>10} {'dense/sparse':>13} "
          f"{'floor ms':>9} {'dense/floor':>12}")
    for density in (1.0, 0.5, 0.25):
        rows = max(1, round(density * args.batch))
        every = torch.ones(shape, dtype=torch.bool)
        times = {"sparse": [], "dense": [], "floor": []}
        for i in range(args.steps + args.warmup):
            policy = torch.rand(shape) < density
            runs = [("sparse", x, y, policy), ("dense", x, y, policy),
                    ("floor", x[:rows], y[:rows], every[:rows])]
            for name, xs, ys, ps in runs if i % 2 == 0 else runs[::-1]:
                execution = "dense" if name == "dense" else "sparse"
                t = step_time(graph, optimizer, xs, ys, ps, execution)
                if i >= args.warmup:  # the first steps build kernels
                    times[name].append(t)
        sparse, dense, floor = (statistics.median(times[k]) * 1e3
                                for k in ("sparse", "dense", "floor"))
        print(f"{density:>8.2f} {sparse:>10.1f} {dense:>10.1f} {dense / sparse:>12.2f}x "
              f"{floor:>9.1f} {dense / floor:>11.2f}x")


if __name__ == "__main__":
    main()
