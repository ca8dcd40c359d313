"""Invertible linear maps (``LULinear``, Glow's 1x1 convolution) with per-dimension log-dets.

A dense matrix ``W`` mixes its channels, so ``log|det W|`` has no canonical split over them. The
paper (Sec. 3.2.1, Eq. 5) assigns the log singular values of ``W`` to channels. Which singular
value belongs to which channel is not canonical, so the ``attribution`` option chooses:

``"svd-energy"`` (default)
    With ``W = U S V^T``, output channel ``j`` gets ``sum_i U_ji^2 log sigma_i``: each log
    singular value is shared among output channels by the energy of its left singular vector.
    Well defined even for repeated singular values (for example at identity initialization).
``"svd-index"``
    The paper read literally: channel ``i`` gets ``log sigma_i``, singular values sorted in
    descending order.
``"lu"``
    Channel ``i`` gets ``log|u_ii|`` of the LU parametrization (row ``i`` of ``L U``).

Every option sums to ``log|det W|`` per pixel, so over an ``H x W`` image to ``H W log|det W|``.
The SVD options are computed in float64 without gradient (SVD gradients are undefined for
repeated singular values); ``"lu"`` keeps its gradient.

References:
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
    NeurIPS 2018.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2.1.
"""

from __future__ import annotations

import torch
from nflows.transforms import conv as nflows_conv
from nflows.transforms import lu as nflows_lu
from torch import Tensor

from lcma_ext.transforms.base import DiagMixin, check_ndim

__all__ = ["ATTRIBUTIONS", "LULinear", "OneByOneConvolution", "svd_attribution"]

ATTRIBUTIONS = ("svd-energy", "svd-index", "lu")


def check_attribution(attribution: str) -> str:
    """Return ``attribution`` if it is a known option, else raise ``ValueError``."""
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"expected attribution in {ATTRIBUTIONS}; got {attribution!r}")
    return attribution


@torch.no_grad()
def svd_attribution(weight: Tensor, attribution: str) -> Tensor:
    """Per-output-channel share of ``log|det weight|`` from its singular values.

    Args:
        weight: Square matrix ``(C, C)`` acting as ``y = weight @ x``.
        attribution: ``"svd-energy"`` or ``"svd-index"``.

    Returns:
        ``(C,)`` tensor in ``weight``'s dtype that sums to ``log|det weight|``.
    """
    u, s, _ = torch.linalg.svd(weight.detach().double())
    log_s = torch.log(s)
    if attribution == "svd-index":
        shares = log_s
    elif attribution == "svd-energy":
        shares = (u * u) @ log_s
    else:
        raise ValueError(f"expected 'svd-energy' or 'svd-index'; got {attribution!r}")
    return shares.to(weight.dtype)


class LULinear(DiagMixin, nflows_lu.LULinear):
    """nflows ``LULinear`` with ``forward_with_diag``.

    Args:
        features, using_cache, identity_init, eps: As in nflows.
        attribution: How ``log|det W|`` is shared among features (see the module docstring):
            ``"svd-energy"`` (default), ``"svd-index"`` or ``"lu"``.

    Shapes:
        inputs: ``(B, features)``.
    """

    def __init__(
        self,
        features: int,
        using_cache: bool = False,
        identity_init: bool = True,
        eps: float = 1e-3,
        attribution: str = "svd-energy",
    ) -> None:
        super().__init__(features, using_cache=using_cache, identity_init=identity_init, eps=eps)
        self.attribution = check_attribution(attribution)

    def logabsdet_attribution(self) -> Tensor:
        """``(features,)`` shares of ``log|det W|`` that sum to ``self.logabsdet()``."""
        if self.attribution == "lu":
            return torch.log(self.upper_diag)
        return svd_attribution(self.weight(), self.attribution)

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        check_ndim(inputs, (2,), type(self).__name__)
        if inputs.shape[1] != self.features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.features} features; got {inputs.shape[1]}"
            )
        outputs, logabsdet = self.forward(inputs, context)
        return outputs, logabsdet, diag + self.logabsdet_attribution().view(1, -1)

    def extra_repr(self) -> str:
        return f"features={self.features}, attribution={self.attribution!r}"


class OneByOneConvolution(DiagMixin, nflows_conv.OneByOneConvolution):
    """nflows ``OneByOneConvolution`` (fixed channel permutation, then LU 1x1 conv).

    Args:
        num_channels, using_cache, identity_init: As in nflows.
        attribution: How ``log|det W|`` is shared among output channels: ``"svd-energy"``
            (default), ``"svd-index"`` or ``"lu"``. The share is broadcast over space.

    ``carry`` applies the channel permutation. The mixing itself keeps position ``j`` at ``j``.

    Shapes:
        inputs: ``(B, C, H, W)``.
    """

    def __init__(
        self,
        num_channels: int,
        using_cache: bool = False,
        identity_init: bool = True,
        attribution: str = "svd-energy",
    ) -> None:
        super().__init__(num_channels, using_cache=using_cache, identity_init=identity_init)
        self.attribution = check_attribution(attribution)

    def logabsdet_attribution(self) -> Tensor:
        """``(C,)`` per-pixel shares of ``log|det W|``, summing to ``self.logabsdet()``.

        The permutation is orthogonal, so ``W P`` has the left singular vectors of ``W``.
        """
        if self.attribution == "lu":
            return torch.log(self.upper_diag)
        return svd_attribution(self.weight(), self.attribution)

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        check_ndim(tensor, (4,), type(self).__name__)
        return torch.index_select(tensor, 1, self.permutation._permutation)

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        check_ndim(inputs, (4,), type(self).__name__)
        if inputs.shape[1] != self.features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.features} channels; got {inputs.shape[1]}"
            )
        outputs, logabsdet = self.forward(inputs, context)
        shares = self.logabsdet_attribution().view(1, -1, 1, 1)
        return outputs, logabsdet, self.carry(diag) + shares

    def extra_repr(self) -> str:
        return f"num_channels={self.features}, attribution={self.attribution!r}"
