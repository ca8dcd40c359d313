"""Glow's learned prior for the factored-out half, as a transform: usable with any split.

At a split point of a multi-scale flow, Glow (``split2d``) scores the factored-out half ``f``
with a Gaussian whose mean and log-scale come from a zero-initialised convolution of the kept
half ``k``: ``p(f | k) = N(f; mu(k), sigma(k)^2)``. That density is the standard normal after
the affine map ``eps = (f - mu(k)) / sigma(k)`` of ``f`` conditioned on ``k``, with log-det
``-sum log sigma(k)``. :class:`ConditionalGaussianPrior` is that map, so it lives inside
:class:`lcma_ext.ContributionMultiscaleFlow` (``add_transform(..., prior="conditional")``) and
``nflows.flows.Flow(transform, StandardNormal(...))`` stays as it is. It conditions on the kept
half only (conditioning on ``f`` itself would give an unnormalised density).

The net is zero-initialised (weights, bias and Glow's per-channel log-scale factor), so a new
flow is exactly the standard-normal model.

Per-dimension protocol: the map is diagonal in ``f`` (``d eps_i / d f_i = 1 / sigma_i(k)``; its
dependence on ``k`` only fills the off-diagonal block of a block-triangular Jacobian), so the
prior contributes exactly ``-log sigma_i(k)`` to factored dimension ``i`` and nothing to the kept
ones. ``ContributionMultiscaleFlow.forward_with_diag`` (and a normflows ``MultiscaleFlow``'s
``inverse_and_log_det_with_diag``) adds it to each factored dimension's cumulative entry, so the
entries still sum to the log-det. The meaning of :func:`lcma_ext.estimate_contributions` is
unchanged: it measures the NMS flow, which factors nothing out and so has no prior; the LCMA
split is chosen from those contributions of the flow layers alone, and the prior scores a half
only after the split has chosen it.

Sampling: the inverse ``f = mu(k) + sigma(k) * eps`` runs after the deeper levels have produced
``k``, so scaling the base noise by a temperature ``T`` draws ``f = mu(k) + T sigma(k) eps``:
Glow's tempered conditional (see :func:`lcma_ext.sampling.sample`).

References:
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018
    (openai/glow, ``split2d`` and ``split2d_prior`` with ``conv2d_zeros``).
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

__all__ = ["PRIORS", "ConditionalGaussianPrior"]

#: Priors of the factored-out halves of :class:`lcma_ext.ContributionMultiscaleFlow`.
PRIORS = ("standard", "conditional")


def _shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    shape = tuple(int(size) for size in shape)
    if len(shape) not in (1, 3) or any(size < 1 for size in shape):
        raise ValueError(f"expected {name} (D,) or (C, H, W) with positive sizes; got {shape}")
    return shape


class ConditionalGaussianPrior(nn.Module):
    """``eps = (f - mu(k)) / sigma(k)``: Glow's conditional prior of a factored half ``f``.

    ``mu`` and ``log sigma`` are the two halves of a zero-initialised net of the kept half ``k``:
    a ``kernel_size`` convolution for images (Glow's ``conv2d_zeros``: outputs multiplied by
    ``exp(logscale_factor * logs)``, per-channel ``logs`` starting at 0), a linear map for vector
    data.

    Args:
        factored_shape: Event shape of the factored half, ``(C_f, H, W)`` or ``(D_f,)``.
        kept_shape: Event shape of the kept half, ``(C_k, H, W)`` or ``(D_k,)``.
        kernel_size: Odd convolution kernel size for images (default 3, as Glow).
        logscale_factor: Glow's factor on the per-channel output log-scale (default 3).

    Raises:
        ValueError: for shapes of different kinds or spatial sizes, or an even kernel size.

    Shapes:
        factored: ``(B, *factored_shape)``; kept: ``(B, *kept_shape)``; eps: like factored;
        logabsdet: ``(B,)``.
    """

    def __init__(
        self,
        factored_shape: Sequence[int],
        kept_shape: Sequence[int],
        kernel_size: int = 3,
        logscale_factor: float = 3.0,
    ) -> None:
        super().__init__()
        self.factored_shape = _shape(factored_shape, "factored_shape")
        self.kept_shape = _shape(kept_shape, "kept_shape")
        if len(self.factored_shape) != len(self.kept_shape) or (
            self.factored_shape[1:] != self.kept_shape[1:]
        ):
            raise ValueError(
                "expected factored and kept halves of the same kind and spatial size; got "
                f"{self.factored_shape} and {self.kept_shape}"
            )
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"expected an odd positive int kernel_size; got {kernel_size!r}")
        self.logscale_factor = float(logscale_factor)
        features = self.factored_shape[0]
        if len(self.kept_shape) == 3:
            self.net: nn.Conv2d | nn.Linear = nn.Conv2d(
                self.kept_shape[0], 2 * features, kernel_size, padding=kernel_size // 2
            )
            self.logs = nn.Parameter(torch.zeros(2 * features, 1, 1))
        else:
            self.net = nn.Linear(self.kept_shape[0], 2 * features)
            self.logs = nn.Parameter(torch.zeros(2 * features))
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(cast(Tensor, self.net.bias))  # built with bias=True

    def _check(self, tensor: Tensor, shape: tuple[int, ...], name: str) -> None:
        if tuple(tensor.shape[1:]) != shape:
            raise ValueError(
                f"ConditionalGaussianPrior: expected {name} of event shape {shape}; got "
                f"{tuple(tensor.shape[1:])}"
            )

    def mean_and_log_scale(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu(kept), log sigma(kept))``, each shaped like the factored half."""
        self._check(kept, self.kept_shape, "kept")
        params = self.net(kept) * torch.exp(self.logscale_factor * self.logs)
        features = self.factored_shape[0]
        return params[:, :features], params[:, features:]

    def forward(self, factored: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Data to noise: ``(eps, logabsdet)`` with ``logabsdet = -sum log sigma(kept)``."""
        eps, logabsdet, _ = self.forward_with_diag(factored, kept)
        return eps, logabsdet

    def forward_with_diag(self, factored: Tensor, kept: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`forward`, plus the per-dimension contribution ``-log sigma(kept)``."""
        self._check(factored, self.factored_shape, "factored")
        mean, log_scale = self.mean_and_log_scale(kept)
        eps = (factored - mean) * torch.exp(-log_scale)
        own = -log_scale
        return eps, own.flatten(1).sum(1), own

    def inverse(self, eps: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        """Noise to data: ``(mu + sigma * eps, sum log sigma(kept))``."""
        self._check(eps, self.factored_shape, "eps")
        mean, log_scale = self.mean_and_log_scale(kept)
        factored = mean + eps * torch.exp(log_scale)
        return factored, log_scale.flatten(1).sum(1)

    def extra_repr(self) -> str:
        return (
            f"factored_shape={self.factored_shape}, kept_shape={self.kept_shape}, "
            f"logscale_factor={self.logscale_factor}"
        )
