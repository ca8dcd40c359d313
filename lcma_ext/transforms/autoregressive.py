"""Autoregressive transforms with per-dimension log-dets.

A masked autoregressive transform has a triangular Jacobian, so its diagonal is exact:
``log|d y_i / d x_i| = log(scale_i)``.

References:
    G. Papamakarios, T. Pavlakou, I. Murray. Masked Autoregressive Flow for Density
    Estimation. NeurIPS 2017.
"""

from __future__ import annotations

import torch
from nflows.transforms import autoregressive as nflows_autoregressive
from nflows.utils import torchutils
from torch import Tensor
from torch.nn import functional as F

from lcma_ext.transforms.base import DiagMixin, check_ndim

__all__ = ["MaskedAffineAutoregressiveTransform"]


class MaskedAffineAutoregressiveTransform(
    DiagMixin, nflows_autoregressive.MaskedAffineAutoregressiveTransform
):
    """nflows ``MaskedAffineAutoregressiveTransform`` with ``forward_with_diag``.

    Same constructor as nflows. Per-dimension contribution: ``log(softplus(u_i) + 1e-3)``.

    Shapes:
        inputs: ``(B, features)``.
    """

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        check_ndim(inputs, (2,), type(self).__name__)
        if inputs.shape[1] != self.features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.features} features; got {inputs.shape[1]}"
            )
        params = self.autoregressive_net(inputs, context)
        unconstrained_scale, shift = self._unconstrained_scale_and_shift(params)
        scale = F.softplus(unconstrained_scale) + self._epsilon
        log_scale = torch.log(scale)
        outputs = scale * inputs + shift
        logabsdet = torchutils.sum_except_batch(log_scale, num_batch_dims=1)
        return outputs, logabsdet, diag + log_scale
