"""Convolutions on tiny feature maps, computed as matrix products on the CPU.

Most cells of the small presets run on 2x2 or 4x4 maps with a few dozen channels. There a
oneDNN convolution costs far more than its arithmetic, and more again for every new batch size:
oneDNN builds (JIT-compiles) a kernel per shape, and sparse execution gives each module a
different row count at every step. On such maps a convolution is a small linear map per row, so
it runs as BLAS matrix products, which need no per-shape kernels:

* a 1x1 convolution on channels-last rows is ``x[N*H*W, Cin] @ W[Cin, Cout]``;
* a k x k convolution with groups 1 is one ``x[N, H*W*Cin] @ M[H*W*Cin, Ho*Wo*Cout]``, where
  ``M`` places each kernel tap at the (output pixel, input pixel) pairs it connects (the
  weight times a constant one-hot placement, so the weight gradient is a fixed-order product);
* a depthwise k x k convolution on a 2x2 map is the per-channel product of the 4 input pixels
  with a [4 x Ho*Wo] tap matrix.

On larger maps, for depthwise convolutions on 4x4 maps and for wide dense ones the matrix forms
lose, so those keep oneDNN (``matrix_form`` decides; ``bench/conv_forms.py`` and
``bench/train_step.py`` measure both). Strided 1x1 convolutions never reach oneDNN's strided
kernel (docs/troubleshooting.md). Results equal ``F.conv2d`` up to float rounding (tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MAX_POINTWISE_PIXELS = 16  # 1x1 convolutions as one matmul on maps of up to 4x4
MAX_DENSE_PIXELS = 16  # k x k convolutions (groups 1) as one matmul on maps of up to 4x4
MAX_DEPTHWISE_PIXELS = 4  # depthwise k x k as a per-channel product on maps of up to 2x2
# The dense form's tap matrix has H*W*Cin x Ho*Wo*Cout entries; with about 1e5 or more its
# construction and product cost more than oneDNN, even with a new kernel per batch size
# (bench/conv_forms.py). Wide presets (paper-cifar on 4x4 maps) would build 200 MB matrices.
MAX_DENSE_MATRIX = 1 << 17
_matrix_forms: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "instanas_matrix_forms", default=True
)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Every convolution through ``nn.Conv2d`` inside the block (benchmarks compare this)."""
    token = _matrix_forms.set(False)
    try:
        yield
    finally:
        _matrix_forms.reset(token)


def matrix_form(conv: nn.Conv2d, height: int, width: int) -> str | None:
    """Which matrix form computes ``conv`` on a ``height x width`` map, or None for oneDNN."""
    pixels = height * width
    if conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if conv.groups == 1:
        if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
            return "pointwise" if pixels <= MAX_POINTWISE_PIXELS else None
        if pixels > MAX_DENSE_PIXELS:
            return None
        out_h, out_w = output_size(height, width, conv.kernel_size, conv.stride, conv.padding)
        matrix = pixels * conv.in_channels * out_h * out_w * conv.out_channels
        return "dense" if matrix <= MAX_DENSE_MATRIX else None
    if conv.groups == conv.in_channels == conv.out_channels:
        return "depthwise" if pixels <= MAX_DEPTHWISE_PIXELS else None
    return None


def output_size(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int]) -> tuple[int, int]:  # fmt: skip
    """Output side lengths of a convolution on a ``height x width`` map."""
    return (
        (height + 2 * padding[0] - kernel[0]) // stride[0] + 1,
        (width + 2 * padding[1] - kernel[1]) // stride[1] + 1,
    )


