"""Bridges between zuko's lazy transforms and lcma-ext's levels, in both directions.

* :class:`ZukoLevel` holds zuko lazy transforms (the very modules: training either trains both)
  and is a diag-aware nflows transform, so the core's estimator, tracker and builder
  (:mod:`lcma_ext.contributions`, :mod:`lcma_ext.pipeline`) and
  :class:`lcma_ext.ContributionMultiscaleFlow` run on zuko levels unchanged. Its ``forward`` is
  zuko's ``lazy(c).call_and_ladj(x)``; its ``forward_with_diag`` uses
  :func:`lcma_ext.zuko.call_and_ladj_with_diag`.
* :class:`NflowsTransform` is the other way round: a ``zuko.lazy.LazyTransform`` around a
  diag-aware lcma-ext transform (an image level of :func:`lcma_ext.models.make_level_factory`,
  a level of :func:`lcma_ext.zuko.image_level_factory`, or a whole multi-scale flow). Called
  with a context it returns an :class:`NflowsBijection`, a ``torch.distributions.Transform``
  that zuko's ``NormalizingFlow`` samples and scores like any other.

zuko transforms accept any batch shape and broadcast the context against it; lcma-ext
transforms take ``(B, *event)``. :class:`NflowsBijection` broadcasts the inputs and the context
to a common batch shape, flattens it, and restores it on the outputs.

References:
    F. Rozet et al. Zuko: Normalizing flows in PyTorch. 2022.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2-3.4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from nflows.transforms import base as nflows_base
from torch import Size, Tensor, nn
from torch.distributions import constraints
from torch.distributions import transforms as td
from zuko.flows import ElementWiseTransform, GeneralCouplingTransform, MaskedAutoregressiveTransform
from zuko.lazy import Flow, LazyComposedTransform, LazyInverse, LazyTransform

from lcma_ext.multiscale import level_output_shape
from lcma_ext.splits import checked_shape
from lcma_ext.transforms.base import DiagMixin, require_diag_aware
from lcma_ext.transforms.lu import check_attribution
from lcma_ext.zuko.adapters import DEFAULT_ATTRIBUTION, call_and_ladj_with_diag, carry

__all__ = [
    "NflowsBijection",
    "NflowsTransform",
    "ZukoLevel",
    "as_lazy_transform",
    "flatten_batch",
]

Shape = tuple[int, ...]

#: zuko lazy transforms that never move a dimension (their transforms act in place).
_IN_PLACE = (MaskedAutoregressiveTransform, GeneralCouplingTransform, ElementWiseTransform)


def flatten_batch(
    x: Tensor, event_shape: Shape, context: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Size]:
    """Broadcast ``x`` and ``context`` to one batch shape and flatten it, as zuko broadcasts.

    Args:
        x: ``(*batch, *event_shape)``.
        event_shape: The event shape of ``x``.
        context: ``(*batch_c, C)`` or ``None``.

    Returns:
        ``(x_flat, context_flat, batch)``: ``(N, *event_shape)``, ``(N, C)`` (or ``None``) and
        the common batch shape (``N`` its number of elements).

    Raises:
        ValueError: for inputs without ``event_shape`` at the end, a context without a feature
            dimension, or batch shapes that do not broadcast.
    """
    n = len(event_shape)
    if x.dim() < n or tuple(x.shape[x.dim() - n :]) != tuple(event_shape):
        raise ValueError(
            f"expected inputs of event shape {tuple(event_shape)} (after any batch dimensions); "
            f"got shape {tuple(x.shape)}"
        )
    batch = x.shape[: x.dim() - n]
    if context is None:
        return x.reshape(-1, *event_shape), None, batch
    if context.dim() < 1:
        raise ValueError(f"expected a context (*batch, C); got shape {tuple(context.shape)}")
    try:
        common = torch.broadcast_shapes(batch, context.shape[:-1])
    except RuntimeError as error:
        raise ValueError(
            f"expected inputs and context with broadcastable batch shapes; got {tuple(batch)} and "
            f"{tuple(context.shape[:-1])}"
        ) from error
    x = x.expand(*common, *event_shape).reshape(-1, *event_shape)
    context = context.expand(*common, context.shape[-1]).reshape(-1, context.shape[-1])
    return x, context, common


def _lazy_carry(lazy: LazyTransform, tensor: Tensor, context: Tensor | None) -> Tensor:
    """``carry`` of the transform ``lazy`` would build, without evaluating any hyper-network."""
    if isinstance(lazy, LazyComposedTransform):
        for part in lazy.transforms:
            tensor = _lazy_carry(part, tensor, context)
        return tensor
    if isinstance(lazy, _IN_PLACE) or (
        isinstance(lazy, LazyInverse) and isinstance(lazy.transform, _IN_PLACE)
    ):
        return tensor
    return carry(lazy(context), tensor)


def _lazy_output_shape(lazy: LazyTransform, input_shape: Shape) -> Shape:
    index = torch.arange(math.prod(input_shape)).view(1, *input_shape)
    return tuple(_lazy_carry(lazy, index, None).shape[1:])


def as_lazy_transform(
    transform: LazyTransform | Sequence[Any] | nflows_base.Transform, input_shape: Sequence[int]
) -> LazyTransform:
    """One zuko lazy transform from what a level factory returns.

    Args:
        transform: A ``zuko.lazy.LazyTransform`` (e.g. ``zuko.flows.NSF(...).transform`` or
            ``MaskedAutoregressiveTransform(...)``), a diag-aware lcma-ext transform (an image
            level; wrapped in :class:`NflowsTransform`), a :class:`ZukoLevel` (its lazy
            transform), or a sequence of them (a ``LazyComposedTransform``, in data-to-noise
            order).
        input_shape: Event shape of its inputs.

    Raises:
        TypeError: for a zuko ``Flow`` (pass its ``.transform``) or anything else.
        ValueError: for an empty sequence.
    """
    shape = checked_shape(input_shape)
    if isinstance(transform, ZukoLevel):
        if transform.input_shape != shape:
            raise ValueError(
                f"expected a ZukoLevel of input shape {shape}; got one of {transform.input_shape}"
            )
        return transform.transform
    if isinstance(transform, LazyTransform):
        return transform
    if isinstance(transform, Flow):
        raise TypeError(
            f"expected a zuko LazyTransform; got the zuko flow {type(transform).__qualname__}. "
            "Pass its transform (flow.transform): the multi-scale flow brings its own base"
        )
    if isinstance(transform, nflows_base.Transform):
        return NflowsTransform(transform, shape)
    if isinstance(transform, nn.ModuleList) or (
        isinstance(transform, Sequence) and not isinstance(transform, str)
    ):
        if not transform:
            raise ValueError("expected at least one transform in a level; got an empty sequence")
        parts = []
        for part in transform:
            lazy = as_lazy_transform(part, shape)
            shape = _lazy_output_shape(lazy, shape)
            parts.append(lazy)
        return parts[0] if len(parts) == 1 else LazyComposedTransform(*parts)
    cls = type(transform)
    raise TypeError(
        "expected a zuko LazyTransform, a diag-aware lcma-ext transform or a sequence of them; "
        f"got {cls.__module__}.{cls.__qualname__}"
    )


def _per_example(ladj: Tensor | float, inputs: Tensor) -> Tensor:
    """zuko's ``ladj`` (batch first, maybe per dimension) summed to one value per example."""
    ladj = torch.as_tensor(ladj, dtype=inputs.dtype, device=inputs.device)
    if ladj.dim() == 0:
        return ladj.expand(inputs.shape[0])
    return ladj.reshape(ladj.shape[0], -1).sum(1)


