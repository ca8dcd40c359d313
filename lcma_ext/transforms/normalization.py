"""Normalization transforms with per-dimension log-dets.

References:
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
    NeurIPS 2018.
"""

from __future__ import annotations

from nflows.transforms import normalization as nflows_normalization

from lcma_ext.transforms.base import DiagMixin, check_ndim

__all__ = ["ActNorm"]


class ActNorm(DiagMixin, nflows_normalization.ActNorm):
    """nflows ``ActNorm`` with ``forward_with_diag``.

    Per-dimension contribution: the channel's ``log_scale``, broadcast over space. The
    data-dependent initialization runs exactly as in nflows (first training-mode forward) and
    its flag is the parent's ``initialized`` buffer, so it survives ``state_dict``.

    Shapes:
        inputs: ``(B, C)`` or ``(B, C, H, W)``.
    """

    def _forward_with_diag(self, inputs, context, diag):
        check_ndim(inputs, (2, 4), type(self).__name__)
        if inputs.shape[1] != self.log_scale.shape[0]:
            raise ValueError(
                f"ActNorm: expected {self.log_scale.shape[0]} channels in dim 1; "
                f"got {inputs.shape[1]}"
            )
        outputs, logabsdet = self.forward(inputs, context)
        shape = (1, -1, 1, 1) if inputs.dim() == 4 else (1, -1)
        return outputs, logabsdet, diag + self.log_scale.view(shape)
