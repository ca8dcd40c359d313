"""Algorithm 1 for zuko: NMS flow, contributions and multi-scale flow from one level factory.

A *level factory* ``level_factory(level_index, input_shape)`` returns one level: a zuko lazy
transform or a sequence of them (vector data), or a diag-aware lcma-ext transform (images, e.g.
:func:`lcma_ext.models.make_level_factory` or :func:`lcma_ext.zuko.image_level_factory`).
``level_index`` counts from the data side; ``input_shape`` is the level's input event shape
(the kept half of the previous level). zuko's own flows give levels directly::

    def level(index, shape):  # zuko's NSF, written as usual, one per level
        return zuko.flows.NSF(shape[0], context=4, transforms=3).transform

    nms = build_nms_flow(level, (16,), 3)             # train: -nms(c).log_prob(x).mean()
    maps = estimate_contributions(nms, x, level, context=c)
    flow = build_multiscale_flow(level, (16,), 3, "lcma", maps)

Every step runs the core of lcma-ext unchanged on :class:`lcma_ext.zuko.ZukoLevel` wrappers of
the very zuko modules: the estimator (:func:`lcma_ext.contributions.estimate_contributions`),
the one tracker (:func:`lcma_ext.contributions.track_splits`) and the one builder
(:func:`lcma_ext.pipeline.build_multiscale_transform`), whose flow becomes the transform of a
:class:`lcma_ext.zuko.MultiscaleFlow`.

References:
    F. Rozet et al. Zuko: Normalizing flows in PyTorch. 2022.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.4, Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from tqdm import tqdm
from zuko.lazy import Flow, LazyComposedTransform, LazyDistribution, LazyTransform

from lcma_ext import contributions as core_contributions
from lcma_ext import pipeline as core_pipeline
from lcma_ext.contributions import ContributionMaps
from lcma_ext.multiscale import build_levels, check_level_arguments, level_output_shape
from lcma_ext.splits import DEFAULT_REGION_SIZE, SplitSpec
from lcma_ext.transforms import CompositeTransform, SqueezeTransform
from lcma_ext.zuko.adapters import DEFAULT_ATTRIBUTION
from lcma_ext.zuko.levels import NflowsTransform, ZukoLevel
from lcma_ext.zuko.multiscale import (
    MultiscaleFlow,
    MultiscaleTransform,
    NMSFlow,
    flow_levels,
    standard_normal,
)

__all__ = [
    "BaseFactory",
    "LevelFactory",
    "build_multiscale_flow",
    "build_nms_flow",
    "estimate_contributions",
]

#: ``level_factory(level_index, input_shape) -> zuko lazy transform(s) or lcma-ext transform``.
LevelFactory = Callable[[int, tuple[int, ...]], Any]
#: ``base(shape) -> zuko lazy distribution`` of that event shape.
BaseFactory = Callable[[tuple[int, ...]], LazyDistribution]


def _wrap(
    level_factory: LevelFactory, attribution: str
) -> Callable[[int, tuple[int, ...]], ZukoLevel]:
    """The factory as the core expects it: one diag-aware :class:`ZukoLevel` per level."""

    def factory(index: int, shape: tuple[int, ...]) -> ZukoLevel:
        return ZukoLevel(level_factory(index, shape), shape, attribution)

    return factory


def _prebuilt(
    levels: Sequence[Any], input_shape: tuple[int, ...], placement: str, attribution: str
) -> list[ZukoLevel]:
    """Prebuilt levels as :class:`ZukoLevel`, with the input shapes of the core's level walk."""
    return build_levels(
        _wrap(lambda index, shape: levels[index], attribution), input_shape, len(levels), placement
    )


def _base(base: BaseFactory | None, shape: tuple[int, ...]) -> LazyDistribution:
    distribution = (base or standard_normal)(shape)
    if not isinstance(distribution, LazyDistribution):
        raise TypeError(
            f"expected base(shape) to return a zuko LazyDistribution; got "
            f"{type(distribution).__name__} for shape {shape}"
        )
    return distribution


