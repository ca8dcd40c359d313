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
from torch import Tensor

from lcma_ext.contributions import ContributionMaps, estimate_contributions, track_splits
from lcma_ext.multiscale import (
    ContributionMultiscaleFlow,
    LevelFactory,
    build_levels,
    check_level_arguments,
    walk_levels,
)
from lcma_ext.splits import DEFAULT_REGION_SIZE, SPLIT_NAMES, SplitSpec
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
    levels = []
    for step in walk_levels(level_factory, input_shape, num_levels, placement, multiscale=False):
        level = step.level
        if placement == "squeeze" and step.index < num_levels - 1:
            level = CompositeTransform([level, SqueezeTransform()])
        levels.append(level)
    return CompositeTransform(levels)


def _split_specs(
    split: str | SplitSpec | Sequence[str | SplitSpec], num_splits: int, region_size: int
) -> list[SplitSpec]:
    """One :class:`SplitSpec` per split point from a name, a spec or one of them per point."""
    if isinstance(split, (str, SplitSpec)):
        return [SplitSpec.parse(split, region_size)] * num_splits
    specs = [SplitSpec.parse(item, region_size) for item in split]
    if len(specs) != num_splits:
        raise ValueError(
            f"expected one split per split point ({num_splits}); got {len(specs)} ({split!r})"
        )
    return specs


def _check_maps(
    maps: ContributionMaps, input_shape: tuple[int, ...], num_levels: int, placement: str
) -> None:
    if tuple(maps.input_shape) != input_shape:
        raise ValueError(
            f"expected input_shape {tuple(maps.input_shape)} (from the maps); got {input_shape}"
        )
    if num_levels != maps.num_levels:
        raise ValueError(f"expected num_levels {maps.num_levels} (from the maps); got {num_levels}")
    if maps.placement != placement:
        raise ValueError(
            f"expected placement {maps.placement!r} (the contributions'); got {placement!r}"
        )


def build_multiscale_transform(
    level_factory: LevelFactory | None,
    input_shape: Sequence[int],
    num_levels: int,
    split: str | SplitSpec | Sequence[str | SplitSpec] = "channel",
    contributions: ContributionMaps | Sequence[Tensor] | None = None,
    seed: int = 0,
    placement: str = "post_squeeze",
    levels: Sequence[nflows_base.Transform] | None = None,
    remap: bool = False,
    region_size: int = DEFAULT_REGION_SIZE,
    prior: str | Sequence[str] = "standard",
) -> ContributionMultiscaleFlow:
    """A multi-scale flow with the named split at every split point (the one builder).

    The levels are walked once by :func:`lcma_ext.contributions.track_splits`, which builds
    each split point's split and, with a :class:`ContributionMaps`, tracks the survivors: split
    point ``l`` sees the NMS contributions of the dimensions that the splits before it kept.

    Args:
        level_factory: ``level_factory(level_index, input_shape) -> Transform``; builds the
            levels unless ``levels`` are given (``None``: copies of the in-memory levels of
            ``contributions``).
        input_shape: Event shape of the data.
        num_levels: Number of levels (split points: ``num_levels - 1``).
        split: A name of :data:`lcma_ext.splits.SPLIT_NAMES` or
            :data:`lcma_ext.splits.GRANULAR_SPLIT_NAMES` (``"lcma-channel"``, ``"lcma-region"``,
            ``"high-channel"``, ``"high-region"``: LCMA with that granularity, see
            docs/granularity.md), a :class:`lcma_ext.splits.SplitSpec`, or a sequence of them
            with one per split point (e.g. ``["lcma", "high"]``, the paper's Table 4).
        contributions: Required for the LCMA names: a :class:`ContributionMaps` (from
            :func:`lcma_ext.estimate_contributions` or ``ContributionMaps.load``), or a list of
            maps, one per split point, already in this flow's layout.
        seed: Seed of the random split (split point ``l`` uses ``seed + l``).
        placement: ``"post_squeeze"`` or ``"squeeze"``; must match ``contributions``.
        levels: Prebuilt levels to use as they are.
        remap: If the levels rearrange dimensions differently from the ones the maps were
            measured with (for example a freshly built Glow level with another random 1x1
            convolution permutation), ``False`` raises, ``True`` maps the NMS contributions
            onto these levels (no NMS run is needed). Levels that ``level_factory`` builds
            while ``contributions`` hold their own levels in memory are new levels by
            intent: the contributions are always mapped onto them.
        region_size: Tile side of the ``"*-region"`` splits, in sites of each split point's
            grid of local blocks, capped at the grid (default 4).
        prior: Prior of the factored halves, for every split point or one per split point:
            ``"standard"`` (default, the standard normal) or ``"conditional"`` (Glow's learned
            Gaussian given the kept half, zero-initialised, so the untrained flow equals the
            standard one; see :class:`lcma_ext.transforms.ConditionalGaussianPrior`).

    Levels are chosen in this order: ``levels``; new levels from ``level_factory`` (built from
    torch's random state, so the initial weights follow ``torch.manual_seed`` whatever the
    split); deep copies of the levels kept in memory by ``contributions`` when
    ``level_factory`` is ``None``. The factory is never ignored: the flow has its levels.

    Raises:
        ValueError: for an unknown split name, missing contributions or inconsistent shapes.
        RuntimeError: for levels that do not match the maps (unless ``remap``).
    """
    check_level_arguments(num_levels, placement)
    shape = tuple(int(size) for size in input_shape)
    specs = _split_specs(split, num_levels - 1, region_size)
    maps = contributions
    if isinstance(maps, ContributionMaps):
        _check_maps(maps, shape, num_levels, placement)
    elif maps is not None:
        maps = list(maps)
        if len(maps) != num_levels - 1:
            raise ValueError(
                f"expected {num_levels - 1} maps for {num_levels} levels; got {len(maps)}"
            )
    needing = [spec.name for spec in specs if spec.needs_contributions]
    if needing and maps is None:
        raise ValueError(f"split {needing[0]!r} expected contributions; got None")
    measured = maps.levels if isinstance(maps, ContributionMaps) else None
    in_memory = measured is not None
    if levels is not None:
        levels = list(levels)
        if len(levels) != num_levels:
            raise ValueError(f"expected {num_levels} levels; got {len(levels)}")
    elif level_factory is not None:
        levels = build_levels(level_factory, shape, num_levels, placement)
        remap = remap or in_memory  # new levels instead of the measured ones, as asked
    elif measured is not None:  # in_memory
        levels = [copy.deepcopy(level) for level in measured]
    else:
        raise ValueError("expected a level_factory (no levels given); got None")
    if isinstance(maps, ContributionMaps):
        tracked = maps.track(levels, specs, check=not remap and bool(needing), seed=seed)
    else:
        tracked = track_splits(
            levels, shape, specs, layout_maps=maps, placement=placement, seed=seed
        )
    return ContributionMultiscaleFlow.from_levels(levels, shape, tracked.splits, prior)


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
    spec = SplitSpec.parse(split) if split in SPLIT_NAMES else None  # site granularity
    if spec is None or not spec.needs_contributions:
        raise ValueError(f"expected split 'lcma' or 'high'; got {split!r}")
    levels = build_levels(level_factory, input_shape, num_levels, placement)
    maps = estimate_contributions(
        nms_transform,
        data,
        levels,
        input_shape,
        placement=placement,
        factor_out=spec.factor_out,
        batch_size=batch_size,
        progress=progress,
    )
    flow = build_multiscale_transform(
        level_factory, input_shape, num_levels, spec, maps, placement=placement, levels=levels
    )
    return flow, maps
