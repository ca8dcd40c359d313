"""Orthonormal 2x2 Haar-wavelet squeeze: a drop-in for :class:`SqueezeTransform`.

Each 2x2 block ``[[a, b], [c, d]]`` of every channel becomes four coefficients::

    LL = (a + b + c + d) / 2     low-pass in y and x (the block average, times 2)
    LH = (a - b + c - d) / 2     low in y, high in x (horizontal detail)
    HL = (a + b - c - d) / 2     high in y, low in x (vertical detail)
    HH = (a - b - c + d) / 2     high in y and x (diagonal detail)

The 4x4 matrix is symmetric and orthonormal (its own inverse), so ``|det J| = 1`` and the
log-det is exactly 0. The output stacks the subbands as channel groups of ``C`` channels each, in
the order given by ``order`` (default ``("HH", "HL", "LH", "LL")``): output channel
``g * C + c`` holds subband ``order[g]`` of input channel ``c``. With this default, nflows'
channel split (:class:`lcma_ext.splits.ChannelSplit`, which factors out the FIRST half of the
channels) factors out the HH and HL subbands and keeps LH and LL, so the highest-frequency
details leave the flow first and the low-pass image goes on to the next level.

Per-dimension protocol (``carry`` and ``forward_with_diag``): the Haar transform mixes the four
pixels of a block, so no rearrangement of positions describes it exactly. The convention here is
*block ownership*: each block's four coefficients are carried from that same block's four pixels,
subband ``LL`` from the top-left ``a``, ``LH`` from the top-right ``b``, ``HL`` from the
bottom-left ``c`` and ``HH`` from the bottom-right ``d`` (so ``carry`` is a bijection and
:func:`lcma_ext.transforms.carry_positions` stays a permutation; every coefficient stays inside
its own 2x2 block, which is the granularity LCMA's local split works at). The transform's own
contribution is 0 for every dimension, so ``forward_with_diag`` returns ``carry(diag)``.

References:
    A. Haar. Zur Theorie der orthogonalen Funktionensysteme. Math. Ann. 69, 1910.
    J. Yu, K. Derpanis, M. Brubaker. Wavelet Flow: Fast Training of High Resolution
    Normalizing Flows. NeurIPS 2020.
    V. Voleti, C. Finlay, A. Oberman, C. Pal. Multi-Resolution Continuous Normalizing Flows
    (MSFlow, paper 004), Sec. 3 and Sec. 5 (report the finest image's bits/dim only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lcma_ext.transforms.reshape import SqueezeTransform

__all__ = ["HAAR_SUBBANDS", "HaarSqueezeTransform", "haar_matrix"]

#: Subband names; the pixel each is carried from is its index in the block ``(a, b, c, d)``.
HAAR_SUBBANDS = ("LL", "LH", "HL", "HH")

#: Rows: LL, LH, HL, HH; columns: block pixels a (top-left), b, c, d (bottom-right).
_SIGNS = (
    (1.0, 1.0, 1.0, 1.0),
    (1.0, -1.0, 1.0, -1.0),
    (1.0, 1.0, -1.0, -1.0),
    (1.0, -1.0, -1.0, 1.0),
)


def haar_matrix(
    order: Sequence[str] = HAAR_SUBBANDS,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The orthonormal 4x4 Haar matrix with rows in ``order`` and columns ``(a, b, c, d)``."""
    rows = [_SIGNS[HAAR_SUBBANDS.index(name)] for name in order]
    return 0.5 * torch.tensor(rows, dtype=dtype, device=device)


class HaarSqueezeTransform(SqueezeTransform):
    """Orthonormal Haar squeeze ``C x H x W -> 4C x H/2 x W/2`` (log-det exactly 0).

    A subclass of :class:`lcma_ext.transforms.SqueezeTransform` (and so of nflows'), usable
    wherever the plain squeeze is, e.g. ``glow_level_factory(squeeze="haar")``.

    Args:
        factor: Must be 2 (kept for the parent's signature).
        order: The four subband names ``"LL"``, ``"LH"``, ``"HL"``, ``"HH"`` in output
            channel-group order. The default puts the high-frequency subbands first so that a
            channel split factors them out first.

    Shapes:
        inputs: ``(B, C, H, W)`` with even ``H`` and ``W``; outputs ``(B, 4C, H/2, W/2)``.

    Raises:
        ValueError: for ``factor != 2`` or an ``order`` that is not a permutation of the four
            subband names; at call time for a non-4D input or odd ``H`` or ``W``.
    """

    def __init__(self, factor: int = 2, order: Sequence[str] = ("HH", "HL", "LH", "LL")) -> None:
        if factor != 2:
            raise ValueError(f"HaarSqueezeTransform: expected factor 2; got {factor!r}")
        order = tuple(order)
        if sorted(order) != sorted(HAAR_SUBBANDS):
            raise ValueError(f"expected order as a permutation of {HAAR_SUBBANDS}; got {order!r}")
        super().__init__(factor=2)
        self.order = order
        self._columns = tuple(HAAR_SUBBANDS.index(name) for name in order)

    def _check(self, tensor: Tensor) -> None:
        if tensor.dim() != 4:
            raise ValueError(
                f"HaarSqueezeTransform: expected a (B, C, H, W) input; got shape "
                f"{tuple(tensor.shape)}"
            )
        h, w = tensor.shape[2:]
        if h % 2 or w % 2:
            raise ValueError(f"HaarSqueezeTransform: expected even H and W; got {h}x{w}")

    @staticmethod
    def _blocks(tensor: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, 4, C, H/2, W/2)`` with the block pixels ``a, b, c, d``."""
        return torch.stack(
            [tensor[:, :, dy::2, dx::2] for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))], dim=1
        )

    @staticmethod
    def _unblocks(blocks: Tensor) -> Tensor:
        """Inverse of :meth:`_blocks`."""
        b, _, c, h, w = blocks.shape
        return (
            blocks.reshape(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, c, 2 * h, 2 * w)
        )

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(inputs)
        matrix = haar_matrix(self.order, inputs.dtype, inputs.device)
        coefficients = torch.einsum("gk,bkchw->bgchw", matrix, self._blocks(inputs))
        b, _, c, h, w = coefficients.shape
        return coefficients.reshape(b, 4 * c, h, w), inputs.new_zeros(b)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_inverse(inputs)
        b, c4, h, w = inputs.shape
        matrix = haar_matrix(self.order, inputs.dtype, inputs.device)
        pixels = torch.einsum("gk,bgchw->bkchw", matrix, inputs.reshape(b, 4, c4 // 4, h, w))
        return self._unblocks(pixels), inputs.new_zeros(b)

    def _check_inverse(self, tensor: Tensor) -> None:
        if tensor.dim() != 4 or tensor.shape[1] % 4:
            raise ValueError(
                "HaarSqueezeTransform.inverse: expected a (B, 4C, H, W) input; got shape "
                f"{tuple(tensor.shape)}"
            )

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """Block ownership: subband ``s`` of a block comes from pixel ``HAAR_SUBBANDS.index(s)``."""
        self._check(tensor)
        blocks = self._blocks(tensor)[:, list(self._columns)]
        b, _, c, h, w = blocks.shape
        return blocks.reshape(b, 4 * c, h, w)

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        outputs, logabsdet = self.forward(inputs, context)
        return outputs, logabsdet, self.carry(diag)

    def extra_repr(self) -> str:
        return f"order={self.order!r}"
