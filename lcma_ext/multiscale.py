"""``ContributionMultiscaleFlow``: nflows' multi-scale composite with a pluggable split per level.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.3-3.4, Algorithm 1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from nflows.transforms import base as nflows_base
from torch import Tensor, nn

from lcma_ext.splits import (
    PLACEMENTS,
    SPLIT_NAMES,
    ChannelSplit,
    Split,
    kept_shape,
    make_split,
)
from lcma_ext.transforms.base import DiagMixin, carry_positions, require_diag_aware

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

    @property
    def splits(self) -> list[Split]:
        """The split objects, one per split point (``num_transforms - 1``)."""
        return list(self._splits)

    def add_transform(
        self,
        transform: nflows_base.Transform,
        transform_output_shape: Sequence[int],
        split: Split | None = None,
    ) -> tuple[int, ...] | None:
        """Add the next level and the split after it.

        Args:
            transform: The level.
            transform_output_shape: Event shape of the level's outputs.
            split: The split after this level; ``None`` means ``ChannelSplit(split_dim)``. Must
                be ``None`` for the last level, which is not split.

        Returns:
            The kept half's event shape (the next level's input shape), or ``None`` after the
            last level.

        Raises:
            RuntimeError: when adding more than ``num_transforms`` levels.
            ValueError: for a split on the last level or a shape the split cannot take.
        """
        if len(self._transforms) >= self._num_transforms:
            raise RuntimeError(f"expected at most {self._num_transforms} transforms; got one more")
        shape = tuple(int(size) for size in transform_output_shape)
        last = len(self._transforms) == self._num_transforms - 1
        if last:
            if split is not None:
                raise ValueError("expected split=None for the last transform (it is not split)")
            self._transforms.append(transform)
            self._output_shapes.append(shape)
            return None
        if split is None:
            split = ChannelSplit(dim=self._split_dim)
        if not isinstance(split, Split):
            raise TypeError(f"expected a lcma_ext.splits.Split; got {type(split).__name__}")
        factored_shape, kept = split.output_shapes(shape)
        split.bind(shape)
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
        for transform, split in zip(self._transforms[:-1], self._splits):
            transform_outputs, logabsdet = transform(hiddens, context)
            outputs, hiddens = split(transform_outputs)
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
        for index in range(len(self._splits) - 1, -1, -1):
            joined = self._splits[index].inverse(chunks[index], hiddens)
            hiddens, logabsdet = self._transforms[index].inverse(joined, context)
            total_logabsdet += logabsdet
        return hiddens, total_logabsdet

    def _forward_with_diag(self, inputs, context, diag):
        self._check_complete()
        batch_size = inputs.shape[0]
        hiddens = inputs
        all_outputs, all_diags = [], []
        total_logabsdet = inputs.new_zeros(batch_size)
        for index, transform in enumerate(self._transforms):
            level = require_diag_aware(transform, f"ContributionMultiscaleFlow level {index}")
            outputs, logabsdet, diag = level.forward_with_diag(hiddens, context, diag)
            total_logabsdet += logabsdet
            if index < len(self._splits):
                split = self._splits[index]
                outputs, hiddens = split(outputs)
                factored_diag, diag = split.carry(diag)
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
    ) -> ContributionMultiscaleFlow:
        """Assemble a flow from built levels and one split per split point (``None``: channel).

        Raises:
            ValueError: if the number of splits is not ``len(levels) - 1``.
        """
        splits = [None] * (len(levels) - 1) if splits is None else list(splits)
        if len(splits) != len(levels) - 1:
            raise ValueError(
                f"expected {len(levels) - 1} splits for {len(levels)} levels; got {len(splits)}"
            )
        flow = cls(len(levels))
        shape = tuple(input_shape)
        for index, level in enumerate(levels):
            output_shape = level_output_shape(level, shape)
            split = splits[index] if index < len(splits) else None
            shape = flow.add_transform(level, output_shape, split)
        return flow

    @classmethod
    def from_contributions(
        cls,
        level_factory: LevelFactory | None,
        input_shape: Sequence[int],
        contributions: Any = None,
        split: str = "lcma",
        *,
        num_levels: int | None = None,
        levels: Sequence[nflows_base.Transform] | None = None,
        placement: str | None = None,
        seed: int = 0,
        remap: bool = False,
    ) -> ContributionMultiscaleFlow:
        """Build an (untrained) multi-scale flow whose split points follow ``contributions``.

        Args:
            level_factory: ``level_factory(level_index, input_shape) -> Transform``; used only
                when neither ``levels`` nor in-memory levels inside ``contributions`` exist.
            input_shape: Event shape of the data.
            contributions: A :class:`lcma_ext.ContributionMaps` (from
                :func:`lcma_ext.estimate_contributions` or ``ContributionMaps.load``), a list of
                maps (one tensor per split point, in this flow's layout), or ``None`` for the
                static splits.
            split: One of :data:`lcma_ext.splits.SPLIT_NAMES`.
            num_levels: Number of levels; taken from ``contributions`` when given.
            levels: Prebuilt levels to use as they are.
            placement: ``"post_squeeze"`` or ``"squeeze"``; taken from ``contributions`` when
                it is a ``ContributionMaps``.
            seed: Seed of :class:`lcma_ext.RandomSplit`; split point ``l`` uses ``seed + l``.
            remap: If the levels rearrange dimensions differently from the ones the maps were
                measured with (for example a freshly built Glow level with another random 1x1
                convolution permutation), ``False`` raises, ``True`` re-maps the NMS
                contributions onto these levels (no NMS run is needed).

        Levels are chosen in this order: ``levels``; deep copies of the levels kept in memory by
        ``contributions`` (so random permutations agree with the measured maps); new levels from
        ``level_factory``.

        Raises:
            ValueError: for inconsistent arguments or maps.
            RuntimeError: for levels that do not match the maps (unless ``remap``).
        """
        if split not in SPLIT_NAMES:
            raise ValueError(f"expected a split name in {SPLIT_NAMES}; got {split!r}")
        is_maps_object = hasattr(contributions, "maps_for_levels")
        if is_maps_object:
            if placement is not None and placement != contributions.placement:
                raise ValueError(
                    f"expected placement {contributions.placement!r} (the maps' placement); "
                    f"got {placement!r}"
                )
            placement = contributions.placement
            if num_levels is not None and num_levels != contributions.num_levels:
                raise ValueError(
                    f"expected num_levels {contributions.num_levels} (from the maps); got "
                    f"{num_levels}"
                )
            num_levels = contributions.num_levels
            if tuple(input_shape) != tuple(contributions.input_shape):
                raise ValueError(
                    f"expected input_shape {tuple(contributions.input_shape)} (from the maps); "
                    f"got {tuple(input_shape)}"
                )
        elif contributions is not None:
            contributions = list(contributions)
            if num_levels is not None and num_levels != len(contributions) + 1:
                raise ValueError(
                    f"expected {num_levels - 1} maps for {num_levels} levels; got "
                    f"{len(contributions)}"
                )
            num_levels = len(contributions) + 1
        placement = "post_squeeze" if placement is None else placement
        if levels is not None:
            levels = list(levels)
            num_levels = len(levels) if num_levels is None else num_levels
            if len(levels) != num_levels:
                raise ValueError(f"expected {num_levels} levels; got {len(levels)}")
        elif is_maps_object and contributions.levels is not None:
            levels = [copy.deepcopy(level) for level in contributions.levels]
        else:
            if num_levels is None:
                raise ValueError("expected num_levels (no contributions or levels given); got None")
            if level_factory is None:
                raise ValueError("expected a level_factory (no levels given); got None")
            levels = build_levels(level_factory, input_shape, num_levels, placement)

        maps: list[Tensor | None] = [None] * (num_levels - 1)
        if split in ("lcma", "high"):
            if contributions is None:
                raise ValueError(f"split {split!r} expected contributions; got None")
            if is_maps_object:
                factor_out = "low" if split == "lcma" else "high"
                maps = contributions.maps_for_levels(levels, factor_out, check=not remap)
            else:
                maps = contributions
        splits = []
        shape = tuple(input_shape)
        for index, level in enumerate(levels[:-1]):
            output_shape = level_output_shape(level, shape)
            splits.append(make_split(split, output_shape, maps[index], seed + index, placement))
            shape = kept_shape(output_shape, placement)
        return cls.from_levels(levels, input_shape, splits)
