"""Tiny-map convolutions as matrix products equal F.conv2d, forwards and backwards."""

import pytest
import torch
from torch import nn

from instanas.config import load_preset
from instanas.models.metagraph import MetaGraph
from instanas.nn.smallconv import MAX_DENSE_MATRIX, conv2d, matrix_form

CASES = [  # in, out, kernel, stride, groups, map side
    (40, 240, 1, 1, 1, 2),
    (16, 8, 1, 1, 1, 4),
    (8, 8, 3, 1, 1, 2),
    (8, 16, 3, 2, 1, 4),
    (6, 5, 3, 1, 1, 3),
    (4, 4, 5, 1, 1, 2),
    (12, 12, 3, 1, 12, 2),
    (12, 12, 5, 1, 12, 2),
    (12, 12, 3, 2, 12, 2),
    (6, 6, 5, 1, 6, 1),
]


def assert_same_as_conv2d(conv: nn.Conv2d, x: torch.Tensor, form) -> None:
    """``form(x)`` equals ``conv(x)``: outputs, input gradients and parameter gradients."""
    grad_out = None
    outs, grads = [], []
    for fn in (conv, form):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        grad_out = torch.randn_like(y) if grad_out is None else grad_out
        conv.zero_grad()
        y.backward(grad_out)
        outs.append(y)
        grads.append([xi.grad] + [p.grad.clone() for p in conv.parameters()])
    assert outs[0].shape == outs[1].shape
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("cin,cout,kernel,stride,groups,side", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matrix_form_equals_conv2d(cin, cout, kernel, stride, groups, side, channels_last, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias).double()
    assert matrix_form(conv, side, side) is not None
    x = torch.randn(5, cin, side, side, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same_as_conv2d(conv, x, lambda t: conv2d(conv, t))


def test_large_maps_and_depthwise_on_4x4_keep_onednn():
    assert matrix_form(nn.Conv2d(8, 8, 3, padding=1), 7, 7) is None
    assert matrix_form(nn.Conv2d(8, 8, 1), 7, 7) is None
    assert matrix_form(nn.Conv2d(8, 8, 3, padding=1, groups=8), 4, 4) is None
    assert matrix_form(nn.Conv2d(8, 8, 3, padding=1, dilation=2), 2, 2) is None
    assert matrix_form(nn.Conv2d(8, 16, 3, padding=1, groups=4), 2, 2) is None


def test_fashion_preset_cells_on_2x2_maps_call_onednn_only_for_wide_dense_kernels(monkeypatch):
    """On the shipped preset's 2x2 maps, 1x1 and depthwise convolutions run as matrix products
    in training; only dense k x k ones too wide for a tap matrix keep oneDNN."""
    space = load_preset("fashion-cpu").search_space(1, 28, 10)
    graph = MetaGraph(space).train()
    onednn_on_2x2 = []
    original = nn.Conv2d.forward

    def counting(self, x):
        if x.shape[-1] <= 2:
            onednn_on_2x2.append(self)
        return original(self, x)

    monkeypatch.setattr(nn.Conv2d, "forward", counting)
    graph(
        torch.randn(8, 1, 28, 28),
        torch.ones(8, space.num_cells, space.num_modules, dtype=torch.bool),
    ).sum().backward()
    for conv in onednn_on_2x2:
        assert conv.groups == 1 and conv.kernel_size != (1, 1), conv
        assert 4 * conv.in_channels * 4 * conv.out_channels > MAX_DENSE_MATRIX, conv


@pytest.mark.parametrize(
    "cin,cout,stride,groups,side",
    [
        (4, 8, 2, 1, 8),
        (3, 6, 2, 1, 7),
        (8, 16, 2, 1, 2),
        (5, 7, 3, 1, 9),
        (4, 8, 2, 2, 6),
        (16, 32, 2, 1, 28),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("matrix_forms", [False, True])
def test_strided_pointwise_equals_conv2d(
    cin, cout, stride, groups, side, channels_last, matrix_forms
):
    """Strided 1x1 convolutions never reach oneDNN's strided kernel (it corrupts the heap on
    AVX2-only CPUs) and compute the same outputs and gradients as F.conv2d."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=True).double()
    x = torch.randn(3, cin, side, side, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_same_as_conv2d(conv, x, lambda t: conv2d(conv, t, matrix_forms=matrix_forms))


def test_strided_pointwise_never_calls_the_strided_kernel(monkeypatch):
    strides = []
    original = nn.Conv2d._conv_forward

    def recording(self, x, weight, bias):
        strides.append(self.stride)
        return original(self, x, weight, bias)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", recording)
    monkeypatch.setattr(torch.nn.functional, "conv2d", _recording_conv2d(strides))
    conv = nn.Conv2d(4, 8, 1, 2, bias=False)
    for matrix_forms in (False, True):
        conv2d(conv, torch.randn(2, 4, 8, 8), matrix_forms=matrix_forms).sum().backward()
    assert all(s in (1, (1, 1)) for s in strides)


def _recording_conv2d(strides):
    original = torch.nn.functional.conv2d

    def recording(x, weight, bias=None, stride=1, *args):
        strides.append(stride)
        return original(x, weight, bias, stride, *args)

    return recording


def test_wide_dense_convolutions_keep_onednn():
    """The tap matrix would have 448*16 x 448*16 entries here (paper-cifar on 4x4 maps)."""
    assert matrix_form(nn.Conv2d(448, 448, 3, padding=1), 4, 4) is None
    assert matrix_form(nn.Conv2d(80, 80, 3, padding=1), 2, 2) == "dense"