class ZukoLevel(DiagMixin, nflows_base.Transform):
    """zuko lazy transforms as one diag-aware nflows level (data to noise, as zuko).

    The lazy transform is the very module given, so training the zuko flow it came from trains
    this level too. ``forward(inputs, context)`` is zuko's ``transform(context).call_and_ladj``
    with the log-det summed per example; ``inverse`` uses the transform's ``inv``.

    Args:
        transform: What a level factory returns (see :func:`as_lazy_transform`): a zuko lazy
            transform, a sequence of them, or a diag-aware lcma-ext transform.
        input_shape: Event shape of the level's inputs.
        attribution: How rotations and LU linear maps share ``log|det W|`` (see
            :func:`lcma_ext.zuko.call_and_ladj_with_diag`).
        context: A context used when a call passes none (Algorithm 1's estimator calls levels
            without one), ``(B, C)`` matching the inputs' batch; ``None``: none.

    Shapes:
        inputs: ``(B, *input_shape)``; outputs: ``(B, *output_shape)``; logabsdet: ``(B,)``.

    Raises:
        TypeError: for a transform that is not one of the above; when called, for a transform
            without a per-dimension adapter (the message names its class).
        ValueError: for inputs of another event shape.

    References:
        F. Rozet et al. Zuko: Normalizing flows in PyTorch. 2022.
    """

    def __init__(
        self,
        transform: LazyTransform | Sequence[Any] | nflows_base.Transform,
        input_shape: Sequence[int],
        attribution: str = DEFAULT_ATTRIBUTION,
        *,
        context: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.input_shape = checked_shape(input_shape)
        self.transform = as_lazy_transform(transform, self.input_shape)
        self.attribution = check_attribution(attribution)
        self.context = context

    @property
    def output_shape(self) -> Shape:
        """Event shape of the level's outputs."""
        return _lazy_output_shape(self.transform, self.input_shape)

    def bind(self, context: Tensor | None) -> ZukoLevel:
        """A level over the same lazy transform that uses ``context`` when a call passes none."""
        return ZukoLevel(self.transform, self.input_shape, self.attribution, context=context)

    def _check(self, inputs: Tensor) -> None:
        if inputs.dim() < 1 or tuple(inputs.shape[1:]) != self.input_shape:
            raise ValueError(
                f"ZukoLevel: expected inputs (B, {', '.join(map(str, self.input_shape))}); got "
                f"shape {tuple(inputs.shape)}"
            )

    def _transform(self, context: Tensor | None) -> td.Transform:
        return self.transform(self.context if context is None else context)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to noise: ``(outputs, logabsdet)``, zuko's ``call_and_ladj``."""
        self._check(inputs)
        outputs, ladj = self._transform(context).call_and_ladj(inputs)  # type: ignore[attr-defined]  # zuko adds it to torch's Transform
        return outputs, _per_example(ladj, inputs)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise to data: ``(outputs, logabsdet)`` of the inverse transform."""
        outputs, ladj = self._transform(context).inv.call_and_ladj(inputs)  # type: ignore[attr-defined]  # zuko adds it to torch's Transform
        return outputs, _per_example(ladj, inputs)

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        self._check(inputs)
        outputs, ladj, diag = call_and_ladj_with_diag(
            self._transform(context), inputs, diag, self.attribution
        )
        return outputs, _per_example(ladj, inputs), diag

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """The level's rearrangement of ``tensor`` (permutations, squeezes), any dtype."""
        return _lazy_carry(self.transform, tensor, self.context if context is None else context)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, attribution={self.attribution!r}"


class NflowsBijection(td.Transform):
    """A diag-aware lcma-ext transform with a bound context, as a torch transform for zuko.

    The forward call is the wrapped transform's ``forward`` (data to noise); :attr:`inv` its
    ``inverse``. Any batch shape is accepted and broadcast against the context's. Also speaks
    the zuko side of the per-dimension protocol: ``call_and_ladj_with_diag`` (the wrapped
    transform's ``forward_with_diag``) and ``carry``.

    Args:
        transform: A diag-aware lcma-ext (nflows) transform.
        input_shape: Its inputs' event shape.
        output_shape: Its outputs' event shape.
        context: The context passed to every call, ``(*batch, C)``, or ``None``.
        inverse: Whether this is the inverse direction (noise to data).

    Shapes:
        x: ``(*batch, *input_shape)`` -> ``(*batch, *output_shape)``; ladj: ``batch``.
    """

    bijective = True

    def __init__(
        self,
        transform: nflows_base.Transform,
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        context: Tensor | None = None,
        inverse: bool = False,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.input_shape = checked_shape(input_shape)
        self.output_shape = checked_shape(output_shape, "output_shape")
        self.context = context
        self.inverse_direction = inverse
        source, target = self._shapes()
        self.domain = constraints.independent(constraints.real, len(source))
        self.codomain = constraints.independent(constraints.real, len(target))

    def __repr__(self) -> str:
        name = type(self.transform).__name__
        suffix = ".inv" if self.inverse_direction else ""
        return f"{type(self).__name__}({name}{suffix}, {self.input_shape} -> {self.output_shape})"

    def _shapes(self) -> tuple[Shape, Shape]:
        if self.inverse_direction:
            return self.output_shape, self.input_shape
        return self.input_shape, self.output_shape

    @property
    def inv(self) -> NflowsBijection:
        return NflowsBijection(
            self.transform,
            self.input_shape,
            self.output_shape,
            self.context,
            not self.inverse_direction,
        )

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inv(y)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        source, target = self._shapes()
        flat, context, batch = flatten_batch(x, source, self.context)
        if self.inverse_direction:
            y, ladj = self.transform.inverse(flat, context)
        else:
            y, ladj = self.transform(flat, context)
        return y.reshape(*batch, *target), ladj.reshape(batch)

    def _require_forward(self) -> None:
        if self.inverse_direction:
            raise TypeError(
                f"expected the data-to-noise direction of {type(self.transform).__name__} for a "
                "per-dimension log-det; got its inverse (NflowsBijection.inv), which has no "
                "per-dimension adapter"
            )

    def call_and_ladj_with_diag(
        self, x: Tensor, diag: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``call_and_ladj(x)`` plus the per-dimension map (the transform's ``forward_with_diag``).

        Raises:
            TypeError: for the inverse direction.
        """
        self._require_forward()
        flat, context, batch = flatten_batch(x, self.input_shape, self.context)
        if diag is not None:
            if diag.shape != x.shape:
                raise ValueError(
                    f"expected diag shaped like inputs {tuple(x.shape)}; got {tuple(diag.shape)}"
                )
            diag = diag.expand(*batch, *self.input_shape).reshape(flat.shape)
        y, ladj, diag = require_diag_aware(self.transform).forward_with_diag(flat, context, diag)
        return (
            y.reshape(*batch, *self.output_shape),
            ladj.reshape(batch),
            diag.reshape(*batch, *self.output_shape),
        )

    def carry(self, tensor: Tensor) -> Tensor:
        """The transform's rearrangement of ``tensor`` (any dtype; no context needed)."""
        self._require_forward()
        flat, _, batch = flatten_batch(tensor, self.input_shape)
        return require_diag_aware(self.transform).carry(flat).reshape(*batch, *self.output_shape)

    def forward_shape(self, shape: Sequence[int]) -> Size:
        source, target = self._shapes()
        return Size(self._batch_of(shape, source) + target)

    def inverse_shape(self, shape: Sequence[int]) -> Size:
        source, target = self._shapes()
        return Size(self._batch_of(shape, target) + source)

    @staticmethod
    def _batch_of(shape: Sequence[int], event: Shape) -> Shape:
        shape = tuple(shape)
        if shape[len(shape) - len(event) :] != event:
            raise ValueError(f"expected a shape ending with {event}; got {shape}")
        return shape[: len(shape) - len(event)]


class NflowsTransform(LazyTransform):
    """A diag-aware lcma-ext transform as a ``zuko.lazy.LazyTransform``.

    ``NflowsTransform(level, input_shape)(c)`` is an :class:`NflowsBijection` that passes ``c``
    to every call of ``level`` (e.g. the coupling nets of
    :func:`lcma_ext.zuko.image_level_factory`), so an image level of lcma-ext goes into a
    ``zuko.lazy.Flow`` next to zuko's own lazy transforms.

    Args:
        transform: A diag-aware lcma-ext transform (nflows ``Transform``), e.g. a level from
            :func:`lcma_ext.models.make_level_factory`.
        input_shape: Event shape of its inputs, e.g. ``(C, H, W)``.

    Raises:
        TypeError: for a transform that is not diag-aware.
        ValueError: for an input shape the transform cannot take.
    """

    def __init__(self, transform: nflows_base.Transform, input_shape: Sequence[int]) -> None:
        super().__init__()
        if not isinstance(transform, nflows_base.Transform):
            cls = type(transform)
            raise TypeError(
                f"expected a diag-aware lcma-ext (nflows) transform; got "
                f"{cls.__module__}.{cls.__qualname__}"
            )
        require_diag_aware(transform, type(self).__name__)
        self.transform = transform
        self.input_shape = checked_shape(input_shape)
        # the structure of the wrapped modules is fixed, so their output shape is too
        self.output_shape = level_output_shape(transform, self.input_shape)

    def forward(self, c: Tensor | None = None) -> NflowsBijection:
        """The transform with context ``c``, as a torch transform (data to noise)."""
        return NflowsBijection(self.transform, self.input_shape, self.output_shape, c)

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, output_shape={self.output_shape}"
