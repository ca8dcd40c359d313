"""``ContributionMultiscaleFlow``: nflows' multi-scale composite with a pluggable split per level.

The structure only; builders from split names and contribution maps are in
:mod:`lcma_ext.pipeline`.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.3-3.4, Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from nflows.transforms import base as nflows_base
from torch import Tensor, nn

from lcma_ext.splits import PLACEMENTS, ChannelSplit, Split, kept_shape
from lcma_ext.transforms.base import DiagMixin, carry_positions, require_diag_aware
from lcma_ext.transforms.factor_prior import PRIORS, ConditionalGaussianPrior

__all__ = [
    "ContributionMultiscaleFlow",
    "LevelFactory",
    "build_levels",
    "check_level_arguments",
    "level_output_shape",
]

LevelFactory = Callable[[int, tuple[int, ...]], nflows_base.Transform]


def level_output_shape(level: nflows_base.Transform, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Event shape of ``level``'s outputs, found without running data through it (``carry``)."""
    return tuple(carry_positions(require_diag_aware(level), tuple(input_shape)).shape)


def check_level_arguments(num_levels: int, placement: str) -> None:
    """Raise ``ValueError`` unless ``num_levels`` is a positive int and ``placement`` is known."""
    if not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"expected num_levels as a positive int; got {num_levels!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"expected placement in {PLACEMENTS}; got {placement!r}")


def build_levels(
    level_factory: LevelFactory,
    input_shape: Sequence[int],
    num_levels: int,
    placement: str = "post_squeeze",
) -> list[nflows_base.Transform]:
    """Build the ``num_levels`` levels of a multi-scale flow with ``level_factory``.

    Level ``l`` receives the kept half of level ``l - 1``'s output (the same shape for every
    split type of a placement).

    Raises:
        ValueError: for ``num_levels < 1``, an unknown placement, or shapes the placement
            cannot split.
        TypeError: if the factory returns a transform that is not diag-aware.
    """
    check_level_arguments(num_levels, placement)
    shape = tuple(int(size) for size in input_shape)
    levels = []
    for index in range(num_levels):
        level = level_factory(index, shape)
        require_diag_aware(level, f"level {index} from level_factory")
        output_shape = level_output_shape(level, shape)
        levels.append(level)
        if index < num_levels - 1:
            shape = kept_shape(output_shape, placement)
    return levels


