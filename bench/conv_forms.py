"""Dense k x k convolutions on tiny maps: the tap-matrix form against oneDNN, side by side.

Prints, per channel count and map side, the forward+backward time of one 3x3 convolution
(channels-last) with a warm kernel (the same batch size every time) and with a new batch size
every time (what sparse execution does), for both paths, and the tap matrix's entry count that
``smallconv.MAX_DENSE_MATRIX`` bounds.

    .venv/bin/python bench/conv_forms.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from instanas.nn import smallconv
from instanas.nn.backend import enlarge_primitive_cache


def _time(conv: nn.Conv2d, side: int, forward, batches: list[int]) -> float:
    start = time.perf_counter()
    for batch in batches:
        x = torch.randn(batch, conv.in_channels, side, side)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        forward(conv, x).sum().backward()
    return (time.perf_counter() - start) / len(batches) * 1e3


def main() -> None:
    enlarge_primitive_cache()  # what training runs with
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    smallconv.MAX_DENSE_MATRIX = 1 << 40  # time the matrix form beyond the shipped bound
    warm, new = [120] * 20, list(range(100, 140, 2))
    print("channels side entries | matrix warm / new ms | oneDNN warm / new ms | oneDNN/matrix")
    for channels in (16, 32, 48, 64, 80, 96, 128):
        for side in (2, 4):
            conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            matrix = [_time(conv, side, smallconv.conv2d, b) for b in (warm, new)]
            onednn = [_time(conv, side, lambda c, x: c(x), b) for b in (warm, new)]
            entries = side**4 * channels**2
            print(
                f"{channels:8d} {side:4d} {entries:8d} | {matrix[0]:6.2f} / {matrix[1]:6.2f} | "
                f"{onednn[0]:6.2f} / {onednn[1]:6.2f} | new {onednn[1] / matrix[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
