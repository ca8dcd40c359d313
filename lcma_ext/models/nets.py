"""Convolutional ResNet used as the coupling network of the RealNVP and Glow builders.

Convolutions are weight-normalized (``w = g v / ||v||``) as in RealNVP; the ``g`` parameters are
named ``weight_g`` so :func:`scale_parameters` can find them for the paper's L2 penalty
(coefficient 5e-5 on the weight scale parameters). The last convolution starts at zero, so every
coupling starts as the identity.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017, Sec. 4.
    T. Salimans, D. Kingma. Weight Normalization. NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ConvResNet", "WNConv2d", "scale_parameters"]


class WNConv2d(nn.Module):
    """Weight-normalized 2-D convolution with ``same`` padding.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd kernel size.
        zero_init: Start with ``g = 0`` and zero bias (the output is 0 at initialization).

    Shapes:
        inputs: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, zero_init: bool = False
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"expected an odd kernel_size; got {kernel_size}")
        weight = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(weight, a=5**0.5)
        self.weight_v = nn.Parameter(weight)
        norm = weight.flatten(1).norm(dim=1)
        self.weight_g = nn.Parameter(torch.zeros_like(norm) if zero_init else norm.clone())
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.padding = kernel_size // 2

    def forward(self, inputs: Tensor) -> Tensor:
        norm = self.weight_v.flatten(1).norm(dim=1).clamp_min(1e-12)
        weight = self.weight_v * (self.weight_g / norm).view(-1, 1, 1, 1)
        return F.conv2d(inputs, weight, self.bias, padding=self.padding)


class ConvResNet(nn.Module):
    """Weight-normalized conv ResNet: conv3x3, residual blocks, relu, zero-initialized conv3x3.

    Each residual block is ``h + conv3x3(relu(conv3x3(relu(h))))``.

    Same call signature as an nflows transform net: ``net(inputs, context=None)``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        hidden_channels: Width of the hidden layers.
        num_blocks: Number of residual blocks.

    Shapes:
        inputs: ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int, num_blocks: int
    ) -> None:
        super().__init__()
        if min(in_channels, out_channels, hidden_channels) < 1 or num_blocks < 0:
            raise ValueError(
                "expected positive channel counts and num_blocks >= 0; got "
                f"{in_channels}, {out_channels}, {hidden_channels}, {num_blocks}"
            )
        self.initial = WNConv2d(in_channels, hidden_channels)
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                [
                    WNConv2d(hidden_channels, hidden_channels),
                    WNConv2d(hidden_channels, hidden_channels),
                ]
            )
            for _ in range(num_blocks)
        )
        self.final = WNConv2d(hidden_channels, out_channels, zero_init=True)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        hidden = self.initial(inputs)
        for first, second in cast("Iterable[nn.ModuleList]", self.blocks):
            hidden = hidden + second(F.relu(first(F.relu(hidden))))
        return self.final(F.relu(hidden))


def scale_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weight-norm scales (``weight_g``) and coupling ``rescale`` parameters of ``module``.

    These receive the paper's L2 penalty (see :class:`lcma_ext.training.TrainConfig`).
    """
    return [
        parameter
        for name, parameter in module.named_parameters()
        if name.endswith("weight_g") or name.endswith("rescale")
    ]
