"""Training-step time: sparse execution vs the dense masked reference, side by side.

    .venv/bin/python bench/train_step.py [--steps 16] [--batch 256] [--preset fashion-cpu]

For each policy density, the paths train the same meta-graph on the same random batch with a
fresh random policy every step (as in search), in rotating order step by step, and the median
step times are compared. Prints the machine, thread count and the speed ratios. The optimiser is
the stages' own (SGD, Nesterov momentum, weight decay, foreach).

``sparse-onednn`` is the sparse path with every convolution through oneDNN (the tiny-map matrix
forms of ``instanas.nn.smallconv`` switched off), to show what those contribute.

``sparse-gather`` is the sparse path with the tap matrices of the tiny-map forms built by an
indexed gather, as before they became a product with a one-hot placement. The gather's backward
sums in a thread-dependent order (runs differ bit for bit); ``gather/sparse`` is what the
reproducible form costs or saves.

The last column is a floor no execution strategy of this network can beat: a step of the whole
meta-graph on ``density * batch`` images (every module, no gathers), i.e. the work of the selected
rows with no overhead. Where it is far above ``density`` times the full-batch step, the step is
dominated by per-operator costs that do not shrink with the number of rows.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from instanas.config import load_preset
from instanas.latency.timing import processor_name
from instanas.models.metagraph import MetaGraph
from instanas.nn import smallconv
from instanas.nn.backend import enlarge_primitive_cache
from instanas.nn.smallconv import disabled
from instanas.training import sgd

PATHS = ("sparse", "dense", "sparse-onednn", "sparse-gather", "floor")


def gather_form(conv, x, depthwise):
    """The tiny-map forms with the tap matrix built by an indexed gather (the earlier, not
    reproducible, construction); otherwise as ``smallconv._tap_matrix_conv``."""
    n, channels, height, width = x.shape
    placement, out_h, out_w = smallconv._tap_placement(
        height, width, conv.kernel_size, conv.stride, conv.padding, x.device, x.dtype
    )
    taps = conv.weight.flatten(2)
    index = placement.argmax(0)  # the tap of each (output, input) pixel pair, or the zero tap
    index[placement.sum(0) == 0] = taps.shape[-1]
    taps = F.pad(taps, (0, 1))[..., index]  # [Cout, Cin/groups, HWout*HWin]
    rows = x.permute(0, 2, 3, 1).reshape(n, height * width, channels)
    if depthwise:
        matrix = taps[:, 0].view(channels, out_h * out_w, height * width).permute(2, 1, 0)
        y = (rows.unsqueeze(2) * matrix).sum(1)
    else:
        matrix = taps.view(conv.out_channels, channels, out_h * out_w, height * width)
        y = rows.reshape(n, -1) @ matrix.permute(3, 1, 2, 0).reshape(height * width * channels, -1)
    y = y.view(n, out_h, out_w, conv.out_channels)
    return (y if conv.bias is None else y + conv.bias).permute(0, 3, 1, 2)


@contextlib.contextmanager
def _switch(path: str):
    if path == "sparse-onednn":
        with disabled():
            yield
        return
    original = smallconv._tap_matrix_conv
    if path == "sparse-gather":
        smallconv._tap_matrix_conv = gather_form
    try:
        yield
    finally:
        smallconv._tap_matrix_conv = original


def step_time(graph: MetaGraph, optimizer, x, y, policy, execution: str) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(graph(x, policy, execution=execution), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    enlarge_primitive_cache()  # what training runs with
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
    optimizer = sgd(graph.parameters(), lr=1e-3, weight_decay=5e-4)
    x = torch.randn(args.batch, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    shape = (args.batch, space.num_cells, space.num_modules)
    print(
        f"machine: {processor_name()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, preset {args.preset}, batch {args.batch}"
    )
    print(
        f"{'density':>8} {'sparse ms':>10} {'dense ms':>9} {'dense/sparse':>13} "
        f"{'sparse-onednn ms':>17} {'onednn/sparse':>14} {'gather/sparse':>14} "
        f"{'floor ms':>9} {'dense/floor':>12}"
    )
    for density in (1.0, 0.5, 0.25):
        rows = max(1, round(density * args.batch))
        every = torch.ones(shape, dtype=torch.bool)
        times: dict[str, list[float]] = {name: [] for name in PATHS}
        for i in range(args.steps + args.warmup):
            policy = torch.rand(shape) < density
            inputs = {
                "sparse": (x, y, policy),
                "dense": (x, y, policy),
                "sparse-onednn": (x, y, policy),
                "sparse-gather": (x, y, policy),
                "floor": (x[:rows], y[:rows], every[:rows]),
            }
            for name in PATHS[i % len(PATHS) :] + PATHS[: i % len(PATHS)]:
                execution = "dense" if name == "dense" else "sparse"
                with _switch(name):
                    t = step_time(graph, optimizer, *inputs[name], execution)
                if i >= args.warmup:  # the first steps build kernels
                    times[name].append(t)
        ms = {name: statistics.median(times[name]) * 1e3 for name in PATHS}
        print(
            f"{density:>8.2f} {ms['sparse']:>10.1f} {ms['dense']:>9.1f} "
            f"{ms['dense'] / ms['sparse']:>12.2f}x {ms['sparse-onednn']:>17.1f} "
            f"{ms['sparse-onednn'] / ms['sparse']:>13.2f}x "
            f"{ms['sparse-gather'] / ms['sparse']:>13.2f}x {ms['floor']:>9.1f} "
            f"{ms['dense'] / ms['floor']:>11.2f}x"
        )


if __name__ == "__main__":
    main()
