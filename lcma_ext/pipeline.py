"""Algorithm 1 end to end: NMS flow and multi-scale flow from one level factory.

Typical use (see docs/lcma.md)::

    nms = build_nms_transform(level_factory, shape, num_levels)       # then train it (partially)
    flow, maps = lcma_from_nms(nms, level_factory, shape, num_levels, train_data)
    model = nflows.flows.Flow(flow, StandardNormal([math.prod(shape)]))  # then train by ML

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.4, Algorithm 1.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from nflows.transforms import base as nflows_base

from lcma_ext.contributions import ContributionMaps, estimate_contributions
from lcma_ext.multiscale import (
    ContributionMultiscaleFlow,
    LevelFactory,
    build_levels,
    check_level_arguments,
    level_output_shape,
)
from lcma_ext.splits import (
    DEFAULT_REGION_SIZE,
    GRANULAR_SPLIT_NAMES,
    SPLIT_NAMES,
    kept_shape,
    make_split,
)
from lcma_ext.transforms import CompositeTransform, SqueezeTransform

__all__ = [
    "LevelFactory",
    "build_levels",
    "build_multiscale_transform",
    "build_nms_transform",
    "lcma_from_nms",
]


def build_nms_transform(
    level_factory: LevelFactory,
    input_shape: Sequence[int],
    num_levels: int,
    placement: str = "post_squeeze",
) -> CompositeTransform:
    """The non-multi-scale (NMS) flow: the same levels, nothing factored out.

    Level ``l`` receives the full output of level ``l - 1``. With ``placement="squeeze"``
    (where the multi-scale flow's split squeezes), each NMS level but the last is followed by a
    :class:`lcma_ext.transforms.SqueezeTransform` inside the same level entry, so the NMS flow
    still has exactly ``num_levels`` components, one per level.

    Returns:
        A :class:`lcma_ext.transforms.CompositeTransform` of the ``num_levels`` levels.

    Raises:
        ValueError: for ``num_levels < 1`` or an unknown placement.
    """
    check_level_arguments(num_levels, placement)
    shape = tuple(int(size) for size in input_shape)
    levels = []
    for index in range(num_levels):
        level = level_factory(index, shape)
        shape = level_output_shape(level, shape)
        if placement == "squeeze" and index < num_levels - 1:
            squeeze = SqueezeTransform()
            shape = level_output_shape(squeeze, shape)
            level = CompositeTransform([level, squeeze])
        levels.append(level)
    return CompositeTransform(levels)


def build_multiscale_transform(
    level_factory: LevelFactory,
    input_shape: Sequence[int],
    num_levels: int,
    split: str = "channel",
    contributions: ContributionMaps | Sequence[Any] | None = None,
    seed: int = 0,
    placement: str = "post_squeeze",
    levels: Sequence[nflows_base.Transform] | None = None,
    remap: bool = False,
    region_size: int = DEFAULT_REGION_SIZE,
) -> ContributionMultiscaleFlow:
    """A multi-scale flow from ``level_factory`` with the named split at every split point.

    Args:
        level_factory: ``level_factory(level_index, input_shape) -> Transform``.
        input_shape: Event shape of the data.
        num_levels: Number of levels (split points: ``num_levels - 1``).
        split: One of :data:`lcma_ext.splits.SPLIT_NAMES` or
            :data:`lcma_ext.splits.GRANULAR_SPLIT_NAMES` (``"lcma-channel"``, ``"lcma-region"``,
            ``"high-channel"``, ``"high-region"``: LCMA with that granularity, see
            docs/granularity.md).
        contributions: Required for the LCMA names; see
            :meth:`ContributionMultiscaleFlow.from_contributions`. With a
            :class:`ContributionMaps`, later split points see the contributions of the
            dimensions that the chosen split (granularity included) keeps.
        seed: Seed of the random split (split point ``l`` uses ``seed + l``).
        placement: ``"post_squeeze"`` or ``"squeeze"``; must match ``contributions``.
        levels: Prebuilt levels to use instead of the factory.
        remap: See :meth:`ContributionMultiscaleFlow.from_contributions`.
        region_size: Tile side of the ``"*-region"`` splits, in sites of each split point's
            grid of local blocks, capped at the grid (default 4).

    Raises:
        ValueError: for an unknown split name or missing contributions.
    """
    if split not in SPLIT_NAMES + GRANULAR_SPLIT_NAMES:
        raise ValueError(
            f"expected a split name in {SPLIT_NAMES + GRANULAR_SPLIT_NAMES}; got {split!r}"
        )
    if isinstance(contributions, ContributionMaps) and contributions.placement != placement:
        raise ValueError(
            f"expected placement {contributions.placement!r} (the contributions'); got "
            f"{placement!r}"
        )
    if split in GRANULAR_SPLIT_NAMES:
        return _granular_multiscale(
            level_factory,
            input_shape,
            num_levels,
            split,
            contributions,
            placement,
            levels,
            remap,
            region_size,
        )
    return ContributionMultiscaleFlow.from_contributions(
        level_factory,
        input_shape,
        contributions,
        split,
        num_levels=num_levels,
        levels=levels,
        placement=placement,
        seed=seed,
        remap=remap,
    )


def _granular_multiscale(
    level_factory: LevelFactory,
    input_shape: Sequence[int],
    num_levels: int,
    split: str,
    contributions: ContributionMaps | Sequence[Any] | None,
    placement: str,
    levels: Sequence[nflows_base.Transform] | None,
    remap: bool,
    region_size: int,
) -> ContributionMultiscaleFlow:
    """:func:`build_multiscale_transform` for :data:`GRANULAR_SPLIT_NAMES`.

    Levels are chosen as in :meth:`ContributionMultiscaleFlow.from_contributions`; the NMS
    maps are tracked through splits of the same granularity.
    """
    if contributions is None:
        raise ValueError(f"split {split!r} expected contributions; got None")
    shape = tuple(int(size) for size in input_shape)
    if isinstance(contributions, ContributionMaps):
        if shape != tuple(contributions.input_shape):
            raise ValueError(
                f"expected input_shape {tuple(contributions.input_shape)} (from the maps); got "
                f"{shape}"
            )
        if num_levels != contributions.num_levels:
            raise ValueError(
                f"expected num_levels {contributions.num_levels} (from the maps); got {num_levels}"
            )
        if levels is None and contributions.levels is not None:
            levels = [copy.deepcopy(level) for level in contributions.levels]
    if levels is None:
        levels = build_levels(level_factory, shape, num_levels, placement)
    levels = list(levels)
    if len(levels) != num_levels:
        raise ValueError(f"expected {num_levels} levels; got {len(levels)}")
    rule, _, granularity = split.partition("-")
    if isinstance(contributions, ContributionMaps):
        maps = contributions.maps_for_levels(
            levels,
            "low" if rule == "lcma" else "high",
            check=not remap,
            granularity=granularity,
            region_size=region_size,
        )
    else:
        maps = list(contributions)
        if len(maps) != num_levels - 1:
            raise ValueError(
                f"expected {num_levels - 1} maps for {num_levels} levels; got {len(maps)}"
            )
    splits = []
    for index, level in enumerate(levels[:-1]):
        output_shape = level_output_shape(level, shape)
        splits.append(
            make_split(
                split, output_shape, maps[index], placement=placement, region_size=region_size
            )
        )
        shape = kept_shape(output_shape, placement)
    return ContributionMultiscaleFlow.from_levels(levels, input_shape, splits)


def lcma_from_nms(
    nms_transform: Any,
    level_factory: LevelFactory,
    input_shape: Sequence[int],
    num_levels: int,
    data: Any,
    split: str = "lcma",
    batch_size: int = 256,
    progress: bool = True,
    placement: str = "post_squeeze",
) -> tuple[ContributionMultiscaleFlow, ContributionMaps]:
    """Algorithm 1's factorization phase: from a trained NMS flow to an untrained LCMA flow.

    Builds the multi-scale levels once, measures the NMS contributions over ``data`` mapped into
    those levels' layout, and assembles the multi-scale flow from the same level instances.

    Args:
        nms_transform: The (partially) trained NMS flow from :func:`build_nms_transform`.
        level_factory: The factory the NMS flow was built with.
        input_shape: Event shape of the data.
        num_levels: Number of levels of both flows.
        data: Tensor or DataLoader of ``x`` or ``(x, y)`` (pre-processed training data).
        split: ``"lcma"`` (default) or ``"high"`` (the ablation).
        batch_size: Batch size for a tensor ``data``.
        progress: Show a tqdm progress bar.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.

    Returns:
        ``(flow, maps)``: the untrained :class:`ContributionMultiscaleFlow` and the
        :class:`ContributionMaps` (diagnostics, save, plot).

    Raises:
        ValueError: for a split other than ``"lcma"``/``"high"`` or inconsistent shapes.
    """
    if split not in ("lcma", "high"):
        raise ValueError(f"expected split 'lcma' or 'high'; got {split!r}")
    levels = build_levels(level_factory, input_shape, num_levels, placement)
    maps = estimate_contributions(
        nms_transform,
        data,
        levels,
        input_shape,
        placement=placement,
        factor_out="low" if split == "lcma" else "high",
        batch_size=batch_size,
        progress=progress,
    )
    flow = ContributionMultiscaleFlow.from_contributions(
        level_factory, input_shape, maps, split, levels=levels, placement=placement
    )
    return flow, maps
