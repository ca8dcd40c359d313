"""Multi-scale structure: the one level walk, the one split-point step, and the nflows flow.

* :func:`walk_levels` is the one walk over the levels of a flow and their shapes: level ``l``
  receives the kept half of level ``l - 1``'s output (multi-scale), or its whole output (the
  non-multi-scale flow, squeezed for ``placement="squeeze"``). Every builder and shape check
  walks levels with it.
* :class:`SplitPoint` is the one split-point step: the split, then the factored half's prior,
  with the log-det and the per-dimension map carried alike. nflows'
  :class:`ContributionMultiscaleFlow` and normflows' merges
  (:class:`lcma_ext.normflows.SplitMerge`) both run it.
* :class:`ContributionMultiscaleFlow` is nflows' multi-scale composite with a pluggable split
  per level. Builders from split names and contribution maps are in :mod:`lcma_ext.pipeline`.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.3-3.4, Algorithm 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any, NamedTuple, cast

import torch
from nflows.transforms import base as nflows_base
from torch import Tensor, nn

from lcma_ext.splits import PLACEMENTS, ChannelSplit, MapLayout, Split, split_shapes
from lcma_ext.transforms.base import DiagMixin, carry_positions, require_diag_aware
from lcma_ext.transforms.factor_prior import PRIORS, ConditionalGaussianPrior

__all__ = [
    "ContributionMultiscaleFlow",
    "LevelFactory",
    "LevelShapes",
    "SplitDiagOutput",
    "SplitOutput",
    "SplitPoint",
    "build_levels",
    "check_level_arguments",
    "level_output_shape",
    "walk_levels",
]

Shape = tuple[int, ...]
#: ``level_factory(level_index, input_shape) -> Transform``; ``level_index`` counts from the
#: data side, ``input_shape`` is the level's input event shape.
LevelFactory = Callable[[int, tuple[int, ...]], nflows_base.Transform]


def level_output_shape(level: nflows_base.Transform, input_shape: Sequence[int]) -> Shape:
    """Event shape of ``level``'s outputs, found without running data through it (``carry``)."""
    return tuple(carry_positions(require_diag_aware(level), tuple(input_shape)).shape)


def check_level_arguments(num_levels: int, placement: str) -> None:
    """Raise ``ValueError`` unless ``num_levels`` is a positive int and ``placement`` is known."""
    if not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"expected num_levels as a positive int; got {num_levels!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"expected placement in {PLACEMENTS}; got {placement!r}")


# ----------------------------------------------------------------------------------------------
# the one level walk


@dataclass(frozen=True, eq=False)
class LevelShapes:
    """One level of :func:`walk_levels`: the level, its shapes and its rearrangement.

    Attributes:
        index: The level's index, counted from the data side.
        level: The level (built by the factory, or as given; a rearrangement tensor if the
            levels were given as such).
        input_shape: Event shape of the level's inputs.
        positions: ``carry_positions(level, input_shape)``: entry ``q`` is the flat index, in
            ``input_shape``, of the dimension at output position ``q``.
        factored_shape: Event shape of the half factored out after the level; ``None`` for the
            last level and in a non-multi-scale walk.
        kept_shape: Event shape of the kept half, the next level's input; ``None`` likewise.

    Shapes:
        positions: ``output_shape`` (long).
    """

    index: int
    level: Any
    input_shape: Shape
    positions: Tensor
    factored_shape: Shape | None
    kept_shape: Shape | None

    @property
    def output_shape(self) -> Shape:
        """Event shape of the level's outputs (the split's input at a split point)."""
        return tuple(self.positions.shape)

    @property
    def is_split_point(self) -> bool:
        """Whether a split follows the level."""
        return self.kept_shape is not None


def _as_shape(shape: Sequence[int]) -> Shape:
    return tuple(int(size) for size in shape)


def _nms_next_shape(output_shape: Shape, placement: str) -> Shape:
    """The next non-multi-scale level's input: the whole output, squeezed for ``"squeeze"``."""
    if placement == "post_squeeze":
        return output_shape
    factored, kept = split_shapes(output_shape, placement)  # the split's squeeze, both halves
    return (factored[0] + kept[0], *kept[1:])


