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

from lcma_ext.flows import build_flow, count_parameters
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
    default_num_levels,
    glow_level_factory,
    iresnet_level_factory,
    level_shapes,
    make_level_factory,
    max_num_levels,
    realnvp_level_factory,
    resflow_level_factory,
    squeeze_layer,
)
from lcma_ext.models.nets import ConvResNet, WNConv2d, scale_parameters

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
    "level_shapes",
    "make_level_factory",
    "max_num_levels",
    "realnvp_level_factory",
    "resflow_level_factory",
    "scale_parameters",
    "squeeze_layer",
]
