"""Running convolution shapes through the package's own layers, the way training (channels-last,
train mode, forward and backward, many batch sizes) and deployment (BatchNorm folded,
inference) run them, to find native kernels that crash (docs/troubleshooting.md, "Native
crashes"). ``python -m instanas.kernel_check`` lists the shapes of a configuration and runs
them through here.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
from torch import nn

from .ops import ConvBNAct
from .smallconv import output_size

# The environment that makes an AVX-512 machine run the AVX2 code paths, with glibc stopping at
# the first bad free instead of much later.
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MALLOC_CHECK_": "3"}
# Batch sizes of sparse execution vary at every step: small, odd and even ones.
SMALL_MAP_BATCHES = (1, 2, 3, 5, 8, 13, 16)
LARGE_MAP_BATCHES = (1, 2, 3)  # maps over 32x32 (ImageNet-sized), to bound the check's time
LARGE_MAP_PIXELS = 32 * 32


@dataclass(frozen=True, order=True)
class ConvShape:
    """One convolution as the package builds it, with the map it runs on."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    groups: int
    height: int
    width: int

    def label(self) -> str:
        return (
            f"conv {self.in_channels}->{self.out_channels} k{self.kernel} s{self.stride} "
            f"g{self.groups} on {self.height}x{self.width}"
        )

    def batches(self) -> tuple[int, ...]:
        large = self.height * self.width > LARGE_MAP_PIXELS
        return LARGE_MAP_BATCHES if large else SMALL_MAP_BATCHES


def shapes_of(
    model: nn.Module, policy: torch.Tensor | None, channels: int, side: int
) -> set[ConvShape]:
    """Shapes seen by the model's ConvBNAct layers in one batch-1 forward pass."""
    found: set[ConvShape] = set()

    def record(layer: nn.Module, args: tuple) -> None:
        conv, (_, _, height, width) = layer.conv, args[0].shape
        found.add(
            ConvShape(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size[0],
                conv.stride[0],
                conv.groups,
                height,
                width,
            )
        )

    hooks = [
        m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, ConvBNAct)
    ]
    with torch.no_grad():
        x = torch.zeros(1, channels, side, side)
        model.eval()(x) if policy is None else model.eval()(x, policy)
    for hook in hooks:
        hook.remove()
    return found


def sweep_shapes() -> list[ConvShape]:
    """Shapes around those the presets build, for finding other bad kernels: 1x1, 3x3 and 5x5
    kernels, strides 1 and 2, dense, grouped and depthwise, on maps from 1x1 to 8x8; and the
    strided 1x1 family in detail (1 to 16 input channels, maps up to 16x16)."""
    shapes = set()
    for kernel, stride, channels, side in itertools.product(
        (1, 3, 5), (1, 2), (4, 8, 16), (1, 2, 3, 4, 7, 8)
    ):
        for groups in (1, 2, channels):
            shapes.add(
                ConvShape(
                    channels,
                    channels * 2 if groups == 1 else channels,
                    kernel,
                    stride,
                    groups,
                    side,
                    side,
                )
            )
    for channels, stride, side in itertools.product(
        (1, 2, 3, 4, 6, 8, 12, 16), (2, 3), (2, 3, 4, 5, 6, 8, 9, 12, 16)
    ):
        for out in {channels, channels * 2, 8}:
            shapes.add(ConvShape(channels, out, 1, stride, 1, side, side))
    return sorted(shapes)


def run_shape(shape: ConvShape, raw: bool = False) -> None:
    """Training (channels-last, forward and backward) and deployment passes of one shape, through
    the package's layers or, with ``raw``, through a plain ``nn.Conv2d``."""
    layer: nn.Module = ConvBNAct(
        shape.in_channels, shape.out_channels, shape.kernel, shape.stride, groups=shape.groups
    )
    deployed = layer.fused()
    if raw:
        layer = deployed = layer.conv
    layer = layer.to(memory_format=torch.channels_last)
    out_h, out_w = output_size(
        shape.height,
        shape.width,
        (shape.kernel,) * 2,
        (shape.stride,) * 2,
        (shape.kernel // 2,) * 2,
    )
    for batch in shape.batches():
        x = torch.randn(batch, shape.in_channels, shape.height, shape.width)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        if raw or batch * out_h * out_w > 1:  # BatchNorm cannot train on one value per channel
            layer.train()(x).sum().backward()
        with torch.inference_mode():
            deployed(x.detach())


RAW_PATTERN = ConvShape(4, 8, 1, 2, 1, 8, 8)  # aborts on AVX2-only CPUs with torch 2.12-2.13


def check_shapes(
    name: str, shapes: list[ConvShape], raw: bool = False, isolate: bool = False, threads: int = 1
) -> list[str]:
    """Run every shape; with ``isolate`` each in a forked process, returning those that died."""
    died = []
    for shape in shapes:
        label = f"{name}: {shape.label()}{' (raw nn.Conv2d)' if raw else ''}"
        print(f"checking {label}", flush=True)
        if not isolate:
            run_shape(shape, raw)
            continue
        status = _in_child(shape, raw, threads)
        if status:
            died.append(f"{label}: {status}")
            print(f"DIED {label}: {status}", flush=True)
    return died


def _in_child(shape: ConvShape, raw: bool, threads: int) -> str | None:
    # The parent stays at one thread: a child forked from a process whose OpenMP pool has
    # worker threads hangs; a child may start its own pool.
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            torch.set_num_threads(threads)
            run_shape(shape, raw)
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}" if os.WEXITSTATUS(status) else None
