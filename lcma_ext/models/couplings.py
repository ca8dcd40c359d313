"""RealNVP's affine couplings: channel-wise and checkerboard, with bounded learnable scales.

nflows' ``AffineCouplingTransform`` uses ``scale = sigmoid(h + 2) + 1e-3``, which can only shrink.
RealNVP uses ``log scale = rescale * tanh(h)`` with a learned per-channel ``rescale``, which can
also expand (needed for the near-constant border pixels of digits). Both classes here use that
parametrization; at initialization (zero last layer) they are the identity.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017,
    Sec. 3.4-3.6 (masked convolutions, checkerboard and channel-wise masks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from nflows.transforms.base import Transform
from torch import Tensor, nn

from lcma_ext.transforms import AffineCouplingTransform
from lcma_ext.transforms.base import DiagMixin, check_ndim

__all__ = ["CheckerboardAffineCouplingTransform", "RealNVPAffineCouplingTransform"]


class RealNVPAffineCouplingTransform(AffineCouplingTransform):
    """Channel-mask affine coupling with ``log scale = rescale * tanh(h)``.

    Same constructor as nflows' ``AffineCouplingTransform``: ``(mask, transform_net_create_fn,
    unconditional_transform=None)``; adds a ``rescale`` parameter (one per transformed feature,
    initialized to 1). Per-dimension contribution: ``log scale`` on the transformed half.

    Shapes:
        inputs: ``(B, D)`` or ``(B, C, H, W)``; the mask acts on dim 1.
    """

    def __init__(
        self,
        mask: Tensor | Sequence[int],
        transform_net_create_fn: Callable[[int, int], nn.Module],
        unconditional_transform: Callable[[int], Transform] | None = None,
    ) -> None:
        super().__init__(mask, transform_net_create_fn, unconditional_transform)
        self.rescale = nn.Parameter(torch.ones(self.num_transform_features))

    def _scale_and_shift(self, transform_params: Tensor) -> tuple[Tensor, Tensor]:
        raw = transform_params[:, self.num_transform_features :, ...]
        shift = transform_params[:, : self.num_transform_features, ...]
        rescale = self.rescale.view(1, -1, *([1] * (raw.dim() - 2)))
        return torch.exp(rescale * torch.tanh(raw)), shift


class CheckerboardAffineCouplingTransform(DiagMixin, Transform):
    """Affine coupling with RealNVP's spatial checkerboard mask.

    Pixels with ``(i + j) % 2 == parity`` are the identity half; the others are scaled and
    shifted by a network that sees only the identity half (the other half zeroed):
    ``y = x * exp(log_s) + (1 - m) * t`` with ``log_s = (1 - m) * rescale * tanh(h)``.

    Args:
        num_channels: Channels ``C`` of the input.
        transform_net_create_fn: ``(in_channels, out_channels) -> net``; called with
            ``(C, 2 C)``, the net maps ``(B, C, H, W) -> (B, 2 C, H, W)``.
        parity: 0 or 1, which colour of the checkerboard is kept.

    Per-dimension contribution: ``log_s`` (0 on the identity half).

    Shapes:
        inputs: ``(B, C, H, W)`` with ``H * W >= 2``.
    """

    def __init__(
        self,
        num_channels: int,
        transform_net_create_fn: Callable[[int, int], nn.Module],
        parity: int = 0,
    ) -> None:
        super().__init__()
        if parity not in (0, 1):
            raise ValueError(f"expected parity 0 or 1; got {parity}")
        if num_channels < 1:
            raise ValueError(f"expected num_channels >= 1; got {num_channels}")
        self.num_channels = int(num_channels)
        self.register_buffer("parity", torch.tensor(int(parity)))
        self.net = transform_net_create_fn(num_channels, 2 * num_channels)
        self.rescale = nn.Parameter(torch.ones(num_channels))

    def _check(self, inputs: Tensor) -> None:
        check_ndim(inputs, (4,), type(self).__name__)
        if inputs.shape[1] != self.num_channels:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_channels} channels; "
                f"got {inputs.shape[1]}"
            )
        if inputs.shape[2] * inputs.shape[3] < 2:
            raise ValueError(
                f"{type(self).__name__}: expected at least 2 pixels; got "
                f"{inputs.shape[2]}x{inputs.shape[3]}"
            )

    def mask(self, height: int, width: int, like: Tensor) -> Tensor:
        """``(1, 1, H, W)`` mask, 1 on the identity half."""
        i = torch.arange(height, device=like.device).view(-1, 1)
        j = torch.arange(width, device=like.device).view(1, -1)
        return ((i + j) % 2 == self.parity).to(like.dtype).view(1, 1, height, width)

    def _params(
        self, identity: Tensor, mask: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        params = self.net(identity, context)
        shift, raw = params[:, : self.num_channels], params[:, self.num_channels :]
        log_scale = (1.0 - mask) * self.rescale.view(1, -1, 1, 1) * torch.tanh(raw)
        return (1.0 - mask) * shift, log_scale

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        self._check(inputs)
        mask = self.mask(inputs.shape[2], inputs.shape[3], inputs)
        shift, log_scale = self._params(inputs * mask, mask, context)
        outputs = inputs * torch.exp(log_scale) + shift
        return outputs, log_scale.flatten(1).sum(1), diag + log_scale

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        outputs, logabsdet, _ = self._forward_with_diag(inputs, context, torch.zeros_like(inputs))
        return outputs, logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(inputs)
        mask = self.mask(inputs.shape[2], inputs.shape[3], inputs)
        shift, log_scale = self._params(inputs * mask, mask, context)
        outputs = (inputs - shift) * torch.exp(-log_scale)
        return outputs, -log_scale.flatten(1).sum(1)
