"""Model builders: RealNVP, Glow, i-ResNet and Residual Flow for image shapes ``(C, H, W)``.

Each family is a level factory (see :mod:`lcma_ext.models.levels`); the NMS and the multi-scale
flows are built from the same factory by :mod:`lcma_ext.pipeline`, so they differ only in the
split. :func:`build_flow` wraps a transform into an nflows ``Flow`` with a standard normal base.

Example:
    >>> from lcma_ext.models import make_level_factory, build_flow, default_num_levels
    >>> from lcma_ext.pipeline import build_multiscale_transform
    >>> factory = make_level_factory("realnvp", "tiny")
    >>> transform = build_multiscale_transform(factory, (1, 8, 8), 3, split="channel")
    >>> flow = build_flow(transform, (1, 8, 8))

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms.base import Transform

from lcma_ext.models.couplings import (
    CheckerboardAffineCouplingTransform,
    RealNVPAffineCouplingTransform,
)
from lcma_ext.models.levels import (
    MODELS,
    SIZE_NAMES,
    SIZES,
    SQUEEZES,
    LevelFactory,
    glow_level_factory,
    iresnet_level_factory,
    make_level_factory,
    realnvp_level_factory,
    resflow_level_factory,
)
from lcma_ext.models.nets import ConvResNet, WNConv2d, scale_parameters
from lcma_ext.transforms import carry_positions

__all__ = [
    "MODELS",
    "SIZES",
    "SIZE_NAMES",
    "SQUEEZES",
    "CheckerboardAffineCouplingTransform",
    "ConvResNet",
    "LevelFactory",
    "RealNVPAffineCouplingTransform",
    "WNConv2d",
    "build_flow",
    "count_parameters",
    "default_num_levels",
    "glow_level_factory",
    "iresnet_level_factory",
    "make_level_factory",
    "max_num_levels",
    "realnvp_level_factory",
    "resflow_level_factory",
    "scale_parameters",
]


def max_num_levels(shape: Sequence[int]) -> int:
    """Largest number of levels (one squeeze each) an image shape ``(C, H, W)`` allows."""
    if len(shape) != 3:
        raise ValueError(f"expected an image shape (C, H, W); got {tuple(shape)}")
    _, h, w = shape
    levels = 0
    while h % 2 == 0 and w % 2 == 0 and h >= 2 and w >= 2:
        h, w, levels = h // 2, w // 2, levels + 1
    return levels


def default_num_levels(shape: Sequence[int], cap: int = 4) -> int:
    """``min(max_num_levels(shape), cap)``: 3 for 8x8 digits (2 splits), 4 for 16x16 patches."""
    levels = min(max_num_levels(shape), cap)
    if levels < 2:
        raise ValueError(
            "expected an image shape that allows 2 squeezes (H, W divisible by 4); "
            f"got {tuple(shape)}"
        )
    return levels


def build_flow(transform: Transform, shape: Sequence[int]) -> Flow:
    """nflows ``Flow`` of a diag-aware ``transform`` with a standard normal base.

    The base has the transform's output shape (flat ``[D]`` for a multi-scale transform, the last
    level's shape for an NMS transform), found with ``carry_positions`` so no data runs through
    the transform (ActNorm would data-initialize).

    Args:
        transform: Diag-aware transform (data to noise).
        shape: Event shape of the data, e.g. ``(C, H, W)``.
    """
    output_shape = tuple(carry_positions(transform, tuple(int(s) for s in shape)).shape)
    if math.prod(output_shape) != math.prod(int(s) for s in shape):
        raise ValueError(
            f"expected a transform that keeps all {math.prod(shape)} dimensions; "
            f"got output shape {output_shape}"
        )
    return Flow(transform, StandardNormal(list(output_shape)))


def count_parameters(module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
