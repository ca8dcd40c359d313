"""Elementwise nonlinearities with per-dimension log-dets.

References:
    C. Durkan et al. Neural Spline Flows. NeurIPS 2019.
"""

from __future__ import annotations

from nflows.transforms import nonlinearities as nflows_nonlinearities
from nflows.transforms import splines
from nflows.utils import torchutils
from torch import Tensor

from lcma_ext.transforms.base import DiagMixin

__all__ = ["PiecewiseRationalQuadraticCDF"]


class PiecewiseRationalQuadraticCDF(DiagMixin, nflows_nonlinearities.PiecewiseRationalQuadraticCDF):
    """nflows ``PiecewiseRationalQuadraticCDF`` with ``forward_with_diag``.

    Elementwise, so the Jacobian is diagonal and the contribution of dimension ``i`` is the
    log-derivative of its spline. Same constructor as nflows.
    """

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch_size = inputs.shape[0]
        share = nflows_nonlinearities._share_across_batch
        if self.tails is None:
            spline_fn = splines.rational_quadratic_spline
            spline_kwargs = {}
        else:
            spline_fn = splines.unconstrained_rational_quadratic_spline
            spline_kwargs = {"tails": self.tails, "tail_bound": self.tail_bound}
        outputs, elementwise = spline_fn(
            inputs=inputs,
            unnormalized_widths=share(self.unnormalized_widths, batch_size),
            unnormalized_heights=share(self.unnormalized_heights, batch_size),
            unnormalized_derivatives=share(self.unnormalized_derivatives, batch_size),
            inverse=False,
            min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative,
            **spline_kwargs,
        )
        return outputs, torchutils.sum_except_batch(elementwise), diag + elementwise