def _rearrangement(level: Any, shape: Shape, where: str) -> Tensor:
    if isinstance(level, Tensor):
        numel = math.prod(shape)
        if level.numel() != numel:
            raise ValueError(
                f"expected {where}'s rearrangement over {numel} dimensions; got {level.numel()}"
            )
        return level.cpu()
    return carry_positions(require_diag_aware(level, where), shape).cpu()


def walk_levels(
    levels: Sequence[nflows_base.Transform | Tensor] | LevelFactory,
    input_shape: Sequence[int],
    num_levels: int | None = None,
    placement: str = "post_squeeze",
    *,
    splits: Sequence[Split | None] | None = None,
    multiscale: bool = True,
) -> Iterator[LevelShapes]:
    """Walk the levels of a flow, data side first, with each level's shapes.

    Level ``l`` receives the kept half of level ``l - 1``'s output (``multiscale``, the split
    of ``placement`` or of ``splits[l - 1]``), or its whole output (the non-multi-scale flow;
    for ``placement="squeeze"`` squeezed, as the NMS flow's added squeeze does). A factory is
    called level by level with each level's input shape, in order, so it draws from torch's
    random state as a loop over the levels would.

    Args:
        levels: The levels (diag-aware transforms, or their rearrangements as
            :func:`lcma_ext.transforms.carry_positions` gives them), or a level factory.
        input_shape: Event shape of the data.
        num_levels: Number of levels; ``None``: all given levels, or, for a factory, levels
            without end, each a split point (stop the iteration yourself).
        placement: ``"post_squeeze"`` or ``"squeeze"``.
        splits: One split per split point (``None`` entries: the placement's shapes), for
            splits with other shapes (a :class:`lcma_ext.splits.ChannelSplit` of another dim).
        multiscale: ``False`` walks the non-multi-scale flow (nothing factored out).

    Yields:
        One :class:`LevelShapes` per level.

    Raises:
        ValueError: for a count that does not match, an unknown placement, or a shape the
            split (or the NMS squeeze) cannot take.
        TypeError: for a level that is not diag-aware.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"expected placement in {PLACEMENTS}; got {placement!r}")
    factory = callable(levels) and not isinstance(levels, nn.Module | Tensor)
    if not factory:
        levels = list(levels)  # type: ignore[arg-type]
        if num_levels is not None and num_levels != len(levels):
            raise ValueError(f"expected {num_levels} levels; got {len(levels)}")
        num_levels = len(levels)
    splits = None if splits is None else list(splits)
    shape = _as_shape(input_shape)
    for index in count() if num_levels is None else range(num_levels):
        if factory:
            level = levels(index, shape)  # type: ignore[operator]
            where = f"level {index} from level_factory"
        else:
            level = levels[index]  # type: ignore[index]
            where = f"level {index}"
        positions = _rearrangement(level, shape, where)
        output = tuple(positions.shape)
        last = num_levels is not None and index == num_levels - 1
        factored = kept = None
        if multiscale and not last:
            split = None if splits is None or index >= len(splits) else splits[index]
            if split is None:
                factored, kept = split_shapes(output, placement)
            else:
                factored, kept = split.output_shapes(output)
            factored, kept = _as_shape(factored), _as_shape(kept)
        yield LevelShapes(index, level, shape, positions, factored, kept)
        if last:
            return  # no next level: its input shape is not needed (and may not exist)
        shape = kept if kept is not None else _nms_next_shape(output, placement)


def build_levels(
    level_factory: LevelFactory,
    input_shape: Sequence[int],
    num_levels: int,
    placement: str = "post_squeeze",
) -> list[nflows_base.Transform]:
    """Build the ``num_levels`` levels of a multi-scale flow with ``level_factory``.

    Level ``l`` receives the kept half of level ``l - 1``'s output (the same shape for every
    split type of a placement); see :func:`walk_levels`.

    Raises:
        ValueError: for ``num_levels < 1``, an unknown placement, or shapes the placement
            cannot split.
        TypeError: if the factory returns a transform that is not diag-aware.
    """
    check_level_arguments(num_levels, placement)
    return [step.level for step in walk_levels(level_factory, input_shape, num_levels, placement)]


# ----------------------------------------------------------------------------------------------
# the one split-point step


class SplitOutput(NamedTuple):
    """What :meth:`SplitPoint.forward` returns (data to noise)."""

    #: The factored half, after the prior's map if there is one: ``(B, *factored_shape)``.
    factored: Tensor
    #: The kept half, the next level's input: ``(B, *kept_shape)``.
    kept: Tensor
    #: log|det J| of the step (the prior's; 0 without one): ``(B,)``.
    logabsdet: Tensor


class SplitDiagOutput(NamedTuple):
    """What :meth:`SplitPoint.forward_with_diag` returns: :class:`SplitOutput` and the maps."""

    factored: Tensor
    kept: Tensor
    logabsdet: Tensor
    #: The running per-dimension map of the factored half, plus the prior's own entries.
    factored_diag: Tensor
    #: The running per-dimension map of the kept half.
    kept_diag: Tensor


class SplitPoint(nn.Module):
    """One split point of a multi-scale flow: the split, then the factored half's prior.

    Data to noise, ``forward(x)`` splits ``x`` into the factored and the kept half (log-det 0:
    a split only moves dimensions) and, with a :class:`ConditionalGaussianPrior`, maps the
    factored half ``f`` to ``eps = (f - mu(k)) / sigma(k)`` given the kept half ``k`` (log-det
    ``-sum log sigma(k)``). Without a prior the factored half is scored by the standard normal
    as it is. ``inverse`` undoes both; ``forward_with_diag`` also splits the running
    per-dimension map and adds the prior's ``-log sigma_i(k)`` to each factored entry, so the
    entries still sum to the log-det; ``carry`` splits any tensor as the data.

    Args:
        split: The split.
        prior: ``None`` (the standard normal) or Glow's conditional prior of the split's halves.
        input_shape: The split's input event shape; binds the split. Without it the shapes are
            known only for a bound index split.

    Attributes:
        input_shape, factored_shape, kept_shape: Event shapes (``None`` while unknown).

    Raises:
        TypeError: for a split that is not a :class:`lcma_ext.splits.Split`, or another prior.
        ValueError: for a shape the split cannot take, or a prior of other halves.

    Shapes:
        x: ``(B, *input_shape)``; factored: ``(B, *factored_shape)``; kept:
        ``(B, *kept_shape)``; logabsdet: ``(B,)``.

    References:
        D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
        NeurIPS 2018 (``split2d``).
        S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture
        for Generative Flows, Sec. 3.3.
    """

    def __init__(
        self,
        split: Split,
        prior: ConditionalGaussianPrior | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_split(split)
        if prior is not None and not isinstance(prior, ConditionalGaussianPrior):
            raise TypeError(
                f"expected prior=None or a ConditionalGaussianPrior; got {type(prior).__name__}"
            )
        shape = input_shape if input_shape is not None else getattr(split, "input_shape", None)
        self.input_shape: Shape | None = None if shape is None else _as_shape(shape)
        self.factored_shape: Shape | None = None
        self.kept_shape: Shape | None = None
        if self.input_shape is not None:
            factored, kept = split.output_shapes(self.input_shape)
            split.bind(self.input_shape)
            self.factored_shape, self.kept_shape = _as_shape(factored), _as_shape(kept)
            if prior is not None and (prior.factored_shape, prior.kept_shape) != (
                self.factored_shape,
                self.kept_shape,
            ):
                raise ValueError(
                    f"expected a prior for halves {self.factored_shape} and {self.kept_shape}; "
                    f"got one for {prior.factored_shape} and {prior.kept_shape}"
                )
        self.split = split
        self.prior = prior

    @classmethod
    def build(
        cls,
        split: Split,
        input_shape: Sequence[int],
        prior: str | ConditionalGaussianPrior = "standard",
    ) -> SplitPoint:
        """The split point of ``split`` bound to ``input_shape``, with the named prior.

        Args:
            split: The split.
            input_shape: The split's input event shape.
            prior: ``"standard"`` (no prior module: the standard normal), ``"conditional"``
                (a new zero-initialised :class:`ConditionalGaussianPrior` of the split's
                halves, so the new step equals the standard one) or such a prior.

        Raises:
            TypeError: for a split that is not a :class:`lcma_ext.splits.Split`.
            ValueError: for an unknown prior, a shape the split cannot take, or a prior of
                other halves.
        """
        _check_split(split)
        if isinstance(prior, ConditionalGaussianPrior):
            return cls(split, prior, input_shape)
        if prior not in PRIORS:
            raise ValueError(
                f"expected prior in {PRIORS} or a ConditionalGaussianPrior; got {prior!r}"
            )
        if prior == "standard":
            return cls(split, None, input_shape)
        factored, kept = split.output_shapes(_as_shape(input_shape))
        return cls(split, ConditionalGaussianPrior(factored, kept), input_shape)

    def _zeros(self, like: Tensor) -> Tensor:
        return like.new_zeros(like.shape[0])

    def forward(self, x: Tensor) -> SplitOutput:
        """Data to noise: ``(factored, kept, logabsdet)``."""
        factored, kept = self.split(x)
        if self.prior is None:
            return SplitOutput(factored, kept, self._zeros(x))
        factored, logabsdet = self.prior(factored, kept)
        return SplitOutput(factored, kept, logabsdet)

    def inverse(self, factored: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Noise to data: ``(x, logabsdet)``, the log-det of this (inverse) direction."""
        if self.prior is None:
            return self.split.inverse(factored, kept), self._zeros(kept)
        factored, logabsdet = self.prior.inverse(factored, kept)
        return self.split.inverse(factored, kept), logabsdet

    def forward_with_diag(self, x: Tensor, diag: Tensor) -> SplitDiagOutput:
        """:meth:`forward`, and the running per-dimension map ``diag`` (shaped like ``x``).

        Returns:
            ``(factored, kept, logabsdet, factored_diag, kept_diag)``: the factored half's
            map gets the prior's ``-log sigma_i(kept)`` added.
        """
        factored, kept = self.split(x)
        factored_diag, kept_diag = self.split.carry(diag)
        if self.prior is None:
            return SplitDiagOutput(factored, kept, self._zeros(x), factored_diag, kept_diag)
        factored, logabsdet, own = self.prior.forward_with_diag(factored, kept)
        return SplitDiagOutput(factored, kept, logabsdet, factored_diag + own, kept_diag)

    def carry(self, tensor: Tensor) -> tuple[Tensor, Tensor]:
        """The split's selection of ``tensor`` (any dtype): ``(factored, kept)``."""
        return self.split.carry(tensor)


