"""Coupling transforms with per-dimension log-dets.

A coupling transform leaves its identity half unchanged (contribution 0, unless an unconditional
elementwise transform acts on it) and transforms each dimension of the other half elementwise,
so its Jacobian is block triangular and the per-dimension contribution is exactly
``log|d y_i / d x_i|``.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    L. Dinh, D. Krueger, Y. Bengio. NICE: Non-linear Independent Components Estimation. 2014.
    C. Durkan et al. Neural Spline Flows. NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from nflows.transforms import coupling as nflows_coupling
from nflows.utils import torchutils
from torch import Tensor, nn

from lcma_ext.transforms.base import DiagMixin, check_ndim, require_diag_aware
from lcma_ext.transforms.nonlinearities import PiecewiseRationalQuadraticCDF

__all__ = [
    "AdditiveCouplingTransform",
    "AffineCouplingTransform",
    "PiecewiseRationalQuadraticCouplingTransform",
]


class _CouplingDiagMixin(DiagMixin):
    """Shared ``forward_with_diag`` of nflows ``CouplingTransform`` subclasses.

    Subclasses provide ``_elementwise_forward(inputs, transform_params)`` returning the
    transformed half and its elementwise log|derivative| (not summed).
    """

    # set by the nflows CouplingTransform this mixin is combined with
    features: int
    identity_features: Tensor
    transform_features: Tensor
    transform_net: nn.Module
    unconditional_transform: nn.Module | None

    def _elementwise_forward(
        self, inputs: Tensor, transform_params: Tensor
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        check_ndim(inputs, (2, 4), type(self).__name__)
        if inputs.shape[1] != self.features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.features} features in dim 1; "
                f"got {inputs.shape[1]}"
            )
        identity_split = inputs[:, self.identity_features, ...]
        transform_split = inputs[:, self.transform_features, ...]

        transform_params = self.transform_net(identity_split, context)
        transform_split, elementwise = self._elementwise_forward(transform_split, transform_params)
        logabsdet = torchutils.sum_except_batch(elementwise, num_batch_dims=1)
        diag_out = diag.index_add(1, self.transform_features, elementwise)

        if self.unconditional_transform is not None:
            unconditional = require_diag_aware(
                self.unconditional_transform, f"{type(self).__name__}.unconditional_transform"
            )
            identity_split, logabsdet_identity, identity_diag = unconditional.forward_with_diag(
                identity_split, context
            )
            logabsdet += logabsdet_identity
            diag_out = diag_out.index_add(1, self.identity_features, identity_diag)

        outputs = torch.empty_like(inputs)
        outputs[:, self.identity_features, ...] = identity_split
        outputs[:, self.transform_features, ...] = transform_split
        return outputs, logabsdet, diag_out


class AffineCouplingTransform(_CouplingDiagMixin, nflows_coupling.AffineCouplingTransform):
    """nflows ``AffineCouplingTransform`` with ``forward_with_diag``.

    Per-dimension contribution: ``log(scale_i)`` on the transformed half, 0 on the identity half.
    Same constructor as nflows: ``(mask, transform_net_create_fn, unconditional_transform=None)``.

    Shapes:
        inputs: ``(B, D)`` or ``(B, C, H, W)``; the mask acts on dim 1.
    """

    def _elementwise_forward(
        self, inputs: Tensor, transform_params: Tensor
    ) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_and_shift(transform_params)
        log_scale = torch.log(scale)
        return inputs * scale + shift, log_scale


class AdditiveCouplingTransform(_CouplingDiagMixin, nflows_coupling.AdditiveCouplingTransform):
    """nflows ``AdditiveCouplingTransform`` (NICE) with ``forward_with_diag``.

    Volume preserving: every contribution is 0 (unless an unconditional transform is set).
    """

    def _elementwise_forward(
        self, inputs: Tensor, transform_params: Tensor
    ) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_and_shift(transform_params)
        log_scale = torch.log(scale)
        return inputs * scale + shift, log_scale


class PiecewiseRationalQuadraticCouplingTransform(
    _CouplingDiagMixin, nflows_coupling.PiecewiseRationalQuadraticCouplingTransform
):
    """nflows rational-quadratic spline coupling with ``forward_with_diag``.

    Per-dimension contribution: the log-derivative of each dimension's spline. With
    ``apply_unconditional_transform=True`` the identity half goes through
    :class:`lcma_ext.transforms.PiecewiseRationalQuadraticCDF` and contributes its own
    log-derivatives. Same constructor as nflows.
    """

    def __init__(
        self,
        mask: Tensor | Sequence[int],
        transform_net_create_fn: Callable[[int, int], nn.Module],
        num_bins: int = 10,
        tails: str | None = None,
        tail_bound: float = 1.0,
        apply_unconditional_transform: bool = False,
        img_shape: Sequence[int] | None = None,
        min_bin_width: float = nflows_coupling.splines.rational_quadratic.DEFAULT_MIN_BIN_WIDTH,
        min_bin_height: float = nflows_coupling.splines.rational_quadratic.DEFAULT_MIN_BIN_HEIGHT,
        min_derivative: float = nflows_coupling.splines.rational_quadratic.DEFAULT_MIN_DERIVATIVE,
    ) -> None:
        super().__init__(
            mask,
            transform_net_create_fn,
            num_bins=num_bins,
            tails=tails,
            tail_bound=tail_bound,
            apply_unconditional_transform=apply_unconditional_transform,
            img_shape=img_shape,
            min_bin_width=min_bin_width,
            min_bin_height=min_bin_height,
            min_derivative=min_derivative,
        )
        if apply_unconditional_transform:
            # Same class, parameters and names as nflows' own, plus forward_with_diag.
            self.unconditional_transform = PiecewiseRationalQuadraticCDF(
                shape=[self.num_identity_features] + (list(img_shape) if img_shape else []),
                num_bins=num_bins,
                tails=tails,
                tail_bound=tail_bound,
                min_bin_width=min_bin_width,
                min_bin_height=min_bin_height,
                min_derivative=min_derivative,
            )

    def _elementwise_forward(
        self, inputs: Tensor, transform_params: Tensor
    ) -> tuple[Tensor, Tensor]:
        if inputs.dim() == 4:
            b, c, h, w = inputs.shape
            transform_params = transform_params.reshape(b, c, -1, h, w).permute(0, 1, 3, 4, 2)
        else:
            b, d = inputs.shape
            transform_params = transform_params.reshape(b, d, -1)
        return self._piecewise_cdf(inputs, transform_params, inverse=False)
