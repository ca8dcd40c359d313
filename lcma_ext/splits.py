"""Split objects: which half of a level's output is factored out and which half is kept.

Every split shares one interface (:class:`Split`) and, for a given input shape and placement, the
same output shapes, so multi-scale flows that differ only in their split are compared like for
like. A split only rearranges dimensions: its log-det is 0 and ``inverse`` is exact.

Placements (the ``placement`` argument):

``"post_squeeze"`` (default; Glow and nflows style)
    The level begins with a :class:`lcma_ext.transforms.SqueezeTransform`, so the split receives
    ``4C x H x W`` where channels ``4c .. 4c + 3`` at site ``(i, j)`` came from one ``2 x 2`` block
    (nflows' squeeze ordering: output channel ``4c + 2 dy + dx``). That group of four is the
    *local block*. Output shapes equal :class:`ChannelSplit`'s: factored ``2C x H x W`` and kept
    ``2C x H x W``.
``"squeeze"`` (Fig. 1 of the paper, literally)
    The split is itself a squeeze: ``C x H x W -> `` factored ``2C x H/2 x W/2`` plus kept
    ``2C x H/2 x W/2``; the local block is the ``2 x 2`` spatial block of each channel.

Within a block, position ``k = 2 dy + dx`` (0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right). Each half keeps the image layout: block ``(c, i, j)`` sends its two kept
dimensions to channels ``2c`` and ``2c + 1`` of the kept half at site ``(i, j)``, ordered by block
position, and likewise its two factored dimensions. Vector data (event shape ``(D,)``) has no
spatial layout: factored gets ``D - D // 2`` dimensions and kept ``D // 2``, as ``torch.chunk``.

LCMA rule (:class:`LCMASplit`): inside each block, keep the two dimensions with the highest
averaged cumulative contribution and factor out the two lowest. **Ties** break by the fixed
preference order top-left, bottom-right, top-right, bottom-left (:data:`BLOCK_PRIORITY`): among
equal contributions the earlier position is kept. A constant map therefore gives exactly
:class:`CheckerboardSplit` (kept: the diagonal, factored: the anti-diagonal). For vector data the
preference order is the odd indices, then the even ones, so a constant vector map also equals
:class:`CheckerboardSplit`. ``factor_out="high"`` swaps the two halves of that same ranking, so it
keeps exactly the complement, ties included.

Granularity (``LCMASplit(granularity=...)``, beyond the paper): the *block grid* of a split is
its ``h x w`` grid of local blocks (``H x W`` for ``"post_squeeze"``, ``H/2 x W/2`` for
``"squeeze"``), one per channel group. ``"site"`` (default, the paper) ranks every block on its
own. ``"region"`` averages the map over tiles of ``region_size x region_size`` sites, separately
for each channel group and block position, and applies one ranking to the whole tile.
``"channel"`` is one tile covering the grid: one static choice per channel group, so kept
channel ``2c`` (``2c + 1``) holds the same block position at every site. Ties break as above.

All index-based splits precompute one flat permutation (a registered buffer, so it survives
``state_dict``) and apply it with a single ``index_select``; the backward pass is the inverse
gather, so no scatter and no per-call index allocation.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.3, Fig. 1, Algorithm 1.
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BLOCK_PRIORITY",
    "CHECKERBOARD_FACTORED",
    "CHECKERBOARD_KEPT",
    "DEFAULT_REGION_SIZE",
    "FACTOR_OUT",
    "GRANULARITIES",
    "GRANULAR_SPLIT_NAMES",
    "PLACEMENTS",
    "SPLIT_NAMES",
    "SPLIT_RULES",
    "ChannelSplit",
    "CheckerboardSplit",
    "IndexSplit",
    "LCMASplit",
    "MapLayout",
    "RandomSplit",
    "Split",
    "SplitSpec",
    "checked_shape",
    "fit_region_size",
    "kept_block_positions",
    "kept_shape",
    "make_split",
    "map_layout",
    "rank_blocks",
    "rank_tiles",
    "rank_vector",
    "region_tile",
    "split_shapes",
    "squeeze_layout",
    "with_layout",
]

PLACEMENTS = ("post_squeeze", "squeeze")
SPLIT_NAMES = ("channel", "checkerboard", "random", "lcma", "high")
#: Rules of :class:`SplitSpec` (``"lcma"`` with ``factor_out="high"`` is the name ``"high"``).
SPLIT_RULES = ("channel", "checkerboard", "random", "lcma")
FACTOR_OUT = ("low", "high")
#: Granularity of the LCMA choice: per site (the paper), per tile of sites, per channel group.
GRANULARITIES = ("site", "region", "channel")
#: Default tile side (in sites of the block grid) of ``granularity="region"``.
DEFAULT_REGION_SIZE = 4
#: Split names of :func:`make_split` beyond :data:`SPLIT_NAMES`: ``<lcma|high>-<granularity>``.
GRANULAR_SPLIT_NAMES = ("lcma-channel", "lcma-region", "high-channel", "high-region")
#: Tie-break preference over block positions ``k = 2 dy + dx``: TL, BR, TR, BL.
BLOCK_PRIORITY = (0, 3, 1, 2)
#: Block positions the checkerboard split keeps (TL, BR) and factors out (TR, BL).
CHECKERBOARD_KEPT = (0, 3)
CHECKERBOARD_FACTORED = (1, 2)

Shape = tuple[int, ...]


def _check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"expected placement in {PLACEMENTS}; got {placement!r}")
    return placement


def checked_shape(shape: Sequence[int], name: str = "input_shape") -> Shape:
    """``shape`` as a tuple of positive ints; a ``ValueError`` naming ``name`` otherwise."""
    try:
        shape = tuple(int(size) for size in shape)
    except TypeError as error:
        raise ValueError(f"expected {name} as a sequence of ints; got {shape!r}") from error
    if not shape or any(size < 1 for size in shape):
        raise ValueError(f"expected {name} with positive sizes; got {shape}")
    return shape


def split_shapes(
    input_shape: Sequence[int], placement: str = "post_squeeze", blocks: bool = False
) -> tuple[Shape, Shape]:
    """``(factored_shape, kept_shape)`` of a split of ``input_shape`` (no batch dimension).

    Args:
        input_shape: ``(D,)`` (vector data) or ``(C, H, W)``.
        placement: ``"post_squeeze"`` or ``"squeeze"`` (see the module docstring).
        blocks: If true, also require the local-block structure (``C`` divisible by 4 for
            ``"post_squeeze"``), as the block-based splits do.

    Raises:
        ValueError: if the placement cannot split ``input_shape``.
    """
    _check_placement(placement)
    shape = checked_shape(input_shape)
    if len(shape) == 1:
        (d,) = shape
        if d < 2:
            raise ValueError(f"expected at least 2 features to split; got {d}")
        return (d - d // 2,), (d // 2,)
    if len(shape) != 3:
        raise ValueError(f"expected an event shape (D,) or (C, H, W); got {shape}")
    c, h, w = shape
    if placement == "squeeze":
        if h % 2 or w % 2:
            raise ValueError(
                f"placement 'squeeze' expected even H and W; got {h}x{w} (input shape {shape})"
            )
        return (2 * c, h // 2, w // 2), (2 * c, h // 2, w // 2)
    if blocks and c % 4:
        raise ValueError(
            "placement 'post_squeeze' expected a channel count divisible by 4 (groups of 4 "
            f"channels made by a squeeze); got {c} channels (input shape {shape})"
        )
    if c < 2:
        raise ValueError(f"expected at least 2 channels to split; got {c} (input shape {shape})")
    return ((c + 1) // 2, h, w), (c // 2, h, w)


def kept_shape(output_shape: Sequence[int], placement: str = "post_squeeze") -> Shape:
    """Event shape of the kept half, i.e. the next level's input shape (same for all splits)."""
    return split_shapes(output_shape, placement)[1]


