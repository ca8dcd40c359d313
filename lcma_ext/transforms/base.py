"""The per-dimension log-det protocol, and the composite transform that chains it.

Every diag-aware transform in lcma-ext has two extra methods, both in the data-to-noise
direction (nflows' ``forward``):

``forward_with_diag(inputs, context=None, diag=None) -> (outputs, logabsdet, diag_out)``
    ``outputs`` and ``logabsdet`` are exactly what the parent class's ``forward`` returns.
    ``diag`` is the running per-dimension contribution, shaped like ``inputs`` (``None`` means
    zeros). ``diag_out`` is shaped like ``outputs``: the carried ``diag``, rearranged as the
    transform rearranges the data, plus this transform's own per-dimension log|det|. Per sample,
    ``diag_out.sum() - diag.sum() == logabsdet``.

``carry(tensor, context=None) -> tensor``
    Applies only the transform's rearrangement of positions (squeeze, permutations) to a tensor
    shaped like ``inputs``, adding nothing. Works for any dtype, so an index tensor can be carried
    to track where each dimension goes (see :func:`carry_positions`).

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.1-3.2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from nflows.transforms import base as nflows_base
from torch import Tensor

__all__ = [
    "CompositeTransform",
    "DiagMixin",
    "DiagTransform",
    "carry_positions",
    "check_diag",
    "is_diag_aware",
    "require_diag_aware",
]


@runtime_checkable
class DiagTransform(Protocol):
    """Structural type of a transform that speaks the per-dimension protocol."""

    def forward_with_diag(
        self, inputs: Tensor, context: Tensor | None = None, diag: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]: ...

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor: ...


def is_diag_aware(transform: object) -> bool:
    """Whether ``transform`` implements ``forward_with_diag`` and ``carry``."""
    return isinstance(transform, DiagTransform)


def require_diag_aware(transform: object, where: str = "") -> DiagTransform:
    """Return ``transform`` if it is diag-aware, else raise a clear ``TypeError``."""
    if not is_diag_aware(transform):
        cls = type(transform)
        place = f" in {where}" if where else ""
        raise TypeError(
            f"expected a diag-aware transform (with forward_with_diag and carry){place}; "
            f"got {cls.__module__}.{cls.__qualname__}. Import the class from "
            "lcma_ext.transforms instead of nflows.transforms."
        )
    return transform  # type: ignore[return-value]


def check_diag(inputs: Tensor, diag: Tensor | None) -> Tensor:
    """Validate the running ``diag`` against ``inputs``; ``None`` becomes zeros.

    Raises:
        ValueError: if ``diag`` is not shaped like ``inputs``.
    """
    if diag is None:
        return torch.zeros_like(inputs)
    if diag.shape != inputs.shape:
        raise ValueError(
            f"expected diag shaped like inputs {tuple(inputs.shape)}; got {tuple(diag.shape)}"
        )
    return diag


def check_ndim(inputs: Tensor, allowed: Sequence[int], name: str) -> None:
    """Raise ``ValueError`` unless ``inputs.dim()`` is one of ``allowed``."""
    if inputs.dim() not in allowed:
        dims = " or ".join(f"{d}D" for d in allowed)
        raise ValueError(
            f"{name}: expected a {dims} input; got shape {tuple(inputs.shape)} ({inputs.dim()}D)"
        )


class DiagMixin:
    """Mixin that turns ``_forward_with_diag`` plus ``carry`` into the public protocol.

    Subclasses implement ``_forward_with_diag(inputs, context, diag)`` where ``diag`` is already
    validated (never ``None``). The default ``carry`` is the identity, right for every transform
    that does not move dimensions (couplings, ActNorm, elementwise maps).
    """

    def forward_with_diag(
        self, inputs: Tensor, context: Tensor | None = None, diag: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Forward (data to noise) with the per-dimension log|det|.

        Args:
            inputs: Data, shape ``(B, *event_shape)``.
            context: Optional context, passed on as in ``forward``.
            diag: Running per-dimension contribution, shaped like ``inputs``, or ``None``.

        Returns:
            ``(outputs, logabsdet, diag_out)``: ``outputs`` and ``logabsdet`` equal
            ``self.forward(inputs, context)``; ``diag_out`` is shaped like ``outputs`` and
            ``diag_out.sum() - diag.sum() == logabsdet`` per sample.
        """
        return self._forward_with_diag(inputs, context, check_diag(inputs, diag))

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """Rearrange ``tensor`` (shaped like ``inputs``) as the data; identity by default."""
        return tensor


class CompositeTransform(DiagMixin, nflows_base.CompositeTransform):
    """nflows ``CompositeTransform`` that also chains ``forward_with_diag`` and ``carry``.

    Any nflows transform may be added; the per-dimension methods raise ``TypeError`` naming the
    first component that is not diag-aware.
    """

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        outputs = inputs
        total_logabsdet = inputs.new_zeros(inputs.shape[0])
        for index, transform in enumerate(self._transforms):
            component = require_diag_aware(transform, f"CompositeTransform component {index}")
            outputs, logabsdet, diag = component.forward_with_diag(outputs, context, diag)
            total_logabsdet += logabsdet
        return outputs, total_logabsdet, diag

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        for index, transform in enumerate(self._transforms):
            component = require_diag_aware(transform, f"CompositeTransform component {index}")
            tensor = component.carry(tensor, context)
        return tensor


def carry_positions(
    transform: DiagTransform,
    input_shape: Sequence[int],
    device: torch.device | str | None = None,
) -> Tensor:
    """Where each input dimension ends up after ``transform``'s rearrangement.

    Args:
        transform: A diag-aware transform.
        input_shape: Event shape of the inputs, without the batch dimension.
        device: Device of the returned tensor.

    Returns:
        A ``long`` tensor shaped like one output event (no batch dimension): entry ``q`` holds
        the flat index, in ``input_shape``, of the input dimension now at output position ``q``.
    """
    numel = 1
    for size in input_shape:
        numel *= int(size)
    index = torch.arange(numel, device=device).view(1, *input_shape)
    return require_diag_aware(transform).carry(index)[0]
