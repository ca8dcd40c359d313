"""Level factories of the four flow families, for image shapes ``(C, H, W)``.

A level factory is ``level_factory(level_index, input_shape) -> Transform``. Every level begins with
:class:`lcma_ext.transforms.SqueezeTransform` (``C x H x W -> 4C x H/2 x W/2``) followed by the
family's steps, so the same factory builds the non-multi-scale (NMS) flow and every multi-scale
variant (see :mod:`lcma_ext.pipeline`); the variants differ only in the split.

Sizes go from ``tiny`` (CPU, seconds per epoch on 8x8 digits) to ``paper`` (the papers' widths).

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
    J. Behrmann et al. Invertible Residual Networks. ICML 2019.
    R. T. Q. Chen et al. Residual Flows for Invertible Generative Modeling. NeurIPS 2019.
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 4.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from nflows.transforms.base import Transform

from lcma_ext import transforms as T
from lcma_ext.models.couplings import (
    CheckerboardAffineCouplingTransform,
    RealNVPAffineCouplingTransform,
)
from lcma_ext.models.nets import ConvResNet
from lcma_ext.multiscale import LevelFactory, LevelShapes, walk_levels
from lcma_ext.transforms import residual

__all__ = [
    "MODELS",
    "SIZES",
    "SIZE_NAMES",
    "SQUEEZES",
    "LevelFactory",
    "default_num_levels",
    "glow_level_factory",
    "iresnet_level_factory",
    "level_shapes",
    "make_level_factory",
    "max_num_levels",
    "realnvp_level_factory",
    "resflow_level_factory",
    "squeeze_layer",
]

SIZE_NAMES = ("tiny", "small", "medium", "paper")

#: Per family and size: ``hidden`` channels of the nets, residual ``blocks`` per net, ``steps``
#: per level (RealNVP: checkerboard couplings and as many channel couplings; Glow: ActNorm +
#: 1x1 conv + coupling steps; residual families: residual blocks).
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "realnvp": {
        "tiny": {"hidden": 16, "blocks": 1, "steps": 2},
        "small": {"hidden": 32, "blocks": 2, "steps": 3},
        "medium": {"hidden": 64, "blocks": 4, "steps": 3},
        "paper": {"hidden": 64, "blocks": 8, "steps": 3},
    },
    "glow": {
        "tiny": {"hidden": 16, "blocks": 1, "steps": 3},
        "small": {"hidden": 64, "blocks": 1, "steps": 4},
        "medium": {"hidden": 128, "blocks": 1, "steps": 8},
        "paper": {"hidden": 512, "blocks": 1, "steps": 32},
    },
    "iresnet": {
        "tiny": {"hidden": 16, "blocks": 1, "steps": 2},
        "small": {"hidden": 32, "blocks": 1, "steps": 4},
        "medium": {"hidden": 128, "blocks": 1, "steps": 8},
        "paper": {"hidden": 512, "blocks": 1, "steps": 32},
    },
    "resflow": {
        "tiny": {"hidden": 16, "blocks": 1, "steps": 2},
        "small": {"hidden": 32, "blocks": 1, "steps": 4},
        "medium": {"hidden": 128, "blocks": 1, "steps": 8},
        "paper": {"hidden": 512, "blocks": 1, "steps": 16},
    },
}


def _resolve(family: str, size: str, overrides: dict[str, int | None]) -> dict[str, int]:
    if size not in SIZE_NAMES:
        raise ValueError(f"expected size in {SIZE_NAMES}; got {size!r}")
    config = dict(SIZES[family][size])
    for key, value in overrides.items():
        if value is not None:
            if int(value) < (0 if key == "blocks" else 1):
                raise ValueError(f"expected a positive {key}; got {value}")
            config[key] = int(value)
    return config


def _squeezed(level_index: int, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if level_index < 0:
        raise ValueError(f"expected level_index >= 0; got {level_index}")
    if len(input_shape) != 3:
        raise ValueError(f"expected an image shape (C, H, W); got {tuple(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    if h % 2 or w % 2 or min(c, h, w) < 1:
        raise ValueError(f"expected positive C and even H, W; got {tuple(input_shape)}")
    return 4 * c, h // 2, w // 2


#: Names of the squeeze at the start of every level: nflows' pixel shuffle or the orthonormal Haar
#: wavelet squeeze (:class:`lcma_ext.transforms.HaarSqueezeTransform`, log-det 0; its default
#: subband order makes a channel split factor out the high-frequency subbands first).
SQUEEZES = ("pixel", "haar")


def _check_squeeze(squeeze: str) -> None:
    if squeeze not in SQUEEZES:
        raise ValueError(f"expected squeeze in {SQUEEZES}; got {squeeze!r}")


def squeeze_layer(squeeze: str) -> Transform:
    """The squeeze at the start of every level: ``"pixel"`` (nflows') or ``"haar"``.

    Raises:
        ValueError: for a name not in :data:`SQUEEZES`.
    """
    _check_squeeze(squeeze)
    return T.HaarSqueezeTransform() if squeeze == "haar" else T.SqueezeTransform()


def _half_mask(channels: int, flip: bool) -> torch.Tensor:
    mask = torch.zeros(channels, dtype=torch.long)
    mask[channels // 2 :] = 1
    return 1 - mask if flip else mask


def realnvp_level_factory(
    size: str = "tiny",
    *,
    hidden: int | None = None,
    blocks: int | None = None,
    steps: int | None = None,
    squeeze: str = "pixel",
) -> LevelFactory:
    """RealNVP level: squeeze, ``steps`` checkerboard couplings, ``steps`` channel couplings.

    Checkerboard couplings alternate parity and are skipped on a ``1 x 1`` grid; channel
    couplings alternate which half of the channels they transform. Each coupling network is a
    weight-normalized :class:`ConvResNet` (``hidden`` channels, ``blocks`` residual blocks).
    ``squeeze="haar"`` starts each level with the Haar squeeze instead of nflows' (one of
    :data:`SQUEEZES`).
    """
    config = _resolve("realnvp", size, {"hidden": hidden, "blocks": blocks, "steps": steps})
    _check_squeeze(squeeze)

    def net(in_channels: int, out_channels: int) -> ConvResNet:
        return ConvResNet(in_channels, out_channels, config["hidden"], config["blocks"])

    def factory(level_index: int, input_shape: tuple[int, ...]) -> T.CompositeTransform:
        channels, height, width = _squeezed(level_index, input_shape)
        layers: list[Transform] = [squeeze_layer(squeeze)]
        if height * width >= 2:
            layers += [
                CheckerboardAffineCouplingTransform(channels, net, parity=k % 2)
                for k in range(config["steps"])
            ]
        if channels >= 2:
            layers += [
                RealNVPAffineCouplingTransform(_half_mask(channels, k % 2 == 1), net)
                for k in range(config["steps"])
            ]
        return T.CompositeTransform(layers)

    return factory


def glow_level_factory(
    size: str = "tiny",
    *,
    hidden: int | None = None,
    blocks: int | None = None,
    steps: int | None = None,
    attribution: str = "svd-energy",
    squeeze: str = "pixel",
) -> LevelFactory:
    """Glow level: squeeze, then ``steps`` x [ActNorm, invertible 1x1 conv, affine coupling].

    The coupling is nflows' (``scale = sigmoid(h + 2) + 1e-3``, as in Glow). ``attribution``
    chooses how the 1x1 convolution's log|det| is shared among channels (paper Eq. 5: singular
    values; see :mod:`lcma_ext.transforms.lu`). ``squeeze`` is one of :data:`SQUEEZES`.
    """
    config = _resolve("glow", size, {"hidden": hidden, "blocks": blocks, "steps": steps})
    _check_squeeze(squeeze)

    def net(in_channels: int, out_channels: int) -> ConvResNet:
        return ConvResNet(in_channels, out_channels, config["hidden"], config["blocks"])

    def factory(level_index: int, input_shape: tuple[int, ...]) -> T.CompositeTransform:
        channels, _, _ = _squeezed(level_index, input_shape)
        layers: list[Transform] = [squeeze_layer(squeeze)]
        for k in range(config["steps"]):
            layers += [
                T.ActNorm(channels),
                T.OneByOneConvolution(channels, attribution=attribution),
                T.AffineCouplingTransform(_half_mask(channels, k % 2 == 1), net),
            ]
        return T.CompositeTransform(layers)

    return factory


def _residual_factory(
    family: str, config: dict[str, int], squeeze: str, block_kwargs: dict[str, Any]
) -> LevelFactory:
    _check_squeeze(squeeze)
    if "hidden_channels" in block_kwargs:
        raise ValueError(
            f"expected the hidden width as hidden= (the {family} size's default); got "
            "hidden_channels="
        )
    block_class = (
        residual.InvertibleResNetBlock if family == "iresnet" else residual.ResidualFlowBlock
    )

    def factory(level_index: int, input_shape: tuple[int, ...]) -> T.CompositeTransform:
        channels, height, width = _squeezed(level_index, input_shape)
        layers: list[Transform] = [squeeze_layer(squeeze)]
        for _ in range(config["steps"]):
            if family == "resflow":
                layers.append(T.ActNorm(channels))
            # The squeezed image shape: the conv net normalizes its true operator norm on it.
            layers.append(
                block_class(
                    (channels, height, width),
                    hidden_channels=config["hidden"],
                    **block_kwargs,
                )
            )
        return T.CompositeTransform(layers)

    return factory


def iresnet_level_factory(
    size: str = "tiny",
    *,
    hidden: int | None = None,
    blocks: int | None = None,
    steps: int | None = None,
    squeeze: str = "pixel",
    **block_kwargs: Any,
) -> LevelFactory:
    """i-ResNet level: squeeze, then ``steps`` invertible residual blocks.

    ``block_kwargs`` go to every :class:`~lcma_ext.transforms.InvertibleResNetBlock` (an
    unknown name raises ``TypeError`` when the level is built); ``squeeze`` is one of
    :data:`SQUEEZES`.
    """
    config = _resolve("iresnet", size, {"hidden": hidden, "blocks": blocks, "steps": steps})
    return _residual_factory("iresnet", config, squeeze, block_kwargs)


def resflow_level_factory(
    size: str = "tiny",
    *,
    hidden: int | None = None,
    blocks: int | None = None,
    steps: int | None = None,
    squeeze: str = "pixel",
    **block_kwargs: Any,
) -> LevelFactory:
    """Residual Flow level: squeeze, then ``steps`` x [ActNorm, residual flow block].

    ``block_kwargs`` go to every :class:`~lcma_ext.transforms.ResidualFlowBlock` (an unknown
    name raises ``TypeError`` when the level is built); ``squeeze`` is one of
    :data:`SQUEEZES`.
    """
    config = _resolve("resflow", size, {"hidden": hidden, "blocks": blocks, "steps": steps})
    return _residual_factory("resflow", config, squeeze, block_kwargs)


#: Model name -> ``(size="tiny", **overrides) -> LevelFactory``.
MODELS: dict[str, Callable[..., LevelFactory]] = {
    "realnvp": realnvp_level_factory,
    "glow": glow_level_factory,
    "iresnet": iresnet_level_factory,
    "resflow": resflow_level_factory,
}


def make_level_factory(model: str, size: str = "tiny", **overrides: Any) -> LevelFactory:
    """Level factory of ``model`` (a key of :data:`MODELS`) at ``size``."""
    if model not in MODELS:
        raise ValueError(f"expected model in {tuple(MODELS)}; got {model!r}")
    return MODELS[model](size, **overrides)


def _squeeze_level(level_index: int, input_shape: tuple[int, ...]) -> Transform:
    """A level's shapes without its steps: every family's level is its squeeze, shape-wise."""
    _squeezed(level_index, input_shape)  # the factories' own check, with their message
    return T.SqueezeTransform()


def level_shapes(
    input_shape: Sequence[int], num_levels: int | None = None
) -> Iterator[LevelShapes]:
    """The level shapes of a multi-scale flow of this module's families, building no model.

    :func:`lcma_ext.multiscale.walk_levels` of levels that are only their squeeze (every
    family's level begins with it and keeps its shape after it), placement
    ``"post_squeeze"``: split point ``l`` sees :attr:`LevelShapes.output_shape`, whose
    ``H x W`` is its grid of local blocks.

    Args:
        input_shape: Image shape ``(C, H, W)``.
        num_levels: Number of levels; ``None``: levels while the shape allows a squeeze (the
            walk raises ``ValueError`` at the first that does not).

    Raises:
        ValueError: for a shape that is not ``(C, H, W)``, or one a level cannot squeeze.
    """
    if len(input_shape) != 3:
        raise ValueError(f"expected an image shape (C, H, W); got {tuple(input_shape)}")
    return walk_levels(_squeeze_level, input_shape, num_levels)


def max_num_levels(shape: Sequence[int]) -> int:
    """Largest number of levels (one squeeze each) an image shape ``(C, H, W)`` allows."""
    steps = level_shapes(shape)
    levels = 0
    try:
        for _ in steps:
            levels += 1
    except ValueError:  # the next level's squeeze needs an even H and W
        pass
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
