"""Candidate modules of a cell and BatchNorm folding for inference."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..space import CandidateModule
from .smallconv import conv2d


class ConvBNAct(nn.Module):
    """Convolution (no bias), BatchNorm, optional ReLU: the unit every module is built from."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(conv2d(self.conv, x))
        return torch.relu(x) if self.relu else x

    def fused(self) -> nn.Module:
        """An eval-only equivalent with the BatchNorm folded into the convolution."""
        conv, bn = self.conv, self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            groups=conv.groups,
            bias=True,
        )
        with torch.no_grad():
            folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            folded.bias.copy_(bn.bias - bn.running_mean * scale)
        folded.to(conv.weight.device, conv.weight.dtype)
        return FusedConvAct(folded, self.relu)


class FusedConvAct(nn.Module):
    def __init__(self, conv: nn.Conv2d, relu: bool) -> None:
        super().__init__()
        self.conv = conv
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN, not the matrix forms: those pay off on the many new batch sizes of sparse
        # training (bench/conv_forms.py); deployed inference reuses one shape per child.
        x = conv2d(self.conv, x, matrix_forms=False)
        return torch.relu(x) if self.relu else x


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, kxk depthwise, 1x1 linear projection, identity shortcut."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, kernel: int, expansion: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBNAct(in_channels, hidden, 1)
        self.depthwise = ConvBNAct(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBNAct(hidden, out_channels, 1, relu=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class BasicBlock(nn.Module):
    """conv3x3(stride) BN ReLU, conv3x3 BN ReLU, no shortcut (module 4 of the paper's five)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, kernel, stride)
        self.conv2 = ConvBNAct(out_channels, out_channels, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


def build_candidate(
    spec: CandidateModule, in_channels: int, out_channels: int, stride: int
) -> nn.Module:
    if spec.kind == "inverted_residual":
        return InvertedResidual(in_channels, out_channels, stride, spec.kernel, spec.expansion)
    if spec.kind == "basic_block":
        return BasicBlock(in_channels, out_channels, stride, spec.kernel)
    raise ValueError(
        f"unknown candidate module kind {spec.kind!r}: use 'inverted_residual' or 'basic_block'"
    )


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` in eval mode with every ConvBNAct replaced by its fused form."""
    folded = copy.deepcopy(module).eval()
    _replace_conv_bn(folded)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def _replace_conv_bn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, ConvBNAct):
            setattr(module, name, child.fused())
        else:
            _replace_conv_bn(child)