def squeeze_layout(tensor: Tensor) -> Tensor:
    """nflows' squeeze of one event ``(C, H, W) -> (4C, H/2, W/2)``, channel ``4c + 2dy + dx``."""
    c, h, w = tensor.shape
    return (
        tensor.reshape(c, h // 2, 2, w // 2, 2)
        .permute(0, 2, 4, 1, 3)
        .reshape(c * 4, h // 2, w // 2)
    )


class _Permute(torch.autograd.Function):
    """``x.index_select(1, index)`` for a permutation ``index``; backward gathers with its inverse.

    Cheaper than the default backward of ``index_select`` (a scatter-add), and still
    differentiable twice since the backward is itself an ``index_select``.
    """

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, index: Tensor, inverse_index: Tensor) -> Tensor:
        ctx.save_for_backward(index, inverse_index)
        return inputs.index_select(1, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        index, inverse_index = ctx.saved_tensors
        # torch leaves Function.apply unannotated
        return _Permute.apply(grad, inverse_index, index), None, None  # type: ignore[no-untyped-call]


def _permute(inputs: Tensor, index: Tensor, inverse_index: Tensor) -> Tensor:
    if inputs.is_floating_point() and torch.is_grad_enabled() and inputs.requires_grad:
        # torch leaves Function.apply unannotated
        return _Permute.apply(inputs, index, inverse_index)  # type: ignore[no-untyped-call]
    return inputs.index_select(1, index)


#: The attribute under which a contribution map records its :class:`MapLayout`.
_LAYOUT_ATTRIBUTE = "lcma_layout"


@dataclass(frozen=True, eq=False)
class MapLayout:
    """Where the entries of a contribution map come from: the data dimension at each position.

    The tracker (:func:`lcma_ext.contributions.track_splits`) records it on every map it
    gathers from the data's layout (:attr:`lcma_ext.ContributionMaps.maps`), an
    :class:`LCMASplit` of such a map keeps it, and
    :meth:`lcma_ext.ContributionMultiscaleFlow.add_transform` checks it against the flow the
    split is added to. A copy of the map (``clone``, ``to``, arithmetic) has no layout.

    Attributes:
        data_shape: Event shape of the data.
        positions: Long tensor shaped like the map: the flat index, in ``data_shape``, of the
            data dimension at each position.
    """

    data_shape: Shape
    positions: Tensor


def with_layout(contributions: Tensor, layout: MapLayout) -> Tensor:
    """Record ``layout`` on the map ``contributions`` (the same tensor object); returns it.

    Raises:
        ValueError: if the layout's positions are not shaped like the map.
    """
    if tuple(layout.positions.shape) != tuple(contributions.shape):
        raise ValueError(
            f"expected layout positions of the map's shape {tuple(contributions.shape)}; got "
            f"{tuple(layout.positions.shape)}"
        )
    setattr(contributions, _LAYOUT_ATTRIBUTE, layout)
    return contributions


def map_layout(contributions: Tensor) -> MapLayout | None:
    """The :class:`MapLayout` recorded on a map by :func:`with_layout`, or ``None``."""
    layout = getattr(contributions, _LAYOUT_ATTRIBUTE, None)
    return layout if isinstance(layout, MapLayout) else None


class Split(nn.Module):
    """Common interface of all split objects.

    ``forward(x) -> (factored, kept)`` with log-det 0, ``inverse(factored, kept) -> x`` and
    ``carry(tensor) -> (factored, kept)`` (the same selection on a tensor of any dtype, e.g. a
    running per-dimension contribution map or a long index tensor).

    Args:
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.

    Shapes:
        x: ``(B, *input_shape)``; factored and kept: ``(B, *shape)`` from :meth:`output_shapes`.
    """

    #: Where the split's contribution map came from (:class:`MapLayout`), if known.
    layout: MapLayout | None = None

    def __init__(self, placement: str = "post_squeeze") -> None:
        super().__init__()
        self.placement = _check_placement(placement)

    def output_shapes(self, input_shape: Sequence[int]) -> tuple[Shape, Shape]:
        """``(factored_shape, kept_shape)`` for inputs of event shape ``input_shape``.

        Raises:
            ValueError: if this split cannot split ``input_shape``.
        """
        return split_shapes(input_shape, self.placement)

    def bind(self, input_shape: Sequence[int]) -> Split:
        """Fix the input event shape (builds index buffers where needed); returns ``self``.

        Raises:
            ValueError: if the split cannot take ``input_shape``.
        """
        self.output_shapes(input_shape)
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, factored: Tensor, kept: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def carry(self, tensor: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the same selection to ``tensor`` (any dtype); returns ``(factored, kept)``."""
        return self.forward(tensor)

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}"


class ChannelSplit(Split):
    """The static channel split of RealNVP, Glow and nflows' ``MultiscaleCompositeTransform``.

    Factored: the first ``ceil(C / 2)`` channels, kept: the rest (``torch.chunk(x, 2, dim)``,
    exactly as nflows). With ``placement="squeeze"`` the input is squeezed first.

    Args:
        dim: Dimension to split (``1`` for channels / features; nflows' ``split_dim``).
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.

    Shapes:
        x: ``(B, *input_shape)``.
    """

    def __init__(self, dim: int = 1, placement: str = "post_squeeze") -> None:
        super().__init__(placement)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"expected a positive int dim (batch is dim 0); got {dim!r}")
        if placement == "squeeze" and dim != 1:
            raise ValueError(f"placement 'squeeze' expected dim=1; got {dim}")
        self.dim = dim

    def output_shapes(self, input_shape: Sequence[int]) -> tuple[Shape, Shape]:
        shape = checked_shape(input_shape)
        if self.placement == "squeeze" or self.dim == 1:
            return split_shapes(shape, self.placement)
        if self.dim - 1 >= len(shape) or shape[self.dim - 1] < 2:
            raise ValueError(f"expected size >= 2 in dim {self.dim}; got event shape {shape}")
        factored, kept = list(shape), list(shape)
        factored[self.dim - 1] = (shape[self.dim - 1] + 1) // 2
        kept[self.dim - 1] = shape[self.dim - 1] // 2
        return tuple(factored), tuple(kept)

    def _squeeze(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(
                f"ChannelSplit(placement='squeeze'): expected (B, C, H, W) with even H and W; "
                f"got {tuple(x.shape)}"
            )
        b, c, h, w = x.shape
        return (
            x.reshape(b, c, h // 2, 2, w // 2, 2)
            .permute(0, 1, 3, 5, 2, 4)
            .reshape(b, 4 * c, h // 2, w // 2)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.placement == "squeeze":
            x = self._squeeze(x)
        if self.dim >= x.dim() or x.shape[self.dim] < 2:
            raise ValueError(
                f"ChannelSplit: expected size >= 2 in dim {self.dim}; got {tuple(x.shape)}"
            )
        factored, kept = torch.chunk(x, chunks=2, dim=self.dim)
        return factored, kept

    def inverse(self, factored: Tensor, kept: Tensor) -> Tensor:
        x = torch.cat([factored, kept], dim=self.dim)
        if self.placement == "squeeze":
            b, c4, h, w = x.shape
            x = (
                x.reshape(b, c4 // 4, 2, 2, h, w)
                .permute(0, 1, 4, 2, 5, 3)
                .reshape(b, c4 // 4, 2 * h, 2 * w)
            )
        return x

    def extra_repr(self) -> str:
        return f"dim={self.dim}, placement={self.placement!r}"


class IndexSplit(Split):
    """A split given by one fixed flat permutation of the input event (a registered buffer).

    Subclasses implement :meth:`_build_index` returning the flat input indices of the factored
    half and of the kept half, each in the layout of its output shape. ``forward`` is then a
    single ``index_select`` and ``inverse`` its inverse gather. The permutation ``index`` is
    saved with the state; its inverse is derived. Loading a state checks that the stored index
    is a permutation and is the one this split's settings (and, for :class:`LCMASplit`, its
    stored map) give, so the state of another split kind or a corrupted index is refused.

    Args:
        input_shape: Event shape; ``None`` defers building until :meth:`bind` (which
            :class:`lcma_ext.ContributionMultiscaleFlow.add_transform` calls).
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.
    """

    index: Tensor
    inverse_index: Tensor

    #: Whether the split needs the local-block structure (``C % 4 == 0`` for post_squeeze).
    _needs_blocks = True

    def __init__(
        self, input_shape: Sequence[int] | None = None, placement: str = "post_squeeze"
    ) -> None:
        super().__init__(placement)
        self.register_buffer("index", torch.zeros(0, dtype=torch.long))
        self.register_buffer("inverse_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.input_shape: Shape | None = None
        self.factored_shape: Shape | None = None
        self.kept_shape: Shape | None = None
        if input_shape is not None:
            self.bind(input_shape)

    def output_shapes(self, input_shape: Sequence[int]) -> tuple[Shape, Shape]:
        return split_shapes(input_shape, self.placement, blocks=self._needs_blocks)

    def bind(self, input_shape: Sequence[int]) -> Split:
        shape = checked_shape(input_shape)
        if self.input_shape is not None:
            if shape != self.input_shape:
                raise ValueError(
                    f"{type(self).__name__}: expected input event shape {self.input_shape}; "
                    f"got {shape}"
                )
            return self
        factored_shape, kept_shape_ = self.output_shapes(shape)
        index = self._full_index(shape)
        if not _is_permutation(index, _numel(shape)):  # internal consistency, not user input
            raise RuntimeError(f"{type(self).__name__} built an index that is no permutation")
        self.index = index
        self.inverse_index = torch.argsort(index)
        self.input_shape = shape
        self.factored_shape, self.kept_shape = factored_shape, kept_shape_
        return self

    def _full_index(self, shape: Shape) -> Tensor:
        factored, kept = self._build_index(shape)
        return torch.cat([factored.reshape(-1), kept.reshape(-1)]).to(self.index.device)

    def _build_index(self, shape: Shape) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _require_bound(self) -> tuple[Shape, Shape, Shape]:
        """The bound ``(input_shape, factored_shape, kept_shape)``; ``bind`` sets all three."""
        if self.input_shape is None or self.factored_shape is None or self.kept_shape is None:
            raise RuntimeError(
                f"{type(self).__name__}: expected a bound split (pass input_shape or call "
                "bind(input_shape) first); got an unbound one"
            )
        return self.input_shape, self.factored_shape, self.kept_shape

    def _check_event(self, tensor: Tensor, shape: Shape, name: str) -> None:
        if tuple(tensor.shape[1:]) != shape:
            raise ValueError(
                f"{type(self).__name__}: expected {name} of event shape {shape}; got "
                f"{tuple(tensor.shape[1:])} (full shape {tuple(tensor.shape)})"
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        input_shape, factored_shape, kept_shape = self._require_bound()
        self._check_event(x, input_shape, "inputs")
        batch = x.shape[0]
        out = _permute(x.flatten(1), self.index, self.inverse_index)
        split = _numel(factored_shape)
        return out[:, :split].view(batch, *factored_shape), out[:, split:].view(batch, *kept_shape)

    def inverse(self, factored: Tensor, kept: Tensor) -> Tensor:
        input_shape, factored_shape, kept_shape = self._require_bound()
        self._check_event(factored, factored_shape, "factored")
        self._check_event(kept, kept_shape, "kept")
        batch = factored.shape[0]
        flat = torch.cat([factored.flatten(1), kept.flatten(1)], dim=1)
        return _permute(flat, self.inverse_index, self.index).view(batch, *input_shape)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A split bound to a different shape than the stored one cannot load it.
        stored = state_dict.get(prefix + "index")
        name = type(self).__name__
        if stored is not None and self.input_shape is not None:
            numel = _numel(self.input_shape)
            if stored.numel() != numel:
                raise ValueError(
                    f"{name}: expected a stored index of {numel} entries; got {stored.numel()}"
                )
            if not _is_permutation(stored.reshape(-1), numel):
                raise ValueError(
                    f"{name}: expected a stored index that is a permutation of 0..{numel - 1}; "
                    "got one that is not"
                )
        # A refused state leaves the split as it was.
        settings = self.settings()
        buffers = {key: value for key, value in self._buffers.items() if value is not None}
        buffers = {key: value.clone() for key, value in buffers.items()}
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        except ValueError:
            for key, value in settings.items():
                setattr(self, key, value)
            for key, value in buffers.items():
                self._buffers[key] = value
            raise

    def settings(self) -> dict[str, Any]:
        """The constructor settings that define this split (saved with its state)."""
        return {"placement": self.placement}

    def get_extra_state(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **self.settings()}

    def set_extra_state(self, state: Any) -> None:
        """Take the settings saved with a state; refuse the state of another split kind.

        The ``placement``, which fixes the output shapes, must be equal; the other settings
        (a random split's seed, an LCMA split's rule and granularity) are taken from the state,
        as the state's tensors are. The stored index must then be the one they give.

        Raises:
            ValueError: if ``state`` was saved by another split class or placement, or its
                index is not the one its settings give.
        """
        name = type(self).__name__
        kind = state.get("kind") if isinstance(state, dict) else None
        if kind != name:
            raise ValueError(f"expected the state of a {name}; got the state of a {kind}")
        stored = {key: value for key, value in state.items() if key != "kind"}
        settings = self.settings()
        if set(stored) != set(settings) or stored["placement"] != self.placement:
            raise ValueError(
                f"expected the state of a {name} with settings like {settings}; got {stored}"
            )
        for key, value in stored.items():
            setattr(self, key, value)
        if self.input_shape is None:
            return
        expected = self._full_index(self.input_shape)
        if self.index.shape == expected.shape and not torch.equal(self.index, expected):
            raise ValueError(
                f"{type(self).__name__}: expected the stored index that the stored settings "
                f"{self.settings()} give; got another permutation (the state of another split)"
            )
        self.inverse_index = torch.argsort(self.index)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, placement={self.placement!r}"


def _numel(shape: Sequence[int]) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel


def _is_permutation(index: Tensor, numel: int) -> bool:
    """Whether the flat long tensor ``index`` is a permutation of ``0 .. numel - 1``."""
    return (
        index.dtype == torch.long
        and index.numel() == numel
        and torch.equal(torch.sort(index).values, torch.arange(numel, device=index.device))
    )


def _block_index(
    kept_pos: Tensor, factored_pos: Tensor, channels4: int, h: int, w: int
) -> tuple[Tensor, Tensor]:
    """Flat indices into a ``(4G, h, w)`` event for per-block positions ``(G, 2, h, w)``."""
    groups = channels4 // 4
    device = kept_pos.device
    base = (4 * torch.arange(groups, device=device)).view(groups, 1, 1, 1)
    rows = torch.arange(h, device=device).view(1, 1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, 1, w)

    def flat(pos: Tensor) -> Tensor:
        return (((base + pos) * h + rows) * w + cols).reshape(2 * groups, h, w)

    return flat(factored_pos), flat(kept_pos)


def _block_layout(shape: Shape, placement: str) -> tuple[Tensor | None, Shape]:
    """For a 3D event: the squeezed flat positions (placement 'squeeze') and the block shape."""
    c, h, w = shape
    if placement == "squeeze":
        positions = squeeze_layout(torch.arange(_numel(shape)).view(c, h, w))
        return positions, (4 * c, h // 2, w // 2)
    return None, shape


def _compose(positions: Tensor | None, index: Tensor) -> Tensor:
    return index if positions is None else positions.reshape(-1)[index]


def rank_blocks(values: Tensor) -> Tensor:
    """Block positions ``(G, 4, h, w)`` sorted by decreasing value, ties by BLOCK_PRIORITY."""
    priority = torch.tensor(BLOCK_PRIORITY, device=values.device)
    order = torch.sort(values[:, priority], dim=1, descending=True, stable=True).indices
    return priority[order]


def rank_vector(values: Tensor) -> Tensor:
    """Indices sorted by decreasing value; ties prefer odd indices, then lower indices."""
    d = values.shape[0]
    priority = torch.cat([torch.arange(1, d, 2), torch.arange(0, d, 2)]).to(values.device)
    order = torch.sort(values[priority], descending=True, stable=True).indices
    return priority[order]


class CheckerboardSplit(IndexSplit):
    """Static checkerboard: in every ``2 x 2`` block keep the diagonal (top-left, bottom-right)
    and factor out the anti-diagonal. Vector data: factor out even indices, keep odd ones.

    Args:
        input_shape: Event shape, or ``None`` to bind later.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.

    Shapes:
        x: ``(B, *input_shape)``; outputs as :class:`ChannelSplit`'s.
    """

    def _build_index(self, shape: Shape) -> tuple[Tensor, Tensor]:
        if len(shape) == 1:
            d = shape[0]
            return torch.arange(0, d, 2), torch.arange(1, d, 2)
        positions, (c4, h, w) = _block_layout(shape, self.placement)
        groups = c4 // 4
        kept = torch.tensor(CHECKERBOARD_KEPT).view(1, 2, 1, 1).expand(groups, 2, h, w)
        factored = torch.tensor(CHECKERBOARD_FACTORED).view(1, 2, 1, 1).expand(groups, 2, h, w)
        factored_index, kept_index = _block_index(kept, factored, c4, h, w)
        return _compose(positions, factored_index), _compose(positions, kept_index)


class RandomSplit(IndexSplit):
    """A fixed random half of the dimensions is factored out (seeded, reproducible).

    The chosen dimensions keep their relative order inside each half.

    Args:
        seed: Seed of the ``torch.Generator`` drawing the permutation.
        input_shape: Event shape, or ``None`` to bind later.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"`` (only the output shapes).

    Shapes:
        x: ``(B, *input_shape)``; outputs as :class:`ChannelSplit`'s.
    """

    _needs_blocks = False

    def __init__(
        self,
        seed: int = 0,
        input_shape: Sequence[int] | None = None,
        placement: str = "post_squeeze",
    ) -> None:
        self.seed = int(seed)
        super().__init__(input_shape, placement)

    def _build_index(self, shape: Shape) -> tuple[Tensor, Tensor]:
        numel = _numel(shape)
        generator = torch.Generator().manual_seed(self.seed)
        permutation = torch.randperm(numel, generator=generator)
        num_factored = _numel(split_shapes(shape, self.placement)[0])
        return (
            torch.sort(permutation[:num_factored]).values,
            torch.sort(permutation[num_factored:]).values,
        )

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, **super().settings()}

    def extra_repr(self) -> str:
        return f"seed={self.seed}, " + super().extra_repr()


def check_contributions(contributions: Tensor, placement: str = "post_squeeze") -> Tensor:
    """Validate one contribution map (finite, ``(D,)`` or ``(C, H, W)``, splittable).

    Raises:
        ValueError: with an "expected ...; got ..." message.
    """
    if not isinstance(contributions, Tensor):
        raise ValueError(
            f"expected the contribution map as a torch.Tensor; got {type(contributions).__name__}"
        )
    if contributions.dim() not in (1, 3):
        raise ValueError(
            "expected a contribution map of shape (D,) or (C, H, W) (one event, no batch "
            f"dimension); got shape {tuple(contributions.shape)}"
        )
    if not contributions.is_floating_point():
        raise ValueError(f"expected a floating-point contribution map; got {contributions.dtype}")
    if not torch.isfinite(contributions).all():
        count = int((~torch.isfinite(contributions)).sum())
        raise ValueError(f"expected a finite contribution map; got {count} NaN or inf values")
    split_shapes(contributions.shape, placement, blocks=True)
    return contributions


def _check_granularity(granularity: str, region_size: int) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"expected granularity in {GRANULARITIES}; got {granularity!r}")
    if isinstance(region_size, bool) or not isinstance(region_size, int) or region_size < 1:
        raise ValueError(f"expected region_size as a positive int; got {region_size!r}")


def _block_grid(shape: Shape, placement: str) -> tuple[int, int]:
    """``(h, w)``: the grid of local blocks of a 3D event ``shape`` under ``placement``."""
    _, h, w = shape
    return (h // 2, w // 2) if placement == "squeeze" else (h, w)


def _tile(shape: Shape, placement: str, granularity: str, region_size: int) -> tuple[int, int]:
    """Tile ``(th, tw)`` in sites that one ranking covers; raises if it does not tile the grid."""
    h, w = _block_grid(shape, placement)
    if granularity == "site":
        return 1, 1
    if granularity == "channel":
        return h, w
    if h % region_size or w % region_size:
        raise ValueError(
            f"granularity 'region' expected a region_size dividing the {h}x{w} grid of local "
            f"blocks (input shape {shape}, placement {placement!r}); got region_size "
            f"{region_size}"
        )
    return region_size, region_size


def fit_region_size(
    input_shape: Sequence[int], region_size: int, placement: str = "post_squeeze"
) -> int:
    """``region_size`` capped at the block grid of ``input_shape``: ``min(region_size, h, w)``.

    Deeper split points have smaller grids (a ``2 x 2`` grid cannot hold a tile of side 4); a
    capped tile then covers the whole grid, i.e. channel granularity there. Used by
    :func:`make_split` for the ``"*-region"`` names. Vector shapes return ``region_size``.

    Raises:
        ValueError: for an unknown placement or a region_size that is not a positive int.
    """
    _check_placement(placement)
    _check_granularity("region", region_size)
    shape = checked_shape(input_shape)
    if len(shape) != 3:
        return region_size
    return min(region_size, *_block_grid(shape, placement))


def region_tile(
    input_shape: Sequence[int], region_size: int, placement: str = "post_squeeze"
) -> tuple[int, int]:
    """The tile ``(th, tw)`` of a ``"*-region"`` split of inputs of event shape ``input_shape``.

    The tile side is ``fit_region_size(input_shape, region_size, placement)`` (capped at the
    block grid), as :func:`make_split` builds it. Use it to check a ``region_size`` against
    every split point's input shape before building anything.

    Raises:
        ValueError: for a capped tile side that does not divide both sides of the block grid,
            a shape without sites (vector data) or the placement cannot split, or an invalid
            ``region_size``.
    """
    shape = checked_shape(input_shape)
    if len(shape) != 3:
        raise ValueError(
            f"granularity 'region' expected an image shape (C, H, W) with sites; got {shape}"
        )
    split_shapes(shape, placement, blocks=True)
    return _tile(shape, placement, "region", fit_region_size(shape, region_size, placement))


def rank_tiles(blocks: Tensor, tile: tuple[int, int]) -> Tensor:
    """:func:`rank_blocks` of the tile means of ``blocks`` ``(G, 4, h, w)``, spread per site."""
    th, tw = tile
    if (th, tw) == (1, 1):
        return rank_blocks(blocks)
    groups, _, h, w = blocks.shape
    pooled = blocks.reshape(groups, 4, h // th, th, w // tw, tw).mean(dim=(3, 5))
    return rank_blocks(pooled).repeat_interleave(th, dim=2).repeat_interleave(tw, dim=3)


@torch.no_grad()
def kept_block_positions(
    contributions: Tensor,
    placement: str = "post_squeeze",
    factor_out: str = "low",
    granularity: str = "site",
    region_size: int = DEFAULT_REGION_SIZE,
) -> tuple[Tensor, Tensor]:
    """Block positions kept and factored out by the LCMA rule at every site.

    Args:
        contributions: One map ``(C, H, W)`` in the split's input layout (see
            :class:`LCMASplit`), or ``(D,)``.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.
        factor_out: ``"low"`` (the paper) or ``"high"``.
        granularity: ``"site"`` (the paper), ``"region"`` or ``"channel"``.
        region_size: Tile side in sites for ``"region"``; must divide the block grid.

    Returns:
        ``(kept, factored)``: long tensors ``(G, 2, h, w)`` of block positions
        ``k = 2 dy + dx`` in increasing order (``G`` channel groups on an ``h x w`` grid of
        local blocks). Vector data: the kept (``D // 2``) and factored (``D - D // 2``) indices,
        sorted.

    Raises:
        ValueError: for an invalid map, an unknown ``factor_out``/``granularity``, a
            ``region_size`` that does not divide the grid, or ``"region"``/``"channel"`` on
            vector data (no sites).
    """
    if factor_out not in FACTOR_OUT:
        raise ValueError(f"expected factor_out in {FACTOR_OUT}; got {factor_out!r}")
    _check_granularity(granularity, region_size)
    values = check_contributions(contributions, placement).detach().to("cpu", torch.float64)
    shape = tuple(values.shape)
    if len(shape) == 1:
        if granularity != "site":
            raise ValueError(
                f"granularity {granularity!r} expected an image map (C, H, W) with sites; got "
                f"a vector map of shape {shape} (use granularity='site')"
            )
        ranked = rank_vector(values)
        if factor_out == "high":  # the reverse ranking; factored keeps ceil(D / 2)
            ranked = torch.flip(ranked, [0])
        kept, factored = ranked[: shape[0] // 2], ranked[shape[0] // 2 :]
        return torch.sort(kept).values, torch.sort(factored).values
    tile = _tile(shape, placement, granularity, region_size)
    if placement == "squeeze":
        values = squeeze_layout(values)
    c4, h, w = values.shape
    ranked = rank_tiles(values.view(c4 // 4, 4, h, w), tile)
    high = torch.sort(ranked[:, :2], dim=1).values
    low = torch.sort(ranked[:, 2:], dim=1).values
    return (high, low) if factor_out == "low" else (low, high)


class LCMASplit(IndexSplit):
    """The paper's likelihood-contribution split (local max- and min-pooling).

    Inside each local ``2 x 2`` block (see the module docstring for both placements), the two
    dimensions with the highest contribution are kept (they see more flow layers) and the two
    lowest are factored out; ``factor_out="high"`` does the reverse (ablation). Ties break by
    :data:`BLOCK_PRIORITY`. Vector data: keep the ``D // 2`` highest.

    ``granularity`` (beyond the paper) chooses how many sites share one choice: ``"site"``
    (default: the paper, every block on its own), ``"region"`` (one choice per tile of
    ``region_size x region_size`` sites, ranked by the tile's mean contribution of each block
    position) or ``"channel"`` (one choice per channel group for the whole image: a static
    split derived from data, so each kept channel holds the same block position everywhere).
    The map is a buffer, so it survives ``state_dict``; loading a state requires the same
    ``factor_out``, ``granularity`` and ``region_size`` (see :class:`IndexSplit`).

    Args:
        contributions: Averaged cumulative contribution map of one event in the layout of this
            split's input: ``(4C, H, W)`` for ``"post_squeeze"``, ``(C, H, W)`` for
            ``"squeeze"``, or ``(D,)``. Stored as a buffer.
        factor_out: ``"low"`` (the paper) or ``"high"``.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``; ignored for vector data.
        granularity: ``"site"`` (default), ``"region"`` or ``"channel"``. Vector data has no
            sites and accepts only ``"site"``.
        region_size: Tile side in sites of the block grid for ``"region"`` (default 4); must
            divide both sides of the grid (:func:`fit_region_size` caps it at the grid).
            ``region_size=1`` equals ``"site"``; a tile covering the grid equals ``"channel"``.

    Raises:
        ValueError: for a map that is not finite or whose shape the placement cannot split, an
            unknown granularity, a region_size that does not divide the block grid, or a
            granularity other than ``"site"`` on vector data.

    Shapes:
        x: ``(B, *contributions.shape)``; outputs as :class:`ChannelSplit`'s.
        kept_positions: ``(G, 2, h, w)`` block positions (vector data: ``(D // 2,)`` indices).

    References:
        S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture
        for Generative Flows, Sec. 3.3, Fig. 1.
    """

    contributions: Tensor

    def __init__(
        self,
        contributions: Tensor,
        factor_out: str = "low",
        placement: str = "post_squeeze",
        granularity: str = "site",
        region_size: int = DEFAULT_REGION_SIZE,
    ) -> None:
        if factor_out not in FACTOR_OUT:
            raise ValueError(f"expected factor_out in {FACTOR_OUT}; got {factor_out!r}")
        _check_granularity(granularity, region_size)
        check_contributions(contributions, placement)
        if contributions.dim() == 3:
            _tile(tuple(contributions.shape), placement, granularity, region_size)
        super().__init__(None, placement)
        self.factor_out = factor_out
        self.granularity = granularity
        self.region_size = region_size
        self.register_buffer("contributions", contributions.detach().clone())
        self.layout = map_layout(contributions)
        self.bind(tuple(contributions.shape))

    @property
    def kept_positions(self) -> Tensor:
        """Kept block positions ``(G, 2, h, w)`` (vector data: kept indices ``(D // 2,)``)."""
        return self._positions()[0]

    def _positions(self) -> tuple[Tensor, Tensor]:
        kept, factored = kept_block_positions(
            self.contributions, self.placement, self.factor_out, self.granularity, self.region_size
        )
        return kept.to(self.index.device), factored.to(self.index.device)

    def _build_index(self, shape: Shape) -> tuple[Tensor, Tensor]:
        kept, factored = self._positions()
        if len(shape) == 1:
            return factored, kept
        positions, (c4, h, w) = _block_layout(shape, self.placement)
        factored_index, kept_index = _block_index(kept, factored, c4, h, w)
        return _compose(positions, factored_index), _compose(positions, kept_index)

    def settings(self) -> dict[str, Any]:
        return {
            "factor_out": self.factor_out,
            "granularity": self.granularity,
            "region_size": self.region_size,
            **super().settings(),
        }

    def extra_repr(self) -> str:
        granularity = f"granularity={self.granularity!r}, "
        if self.granularity == "region":
            granularity += f"region_size={self.region_size}, "
        return f"factor_out={self.factor_out!r}, " + granularity + super().extra_repr()


@dataclass(frozen=True)
class SplitSpec:
    """A split name parsed once: the rule, which half is factored out, the granularity.

    Names (:meth:`parse`, :attr:`name`): ``"channel"``, ``"checkerboard"``, ``"random"``;
    ``"lcma"`` (factor out the low-contribution half, the paper) and ``"high"`` (the high half,
    the ablation) at site granularity; ``"<lcma|high>-<region|channel>"`` at a coarser one
    (:data:`GRANULAR_SPLIT_NAMES`).

    Args:
        rule: ``"channel"``, ``"checkerboard"``, ``"random"`` or ``"lcma"``.
        factor_out: ``"low"`` or ``"high"`` (only for ``"lcma"``).
        granularity: ``"site"``, ``"region"`` or ``"channel"`` (only for ``"lcma"``).
        region_size: Tile side of ``"region"``, capped at each split point's block grid by
            :meth:`build` (:func:`fit_region_size`).

    Raises:
        ValueError: for an unknown rule, factor_out or granularity, or an LCMA option on a
            static rule.
    """

    rule: str = "channel"
    factor_out: str = "low"
    granularity: str = "site"
    region_size: int = DEFAULT_REGION_SIZE

    def __post_init__(self) -> None:
        if self.rule not in SPLIT_RULES:
            raise ValueError(f"expected a split rule in {SPLIT_RULES}; got {self.rule!r}")
        if self.factor_out not in FACTOR_OUT:
            raise ValueError(f"expected factor_out in {FACTOR_OUT}; got {self.factor_out!r}")
        _check_granularity(self.granularity, self.region_size)
        if self.rule != "lcma" and (self.factor_out, self.granularity) != ("low", "site"):
            raise ValueError(
                f"expected factor_out='low' and granularity='site' for the static rule "
                f"{self.rule!r}; got {self.factor_out!r} and {self.granularity!r}"
            )

    @classmethod
    def parse(cls, name: str | SplitSpec, region_size: int = DEFAULT_REGION_SIZE) -> SplitSpec:
        """The spec of a split name (a :class:`SplitSpec` is returned as it is).

        Raises:
            ValueError: for a name not in :data:`SPLIT_NAMES` or :data:`GRANULAR_SPLIT_NAMES`.
        """
        if isinstance(name, SplitSpec):
            return name
        if name not in SPLIT_NAMES + GRANULAR_SPLIT_NAMES:
            raise ValueError(
                f"expected a split name in {SPLIT_NAMES + GRANULAR_SPLIT_NAMES}; got {name!r}"
            )
        rule, _, granularity = name.partition("-")
        if rule not in ("lcma", "high"):
            return cls(rule, region_size=region_size)
        factor_out = "low" if rule == "lcma" else "high"
        return cls("lcma", factor_out, granularity or "site", region_size)

    @property
    def name(self) -> str:
        """The split name, e.g. ``"lcma"``, ``"high-region"`` or ``"random"``."""
        if self.rule != "lcma":
            return self.rule
        prefix = "lcma" if self.factor_out == "low" else "high"
        return prefix if self.granularity == "site" else f"{prefix}-{self.granularity}"

    @property
    def needs_contributions(self) -> bool:
        """Whether :meth:`build` needs a contribution map."""
        return self.rule == "lcma"

    def build(
        self,
        input_shape: Sequence[int],
        contributions: Tensor | None = None,
        seed: int = 0,
        placement: str = "post_squeeze",
    ) -> Split:
        """The split of inputs of event shape ``input_shape``, bound to it.

        Args:
            input_shape: The split's input event shape.
            contributions: The map in that layout (required for ``"lcma"``).
            seed: Seed of :class:`RandomSplit`.
            placement: ``"post_squeeze"`` or ``"squeeze"``.

        Raises:
            ValueError: for a missing map or one whose shape differs from ``input_shape``.
        """
        shape = checked_shape(input_shape)
        if self.rule == "channel":
            return ChannelSplit(placement=placement).bind(shape)
        if self.rule == "checkerboard":
            return CheckerboardSplit(shape, placement=placement)
        if self.rule == "random":
            return RandomSplit(seed=seed, input_shape=shape, placement=placement)
        if contributions is None:
            raise ValueError(f"split {self.name!r} expected a contribution map; got None")
        if tuple(contributions.shape) != shape:
            raise ValueError(
                f"expected a contribution map of shape {shape} (the split's input shape); got "
                f"{tuple(contributions.shape)}"
            )
        region_size = self.region_size
        if self.granularity == "region":
            region_size = fit_region_size(shape, region_size, placement)
        return LCMASplit(contributions, self.factor_out, placement, self.granularity, region_size)


def make_split(
    name: str | SplitSpec,
    input_shape: Sequence[int],
    contributions: Tensor | None = None,
    seed: int = 0,
    placement: str = "post_squeeze",
    region_size: int = DEFAULT_REGION_SIZE,
) -> Split:
    """Build a split by name (:data:`SPLIT_NAMES` or :data:`GRANULAR_SPLIT_NAMES`) or spec.

    ``SplitSpec.parse(name, region_size).build(input_shape, contributions, seed, placement)``:
    ``"high"`` is ``LCMASplit(contributions, factor_out="high")``; ``"lcma-channel"``,
    ``"lcma-region"``, ``"high-channel"`` and ``"high-region"`` are :class:`LCMASplit` with
    that ``factor_out`` (``lcma``: ``"low"``) and granularity; for ``"*-region"`` the tile side
    is ``fit_region_size(input_shape, region_size, placement)``, i.e. capped at the block grid.

    Raises:
        ValueError: for an unknown name, a missing contribution map for the LCMA names,
            or a map whose shape differs from ``input_shape``.
    """
    return SplitSpec.parse(name, region_size).build(input_shape, contributions, seed, placement)