def build_nms_flow(
    level_factory: LevelFactory,
    input_shape: Sequence[int],
    num_levels: int,
    placement: str = "post_squeeze",
    base: BaseFactory | None = None,
    attribution: str = DEFAULT_ATTRIBUTION,
) -> NMSFlow:
    """The non-multi-scale (NMS) zuko flow: the same levels, nothing factored out.

    Level ``l`` receives the full output of level ``l - 1``. With ``placement="squeeze"`` (the
    multi-scale flow's split squeezes images), each image level but the last is followed by a
    squeeze inside the same level entry.

    Args:
        level_factory: ``level_factory(level_index, input_shape)`` (see the module docstring).
        input_shape: Event shape of the data: ``(D,)`` or ``(C, H, W)``.
        num_levels: Number of levels.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.
        base: ``base(shape) -> LazyDistribution`` of the last level's output shape; default
            the standard normal.
        attribution: How rotations and LU linear maps share ``log|det W|``.

    Returns:
        An :class:`NMSFlow` whose ``levels`` are the factory's levels as zuko lazy transforms.

    Raises:
        ValueError: for ``num_levels < 1`` or an unknown placement.
        TypeError: for a factory result that is not a level (the message names its class).
    """
    check_level_arguments(num_levels, placement)
    factory = _wrap(level_factory, attribution)
    shape = tuple(int(size) for size in input_shape)
    lazies: list[LazyTransform] = []
    for index in range(num_levels):
        level = factory(index, shape)
        lazy, shape = level.transform, level.output_shape
        if placement == "squeeze" and index < num_levels - 1 and len(shape) == 3:
            squeeze = NflowsTransform(SqueezeTransform(), shape)
            lazy, shape = LazyComposedTransform(lazy, squeeze), squeeze.output_shape
        lazies.append(lazy)
    return NMSFlow(lazies, _base(base, shape), input_shape=input_shape, placement=placement)


def _nms_levels(nms_flow: Flow, input_shape: tuple[int, ...], attribution: str) -> list[ZukoLevel]:
    if isinstance(nms_flow, MultiscaleFlow):
        raise TypeError(
            "expected the NMS flow (it keeps every dimension, from build_nms_flow); got a "
            "MultiscaleFlow, whose splits factor dimensions out. Measure the contributions on "
            "the NMS flow"
        )
    if not isinstance(nms_flow, Flow):
        cls = type(nms_flow)
        raise TypeError(
            "expected the NMS flow as a zuko Flow (build_nms_flow); got "
            f"{cls.__module__}.{cls.__qualname__}"
        )
    levels, shape = [], input_shape
    for lazy in flow_levels(nms_flow):
        level = ZukoLevel(lazy, shape, attribution)
        shape = level_output_shape(level, shape)
        levels.append(level)
    return levels


