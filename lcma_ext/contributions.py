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
Glow level's 1x1 convolution has a random channel permutation), the maps are computed for
specific level instances, whose ``carry_positions`` are stored so that a mismatch is detected.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2-3.4, Algorithm 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from nflows.flows import Flow
from nflows.transforms import base as nflows_base
from torch import Tensor, nn
from tqdm import tqdm

from lcma_ext.multiscale import LevelFactory, build_levels
from lcma_ext.splits import (
    DEFAULT_REGION_SIZE,
    FACTOR_OUT,
    NEAR_TIE_RTOL,
    PLACEMENTS,
    LCMASplit,
    fit_region_size,
    kept_shape,
    split_diagnostics,
)
from lcma_ext.transforms.base import require_diag_aware

__all__ = ["ContributionMaps", "estimate_contributions"]

_FORMAT = "lcma-ext-contributions"
_VERSION = 1


@dataclass
class ContributionMaps:
    """Averaged cumulative contributions of an NMS flow, per split point.

    Attributes:
        input_shape: Event shape of the data.
        placement: ``"post_squeeze"`` or ``"squeeze"``.
        data_maps: Per split point ``l``, the NMS contribution ``L^(l)`` of every data
            dimension, shaped like the data (float64).
        maps: Per split point, ``L^(l)`` in the multi-scale flow's layout at that split point
            (the split's input shape), for the levels the maps were computed with.
        level_positions: Per level, ``carry_positions(level, level_input_shape)``: how those
            levels rearrange dimensions (used to detect levels that do not match).
        factored_positions: Per split point, the data dimension at each position of the
            factored half (long tensor in the factored half's shape).
        kept_positions: Likewise for the kept half.
        diagnostics: Per split point, :func:`lcma_ext.splits.split_diagnostics` of ``maps``.
        factor_out: The rule the positions and later maps were tracked with (``"low"``:
            LCMA, ``"high"``: the reverse).
        num_examples: Number of examples averaged over.
        levels: In memory only (never saved): the multi-scale levels the maps were computed
            for, reused by :meth:`lcma_ext.ContributionMultiscaleFlow.from_contributions`.

    Shapes:
        data_maps[l]: ``input_shape``; maps[l]: output shape of multi-scale level ``l``.
    """

    input_shape: tuple[int, ...]
    placement: str
    data_maps: list[Tensor]
    maps: list[Tensor] = field(default_factory=list)
    level_positions: list[Tensor] = field(default_factory=list)
    factored_positions: list[Tensor] = field(default_factory=list)
    kept_positions: list[Tensor] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    factor_out: str = "low"
    num_examples: int = 0
    levels: list[nflows_base.Transform] | None = field(default=None, repr=False, compare=False)

    @property
    def num_levels(self) -> int:
        """Number of levels of the flows (split points + 1)."""
        return len(self.data_maps) + 1

    def _level_input_shapes(self) -> list[tuple[int, ...]]:
        shapes = [tuple(self.input_shape)]
        for positions in self.level_positions[:-1]:
            shapes.append(kept_shape(tuple(positions.shape), self.placement))
        return shapes

    def check_levels(self, levels: Sequence[nflows_base.Transform]) -> None:
        """Raise ``RuntimeError`` unless ``levels`` rearrange dimensions as the stored ones."""
        levels = list(levels)
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} levels; got {len(levels)}")
        if not self.level_positions:
            return
        for index, (level, shape) in enumerate(zip(levels, self._level_input_shapes())):
            positions = _positions(level, shape)
            stored = self.level_positions[index]
            if positions.shape != stored.shape or not torch.equal(positions, stored.cpu()):
                raise RuntimeError(
                    f"expected level {index} to rearrange dimensions like the level the "
                    "contributions were mapped with; got a different rearrangement (e.g. another "
                    "random 1x1-convolution permutation). Reuse the same level instances "
                    "(lcma_from_nms, or from_contributions with the maps' in-memory levels), "
                    "seed torch identically before building them, or pass remap=True"
                )

    def maps_for_levels(
        self,
        levels: Sequence[nflows_base.Transform],
        factor_out: str = "low",
        check: bool = True,
        granularity: str = "site",
        region_size: int = DEFAULT_REGION_SIZE,
    ) -> list[Tensor]:
        """The maps at each split point in the layout of ``levels`` (split with LCMA).

        Args:
            levels: The multi-scale levels.
            factor_out: ``"low"`` (LCMA) or ``"high"``: which dimensions survive each split,
                hence which NMS contributions later split points see.
            check: Raise if ``levels`` differ from the stored ``level_positions``.
            granularity: Granularity of the LCMA splits that decide the survivors (see
                :class:`lcma_ext.splits.LCMASplit`); ``"region"`` tiles are capped at each
                split point's grid (:func:`lcma_ext.splits.fit_region_size`).
            region_size: Tile side for ``"region"``.

        Raises:
            RuntimeError: if ``check`` and the levels do not match.
        """
        if check:
            self.check_levels(levels)
        tracked = _track(
            self.data_maps,
            levels,
            self.input_shape,
            self.placement,
            factor_out,
            granularity,
            region_size,
        )
        return tracked["maps"]

    def splits(self, factor_out: str = "low") -> list[LCMASplit]:
        """One :class:`LCMASplit` per split point, from :attr:`maps`."""
        return [LCMASplit(m, factor_out, self.placement) for m in self.maps]

    def save(self, path: str | Path) -> None:
        """Write a small file of plain tensors, lists, strings and numbers.

        It loads with ``torch.load(path, weights_only=True)`` (no pickled classes); the
        in-memory ``levels`` are not saved.
        """
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "input_shape": list(self.input_shape),
            "placement": self.placement,
            "factor_out": self.factor_out,
            "num_examples": int(self.num_examples),
            "data_maps": [t.detach().cpu() for t in self.data_maps],
            "maps": [t.detach().cpu() for t in self.maps],
            "level_positions": [t.cpu() for t in self.level_positions],
            "factored_positions": [t.cpu() for t in self.factored_positions],
            "kept_positions": [t.cpu() for t in self.kept_positions],
            "diagnostics": list(self.diagnostics),
        }
        torch.save(state, str(path))

    @classmethod
    def load(cls, path: str | Path) -> ContributionMaps:
        """Read a file written by :meth:`save` (with ``weights_only=True``).

        Raises:
            ValueError: if the file is not a contributions file of a known version.
        """
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"expected an lcma-ext contributions file; got {path}")
        if state.get("version") != _VERSION:
            raise ValueError(f"expected version {_VERSION}; got {state.get('version')}")
        return cls(
            input_shape=tuple(state["input_shape"]),
            placement=state["placement"],
            data_maps=list(state["data_maps"]),
            maps=list(state["maps"]),
            level_positions=list(state["level_positions"]),
            factored_positions=list(state["factored_positions"]),
            kept_positions=list(state["kept_positions"]),
            diagnostics=list(state["diagnostics"]),
            factor_out=state["factor_out"],
            num_examples=int(state["num_examples"]),
        )


