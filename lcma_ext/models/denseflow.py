"""A small multi-scale DenseFlow-style model: Glow units joined by cross-unit coupling.

One level (a DenseFlow *block*, :class:`DenseFlowBlock`) is: squeeze, then ``units`` units of
``steps`` Glow steps (ActNorm, invertible 1x1 convolution, affine coupling), with a
:class:`lcma_ext.transforms.CrossUnitCoupling` after every unit but the last. Coupling ``i``
adds ``growth`` noise channels whose ``(mu, sigma)`` come from the current latent and every
earlier unit output of the block (dense connectivity, paper 003 Fig. 1c and Fig. 3), so unit
``i`` works on ``4C + (i - 1) growth`` channels. Between blocks a channel split factors out half
of the channels ("squeeze-and-drop": the split here, the squeeze at the start of the next
block). The last block has a single unit (no noise), as in the paper.

The flow's ``log_prob`` is a one-sample lower bound (Eq. 9), stochastic in training and in
evaluation; score it with :func:`lcma_ext.distributions.evaluate_bpd_mc` (many samples of the
noise, IWAE-K with standard errors), never as an exact likelihood.

Example:
    >>> from lcma_ext.flows import flow_parts
    >>> from lcma_ext.models.denseflow import build_denseflow
    >>> flow = build_denseflow((1, 8, 8), num_levels=2, size="tiny")
    >>> flow_parts(flow).distribution._shape  # 64 data dims + 32 noise dims, flattened
    torch.Size([96])

References:
    M. Grcic, I. Grubisic, S. Segvic. Densely connected normalizing flows (DenseFlow, paper
    003), Sec. 2.1 and 3 (DenseFlow blocks, units, squeeze-and-drop).
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms.base import Transform
from torch import Tensor, nn

from lcma_ext import transforms as T
from lcma_ext.models.levels import LevelFactory, squeeze_layer
from lcma_ext.models.nets import ConvResNet
from lcma_ext.transforms.base import DiagMixin, carry_positions, check_diag

__all__ = [
    "DENSEFLOW_SIZES",
    "DenseFlowBlock",
    "build_denseflow",
    "denseflow_level_factory",
]

#: ``units`` per block (all but the last block), Glow ``steps`` per unit, noise ``growth``
#: channels per cross-unit coupling, ``hidden`` width of the coupling and conditioner nets.
DENSEFLOW_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"units": 2, "steps": 2, "growth": 2, "hidden": 16},
    "small": {"units": 3, "steps": 3, "growth": 4, "hidden": 32},
    "medium": {"units": 4, "steps": 4, "growth": 6, "hidden": 64},
    "paper": {"units": 5, "steps": 3, "growth": 6, "hidden": 128},
}


def _half_mask(channels: int, flip: bool) -> Tensor:
    mask = torch.zeros(channels, dtype=torch.long)
    mask[channels // 2 :] = 1
    return 1 - mask if flip else mask


def _glow_unit(channels: int, steps: int, hidden: int) -> T.CompositeTransform:
    def net(in_channels: int, out_channels: int) -> ConvResNet:
        return ConvResNet(in_channels, out_channels, hidden, 1)

    layers: list[Transform] = []
    for k in range(steps):
        layers += [
            T.ActNorm(channels),
            T.OneByOneConvolution(channels),
            T.AffineCouplingTransform(_half_mask(channels, k % 2 == 1), net),
        ]
    return T.CompositeTransform(layers)


class DenseFlowBlock(DiagMixin, Transform):
    """Squeeze, then ``units`` Glow units with cross-unit coupling between them.

    Args:
        input_shape: ``(C, H, W)`` of the block's input (``H``, ``W`` even).
        units: Number of units (``units - 1`` cross-unit couplings).
        steps: Glow steps per unit.
        growth: Noise channels added by each cross-unit coupling.
        hidden: Width of the coupling nets and of the conditioners.
        squeeze: ``"pixel"`` (nflows) or ``"haar"``.

    Shapes:
        inputs: ``(B, C, H, W)``; outputs ``(B, 4C + (units - 1) growth, H/2, W/2)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        units: int = 2,
        steps: int = 2,
        growth: int = 2,
        hidden: int = 16,
        squeeze: str = "pixel",
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"expected an image shape (C, H, W); got {tuple(input_shape)}")
        c, h, w = (int(s) for s in input_shape)
        if h % 2 or w % 2:
            raise ValueError(f"DenseFlowBlock: expected even H and W; got {h}x{w}")
        for name, value in (("units", units), ("steps", steps), ("growth", growth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} a positive int; got {value!r}")
        self.squeeze = squeeze_layer(squeeze)
        channels = 4 * c
        self.units = nn.ModuleList()
        self.couplings = nn.ModuleList()
        cond = 0
        for index in range(units):
            self.units.append(_glow_unit(channels, steps, hidden))
            if index < units - 1:
                cond += channels
                self.couplings.append(T.CrossUnitCoupling(channels, growth, cond, hidden=hidden))
                channels += growth
        self.output_channels = channels

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        outputs, logabsdet, _ = self._run(inputs, context, None)
        return outputs, logabsdet

    def _run(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        with_diag = diag is not None
        if with_diag:
            hidden, total, diag = self.squeeze.forward_with_diag(inputs, context, diag)
        else:
            hidden, total = self.squeeze(inputs, context)
        previous: list[Tensor] = []  # unit outputs z_{i-1}, ..., z_1 (newest first)
        for index, unit in enumerate(cast("Iterable[T.CompositeTransform]", self.units)):
            if with_diag:
                hidden, logabsdet, diag = unit.forward_with_diag(hidden, context, diag)
            else:
                hidden, logabsdet = unit(hidden, context)
            total = total + logabsdet
            if index < len(self.couplings):
                coupling = cast(T.CrossUnitCoupling, self.couplings[index])
                latent = hidden
                if with_diag:
                    hidden, term, diag = coupling.forward_with_diag(
                        latent, context, diag, previous=previous
                    )
                else:
                    hidden, term = coupling(latent, context, previous=previous)
                previous.insert(0, latent)
                total = total + term
        return hidden, total, diag

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Invert the units, dropping each coupling's noise channels (log-det of those: 0)."""
        hidden, total = inputs, inputs.new_zeros(inputs.shape[0])
        for index in range(len(self.units) - 1, -1, -1):
            if index < len(self.couplings):
                hidden, _ = cast(T.CrossUnitCoupling, self.couplings[index]).inverse(
                    hidden, context
                )
            unit = cast(T.CompositeTransform, self.units[index])
            hidden, logabsdet = unit.inverse(hidden, context)
            total = total + logabsdet
        hidden, logabsdet = self.squeeze.inverse(hidden, context)
        return hidden, total + logabsdet

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        outputs, logabsdet, diag_out = self._run(inputs, context, check_diag(inputs, diag))
        return outputs, logabsdet, cast(Tensor, diag_out)  # given a diag, _run returns one

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        tensor = self.squeeze.carry(tensor)
        for index, unit in enumerate(cast("Iterable[T.CompositeTransform]", self.units)):
            tensor = unit.carry(tensor)
            if index < len(self.couplings):
                tensor = cast(T.CrossUnitCoupling, self.couplings[index]).carry(tensor)
        return tensor


def denseflow_level_factory(
    size: str = "tiny",
    *,
    units: int | None = None,
    steps: int | None = None,
    growth: int | None = None,
    hidden: int | None = None,
    squeeze: str = "pixel",
    num_levels: int | None = None,
) -> LevelFactory:
    """Level factory of DenseFlow blocks; with ``num_levels`` the last block has one unit."""
    if size not in DENSEFLOW_SIZES:
        raise ValueError(f"expected size in {tuple(DENSEFLOW_SIZES)}; got {size!r}")
    config = dict(DENSEFLOW_SIZES[size])
    for key, value in (("units", units), ("steps", steps), ("growth", growth), ("hidden", hidden)):
        if value is not None:
            config[key] = value

    def factory(level_index: int, input_shape: tuple[int, ...]) -> DenseFlowBlock:
        last = num_levels is not None and level_index == num_levels - 1
        return DenseFlowBlock(
            input_shape,
            units=1 if last else config["units"],
            steps=config["steps"],
            growth=config["growth"],
            hidden=config["hidden"],
            squeeze=squeeze,
        )

    return factory


def build_denseflow(
    shape: Sequence[int], num_levels: int, size: str = "tiny", **overrides: Any
) -> Flow:
    """Multi-scale DenseFlow-style ``Flow`` with a channel split (squeeze-and-drop) per level.

    Args:
        shape: Image shape ``(C, H, W)``.
        num_levels: Number of blocks (one squeeze each).
        size: A key of :data:`DENSEFLOW_SIZES`.
        **overrides: ``units``, ``steps``, ``growth``, ``hidden``, ``squeeze``.

    Returns:
        An nflows ``Flow`` whose base is ``N(0, I)`` over the flattened data dims plus every
        noise dim; its ``log_prob`` is a stochastic lower bound.
    """
    from lcma_ext.multiscale import ContributionMultiscaleFlow, build_levels

    shape = tuple(int(s) for s in shape)
    factory = denseflow_level_factory(size, num_levels=num_levels, **overrides)
    levels = build_levels(factory, shape, num_levels)
    transform = ContributionMultiscaleFlow.from_levels(levels, shape)
    latent = math.prod(carry_positions(transform, shape).shape)
    return Flow(transform, StandardNormal([latent]))