def _data_dtype(levels: Sequence[ZukoLevel]) -> tuple[torch.dtype, torch.device] | None:
    for level in levels:
        for tensor in (*level.parameters(), *level.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype, tensor.device
    return None


def estimate_contributions(
    nms_flow: Flow,
    data: Tensor | Iterable[object],
    levels: LevelFactory | Sequence[Any],
    input_shape: Sequence[int] | None = None,
    *,
    context: Tensor | None = None,
    placement: str | None = None,
    factor_out: str = "low",
    batch_size: int = 256,
    progress: bool = True,
    attribution: str = DEFAULT_ATTRIBUTION,
) -> ContributionMaps:
    """Average a zuko NMS flow's cumulative contributions, mapped per split point.

    :func:`lcma_ext.contributions.estimate_contributions` on the NMS flow's levels (the same
    modules, wrapped as :class:`ZukoLevel`), in eval mode without gradient; every module's
    training mode is restored afterwards. With a ``context``, each batch's levels use that
    batch's context, and the per-batch averages are combined weighted by batch size.

    Args:
        nms_flow: The (partially) trained NMS flow: an :class:`NMSFlow`, or a ``zuko.lazy.Flow``
            whose transform is a ``LazyComposedTransform`` of one lazy transform per level (then
            ``input_shape`` is required).
        data: A tensor ``(N, *input_shape)``, or (without ``context``) an iterable of ``x`` or
            ``(x, y, ...)`` batches, pre-processed as the flow sees it.
        levels: The level factory (new multi-scale levels are built and kept in the result's
            ``levels``), or the ``K`` multi-scale levels (what the factory returns), data side
            first.
        input_shape: Event shape of the data; default the NMS flow's.
        context: For a conditional flow, the context of every example, ``(N, C)``, aligned with
            a tensor ``data``.
        placement: ``"post_squeeze"`` or ``"squeeze"``; default the NMS flow's, else
            ``"post_squeeze"``.
        factor_out, batch_size, progress: As in the core function.
        attribution: How rotations and LU linear maps share ``log|det W|``.

    Returns:
        A :class:`lcma_ext.ContributionMaps` (``levels``: the :class:`ZukoLevel` multi-scale
        levels, reused by :func:`build_multiscale_flow`).

    Raises:
        TypeError: for a flow that is not an NMS zuko flow, or a transform without a
            per-dimension adapter.
        ValueError: for inconsistent shapes, counts, data or contexts.
    """
    recorded = getattr(nms_flow, "input_shape", None)
    if input_shape is not None and recorded is not None and tuple(input_shape) != recorded:
        raise ValueError(
            f"expected input_shape {recorded} (the NMS flow's); got {tuple(input_shape)}"
        )
    shape = recorded if input_shape is None else tuple(int(s) for s in input_shape)
    if shape is None:
        raise ValueError(
            "expected input_shape for a zuko Flow that does not record it (use build_nms_flow); "
            "got None"
        )
    recorded_placement = getattr(nms_flow, "placement", None)
    if placement is not None and recorded_placement not in (None, placement):
        raise ValueError(
            f"expected placement {recorded_placement!r} (the NMS flow's); got {placement!r}"
        )
    placement = placement or recorded_placement or "post_squeeze"
    nms_levels = _nms_levels(nms_flow, shape, attribution)
    if isinstance(levels, Sequence | nn.ModuleList):
        multiscale = _prebuilt(list(levels), shape, placement, attribution)
    else:
        multiscale = build_levels(_wrap(levels, attribution), shape, len(nms_levels), placement)
    options = {"placement": placement, "factor_out": factor_out}
    if context is None:
        return core_contributions.estimate_contributions(
            CompositeTransform(nms_levels),
            data,
            multiscale,
            shape,
            batch_size=batch_size,
            progress=progress,
            **options,
        )
    if not isinstance(data, Tensor) or not isinstance(context, Tensor):
        raise ValueError(
            "expected data and context as tensors (N, *input_shape) and (N, C); got "
            f"{type(data).__name__} and {type(context).__name__}"
        )
    if context.dim() != 2 or data.dim() < 2 or context.shape[0] != data.shape[0]:
        raise ValueError(
            f"expected a context (N, C) with one row per example of data {tuple(data.shape)}; "
            f"got {tuple(context.shape)}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"expected a positive int batch_size; got {batch_size!r}")
    reference = _data_dtype(nms_levels)
    if reference is not None:
        context = context.to(dtype=reference[0], device=reference[1])
    batches = list(zip(data.split(batch_size), context.split(batch_size)))
    if not batches:
        raise ValueError("expected at least one example in data; got none")
    per_batch = [
        core_contributions.estimate_contributions(
            CompositeTransform([level.bind(c) for level in nms_levels]),
            x,
            multiscale,
            shape,
            batch_size=x.shape[0],
            progress=False,
            **options,
        )
        for x, c in tqdm(batches, disable=not progress, desc="contributions")
    ]
    count = sum(maps.num_examples for maps in per_batch)
    data_maps = [
        cast(Tensor, sum(maps.data_maps[index] * maps.num_examples for maps in per_batch)) / count
        for index in range(len(nms_levels) - 1)
    ]
    return ContributionMaps(
        input_shape=shape,
        placement=placement,
        data_maps=data_maps,
        level_positions=per_batch[0].level_positions,
        factor_out=factor_out,
        num_examples=count,
        levels=multiscale,
    )


def build_multiscale_flow(
    level_factory: LevelFactory | None,
    input_shape: Sequence[int],
    num_levels: int,
    split: str | SplitSpec | Sequence[str | SplitSpec] = "channel",
    contributions: ContributionMaps | Sequence[Tensor] | None = None,
    seed: int = 0,
    placement: str = "post_squeeze",
    levels: Sequence[Any] | None = None,
    remap: bool = False,
    region_size: int = DEFAULT_REGION_SIZE,
    *,
    prior: str | Sequence[str] = "standard",
    base: BaseFactory | None = None,
    attribution: str = DEFAULT_ATTRIBUTION,
) -> MultiscaleFlow:
    """A multi-scale zuko flow with the named split at every split point.

    :func:`lcma_ext.pipeline.build_multiscale_transform` (same arguments and semantics) builds
    and tracks the levels and splits; its flow becomes the transform of a
    :class:`MultiscaleFlow`. ``flow(c)`` is zuko's ``NormalizingFlow`` (``log_prob``,
    ``sample``, ``rsample``, ``rsample_and_log_prob``).

    Args:
        level_factory: ``level_factory(level_index, input_shape)`` (see the module docstring);
            used only when neither ``levels`` nor in-memory levels of ``contributions`` exist.
        input_shape: Event shape of the data.
        num_levels: Number of levels (split points: ``num_levels - 1``).
        split: A split name (``"channel"``, ``"checkerboard"``, ``"random"``, ``"lcma"``,
            ``"high"``, the granular LCMA names for images), a
            :class:`lcma_ext.splits.SplitSpec`, or one per split point.
        contributions: For the LCMA names: a :class:`ContributionMaps` from
            :func:`estimate_contributions` (or loaded), or one map per split point in this
            flow's layout.
        seed: Seed of the random split (split point ``l`` uses ``seed + l``).
        placement: ``"post_squeeze"`` or ``"squeeze"``; must match ``contributions``.
        levels: Prebuilt levels (what the factory returns), data side first, used as they are.
        remap: Map the contributions onto levels that rearrange dimensions differently from
            the measured ones (else such levels raise).
        region_size: Tile side of the ``"*-region"`` splits.
        prior: ``"standard"`` (default) or ``"conditional"`` (Glow's learned Gaussian of each
            factored half given the kept half), for every split point or one per split point.
        base: ``base((D,)) -> LazyDistribution``; default the standard normal.
        attribution: How rotations and LU linear maps share ``log|det W|``.

    Returns:
        An untrained :class:`MultiscaleFlow`.

    Raises:
        ValueError: for an unknown split or prior, missing contributions or inconsistent
            shapes.
        RuntimeError: for levels that do not match the maps (unless ``remap``).
        TypeError: for levels that are not zuko levels (e.g. nflows levels kept by nflows
            contributions: pass ``levels`` or a ``level_factory``).
    """
    shape = tuple(int(size) for size in input_shape)
    check_level_arguments(num_levels, placement)
    flow = core_pipeline.build_multiscale_transform(
        None if level_factory is None else _wrap(level_factory, attribution),
        shape,
        num_levels,
        split,
        contributions,
        seed=seed,
        placement=placement,
        levels=None if levels is None else _prebuilt(list(levels), shape, placement, attribution),
        remap=remap,
        region_size=region_size,
        prior=prior,
    )
    for index, level in enumerate(flow.levels):
        if not isinstance(level, ZukoLevel):
            raise TypeError(
                f"expected zuko levels; got {type(level).__name__} for level {index} (the "
                "contributions' in-memory levels are not zuko ones: pass levels or a "
                "level_factory, with remap=True if their permutations differ)"
            )
    transform = MultiscaleTransform(flow, shape)
    return MultiscaleFlow(transform, None if base is None else _base(base, transform.output_shape))