def conv2d(conv: nn.Conv2d, x: torch.Tensor, matrix_forms: bool = True) -> torch.Tensor:
    """``conv(x)`` on the CPU without the oneDNN kernels known to be unsafe, and as a matrix
    product where that is faster (tiny maps; ``matrix_forms=False`` keeps oneDNN there)."""
    if x.device.type != "cpu":
        return conv(x)
    if is_strided_pointwise(conv):
        return _strided_pointwise(conv, x, matrix_forms)
    use = matrix_forms and _matrix_forms.get()
    form = matrix_form(conv, x.shape[2], x.shape[3]) if use else None
    if form is None:
        return conv(x)
    if form == "pointwise":
        return _pointwise(conv, x)
    return _tap_matrix_conv(conv, x, depthwise=form == "depthwise")


def is_strided_pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 convolution with a stride above 1 and no padding (a residual shortcut)."""
    return (
        conv.kernel_size == (1, 1)
        and conv.stride != (1, 1)
        and conv.padding == (0, 0)
        and conv.padding_mode == "zeros"
    )


def _strided_pointwise(conv: nn.Conv2d, x: torch.Tensor, matrix_forms: bool) -> torch.Tensor:
    """Subsample, then a stride-1 1x1 convolution: the same function, but never oneDNN's
    strided 1x1 kernel, whose backward corrupts the heap on AVX2-only CPUs
    (docs/troubleshooting.md, "Native crashes")."""
    x = x[:, :, :: conv.stride[0], :: conv.stride[1]]
    if matrix_forms and conv.groups == 1:
        return _pointwise(conv, x)
    return F.conv2d(x, conv.weight, conv.bias, 1, 0, 1, conv.groups)


def _pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # [N, H, W, Cin] (a view for channels-last input) times W^T; the result, permuted back, is
    # a channels-last tensor.
    y = F.linear(x.permute(0, 2, 3, 1), conv.weight.flatten(1), conv.bias)
    return y.permute(0, 3, 1, 2)


def _tap_matrix_conv(conv: nn.Conv2d, x: torch.Tensor, depthwise: bool) -> torch.Tensor:
    n, channels, height, width = x.shape
    placement, out_h, out_w = _tap_placement(
        height, width, conv.kernel_size, conv.stride, conv.padding, x.device, x.dtype
    )
    # Taps times a constant one-hot placement: each (output, input) pixel pair gets its tap's
    # weight, or zero where no tap connects them. A product, not an indexed gather, because
    # the gather's backward (an accumulating scatter) sums in an order that changes from run
    # to run with more than one thread; the product's backward is a fixed-order BLAS call.
    taps = conv.weight.flatten(2) @ placement  # [Cout, Cin/groups, HWout*HWin]
    rows = x.permute(0, 2, 3, 1).reshape(n, height * width, channels)
    if depthwise:
        matrix = taps[:, 0].view(channels, out_h * out_w, height * width).permute(2, 1, 0)
        y = (rows.unsqueeze(2) * matrix).sum(1)  # [N, HWout, C]
    else:
        matrix = taps.view(conv.out_channels, channels, out_h * out_w, height * width)
        matrix = matrix.permute(3, 1, 2, 0).reshape(height * width * channels, -1)
        y = rows.reshape(n, -1) @ matrix
    y = y.view(n, out_h, out_w, conv.out_channels)
    if conv.bias is not None:
        y = y + conv.bias
    return y.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=256)
def _tap_placement(
    height: int,
    width: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, int, int]:
    """One-hot [kh*kw, Ho*Wo*H*W]: which kernel tap connects each output to each input pixel."""
    kh, kw = kernel
    out_h, out_w = output_size(height, width, kernel, stride, padding)
    placement = torch.zeros(kh * kw, out_h * out_w, height * width, dtype=dtype)
    for oy, ox, ky, kx in itertools.product(range(out_h), range(out_w), range(kh), range(kw)):
        iy = oy * stride[0] - padding[0] + ky
        ix = ox * stride[1] - padding[1] + kx
        if 0 <= iy < height and 0 <= ix < width:
            placement[ky * kw + kx, oy * out_w + ox, iy * width + ix] = 1
    return placement.flatten(1).to(device), out_h, out_w
