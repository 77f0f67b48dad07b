"""Row gathers and scatter-adds for sparse execution, one autograd node per cell.

A cell hands each selected module the rows that chose it and sums the modules' outputs back into
the batch. Doing that per module (``x[rows]``, ``out.index_add``) costs a full-batch zero
gradient per module in the backward pass, which autograd then adds up, and a copy of the output
per module in the forward pass. Here one function gathers all of a cell's row sets and one sums
them back, each with a single full-batch buffer in either direction.

Every tensor keeps the batch's memory layout (channels-last included), forwards and backwards:
``index_select`` and ``index_add`` return NCHW even for channels-last input, and oneDNN then
converts layouts around every convolution and picks slower kernels (a depthwise backward with an
NCHW gradient among them). bench/train_step.py times the sparse training step these serve.
"""

from __future__ import annotations

from typing import Sequence

import torch


def memory_layout(x: torch.Tensor) -> torch.memory_format:
    """``channels_last`` for a 4-D channels-last tensor, ``contiguous_format`` otherwise."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _flat(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """A [rows, features] view of ``x``, which must be contiguous in ``layout``.

    Row gathers and index-adds on this 2-D view are much cheaper than on the 4-D tensor
    (channels-last batches of 2x2 to 14x14 maps); bench/train_step.py times the sparse step.
    """
    if layout == torch.channels_last:
        return x.permute(0, 2, 3, 1).view(x.shape[0], -1)
    return x.view(x.shape[0], -1)


def _unflat(flat: torch.Tensor, shape: torch.Size, layout: torch.memory_format) -> torch.Tensor:
    """Inverse of :func:`_flat` for ``flat.shape[0]`` rows of a batch shaped like ``shape``."""
    if layout == torch.channels_last:
        _, channels, height, width = shape
        return flat.view(flat.shape[0], height, width, channels).permute(0, 3, 1, 2)
    return flat.view(flat.shape[0], *shape[1:])


def _select(x: torch.Tensor, rows: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    x = x.contiguous(memory_format=layout)
    return _unflat(_flat(x, layout).index_select(0, rows), x.shape, layout)


def _zeros(shape: torch.Size, like: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    return like.new_zeros(shape).contiguous(memory_format=layout)


def _add_rows(
    target: torch.Tensor, row_sets: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Adds each value at its rows of ``target`` (contiguous in its layout), in place."""
    layout = memory_layout(target)
    flat = _flat(target, layout)
    for rows, value in zip(row_sets, values):
        flat.index_add_(0, rows, _flat(value.contiguous(memory_format=layout), layout))
    return target


class _GatherRowSets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, *row_sets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(*row_sets)
        ctx.batch_shape, ctx.layout = x.shape, memory_layout(x)
        return tuple(_select(x, rows, ctx.layout) for rows in row_sets)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        row_sets = ctx.saved_tensors
        used = [(rows, g) for rows, g in zip(row_sets, grads) if g is not None]
        grad_x = None
        if used:
            grad_x = _zeros(ctx.batch_shape, used[0][1], ctx.layout)
            _add_rows(grad_x, [r for r, _ in used], [g for _, g in used])
        return (grad_x, *(None for _ in row_sets))


class _SumRowSets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base: torch.Tensor, *pairs: torch.Tensor) -> torch.Tensor:
        row_sets, values = pairs[0::2], pairs[1::2]
        ctx.save_for_backward(*row_sets)
        ctx.layouts = [memory_layout(v) for v in values]
        return _add_rows(base.clone(memory_format=torch.preserve_format), row_sets, values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads: list[torch.Tensor | None] = [grad]
        for rows, layout in zip(ctx.saved_tensors, ctx.layouts):
            grads += [None, _select(grad, rows, layout)]
        return tuple(grads)


def gather_row_sets(x: torch.Tensor, row_sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``x[rows]`` for each row set, in ``x``'s layout; one gradient buffer for all of them."""
    return _GatherRowSets.apply(x, *row_sets)


def sum_row_sets(
    base: torch.Tensor | None,
    batch: int,
    row_sets: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``base`` (zeros when None) plus each ``values[i]`` added at rows ``row_sets[i]``.

    ``base`` is not modified; the sum is a new tensor of ``batch`` rows in ``base``'s layout
    (the first value's layout when there is no base).
    """
    if base is None:
        base = _zeros(
            torch.Size((batch, *values[0].shape[1:])), values[0], memory_layout(values[0])
        )
    pairs = [t for rows, value in zip(row_sets, values) for t in (rows, value)]
    return _SumRowSets.apply(base, *pairs)