def _check_split(split: object) -> None:
    if not isinstance(split, Split):
        raise TypeError(f"expected a lcma_ext.splits.Split; got {type(split).__name__}")


def migrate_state_keys(
    state_dict: dict[str, Any], prefix: str, renames: Sequence[tuple[str, str]]
) -> None:
    """Rename the keys of a module's state saved by an earlier version, in place.

    Args:
        state_dict: The state being loaded (as ``_load_from_state_dict`` receives it).
        prefix: The module's prefix in it.
        renames: ``(pattern, replacement)`` pairs (``re`` syntax) for the key after ``prefix``;
            the first pattern that matches at the key's start renames it.
    """
    for key in [key for key in state_dict if key.startswith(prefix)]:
        local = key[len(prefix) :]
        for pattern, replacement in renames:
            renamed, hits = re.subn(f"^{pattern}", replacement, local)
            if hits:
                state_dict[prefix + renamed] = state_dict.pop(key)
                break


# ----------------------------------------------------------------------------------------------
# the nflows flow

#: Keys of a :class:`ContributionMultiscaleFlow` state saved before its split points were
#: :class:`SplitPoint` modules (``_splits.l``, ``_priors.l``), and their names now.
_STATE_RENAMES = (
    (r"_splits\.(\d+)\.", r"_points.\1.split."),
    (r"_priors\.(\d+)\.", r"_points.\1.prior."),
)