class ContributionMultiscaleFlow(DiagMixin, nflows_base.MultiscaleCompositeTransform):
    """nflows ``MultiscaleCompositeTransform`` whose split points take any :class:`Split`.

    Same contract as the parent: call :meth:`add_transform` ``num_transforms`` times, level by
    level; it returns the next level's input shape (``None`` after the last). ``forward``
    returns the flattened concatenation of every factored half and the last level's output, in
    that order, and the total log|det J|. With :class:`ChannelSplit` at every split point the
    outputs and log-det equal the parent's exactly. Also speaks the per-dimension protocol
    (``forward_with_diag``, ``carry``; outputs flattened like ``forward``).

    Args:
        num_transforms: Total number of levels to add.
        split_dim: Dimension of the default :class:`ChannelSplit` (as nflows).

    Shapes:
        inputs: ``(B, *input_shape)``; outputs: ``(B, D)``.

    References:
        L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
        S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture
        for Generative Flows, Sec. 3.3.
    """

    def __init__(self, num_transforms: int, split_dim: int = 1) -> None:
        super().__init__(num_transforms, split_dim=split_dim)
        self._splits = nn.ModuleList()
        # split point index (as a string) -> the conditional prior of its factored half; a
        # split point without an entry has the standard-normal prior (nflows' behaviour)
        self._priors = nn.ModuleDict()

    @property
    def levels(self) -> list[nflows_base.Transform]:
        """The levels, data side first (``num_transforms`` once complete)."""
        return list(self._transforms)

    @property
    def splits(self) -> list[Split]:
        """The split objects, one per split point (``num_transforms - 1``)."""
        return list(self._splits)

    @property
    def priors(self) -> list[ConditionalGaussianPrior | None]:
        """Per split point, its conditional prior, or ``None`` for the standard normal."""
        return [self._priors[str(index)] if str(index) in self._priors else None
                for index in range(len(self._splits))]  # fmt: skip

    def add_transform(
        self,
        transform: nflows_base.Transform,
        transform_output_shape: Sequence[int],
        split: Split | None = None,
        prior: str | ConditionalGaussianPrior = "standard",
    ) -> tuple[int, ...] | None:
        """Add the next level and the split after it.

        Args:
            transform: The level.
            transform_output_shape: Event shape of the level's outputs.
            split: The split after this level; ``None`` means ``ChannelSplit(split_dim)``. Must
                be ``None`` for the last level, which is not split.
            prior: The prior of the factored half: ``"standard"`` (default; the standard normal,
                as nflows), ``"conditional"`` (Glow's learned Gaussian given the kept half, a
                zero-initialised :class:`lcma_ext.transforms.ConditionalGaussianPrior`), or such
                a prior built for the split's halves. Must be ``"standard"`` on the last level.

        Returns:
            The kept half's event shape (the next level's input shape), or ``None`` after the
            last level.

        Raises:
            RuntimeError: when adding more than ``num_transforms`` levels.
            ValueError: for a split or prior on the last level, an unknown prior, or a shape
                the split cannot take.
        """
        if not isinstance(prior, ConditionalGaussianPrior) and prior not in PRIORS:
            raise ValueError(
                f"expected prior in {PRIORS} or a ConditionalGaussianPrior; got {prior!r}"
            )
        if len(self._transforms) >= self._num_transforms:
            raise RuntimeError(f"expected at most {self._num_transforms} transforms; got one more")
        shape = tuple(int(size) for size in transform_output_shape)
        last = len(self._transforms) == self._num_transforms - 1
        if last:
            if split is not None:
                raise ValueError("expected split=None for the last transform (it is not split)")
            if prior != "standard":
                raise ValueError(
                    "expected prior='standard' for the last transform (it has no factored half)"
                )
            self._transforms.append(transform)
            self._output_shapes.append(shape)
            return None
        if split is None:
            split = ChannelSplit(dim=self._split_dim)
        if not isinstance(split, Split):
            raise TypeError(f"expected a lcma_ext.splits.Split; got {type(split).__name__}")
        factored_shape, kept = split.output_shapes(shape)
        split.bind(shape)
        if prior == "conditional":
            prior = ConditionalGaussianPrior(factored_shape, kept)
        if isinstance(prior, ConditionalGaussianPrior):
            if (prior.factored_shape, prior.kept_shape) != (tuple(factored_shape), tuple(kept)):
                raise ValueError(
                    f"expected a prior for halves {tuple(factored_shape)} and {tuple(kept)}; got "
                    f"one for {prior.factored_shape} and {prior.kept_shape}"
                )
            self._priors[str(len(self._splits))] = prior
        self._transforms.append(transform)
        self._splits.append(split)
        self._output_shapes.append(tuple(factored_shape))
        return tuple(kept)

    def _check_complete(self) -> None:
        if self._num_transforms != len(self._transforms):
            raise RuntimeError(
                f"expected exactly {self._num_transforms} transform(s) to be added; got "
                f"{len(self._transforms)}"
            )

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self._split_dim >= inputs.dim():
            raise ValueError(
                f"expected inputs with a dim {self._split_dim}; got shape {tuple(inputs.shape)}"
            )
        self._check_complete()
        batch_size = inputs.shape[0]
        hiddens = inputs
        all_outputs = []
        total_logabsdet = inputs.new_zeros(batch_size)
        for transform, split, prior in zip(self._transforms[:-1], self._splits, self.priors):
            transform_outputs, logabsdet = transform(hiddens, context)
            outputs, hiddens = split(transform_outputs)
            if prior is not None:
                outputs, prior_logabsdet = prior(outputs, hiddens)
                logabsdet = logabsdet + prior_logabsdet
            all_outputs.append(outputs.reshape(batch_size, -1))
            total_logabsdet += logabsdet
        outputs, logabsdet = self._transforms[-1](hiddens, context)
        all_outputs.append(outputs.reshape(batch_size, -1))
        total_logabsdet += logabsdet
        return torch.cat(all_outputs, dim=-1), total_logabsdet

    def _chunks(self, inputs: Tensor) -> list[Tensor]:
        if inputs.dim() != 2:
            raise ValueError(f"expected (B, D) inputs; got shape {tuple(inputs.shape)}")
        self._check_complete()
        sizes = [int(np.prod(shape)) for shape in self._output_shapes]
        if inputs.shape[1] != sum(sizes):
            raise ValueError(f"expected {sum(sizes)} features; got {inputs.shape[1]}")
        flat = torch.split(inputs, sizes, dim=1)
        return [chunk.reshape(-1, *shape) for chunk, shape in zip(flat, self._output_shapes)]

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        chunks = self._chunks(inputs)
        total_logabsdet = inputs.new_zeros(inputs.shape[0])
        hiddens, logabsdet = self._transforms[-1].inverse(chunks[-1], context)
        total_logabsdet += logabsdet
        priors = self.priors
        for index in range(len(self._splits) - 1, -1, -1):
            factored = chunks[index]
            if priors[index] is not None:
                factored, logabsdet = priors[index].inverse(factored, hiddens)
                total_logabsdet += logabsdet
            joined = self._splits[index].inverse(factored, hiddens)
            hiddens, logabsdet = self._transforms[index].inverse(joined, context)
            total_logabsdet += logabsdet
        return hiddens, total_logabsdet

    def _forward_with_diag(self, inputs, context, diag):
        self._check_complete()
        batch_size = inputs.shape[0]
        hiddens = inputs
        all_outputs, all_diags = [], []
        total_logabsdet = inputs.new_zeros(batch_size)
        priors = self.priors
        for index, transform in enumerate(self._transforms):
            level = require_diag_aware(transform, f"ContributionMultiscaleFlow level {index}")
            outputs, logabsdet, diag = level.forward_with_diag(hiddens, context, diag)
            total_logabsdet += logabsdet
            if index < len(self._splits):
                split = self._splits[index]
                outputs, hiddens = split(outputs)
                factored_diag, diag = split.carry(diag)
                prior = priors[index]
                if prior is not None:
                    outputs, prior_logabsdet, own = prior.forward_with_diag(outputs, hiddens)
                    total_logabsdet += prior_logabsdet
                    factored_diag = factored_diag + own
            else:
                factored_diag = diag
            all_outputs.append(outputs.reshape(batch_size, -1))
            all_diags.append(factored_diag.reshape(batch_size, -1))
        return torch.cat(all_outputs, -1), total_logabsdet, torch.cat(all_diags, -1)

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """Rearrange ``tensor`` (shaped like the inputs) as the data; returns ``(B, D)``."""
        self._check_complete()
        batch_size = tensor.shape[0]
        pieces = []
        for index, transform in enumerate(self._transforms):
            level = require_diag_aware(transform, f"ContributionMultiscaleFlow level {index}")
            tensor = level.carry(tensor, context)
            if index < len(self._splits):
                factored, tensor = self._splits[index].carry(tensor)
            else:
                factored = tensor
            pieces.append(factored.reshape(batch_size, -1))
        return torch.cat(pieces, -1)

    @classmethod
    def from_levels(
        cls,
        levels: Sequence[nflows_base.Transform],
        input_shape: Sequence[int],
        splits: Sequence[Split | None] | None = None,
        prior: str | Sequence[str] = "standard",
    ) -> ContributionMultiscaleFlow:
        """Assemble a flow from built levels and one split per split point (``None``: channel).

        Args:
            levels: The levels.
            input_shape: Event shape of the data.
            splits: One split per split point; ``None`` for channel splits everywhere.
            prior: ``"standard"`` or ``"conditional"`` (see :meth:`add_transform`) for every
                split point, or one of them per split point.

        Raises:
            ValueError: if the number of splits or priors is not ``len(levels) - 1``.
        """
        splits = [None] * (len(levels) - 1) if splits is None else list(splits)
        if len(splits) != len(levels) - 1:
            raise ValueError(
                f"expected {len(levels) - 1} splits for {len(levels)} levels; got {len(splits)}"
            )
        priors = [prior] * len(splits) if isinstance(prior, str) else list(prior)
        if len(priors) != len(splits):
            raise ValueError(
                f"expected {len(splits)} priors for {len(levels)} levels; got {len(priors)}"
            )
        flow = cls(len(levels))
        shape = tuple(input_shape)
        for index, level in enumerate(levels):
            output_shape = level_output_shape(level, shape)
            if index < len(splits):
                shape = flow.add_transform(level, output_shape, splits[index], priors[index])
            else:
                flow.add_transform(level, output_shape)
        return flow
