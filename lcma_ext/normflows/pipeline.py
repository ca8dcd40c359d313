"""Algorithm 1 for normflows: NMS model, contributions and multi-scale model from one factory.

A *level factory* ``level_factory(level_index, input_shape) -> list of normflows flows`` writes
one level as normflows' Glow example does, in normflows order (noise to data) and ending with
``Squeeze`` (so in the data-to-noise direction the level squeezes first)::

    def level(index, shape):
        c = 4 * shape[0]
        return [nf.flows.GlowBlock(c, 32, split_mode="channel", scale=True)
                for _ in range(K)] + [nf.flows.Squeeze()]

``level_index`` counts from the data side (0: the level the data enters), as in the nflows
pipeline; ``input_shape`` is the level's input event shape. Typical use::

    nms = build_nms_model(level, shape, num_levels)          # then train: nms.forward_kld(x)
    maps = estimate_model_contributions(nms, x, level, shape)
    model = build_multiscale_model(level, shape, num_levels, "lcma", maps)

Every step runs the core of lcma-ext unchanged on :class:`NormflowsLevel` wrappers of the very
normflows modules: the estimator (:func:`lcma_ext.contributions.estimate_contributions`), the
one tracker (:func:`lcma_ext.contributions.track_splits`) and the one builder
(:func:`lcma_ext.pipeline.build_multiscale_transform`), whose levels and splits are then
assembled as a normflows model.

References:
    V. Stimper et al. normflows: A PyTorch Package for Normalizing Flows. JOSS 2023.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.4, Algorithm 1.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import normflows as nf
from torch import Tensor, nn

from lcma_ext import contributions as core_contributions
from lcma_ext import pipeline as core_pipeline
from lcma_ext.contributions import ContributionMaps
from lcma_ext.multiscale import check_level_arguments, walk_levels
from lcma_ext.normflows.multiscale import MultiscaleFlow, NMSFlow, NormflowsLevel, split_levels
from lcma_ext.normflows.splits import SplitMerge
from lcma_ext.splits import DEFAULT_REGION_SIZE, SplitSpec
from lcma_ext.transforms import CompositeTransform

__all__ = [
    "BaseFactory",
    "LevelFactory",
    "build_multiscale_model",
    "build_nms_model",
    "estimate_model_contributions",
    "takes_labels",
]

#: ``level_factory(level_index, input_shape) -> list of normflows flows`` (normflows order).
LevelFactory = Callable[[int, tuple[int, ...]], Sequence[nf.flows.Flow]]
#: ``base(shape) -> normflows base distribution`` of that event shape.
BaseFactory = Callable[[tuple[int, ...]], nf.distributions.BaseDistribution]


def _diag_gaussian(shape: tuple[int, ...]) -> nf.distributions.BaseDistribution:
    return nf.distributions.DiagGaussian(shape)


def _wrap(level_factory: LevelFactory) -> Callable[[int, tuple[int, ...]], NormflowsLevel]:
    """The factory as the core expects it: one diag-aware transform per level."""

    def factory(index: int, shape: tuple[int, ...]) -> NormflowsLevel:
        flows = level_factory(index, shape)
        if not isinstance(flows, list | tuple | nn.ModuleList | nf.flows.Flow):
            raise TypeError(
                "expected level_factory(level_index, input_shape) to return a list of normflows "
                f"flows; got {type(flows).__name__} for level {index}"
            )
        return NormflowsLevel(flows)

    return factory


def takes_labels(distribution: nf.distributions.BaseDistribution) -> bool:
    """Whether a normflows base distribution is class-conditional: ``log_prob(z, y)``.

    True when its ``log_prob`` has a required argument after ``z`` (normflows'
    ``ClassCondDiagGaussian``); ``DiagGaussian``'s optional ``context`` does not count.
    """
    try:
        parameters = list(inspect.signature(distribution.log_prob).parameters.values())
    except (TypeError, ValueError):  # no signature to read: assume none
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is p.empty]
    return len(required) > 1


def _base(
    base: BaseFactory | None, shape: tuple[int, ...], class_cond: bool | None = False
) -> nn.Module:
    """``base(shape)``, checked; ``class_cond``: whether it must take labels (``None``: either)."""
    distribution = (base or _diag_gaussian)(shape)
    if not isinstance(distribution, nn.Module) or not callable(
        getattr(distribution, "log_prob", None)
    ):
        raise TypeError(
            f"expected base(shape) to return a normflows base distribution; got "
            f"{type(distribution).__name__} for shape {shape}"
        )
    name = type(distribution).__name__
    if class_cond is False and takes_labels(distribution):
        raise ValueError(
            f"expected a base distribution without class labels for class_cond=False; got "
            f"{name} (its log_prob needs labels y) for shape {shape}. Pass class_cond=True to "
            "condition the model on labels"
        )
    if class_cond is True and not takes_labels(distribution):
        raise ValueError(
            f"expected class-conditional base distributions (log_prob(z, y), e.g. normflows' "
            f"ClassCondDiagGaussian) for class_cond=True; got {name} for shape {shape}"
        )
    return distribution


def _nms_levels(
    level_factory: LevelFactory, input_shape: Sequence[int], num_levels: int, placement: str
) -> tuple[list[NormflowsLevel], tuple[int, ...]]:
    """The NMS levels (data side first) and the shape of the last one's output.

    With ``placement="squeeze"`` each level but the last also begins (data to noise) with the
    squeeze the multi-scale split does.
    """
    check_level_arguments(num_levels, placement)
    levels, shape = [], tuple(input_shape)
    steps = walk_levels(_wrap(level_factory), input_shape, num_levels, placement, multiscale=False)
    for step in steps:
        level, shape = step.level, step.output_shape
        if placement == "squeeze" and step.index < num_levels - 1:
            level = NormflowsLevel([nf.flows.Squeeze(), *level.flows])
        levels.append(level)
    return levels, shape


def build_nms_model(
    level_factory: LevelFactory,
    input_shape: Sequence[int],
    num_levels: int,
    placement: str = "post_squeeze",
    base: BaseFactory | None = None,
) -> NMSFlow:
    """The non-multi-scale (NMS) normflows model: the same levels, nothing factored out.

    Level ``l`` receives the full output of level ``l - 1``. With ``placement="squeeze"``
    each level but the last also ends (data to noise) with the squeeze that the multi-scale
    model's split does.

    Args:
        level_factory: ``level_factory(level_index, input_shape) -> list of normflows flows``
            (normflows order; level 0 is the data side).
        input_shape: Event shape of the data, e.g. ``(C, H, W)``.
        num_levels: Number of levels.
        placement: ``"post_squeeze"`` (default; the levels squeeze) or ``"squeeze"``.
        base: ``base(shape) -> distribution`` for the latent; default normflows'
            ``DiagGaussian(shape)`` (trainable, as normflows does). Without class labels:
            normflows' ``NormalizingFlow`` takes none, and the contributions the NMS model is
            trained for are its flow layers' log-dets, whatever the base.

    Returns:
        An :class:`NMSFlow` (a ``normflows.NormalizingFlow``) that records its level sizes.

    Raises:
        ValueError: for ``num_levels < 1``, an unknown placement, or a class-conditional base.
        TypeError: for a factory result that is not a list of supported normflows flows.
    """
    levels, shape = _nms_levels(level_factory, input_shape, num_levels, placement)
    flows = [flow for level in reversed(levels) for flow in level.flows]  # normflows order
    distribution = _base(base, shape, class_cond=None)
    if takes_labels(distribution):
        raise ValueError(
            "expected a base distribution without class labels for the NMS model (normflows' "
            f"NormalizingFlow takes none); got {type(distribution).__name__}. Pre-train the NMS "
            "model with an unconditional base (the default): the contributions it is trained "
            "for are its flow layers' log-dets"
        )
    return NMSFlow(
        distribution,
        flows,
        level_sizes=[len(level.flows) for level in levels],
        input_shape=input_shape,
        placement=placement,
    )


def _derive_level_sizes(
    nms_model: nf.NormalizingFlow,
    level_factory: LevelFactory | None,
    input_shape: Sequence[int] | None,
    placement: str,
) -> list[int]:
    """Level sizes of a plain ``NormalizingFlow``, by building the factory's NMS levels.

    Levels are built until they hold as many flows as the model; their classes must match.
    """
    if level_factory is None or input_shape is None:
        raise ValueError(
            "expected an NMS model from build_nms_model (it records its levels), or a "
            "level_factory and input_shape to find the levels of a plain NormalizingFlow; "
            f"got {type(nms_model).__name__} without them"
        )
    flows = list(reversed(nms_model.flows))  # data side first
    built: list[nf.flows.Flow] = []
    sizes: list[int] = []
    message = (
        f"expected the NMS model's {len(flows)} flows to be the factory's levels; got other "
        "flows from the factory. Build the model with build_nms_model"
    )
    try:  # NMS levels without end, until they hold as many flows as the model
        for step in walk_levels(
            _wrap(level_factory), input_shape, None, placement, multiscale=False
        ):
            level = step.level
            last = len(built) + len(level.flows) >= len(flows)
            if placement == "squeeze" and not last:
                level = NormflowsLevel([nf.flows.Squeeze(), *level.flows])
            built += list(reversed(level.flows))
            sizes.append(len(level.flows))
            if last:
                break
    except (TypeError, ValueError) as error:
        raise ValueError(f"{message} ({error})") from error
    if [type(flow) for flow in built] != [type(flow) for flow in flows]:
        raise ValueError(message)
    return sizes


def _nms_transform(
    nms_model: Any, level_factory: Any, input_shape: Sequence[int] | None, placement: str
) -> CompositeTransform:
    if isinstance(nms_model, nf.MultiscaleFlow):
        raise TypeError(
            "expected the NMS model (a normflows NormalizingFlow that keeps every dimension, "
            "from build_nms_model); got a MultiscaleFlow, whose merges factor dimensions out. "
            "Measure the contributions on the NMS model"
        )
    if not isinstance(nms_model, nf.NormalizingFlow):
        raise TypeError(
            "expected the NMS model as a normflows NormalizingFlow (build_nms_model); got "
            f"{type(nms_model).__module__}.{type(nms_model).__qualname__}"
        )
    sizes = getattr(nms_model, "level_sizes", None)
    if sizes is None:
        factory = level_factory if callable(level_factory) else None
        sizes = _derive_level_sizes(nms_model, factory, input_shape, placement)
    levels = split_levels(list(nms_model.flows), sizes)
    return CompositeTransform([NormflowsLevel(level) for level in levels])


def estimate_model_contributions(
    nms_model: nf.NormalizingFlow,
    data: Any,
    levels: LevelFactory | Sequence[Sequence[nf.flows.Flow]],
    input_shape: Sequence[int] | None = None,
    *,
    placement: str | None = None,
    factor_out: str = "low",
    batch_size: int = 256,
    progress: bool = True,
) -> ContributionMaps:
    """Average a normflows NMS model's cumulative contributions, mapped per split point.

    :func:`lcma_ext.contributions.estimate_contributions` on the NMS model's levels (the same
    modules, wrapped as :class:`NormflowsLevel`), in eval mode without gradient; every
    module's training mode is restored afterwards. (Named apart from the core function, whose
    first argument is an nflows NMS transform.)

    Args:
        nms_model: The (partially) trained NMS model: from :func:`build_nms_model`, or a plain
            ``normflows.NormalizingFlow`` whose flows are the factory's NMS levels (then
            ``levels`` must be the factory and ``input_shape`` given).
        data: A tensor ``(N, *input_shape)`` or an iterable of ``x`` or ``(x, y, ...)``
            batches, pre-processed as the model sees it (floating point; integer images raise).
        levels: The level factory (new multi-scale levels are built and kept in the result's
            ``levels``), or the ``K`` multi-scale levels as lists of normflows flows, data side
            first.
        input_shape: Event shape of the data; default the NMS model's, else the first batch's.
        placement: ``"post_squeeze"`` or ``"squeeze"``; default the NMS model's, else
            ``"post_squeeze"``.
        factor_out, batch_size, progress: As in the core function.

    Returns:
        A :class:`lcma_ext.ContributionMaps` (``levels``: the :class:`NormflowsLevel` wrappers
        of the multi-scale levels, reused by :func:`build_multiscale_model`).

    Raises:
        TypeError: for a model that is not an NMS ``NormalizingFlow`` (a ``MultiscaleFlow``
            included) or a flow without a per-dimension adapter.
        ValueError: for inconsistent shapes, counts or data.
    """
    recorded = getattr(nms_model, "input_shape", None)
    shape = recorded if input_shape is None else input_shape
    if input_shape is not None and recorded is not None and tuple(input_shape) != recorded:
        raise ValueError(
            f"expected input_shape {recorded} (the NMS model's); got {tuple(input_shape)}"
        )
    recorded_placement = getattr(nms_model, "placement", None)
    if placement is not None and recorded_placement not in (None, placement):
        raise ValueError(
            f"expected placement {recorded_placement!r} (the NMS model's); got {placement!r}"
        )
    placement = placement or recorded_placement or "post_squeeze"
    transform = _nms_transform(nms_model, levels, shape, placement)
    multiscale_levels: Callable[[int, tuple[int, ...]], NormflowsLevel] | list[NormflowsLevel]
    if callable(levels) and not isinstance(levels, nn.Module):
        multiscale_levels = _wrap(levels)
    else:  # the levels as lists of flows
        flow_lists = cast("Sequence[Sequence[nf.flows.Flow]]", levels)
        multiscale_levels = [NormflowsLevel(level) for level in flow_lists]
    # the core runs (and restores the modes of) every flow of the model, wrapped
    return core_contributions.estimate_contributions(
        transform,
        data,
        multiscale_levels,
        shape,
        placement=placement,
        factor_out=factor_out,
        batch_size=batch_size,
        progress=progress,
    )


def estimate_contributions(*args: Any, **kwargs: Any) -> ContributionMaps:
    """Deprecated name of :func:`estimate_model_contributions` (same arguments).

    It shadowed :func:`lcma_ext.estimate_contributions`, whose first argument is an nflows NMS
    transform. Kept for one release: using it warns with a ``DeprecationWarning``.
    """
    warnings.warn(
        "lcma_ext.normflows.estimate_contributions is deprecated and will be removed in the "
        "next release: use lcma_ext.normflows.estimate_model_contributions (same arguments; "
        "lcma_ext.estimate_contributions is the core function for nflows transforms)",
        DeprecationWarning,
        stacklevel=2,
    )
    return estimate_model_contributions(*args, **kwargs)


def build_multiscale_model(
    level_factory: LevelFactory | None,
    input_shape: Sequence[int],
    num_levels: int,
    split: str | SplitSpec | Sequence[str | SplitSpec] = "channel",
    contributions: ContributionMaps | Sequence[Tensor] | None = None,
    seed: int = 0,
    placement: str = "post_squeeze",
    levels: Sequence[Sequence[nf.flows.Flow]] | None = None,
    remap: bool = False,
    region_size: int = DEFAULT_REGION_SIZE,
    *,
    base: BaseFactory | None = None,
    prior: str | Sequence[str] = "standard",
    class_cond: bool = False,
) -> MultiscaleFlow:
    """A normflows multi-scale model with the named split at every split point.

    :func:`lcma_ext.pipeline.build_multiscale_transform` (same arguments and semantics) builds
    and tracks the levels and splits; they are then assembled as a normflows model: level
    ``l`` (data side first) is ``flows[L - 1 - l]``, split point ``l`` is
    ``merges[L - 2 - l]`` (a :class:`lcma_ext.normflows.SplitMerge`), and each factored half
    and the last level's output get a base distribution of their shape. With
    ``prior="conditional"`` a split point's merge also holds Glow's conditional prior (the
    core builder's zero-initialised :class:`lcma_ext.transforms.ConditionalGaussianPrior`, the
    same module): its base distribution scores ``eps = (z_new - mu(z)) / sigma(z)`` of the
    factored half given the kept half ``z``, so a new model is exactly the standard-prior one.

    Args:
        level_factory: ``level_factory(level_index, input_shape) -> list of normflows flows``;
            builds the levels unless ``levels`` are given (``None``: copies of the in-memory
            levels of ``contributions``), as in the core builder.
        input_shape: Event shape of the data.
        num_levels: Number of levels (split points: ``num_levels - 1``).
        split: A split name (``"channel"``, ``"checkerboard"``, ``"random"``, ``"lcma"``,
            ``"high"``, the granular LCMA names), a :class:`lcma_ext.splits.SplitSpec`, or one
            per split point.
        contributions: For the LCMA names: a :class:`ContributionMaps` from
            :func:`estimate_contributions` (or loaded), or one map per split point in this
            model's layout.
        seed: Seed of the random split (split point ``l`` uses ``seed + l``).
        placement: ``"post_squeeze"`` or ``"squeeze"``; must match ``contributions``.
        levels: Prebuilt levels, lists of normflows flows, data side first, used as they are.
        remap: Map the contributions onto levels that rearrange dimensions differently from
            the measured ones (else such levels raise).
        region_size: Tile side of the ``"*-region"`` splits.
        base: ``base(shape) -> distribution``; default normflows' trainable
            ``DiagGaussian(shape)``.
        prior: ``"standard"`` (default: the base distribution scores each factored half) or
            ``"conditional"`` (Glow's learned Gaussian given the kept half), for every split
            point or one per split point.
        class_cond: ``True`` for a class-conditional model: every base must take labels
            (``log_prob(z, y)``, e.g. ``base=lambda s: nf.distributions.ClassCondDiagGaussian(s,
            num_classes)``), and ``log_prob``, ``forward_kld`` and ``sample`` take ``y``. The
            default ``False`` refuses such bases and, later, labels.

    Returns:
        An untrained :class:`lcma_ext.normflows.MultiscaleFlow` with ``class_cond`` as given
        (``False``: ``log_prob(x)`` without labels).

    Raises:
        ValueError: for an unknown split or prior, missing contributions, inconsistent
            shapes, or bases that do not match ``class_cond``.
        RuntimeError: for levels that do not match the maps (unless ``remap``).
        TypeError: for a level entry without a per-dimension adapter.

    References:
        D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
        NeurIPS 2018 (``split2d``).
    """
    wrapped = None if levels is None else [NormflowsLevel(level) for level in levels]
    flow = core_pipeline.build_multiscale_transform(
        None if level_factory is None else _wrap(level_factory),
        input_shape,
        num_levels,
        split,
        contributions,
        seed=seed,
        placement=placement,
        levels=wrapped,
        remap=remap,
        region_size=region_size,
        prior=prior,
    )
    built, splits, priors = flow.levels, flow.splits, flow.priors  # data side first
    for index, level in enumerate(built):
        if not isinstance(level, NormflowsLevel):
            raise TypeError(
                f"expected normflows levels; got {type(level).__name__} for level {index} (the "
                "contributions' in-memory levels are nflows ones: pass levels or a "
                "level_factory, with remap=True if their permutations differ)"
            )
    *factored_shapes, last_shape = flow.output_shapes  # data side first
    q0 = [_base(base, last_shape, class_cond)]
    q0 += [_base(base, shape, class_cond) for shape in reversed(factored_shapes)]
    return MultiscaleFlow(
        q0,
        [list(level.flows) for level in reversed(built)],
        [SplitMerge(s, p) for s, p in zip(reversed(splits), reversed(priors), strict=True)],
        class_cond=class_cond,
    )
