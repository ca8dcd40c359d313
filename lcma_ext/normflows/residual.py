"""normflows wrappers of the i-ResNet and Residual Flow blocks.

normflows runs flows from noise to data in ``forward``; the blocks of
:mod:`lcma_ext.transforms.residual` map data to noise in their ``forward``. The wrappers here are
``normflows.flows.Flow`` subclasses whose ``inverse`` (data to noise) is the block's ``forward``
and whose ``forward`` (noise to data) is the block's fixed-point ``inverse``, with normflows'
sign conventions for the log-det. ``forward_with_diag`` runs the data-to-noise direction with
the per-dimension contributions, like the other adapters of :mod:`lcma_ext.normflows`.

They are not subclasses of normflows' ``Residual``, on purpose: that class wraps a copy of the
reference block with its quirks (squared-error convergence test, the memory-efficient backward
scaled by the first sample's gradient, numpy random numbers). Use these in a
``normflows.NormalizingFlow`` in its place::

    flows = [ResidualFlowBlock((4, 4, 4), hidden_channels=32) for _ in range(4)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian((4, 4, 4)), flows)

References:
    V. Stimper et al. normflows: A PyTorch Package for Normalizing Flows. JOSS 2023.
    R. T. Q. Chen et al. Residual Flows for Invertible Generative Modeling. NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import normflows as nf
from torch import Tensor

from lcma_ext.transforms import residual

__all__ = ["InvertibleResNetBlock", "ResidualFlowBlock"]


class _ResidualWrapper(nf.flows.Flow):
    """Shared normflows plumbing; ``self.block`` is the lcma-ext transform."""

    _block_class: type = residual.ResidualFlowBlock

    def __init__(
        self, shape: int | Sequence[int], hidden_channels: int = 32, **kwargs: Any
    ) -> None:
        super().__init__()
        self.block = self._block_class(shape, hidden_channels, **kwargs)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Noise to data (fixed-point inverse); ``log|det|`` of this direction, shape ``(B,)``."""
        return self.block.inverse(z)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Data to noise (``x + g(x)``); ``log|det|`` of this direction, shape ``(B,)``."""
        return self.block(z)

    def forward_with_diag(
        self, inputs: Tensor, context: Tensor | None = None, diag: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Data to noise (normflows ``inverse``) with the per-dimension log-det."""
        if context is not None:
            raise ValueError("expected context=None for a normflows flow; got a tensor")
        return self.block.forward_with_diag(inputs, None, diag)

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """Identity: the block moves no dimensions."""
        return tensor


class InvertibleResNetBlock(_ResidualWrapper):
    """normflows flow around :class:`lcma_ext.transforms.InvertibleResNetBlock` (same args).

    Shapes:
        z: ``(B, *shape)``.
    """

    _block_class = residual.InvertibleResNetBlock


class ResidualFlowBlock(_ResidualWrapper):
    """normflows flow around :class:`lcma_ext.transforms.ResidualFlowBlock` (same args).

    Shapes:
        z: ``(B, *shape)``.
    """

    _block_class = residual.ResidualFlowBlock