def _positions(level: nflows_base.Transform, shape: Sequence[int]) -> Tensor:
    index = torch.arange(math.prod(shape)).view(1, *shape)
    return require_diag_aware(level).carry(index)[0].cpu()


def _track(
    data_maps: Sequence[Tensor],
    levels: Sequence[nflows_base.Transform],
    input_shape: Sequence[int],
    placement: str,
    factor_out: str,
    granularity: str = "site",
    region_size: int = DEFAULT_REGION_SIZE,
) -> dict[str, list]:
    """Carry data indices through ``levels`` and LCMA splits; collect maps per split point."""
    if factor_out not in FACTOR_OUT:
        raise ValueError(f"expected factor_out in {FACTOR_OUT}; got {factor_out!r}")
    levels = list(levels)
    if len(levels) != len(data_maps) + 1:
        raise ValueError(
            f"expected {len(data_maps) + 1} levels for {len(data_maps)} split points; got "
            f"{len(levels)}"
        )
    shape = tuple(input_shape)
    positions = torch.arange(math.prod(shape)).view(1, *shape)  # data index at each position
    out: dict[str, list] = {k: [] for k in ("maps", "level", "factored", "kept", "diagnostics")}
    for index, level in enumerate(levels):
        out["level"].append(_positions(level, shape))
        carried = require_diag_aware(level).carry(positions).cpu()
        if index == len(levels) - 1:
            break
        contribution = data_maps[index].detach().cpu().double().reshape(-1)[carried[0]]
        size = region_size
        if granularity == "region":
            size = fit_region_size(contribution.shape, region_size, placement)
        split = LCMASplit(contribution, factor_out, placement, granularity, size)
        factored, positions = split.carry(carried)
        out["maps"].append(contribution)
        out["factored"].append(factored[0])
        out["kept"].append(positions[0])
        out["diagnostics"].append(split_diagnostics(contribution, placement, NEAR_TIE_RTOL))
        shape = tuple(positions.shape[1:])
    return out


def _nms_levels(nms_transform: Any) -> list[nflows_base.Transform]:
    transform = nms_transform._transform if isinstance(nms_transform, Flow) else nms_transform
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
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            iterator = tqdm(batches, total=total, disable=not progress, desc="contributions")
            for x in iterator:
                if event_shape is None:
                    event_shape = tuple(x.shape[1:])
                if tuple(x.shape[1:]) != event_shape:
                    raise ValueError(
                        f"expected batches of event shape {event_shape}; got {tuple(x.shape[1:])}"
                    )
                if reference is not None:
                    x = x.to(device=reference.device, dtype=reference.dtype)
                elif not x.is_floating_point():
                    x = x.to(torch.get_default_dtype())
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
    finally:
        if module is not None:
            module.train(was_training)
    if count == 0 or sums is None:
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
    levels = list(levels)
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
    tracked = _track(data_maps, levels, input_shape, placement, factor_out)
    return ContributionMaps(
        input_shape=tuple(input_shape),
        placement=placement,
        data_maps=data_maps,
        maps=tracked["maps"],
        level_positions=tracked["level"],
        factored_positions=tracked["factored"],
        kept_positions=tracked["kept"],
        diagnostics=tracked["diagnostics"],
        factor_out=factor_out,
        num_examples=num_examples,
        levels=levels,
    )
