"""Image levels for zuko flows, conditional ones included, from the package's conv nets.

zuko ships no convolutional transform. An image level here is a diag-aware lcma-ext transform
(nflows' interface), which :class:`lcma_ext.zuko.NflowsTransform` turns into a zuko lazy
transform. Unconditional levels can come from :func:`lcma_ext.models.make_level_factory`;
:func:`image_level_factory` builds Glow levels whose coupling nets also see a context vector
(:class:`ContextConvResNet`), for conditional image flows such as simulation-based inference
on images.

References:
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lcma_ext import transforms as T
from lcma_ext.models.nets import ConvResNet

__all__ = ["ContextConvResNet", "image_level_factory"]


class ContextConvResNet(nn.Module):
    """The package's :class:`lcma_ext.models.nets.ConvResNet` with a context as extra channels.

    The context vector of each example is broadcast over the image and appended to the input
    channels. Same call signature as an nflows transform net: ``net(inputs, context)``.

    Args:
        in_channels: Image channels of the inputs.
        out_channels: Output channels.
        context: Number of context features (0: unconditional; then ``context`` must be
            ``None`` when called).
        hidden_channels: Width of the hidden layers.
        num_blocks: Number of residual blocks.

    Shapes:
        inputs: ``(B, in_channels, H, W)``; context: ``(B, context)``; output:
        ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        context: int = 0,
        hidden_channels: int = 16,
        num_blocks: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(context, int) or context < 0:
            raise ValueError(f"expected a non-negative int context; got {context!r}")
        self.context_features = context
        self.net = ConvResNet(in_channels + context, out_channels, hidden_channels, num_blocks)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_features == 0:
            if context is not None:
                raise ValueError(
                    "ContextConvResNet: expected context=None (built with context=0); got a "
                    f"tensor of shape {tuple(context.shape)}"
                )
            return self.net(inputs)
        expected = (inputs.shape[0], self.context_features)
        if context is None or tuple(context.shape) != expected:
            got = None if context is None else tuple(context.shape)
            raise ValueError(
                f"ContextConvResNet: expected a context of shape {expected}; got {got}"
            )
        height, width = inputs.shape[-2:]
        maps = context.to(inputs.dtype)[:, :, None, None].expand(-1, -1, height, width)
        return self.net(torch.cat([inputs, maps], dim=1))

    def extra_repr(self) -> str:
        return f"context={self.context_features}"


def image_level_factory(
    context: int = 0,
    hidden: int = 16,
    blocks: int = 1,
    steps: int = 2,
    attribution: str = "svd-energy",
) -> Callable[[int, tuple[int, ...]], T.CompositeTransform]:
    """Glow levels with context-aware coupling nets: squeeze, then ``steps`` x [ActNorm, 1x1
    convolution, affine coupling].

    As :func:`lcma_ext.models.glow_level_factory`, except that each coupling net is a
    :class:`ContextConvResNet` (``hidden`` channels, ``blocks`` residual blocks) that sees the
    flow's context. Couplings alternate which half of the channels they transform.

    Args:
        context: Number of context features (0: unconditional).
        hidden: Hidden channels of the coupling nets.
        blocks: Residual blocks per coupling net.
        steps: Glow steps per level.
        attribution: How each 1x1 convolution shares ``log|det W|`` among channels.

    Returns:
        ``factory(level_index, input_shape) -> lcma_ext.transforms.CompositeTransform`` for image
        shapes ``(C, H, W)`` with even ``H`` and ``W``.

    Raises:
        ValueError: (when a level is built) for a shape that is not ``(C, H, W)`` with even
            ``H``, ``W``.
    """
    if min(hidden, steps) < 1 or blocks < 0:
        raise ValueError(
            f"expected hidden, steps >= 1 and blocks >= 0; got {hidden}, {steps}, {blocks}"
        )

    def net(in_channels: int, out_channels: int) -> ContextConvResNet:
        return ContextConvResNet(in_channels, out_channels, context, hidden, blocks)

    def factory(level_index: int, input_shape: tuple[int, ...]) -> T.CompositeTransform:
        shape = tuple(int(size) for size in input_shape)
        if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
            raise ValueError(f"expected an image shape (C, H, W) with even H, W; got {shape}")
        channels = 4 * shape[0]
        layers: list[nn.Module] = [T.SqueezeTransform()]
        for step in range(steps):
            mask = torch.zeros(channels, dtype=torch.long)
            mask[channels // 2 :] = 1
            layers += [
                T.ActNorm(channels),
                T.OneByOneConvolution(channels, attribution=attribution),
                T.AffineCouplingTransform(1 - mask if step % 2 else mask, net),
            ]
        return T.CompositeTransform(layers)

    return factory
