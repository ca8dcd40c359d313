"""Multi-scale and non-multi-scale zuko flows.

zuko has no multi-scale flow. :class:`MultiscaleFlow` is a ``zuko.lazy.Flow``: calling it with a
context ``c`` (or none) gives zuko's ``NormalizingFlow``, with ``log_prob``, ``sample``,
``rsample`` and ``rsample_and_log_prob``. Its transform, :class:`MultiscaleTransform`, is a lazy
transform around the core's :class:`lcma_ext.ContributionMultiscaleFlow` of
:class:`lcma_ext.zuko.ZukoLevel` levels: at each split point a split of :mod:`lcma_ext.splits`
factors dimensions out to the base, optionally with Glow's conditional prior, exactly as in the
nflows flows (the split-point step is the core's; nothing is re-implemented here). The context
reaches every level. The transform maps data ``(*batch, *input_shape)`` to the flat
concatenation of every factored half and the last level's output, ``(*batch, D)``, scored by a
standard normal of ``D`` dimensions.

:class:`NMSFlow` is a ``zuko.lazy.Flow`` whose transform is the non-multi-scale chain of the same
levels (one lazy transform per level), the flow Algorithm 1 pre-trains.

References:
    F. Rozet et al. Zuko: Normalizing flows in PyTorch. 2022.
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.3-3.4, Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from zuko.distributions import DiagNormal
from zuko.lazy import (
    Flow,
    LazyComposedTransform,
    LazyDistribution,
    LazyTransform,
    UnconditionalDistribution,
)

from lcma_ext.multiscale import ContributionMultiscaleFlow
from lcma_ext.splits import PLACEMENTS, Split
from lcma_ext.transforms.factor_prior import ConditionalGaussianPrior
from lcma_ext.zuko.levels import NflowsTransform, ZukoLevel

__all__ = ["MultiscaleFlow", "MultiscaleTransform", "NMSFlow", "flow_levels", "standard_normal"]


def standard_normal(shape: Sequence[int]) -> UnconditionalDistribution:
    """zuko's lazy standard normal of event shape ``shape`` (buffers, not parameters)."""
    shape = tuple(int(size) for size in shape)
    return UnconditionalDistribution(
        DiagNormal, torch.zeros(shape), torch.ones(shape), ndims=len(shape), buffer=True
    )


def flow_levels(flow: Flow) -> list[LazyTransform]:
    """The lazy transforms of a zuko flow's transform: a ``LazyComposedTransform``'s parts, or
    the transform itself."""
    if isinstance(flow.transform, LazyComposedTransform):
        return list(flow.transform.transforms)
    return [flow.transform]


class MultiscaleTransform(NflowsTransform):
    """A multi-scale composite of zuko levels, as a ``zuko.lazy.LazyTransform``.

    ``transform(c)`` maps data ``(*batch, *input_shape)`` to ``(*batch, D)`` (every factored half,
    then the last level's output, flattened), with ``c`` passed to every level.

    Args:
        transform: The core's :class:`lcma_ext.ContributionMultiscaleFlow` whose levels are
            :class:`lcma_ext.zuko.ZukoLevel` (as :func:`lcma_ext.zuko.build_multiscale_flow`
            builds it).
        input_shape: Event shape of the data.

    Raises:
        TypeError: for another transform, or a level that is not a ``ZukoLevel``.

    Shapes:
        x: ``(*batch, *input_shape)``; z: ``(*batch, D)`` with ``D = prod(input_shape)``.
    """

    def __init__(self, transform: ContributionMultiscaleFlow, input_shape: Sequence[int]) -> None:
        if not isinstance(transform, ContributionMultiscaleFlow):
            cls = type(transform)
            raise TypeError(
                "expected a lcma_ext.ContributionMultiscaleFlow of ZukoLevel levels; got "
                f"{cls.__module__}.{cls.__qualname__}"
            )
        for index, level in enumerate(transform.levels):
            if not isinstance(level, ZukoLevel):
                raise TypeError(
                    f"expected ZukoLevel levels; got {type(level).__name__} for level {index}"
                )
        super().__init__(transform, input_shape)

    @property
    def levels(self) -> list[ZukoLevel]:
        """The levels, data side first."""
        return list(self.transform.levels)

    @property
    def splits(self) -> list[Split]:
        """The split at each split point (``len(levels) - 1``)."""
        return self.transform.splits

    @property
    def priors(self) -> list[ConditionalGaussianPrior | None]:
        """Per split point, Glow's conditional prior of the factored half, or ``None``."""
        return self.transform.priors