class ContributionMultiscaleFlow(DiagMixin, nflows_base.MultiscaleCompositeTransform):
    """nflows ``MultiscaleCompositeTransform`` whose split points take any :class:`Split`.

    Same contract as the parent: call :meth:`add_transform` ``num_transforms`` times, level by
    level; it returns the next level's input shape (``None`` after the last). ``forward``
    returns the flattened concatenation of every factored half and the last level's output, in
    that order, and the total log|det J|. With :class:`ChannelSplit` at every split point the
    outputs and log-det equal the parent's exactly. Also speaks the per-dimension protocol
    (``forward_with_diag``, ``carry``; outputs flattened like ``forward``). Each split point is
    a :class:`SplitPoint` (:attr:`points`); states saved before that (with ``_splits`` and
    ``_priors`` keys) still load.

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
        self._points = nn.ModuleList()

    @property
    def levels(self) -> list[nflows_base.Transform]:
        """The levels, data side first (``num_transforms`` once complete)."""
        return list(self._transforms)

    @property
    def points(self) -> list[SplitPoint]:
        """The split points, data side first (``num_transforms - 1``)."""
        return cast("list[SplitPoint]", list(self._points))  # add_transform appends only these

    @property
    def splits(self) -> list[Split]:
        """The split objects, one per split point (``num_transforms - 1``)."""
        return [point.split for point in self.points]

    @property
    def priors(self) -> list[ConditionalGaussianPrior | None]:
        """Per split point, its conditional prior, or ``None`` for the standard normal."""
        return [point.prior for point in self.points]

    @property
    def output_shapes(self) -> list[Shape]:
        """Event shapes of the outputs: each factored half, then the last level's output."""
        return list(self._output_shapes)

    def add_transform(
        self,
        transform: nflows_base.Transform,
        transform_output_shape: Sequence[int],
        split: Split | None = None,
        prior: str | ConditionalGaussianPrior = "standard",
    ) -> Shape | None:
        """Add the next level and the split after it.

        A split with a contribution map from :attr:`lcma_ext.ContributionMaps.maps` (an
        :class:`lcma_ext.LCMASplit` of it) is checked against this flow: the map must have been
        tracked through levels that rearrange dimensions like this flow's levels, and through
        the same splits before it.

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
            RuntimeError: when adding more than ``num_transforms`` levels, or for a contribution
                map of other levels (the message says how to map it onto these).
            ValueError: for a split or prior on the last level, an unknown prior, or a shape
                the split cannot take.
        """
        if not isinstance(prior, ConditionalGaussianPrior) and prior not in PRIORS:
            raise ValueError(
                f"expected prior in {PRIORS} or a ConditionalGaussianPrior; got {prior!r}"
            )
        if len(self._transforms) >= self._num_transforms:
            raise RuntimeError(f"expected at most {self._num_transforms} transforms; got one more")
        shape = _as_shape(transform_output_shape)
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
        point = SplitPoint.build(split, shape, prior)
        self._check_layout(transform, point)
        self._transforms.append(transform)
        self._points.append(point)
        self._output_shapes.append(point.factored_shape)
        return point.kept_shape

    def _check_layout(self, transform: nflows_base.Transform, point: SplitPoint) -> None:
        """Raise unless a split's tracked map (if any) is in this flow's layout there."""
        layout: MapLayout | None = getattr(point.split, "layout", None)
        if layout is None:
            return
        index = len(self._points)
        positions = torch.arange(math.prod(layout.data_shape)).view(1, *layout.data_shape)
        try:
            for level, earlier in zip(self._transforms, self.points, strict=True):
                positions = earlier.carry(require_diag_aware(level).carry(positions))[1]
            positions = require_diag_aware(transform).carry(positions)[0]
            same = torch.equal(positions.cpu(), layout.positions)
        except (RuntimeError, ValueError):  # the layout cannot even be carried here
            same = False
        if not same:
            raise RuntimeError(
                f"expected the contribution map of split point {index} in this flow's layout; "
                "got a map tracked through other levels or splits (e.g. another random "
                "1x1-convolution permutation). Map the contributions onto these levels with "
                "maps.track(levels, check=False).maps, or build the flow with "
                "build_multiscale_transform(..., levels=levels, remap=True)"
            )

    def _check_complete(self) -> None:
        if self._num_transforms != len(self._transforms):
            raise RuntimeError(
                f"expected exactly {self._num_transforms} transform(s) to be added; got "
                f"{len(self._transforms)}"
            )

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        migrate_state_keys(state_dict, prefix, _STATE_RENAMES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self._split_dim >= inputs.dim():
            raise ValueError(
                f"expected inputs with a dim {self._split_dim}; got shape {tuple(inputs.shape)}"
            )
        self._check_complete()
        hiddens = inputs
        all_outputs = []
        total_logabsdet = inputs.new_zeros(inputs.shape[0])
        for transform, point in zip(self._transforms[:-1], self._points):
            transform_outputs, logabsdet = transform(hiddens, context)
            outputs, hiddens, split_logabsdet = point(transform_outputs)
            all_outputs.append(outputs.flatten(1))
            total_logabsdet += logabsdet + split_logabsdet
        outputs, logabsdet = self._transforms[-1](hiddens, context)
        all_outputs.append(outputs.flatten(1))
        total_logabsdet += logabsdet
        return torch.cat(all_outputs, dim=-1), total_logabsdet

    def _chunks(self, inputs: Tensor) -> list[Tensor]:
        if inputs.dim() != 2:
            raise ValueError(f"expected (B, D) inputs; got shape {tuple(inputs.shape)}")
        self._check_complete()
        sizes = [math.prod(shape) for shape in self._output_shapes]
        if inputs.shape[1] != sum(sizes):
            raise ValueError(f"expected {sum(sizes)} features; got {inputs.shape[1]}")
        flat = torch.split(inputs, sizes, dim=1)
        batch = inputs.shape[0]
        return [chunk.reshape(batch, *shape) for chunk, shape in zip(flat, self._output_shapes)]

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        chunks = self._chunks(inputs)
        total_logabsdet = inputs.new_zeros(inputs.shape[0])
        hiddens, logabsdet = self._transforms[-1].inverse(chunks[-1], context)
        total_logabsdet += logabsdet
        for index in range(len(self._points) - 1, -1, -1):
            joined, logabsdet = self.points[index].inverse(chunks[index], hiddens)
            total_logabsdet += logabsdet
            hiddens, logabsdet = self._transforms[index].inverse(joined, context)
            total_logabsdet += logabsdet
        return hiddens, total_logabsdet

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        self._check_complete()
        hiddens = inputs
        all_outputs, all_diags = [], []
        total_logabsdet = inputs.new_zeros(inputs.shape[0])
        for index, transform in enumerate(self._transforms):
            level = require_diag_aware(transform, f"ContributionMultiscaleFlow level {index}")
            outputs, logabsdet, diag = level.forward_with_diag(hiddens, context, diag)
            total_logabsdet += logabsdet
            if index < len(self._points):
                step = self.points[index].forward_with_diag(outputs, diag)
                outputs, hiddens, diag = step.factored, step.kept, step.kept_diag
                total_logabsdet += step.logabsdet
                factored_diag = step.factored_diag
            else:
                factored_diag = diag
            all_outputs.append(outputs.flatten(1))
            all_diags.append(factored_diag.flatten(1))
        return torch.cat(all_outputs, -1), total_logabsdet, torch.cat(all_diags, -1)

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """Rearrange ``tensor`` (shaped like the inputs) as the data; returns ``(B, D)``."""
        self._check_complete()
        pieces = []
        for index, transform in enumerate(self._transforms):
            level = require_diag_aware(transform, f"ContributionMultiscaleFlow level {index}")
            tensor = level.carry(tensor, context)
            if index < len(self._points):
                factored, tensor = self.points[index].carry(tensor)
            else:
                factored = tensor
            pieces.append(factored.flatten(1))
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
        for step in walk_levels(levels, input_shape, splits=splits):
            if step.is_split_point:
                index = step.index
                flow.add_transform(step.level, step.output_shape, splits[index], priors[index])
            else:
                flow.add_transform(step.level, step.output_shape)
        return flow
