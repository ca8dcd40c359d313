"""Reshaping transforms with per-dimension log-dets (pure rearrangements, contribution 0)."""

from __future__ import annotations

from nflows.transforms import reshape as nflows_reshape
from torch import Tensor

from lcma_ext.transforms.base import DiagMixin, check_ndim

__all__ = ["SqueezeTransform"]


class SqueezeTransform(DiagMixin, nflows_reshape.SqueezeTransform):
    """nflows ``SqueezeTransform``: ``C x H x W -> C f^2 x H/f x W/f``, with ``carry``.

    Output channel ``c f^2 + dy f + dx`` at site ``(i, j)`` holds input ``(c, i f + dy, j f + dx)``
    (nflows' ordering). ``carry`` squeezes any tensor the same way; the contribution is 0.

    Shapes:
        inputs: ``(B, C, H, W)`` with ``H`` and ``W`` divisible by ``factor``.
    """

    def _check(self, tensor: Tensor) -> None:
        check_ndim(tensor, (4,), "SqueezeTransform")
        h, w = tensor.shape[2:]
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"SqueezeTransform: expected H and W divisible by {self.factor}; got {h}x{w}"
            )

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(tensor)
        return nflows_reshape.SqueezeTransform.forward(self, tensor)[0]

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        self._check(inputs)
        outputs, logabsdet = self.forward(inputs, context)
        return outputs, logabsdet, self.carry(diag)