class MultiscaleFlow(Flow):
    """A multi-scale zuko flow: ``flow(c)`` is zuko's ``NormalizingFlow`` of a
    :class:`MultiscaleTransform`.

    Same constructor as ``zuko.lazy.Flow``; the base defaults to the standard normal of the
    flattened latent (``D`` dimensions). Build one with
    :func:`lcma_ext.zuko.build_multiscale_flow`.

    Args:
        transform: A :class:`MultiscaleTransform`.
        base: A lazy distribution of event shape ``(D,)``; ``None``: the standard normal.

    Raises:
        TypeError: for a transform that is not a :class:`MultiscaleTransform`.

    The per-dimension log-dets of the whole flow (each latent dimension's cumulative
    contribution, conditional priors included) are
    ``lcma_ext.zuko.call_and_ladj_with_diag(flow(c).transform, x)``.

    Shapes:
        x: ``(*batch, *input_shape)``; ``flow(c).log_prob(x)``: ``batch``;
        ``flow(c).sample((n,))``: ``(n, *c.shape[:-1], *input_shape)``.

    References:
        F. Rozet et al. Zuko: Normalizing flows in PyTorch. 2022.
        S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture
        for Generative Flows, Sec. 3.3.
    """

    def __init__(
        self, transform: MultiscaleTransform, base: LazyDistribution | None = None
    ) -> None:
        if not isinstance(transform, MultiscaleTransform):
            cls = type(transform)
            raise TypeError(
                f"expected a lcma_ext.zuko.MultiscaleTransform; got {cls.__module__}."
                f"{cls.__qualname__}"
            )
        if base is None:
            base = standard_normal(transform.output_shape)
        super().__init__(transform, base)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Event shape of the data."""
        return self.transform.input_shape

    @property
    def levels(self) -> list[ZukoLevel]:
        """The levels, data side first (their ``transform`` is the zuko lazy transform)."""
        return self.transform.levels

    @property
    def splits(self) -> list[Split]:
        """The split at each split point."""
        return self.transform.splits

    @property
    def priors(self) -> list[ConditionalGaussianPrior | None]:
        """Per split point, Glow's conditional prior, or ``None`` (standard normal)."""
        return self.transform.priors


class NMSFlow(Flow):
    """The non-multi-scale (NMS) zuko flow of Algorithm 1: the same levels, nothing factored out.

    Same constructor as ``zuko.lazy.Flow``, plus what the estimator needs to know. The
    transform is a sequence of lazy transforms, one per level (data side first), or a
    ``LazyComposedTransform`` of them. Train it like any zuko flow
    (``loss = -flow(c).log_prob(x).mean()``). Build one with :func:`lcma_ext.zuko.build_nms_flow`.

    Args:
        transform: One lazy transform per level, or a ``LazyComposedTransform`` of them.
        base: A lazy distribution of the last level's output shape.
        input_shape: Event shape of the data, if known.
        placement: The placement the levels were built for, if known.

    Raises:
        ValueError: for an unknown placement.

    References:
        S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture
        for Generative Flows, Sec. 3.4, Algorithm 1.
    """

    def __init__(
        self,
        transform: LazyTransform | Sequence[LazyTransform],
        base: LazyDistribution,
        *,
        input_shape: Sequence[int] | None = None,
        placement: str | None = None,
    ) -> None:
        super().__init__(transform, base)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if placement is not None and placement not in PLACEMENTS:
            raise ValueError(f"NMSFlow: expected placement in {PLACEMENTS}; got {placement!r}")
        self.placement = placement

    @property
    def levels(self) -> list[LazyTransform]:
        """The lazy transform of each level, data side first."""
        return flow_levels(self)
