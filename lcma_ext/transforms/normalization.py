"""Normalization transforms with per-dimension log-dets.

References:
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
    NeurIPS 2018.
"""

from __future__ import annotations

import torch
from nflows.transforms import normalization as nflows_normalization
from torch import Tensor

from lcma_ext.transforms.base import DiagMixin, check_ndim

__all__ = ["ActNorm"]


class ActNorm(DiagMixin, nflows_normalization.ActNorm):
    """nflows ``ActNorm`` with ``forward_with_diag``.

    Per-dimension contribution: the channel's ``log_scale``, broadcast over space. The
    data-dependent initialization runs exactly as in nflows (first training-mode forward) and
    its flag is the parent's ``initialized`` buffer, so it survives ``state_dict``.

    Under ``torch.compile`` the flag is not read (reading a tensor flag in Python is a graph
    break, 27 of them in a tiny Glow): a compiled forward assumes the layer is initialised, which
    :func:`lcma_ext.training.train_flow` ensures by initialising on the first batch before it
    compiles. nflows' own ``ActNorm`` still breaks the graph at that check.

    An empty batch does not initialise the layer (nflows' would set every scale to NaN from
    the statistics of no data); the first batch with data does.

    Shapes:
        inputs: ``(B, C)`` or ``(B, C, H, W)``.
    """

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not torch.compiler.is_compiling() and inputs.shape[0] > 0:
            return super().forward(inputs, context)
        check_ndim(inputs, (2, 4), type(self).__name__)
        scale, shift = self._broadcastable_scale_shift(inputs)
        outputs = scale * inputs + shift
        spatial = inputs.shape[2] * inputs.shape[3] if inputs.dim() == 4 else 1
        return outputs, spatial * torch.sum(self.log_scale) * outputs.new_ones(inputs.shape[0])

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        check_ndim(inputs, (2, 4), type(self).__name__)
        if inputs.shape[1] != self.log_scale.shape[0]:
            raise ValueError(
                f"ActNorm: expected {self.log_scale.shape[0]} channels in dim 1; "
                f"got {inputs.shape[1]}"
            )
        outputs, logabsdet = self.forward(inputs, context)
        shape = (1, -1, 1, 1) if inputs.dim() == 4 else (1, -1)
        return outputs, logabsdet, diag + self.log_scale.view(shape)
