"""Training-step time: sparse execution vs the dense masked reference, side by side.

    .venv/bin/python bench/train_step.py [--steps 12] [--batch 256] [--preset fashion-cpu]

For each policy density, both paths train the same meta-graph on the same random batch with a
fresh random policy every step (as in search), alternating step by step, and the median step
times are compared. Prints the machine, thread count and sparse/dense speed ratios.
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
    parser.add_argument("--steps", type=int, default=12)
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
    print(f"{'density':>8} {'sparse ms':>10} {'dense ms':>10} {'dense/sparse':>13}")
    for density in (1.0, 0.5, 0.25):
        times = {"sparse": [], "dense": []}
        for i in range(args.steps + 2):
            policy = torch.rand(shape) < density
            for execution in ("sparse", "dense") if i % 2 == 0 else ("dense", "sparse"):
                t = step_time(graph, optimizer, x, y, policy, execution)
                if i >= 2:  # the first steps build kernels
                    times[execution].append(t)
        sparse, dense = (statistics.median(times[k]) * 1e3 for k in ("sparse", "dense"))
        print(f"{density:>8.2f} {sparse:>10.1f} {dense:>10.1f} {dense / sparse:>12.2f}x")


if __name__ == "__main__":
    main()
