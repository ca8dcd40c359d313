"""Algorithm 1's measurement phase: averaged cumulative contributions of a pre-trained NMS flow.

A non-multi-scale (NMS) flow is a :class:`lcma_ext.transforms.CompositeTransform` of ``K`` levels
(:func:`lcma_ext.pipeline.build_nms_transform`). After NMS level ``l`` the running per-dimension
map of the protocol (``forward_with_diag``) holds each dimension's cumulative contribution
``L^(l)``. :func:`estimate_contributions` averages it over a data set and stores it per data
dimension (a *data-layout* map: entry ``d`` belongs to the dimension that carries data
dimension ``d``, tracked by ``carry`` through every squeeze and permutation of the NMS flow).

The multi-scale flow then needs, at split point ``l``, the map in *its own* layout: each of its
positions holds some data dimension (tracked through its own levels and through its earlier
splits, which keep only the survivors), and gets that dimension's NMS contribution. This is the
paper's "at the next layer, only the log-det terms for the dimensions which came through flow
layers are considered". Since this depends on the multi-scale levels' own rearrangements (a
Glow level's 1x1 convolution has a random channel permutation), the levels' rearrangements
(``carry_positions``) are stored with the maps, so that a mismatch is detected.

:func:`track_splits` is the one tracker: along the one level walk
(:func:`lcma_ext.multiscale.walk_levels`) it carries the data index of every position through each
level and each split, builds each split point's split (from a
:class:`lcma_ext.splits.SplitSpec`) and keeps the survivors. The maps, positions and splits of
:class:`ContributionMaps` (tracked once per maps and kept), the builders of
:mod:`lcma_ext.pipeline` and the experiments all use it. Each map it gathers records its layout
(:class:`lcma_ext.splits.MapLayout`), so a split of it is checked against the flow it joins.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2-3.4, Algorithm 1.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from nflows.flows import Flow
from nflows.transforms import base as nflows_base
from torch import Tensor, nn
from tqdm import tqdm

from lcma_ext.diagnostics import NEAR_TIE_RTOL, split_diagnostics
from lcma_ext.flows import eval_mode, flow_parts
from lcma_ext.multiscale import LevelFactory, build_levels, walk_levels
from lcma_ext.splits import FACTOR_OUT, PLACEMENTS, MapLayout, Split, SplitSpec, with_layout
from lcma_ext.storage import CorruptFileError, atomic_save, load_stamped, stamped
from lcma_ext.transforms.base import require_diag_aware

__all__ = ["ContributionMaps", "TrackedSplits", "estimate_contributions", "track_splits"]

_FORMAT = "lcma-ext-contributions"
#: Version 2 stores only what was measured (version 1 files also held derived tensors).
_VERSION = 2
_READABLE_VERSIONS = (1, 2)


@dataclass
class TrackedSplits:
    """What :func:`track_splits` finds at each split point ``l`` (shapes without batch).

    Attributes:
        splits: The split built at each split point.
        maps: The contribution map in the split's input layout (``None`` without maps).
        level_positions: Per level (all ``K``), its rearrangement: entry ``q`` is the flat
            index, in the level's input, of the dimension at output position ``q``.
        factored_positions: The data dimension at each position of the factored half.
        kept_positions: Likewise for the kept half (the next level's input).
    """

    splits: list[Split]
    maps: list[Tensor | None]
    level_positions: list[Tensor]
    factored_positions: list[Tensor]
    kept_positions: list[Tensor]


def track_splits(
    levels: Sequence[nflows_base.Transform | Tensor],
    input_shape: Sequence[int],
    specs: Sequence[SplitSpec | str],
    *,
    data_maps: Sequence[Tensor] | None = None,
    layout_maps: Sequence[Tensor | None] | None = None,
    placement: str = "post_squeeze",
    seed: int = 0,
) -> TrackedSplits:
    """Walk the levels, build each split point's split and keep its survivors.

    The data index of every position is carried through each level and each split. At split
    point ``l`` the contribution map in that layout is the NMS contribution of the data
    dimension at each position (``data_maps[l]``), so later split points see only the
    dimensions that survived the earlier splits (the paper's Sec. 3.4).

    Args:
        levels: The ``K`` multi-scale levels (diag-aware transforms), or their rearrangements
            as :func:`lcma_ext.transforms.base.carry_positions` gives them.
        input_shape: Event shape of the data.
        specs: One split spec (or name) per split point (``K - 1``).
        data_maps: Per split point, a map in the data's layout (``input_shape``), e.g.
            :attr:`ContributionMaps.data_maps`; its entries are gathered in float64.
        layout_maps: Per split point, a map already in the split's input layout (used as
            given); at most one of ``data_maps`` and ``layout_maps``.
        placement: ``"post_squeeze"`` or ``"squeeze"``.
        seed: Seed of the random splits: split point ``l`` uses ``seed + l``.

    Raises:
        ValueError: for counts that do not match, or a spec that needs a map and has none.
    """
    levels = list(levels)
    parsed = [SplitSpec.parse(spec) for spec in specs]
    if len(parsed) != len(levels) - 1:
        raise ValueError(
            f"expected {len(levels) - 1} split specs for {len(levels)} levels; got {len(parsed)}"
        )
    if data_maps is not None and layout_maps is not None:
        raise ValueError("expected data_maps or layout_maps; got both")
    given = data_maps if data_maps is not None else layout_maps
    if given is not None and len(given) != len(parsed):
        raise ValueError(f"expected {len(parsed)} maps for {len(levels)} levels; got {len(given)}")
    shape = tuple(int(size) for size in input_shape)
    positions = torch.arange(math.prod(shape)).view(shape)  # data index at each position
    out = TrackedSplits([], [], [], [], [])
    for step in walk_levels(levels, shape, placement=placement):
        out.level_positions.append(step.positions)
        if not step.is_split_point:
            break
        index = step.index
        carried = positions.reshape(-1)[step.positions]
        contribution = None
        if data_maps is not None:
            gathered = data_maps[index].detach().cpu().double().reshape(-1)[carried]
            contribution = with_layout(gathered, MapLayout(shape, carried))
        elif layout_maps is not None:
            contribution = layout_maps[index]
        spec = parsed[index]
        split = spec.build(
            step.output_shape,
            contribution if spec.needs_contributions else None,
            seed + index,
            placement,
        )
        factored, kept = split.carry(carried.unsqueeze(0))
        out.splits.append(split)
        out.maps.append(contribution)
        out.factored_positions.append(factored[0])
        out.kept_positions.append(kept[0])
        positions = kept[0]
    return out


@dataclass
class ContributionMaps:
    """Averaged cumulative contributions of an NMS flow, per split point.

    Only what was measured is stored: the maps in the data's layout and the rearrangements of
    the multi-scale levels they are mapped through. The maps in each split's layout, the
    kept and factored positions, the splits and the diagnostics are derived from them by
    :func:`track_splits` with the LCMA rule ``factor_out`` at every split point.

    Attributes:
        input_shape: Event shape of the data.
        placement: ``"post_squeeze"`` or ``"squeeze"``.
        data_maps: Per split point ``l``, the NMS contribution ``L^(l)`` of every data
            dimension, shaped like the data (float64).
        level_positions: Per level, ``carry_positions(level, level_input_shape)``: how the
            multi-scale levels rearrange dimensions (used to detect levels that do not match).
        factor_out: The LCMA rule the derived maps and positions are tracked with (``"low"``:
            LCMA, ``"high"``: the reverse).
        num_examples: Number of examples averaged over.
        levels: In memory only (never saved): the multi-scale levels the maps were computed
            for, reused by :func:`lcma_ext.pipeline.build_multiscale_transform`.

    Shapes:
        data_maps[l]: ``input_shape``; maps[l]: output shape of multi-scale level ``l``.
    """

    input_shape: tuple[int, ...]
    placement: str
    data_maps: list[Tensor]
    level_positions: list[Tensor]
    factor_out: str = "low"
    num_examples: int = 0
    levels: list[nflows_base.Transform] | None = field(default=None, repr=False, compare=False)
    #: The tracked maps, positions and splits (:meth:`tracked`), computed once.
    _tracked: TrackedSplits | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        # what the tracked result is derived from changes: derive it again when next asked
        if name in _TRACKED_FROM:
            object.__setattr__(self, "_tracked", None)
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(size) for size in self.input_shape)
        if self.placement not in PLACEMENTS:
            raise ValueError(f"expected placement in {PLACEMENTS}; got {self.placement!r}")
        if self.factor_out not in FACTOR_OUT:
            raise ValueError(f"expected factor_out in {FACTOR_OUT}; got {self.factor_out!r}")
        if len(self.level_positions) != len(self.data_maps) + 1:
            raise ValueError(
                f"expected {len(self.data_maps) + 1} level rearrangements for "
                f"{len(self.data_maps)} split points; got {len(self.level_positions)}"
            )
        for index, data_map in enumerate(self.data_maps):
            if tuple(data_map.shape) != self.input_shape:
                raise ValueError(
                    f"expected data map {index} of shape {self.input_shape}; got "
                    f"{tuple(data_map.shape)}"
                )

    @property
    def num_levels(self) -> int:
        """Number of levels of the flows (split points + 1)."""
        return len(self.data_maps) + 1

    def track(
        self,
        levels: Sequence[nflows_base.Transform] | None = None,
        specs: Sequence[SplitSpec | str] | None = None,
        *,
        check: bool = True,
        seed: int = 0,
    ) -> TrackedSplits:
        """:func:`track_splits` of these maps through ``levels``.

        Args:
            levels: The multi-scale levels; ``None``: the stored rearrangements.
            specs: One split spec or name per split point; ``None``: the LCMA rule
                :attr:`factor_out` at every split point.
            check: Raise if ``levels`` rearrange dimensions unlike the stored ones.
            seed: Seed of random splits (split point ``l`` uses ``seed + l``).

        Raises:
            RuntimeError: if ``check`` and the levels do not match.
        """
        if levels is not None and check:
            self.check_levels(levels)
        if specs is None:
            specs = [SplitSpec("lcma", self.factor_out)] * len(self.data_maps)
        return track_splits(
            self.level_positions if levels is None else levels,
            self.input_shape,
            specs,
            data_maps=self.data_maps,
            placement=self.placement,
            seed=seed,
        )

    def tracked(self) -> TrackedSplits:
        """:meth:`track` of the stored rearrangements by the maps' own rule, computed once.

        Every derived property (:attr:`maps`, the positions, :attr:`diagnostics`,
        :meth:`splits`) reads this one result; assigning a field the result derives from
        (the maps, the rearrangements, the shape, the placement or the rule) drops it. The
        maps are not copied: change a derived tensor in place and every later read sees it.
        """
        tracked = self._tracked
        if tracked is None:
            tracked = self.track()
            object.__setattr__(self, "_tracked", tracked)
        return tracked

    @property
    def maps(self) -> list[Tensor]:
        """Per split point, ``L^(l)`` in the multi-scale layout at that split point.

        Each map records its layout (:class:`lcma_ext.splits.MapLayout`), so an
        ``LCMASplit(maps.maps[l])`` added to a flow of other levels is refused.
        """
        # tracked with this object's maps, so there is one at every split point
        return cast("list[Tensor]", list(self.tracked().maps))

    @property
    def factored_positions(self) -> list[Tensor]:
        """Per split point, the data dimension at each position of the factored half."""
        return list(self.tracked().factored_positions)

    @property
    def kept_positions(self) -> list[Tensor]:
        """Per split point, the data dimension at each position of the kept half."""
        return list(self.tracked().kept_positions)

    @property
    def diagnostics(self) -> list[dict[str, Any]]:
        """Per split point, :func:`lcma_ext.diagnostics.split_diagnostics` of :attr:`maps`."""
        return [split_diagnostics(m, self.placement, NEAR_TIE_RTOL) for m in self.maps]

    def splits(self) -> list[Split]:
        """One :class:`lcma_ext.splits.LCMASplit` per split point, by the maps' own rule.

        The splits factor out :attr:`factor_out` at every split point, the rule the maps of
        later split points were tracked with. Each call returns new split modules (copies of
        the tracked ones), free to be moved or put in a flow.
        """
        return copy.deepcopy(self.tracked().splits)

    def check_levels(self, levels: Sequence[nflows_base.Transform]) -> None:
        """Raise ``RuntimeError`` unless ``levels`` rearrange dimensions as the stored ones."""
        levels = list(levels)
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels; got {len(levels)}")
        steps = walk_levels(levels, self.input_shape, placement=self.placement)
        for step, stored in zip(steps, self.level_positions):
            index, positions = step.index, step.positions
            if positions.shape != stored.shape or not torch.equal(positions, stored.cpu()):
                raise RuntimeError(
                    f"expected level {index} to rearrange dimensions like the level the "
                    "contributions were mapped with; got a different rearrangement (e.g. another "
                    "random 1x1-convolution permutation). Reuse the same level instances "
                    "(lcma_from_nms, or the maps' in-memory levels), seed torch identically "
                    "before building them, or pass remap=True"
                )

    def save(self, path: str | Path, identity: Mapping[str, Any] | None = None) -> None:
        """Write a small file of plain tensors, lists, strings and numbers, atomically.

        It loads with ``torch.load(path, weights_only=True)`` (no pickled classes); the
        in-memory ``levels`` are not saved. The file carries a checksum of its content and
        ``identity`` (:func:`lcma_ext.storage.stamped`), e.g. a run folder's fingerprints.
        """
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "input_shape": list(self.input_shape),
            "placement": self.placement,
            "factor_out": self.factor_out,
            "num_examples": int(self.num_examples),
            "data_maps": [t.detach().cpu() for t in self.data_maps],
            "level_positions": [t.cpu() for t in self.level_positions],
        }
        atomic_save(stamped(state, identity), path)

    @classmethod
    def load(cls, path: str | Path) -> ContributionMaps:
        """Read a file written by :meth:`save` (with ``weights_only=True``).

        Raises:
            FileNotFoundError: if there is no such file.
            CorruptFileError: (a ``ValueError``) if the file is corrupt, truncated, changed on
                disk (checksum), not a contributions file, of an unknown version, or maps that
                do not track; the message names the file.
        """
        expected = "an lcma-ext contributions file"
        state, _ = load_stamped(path, expected)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise CorruptFileError(path, expected, "another kind of file")
        if state.get("version") not in _READABLE_VERSIONS:
            raise CorruptFileError(
                path, f"{expected} of version {_READABLE_VERSIONS}", f"{state.get('version')!r}"
            )
        try:
            maps = cls(
                input_shape=tuple(state["input_shape"]),
                placement=state["placement"],
                data_maps=list(state["data_maps"]),
                level_positions=list(state["level_positions"]),
                factor_out=state["factor_out"],
                num_examples=int(state["num_examples"]),
            )
            maps.tracked()  # maps that do not track are refused here, named
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as error:
            detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
            raise CorruptFileError(path, expected, f"inconsistent content ({detail})") from error
        return maps


#: The fields of :class:`ContributionMaps` its tracked result is derived from.
_TRACKED_FROM = frozenset(
    {"input_shape", "placement", "data_maps", "level_positions", "factor_out"}
)


def _nms_levels(nms_transform: Any) -> list[nflows_base.Transform]:
    transform = (
        flow_parts(nms_transform).transform if isinstance(nms_transform, Flow) else nms_transform
    )
    if not isinstance(transform, nflows_base.CompositeTransform):
        raise TypeError(
            "expected the NMS flow as a CompositeTransform of its levels (build_nms_transform) "
            f"or an nflows Flow around one; got {type(transform).__name__}"
        )
    levels = list(transform._transforms)
    for index, level in enumerate(levels):
        require_diag_aware(level, f"NMS level {index}")
    return levels


def _batches(data: Any, batch_size: int) -> tuple[Iterable[Tensor], int | None]:
    if isinstance(data, Tensor):
        if data.dim() < 2:
            raise ValueError(f"expected a data tensor (N, *event_shape); got {tuple(data.shape)}")
        return data.split(batch_size), math.ceil(data.shape[0] / batch_size)

    def items() -> Iterable[Tensor]:
        for item in data:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, Tensor):
                raise ValueError(
                    f"expected batches of tensors x or (x, y, ...); got {type(x).__name__}"
                )
            yield x

    try:
        total = len(data)
    except TypeError:
        total = None
    return items(), total


def estimate_contributions(
    nms_transform: Any,
    data: Any,
    levels: Sequence[nflows_base.Transform] | LevelFactory,
    input_shape: Sequence[int] | None = None,
    *,
    placement: str = "post_squeeze",
    factor_out: str = "low",
    batch_size: int = 256,
    progress: bool = True,
) -> ContributionMaps:
    """Average an NMS flow's cumulative per-dimension contributions and map them per split point.

    Runs ``nms_transform.forward_with_diag`` level by level over ``data`` in eval mode without
    gradient (the mode is restored afterwards), averages the running map after each level over
    all examples, and maps it into the multi-scale layout of ``levels``.

    Args:
        nms_transform: The (partially) trained NMS flow: a CompositeTransform of ``K`` levels as
            built by :func:`lcma_ext.pipeline.build_nms_transform`, or an nflows ``Flow``
            around one.
        data: A tensor ``(N, *event_shape)``, or an iterable (e.g. a ``DataLoader``) of ``x``
            or ``(x, y, ...)`` batches. Already pre-processed as the flow sees it.
        levels: The ``K`` multi-scale levels that the multi-scale flow will use (the very
            instances: their random permutations decide the layout), or a level factory, in
            which case new levels are built and kept in the result's ``levels``.
        input_shape: Event shape of the data; read from the first batch if ``None``.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.
        factor_out: ``"low"`` (LCMA) or ``"high"``: which dimensions survive each split when
            tracking to later split points.
        batch_size: Batch size when ``data`` is a tensor.
        progress: Show a tqdm progress bar.

    Returns:
        A :class:`ContributionMaps` with one map per split point (``K - 1``).

    Raises:
        ValueError: for empty or non-finite data, mismatched shapes, or level counts.
        TypeError: for an NMS flow or level that is not diag-aware.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"expected placement in {PLACEMENTS}; got {placement!r}")
    if factor_out not in FACTOR_OUT:
        raise ValueError(f"expected factor_out in {FACTOR_OUT}; got {factor_out!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"expected a positive int batch_size; got {batch_size!r}")
    nms_levels = _nms_levels(nms_transform)
    module = nms_transform if isinstance(nms_transform, nn.Module) else None
    tensors = [*module.parameters(), *module.buffers()] if module is not None else []
    reference = next((t for t in tensors if t.is_floating_point()), None)

    batches, total = _batches(data, batch_size)
    sums: list[Tensor] | None = None
    count = 0
    event_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    # every submodule's own mode is restored afterwards (not only the top module's)
    mode = eval_mode(module) if module is not None else contextlib.nullcontext()
    with mode, torch.no_grad():
        iterator = tqdm(batches, total=total, disable=not progress, desc="contributions")
        for x in iterator:
            if event_shape is None:
                event_shape = tuple(x.shape[1:])
            if tuple(x.shape[1:]) != event_shape:
                raise ValueError(
                    f"expected batches of event shape {event_shape}; got {tuple(x.shape[1:])}"
                )
            if not x.is_floating_point():
                raise ValueError(
                    "expected data pre-processed as the flow sees it (floating point, e.g. "
                    "x, _ = lcma_ext.data.LogitPreprocessing(levels)(images), as train_flow "
                    f"does with integer images); got {x.dtype} data"
                )
            if reference is not None:
                x = x.to(device=reference.device, dtype=reference.dtype)
            if not torch.isfinite(x).all():
                raise ValueError("expected finite data; got NaN or inf values")
            diag = None
            outputs = x
            if sums is None:
                sums = []
            for index, level in enumerate(nms_levels[:-1]):
                outputs, _, diag = level.forward_with_diag(outputs, None, diag)
                total_diag = diag.sum(0).double().cpu()
                if len(sums) <= index:
                    sums.append(total_diag)
                else:
                    sums[index] += total_diag
            count += x.shape[0]
    if count == 0 or sums is None or event_shape is None:
        raise ValueError("expected at least one example in data; got none")

    positions = torch.arange(math.prod(event_shape)).view(1, *event_shape)
    data_maps = []
    for index, level in enumerate(nms_levels[:-1]):
        positions = level.carry(positions).cpu()
        mean = sums[index] / count
        if mean.shape != positions.shape[1:]:  # pragma: no cover - protocol guarantees this
            raise RuntimeError(f"NMS level {index}: diag and carry shapes disagree")
        flat = torch.zeros(math.prod(event_shape), dtype=torch.float64)
        flat[positions.reshape(-1)] = mean.reshape(-1)
        data_maps.append(flat.view(event_shape))

    if callable(levels) and not isinstance(levels, nn.Module):
        levels = build_levels(levels, event_shape, len(nms_levels), placement)
    levels = list(cast("Iterable[nflows_base.Transform]", levels))  # a sequence or a ModuleList
    if len(levels) != len(nms_levels):
        raise ValueError(
            f"expected {len(nms_levels)} multi-scale levels (as many as the NMS flow has); got "
            f"{len(levels)}"
        )
    return _maps_from_data(data_maps, levels, event_shape, placement, factor_out, count)


def _maps_from_data(
    data_maps: list[Tensor],
    levels: list[nflows_base.Transform],
    input_shape: tuple[int, ...],
    placement: str,
    factor_out: str,
    num_examples: int,
) -> ContributionMaps:
    tracked = track_splits(
        levels,
        input_shape,
        [SplitSpec("lcma", factor_out)] * len(data_maps),
        data_maps=data_maps,
        placement=placement,
    )
    maps = ContributionMaps(
        input_shape=tuple(input_shape),
        placement=placement,
        data_maps=data_maps,
        level_positions=tracked.level_positions,
        factor_out=factor_out,
        num_examples=num_examples,
        levels=levels,
    )
    # the same walk as maps.track(): the levels' rearrangements are the stored ones
    object.__setattr__(maps, "_tracked", tracked)
    return maps
