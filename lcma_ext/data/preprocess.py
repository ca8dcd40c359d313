"""Pre-processing of integer images for flows, and bits/dim with every term included.

Integer data ``x`` in ``{0, ..., levels-1}^D`` is uniformly dequantized and logit-transformed,
as in RealNVP and the LCMA experiments (alpha = 0.05):

::

    v = (x + u) / levels,  u ~ U[0, 1)^D,   p = alpha + (1 - 2 alpha) v,   y = logit(p).

The flow models ``y``. The density of the dequantized data ``x + u`` on ``[0, levels)^D`` is
obtained by the change of variables through ``v`` and ``y``, so the bits/dim reported is

::

    bpd = (-log p_Y(y) - log|det dy/dv| + D log(levels)) / (D ln 2),
    log|det dy/dv| = sum_i [log(1 - 2 alpha) - log p_i - log(1 - p_i)].

``D log(levels)`` is the Jacobian of ``v = (x + u) / levels``; ``-E_u[log p(x + u)]`` upper
bounds the discrete negative log-likelihood of ``x`` (Theis et al., 2016), so the bpd is
comparable to published figures. A uniform density on ``[0, levels)^D`` scores exactly
``log2(levels)`` bits/dim.

Note: paper 001 writes ``logit(alpha + (1 - alpha) x / 256)``; the symmetric ``1 - 2 alpha`` used
here (as in the RealNVP reference code) keeps ``p`` inside ``[alpha, 1 - alpha]``, so both tails
of the logit are clipped alike.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017, Sec. 4.1.
    L. Theis, A. van den Oord, M. Bethge. A note on the evaluation of generative models. ICLR 2016.
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LogitPreprocessing", "bits_per_dim", "dequantize", "logit_transform"]


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"expected alpha in [0, 0.5); got {alpha}")
    return float(alpha)


def _check_levels(levels: int) -> int:
    if int(levels) != levels or levels < 2:
        raise ValueError(f"expected levels to be an integer >= 2; got {levels}")
    return int(levels)


def dequantize(
    x: Tensor,
    levels: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Uniform dequantization ``(x + u) / levels`` with ``u ~ U[0, 1)``.

    Args:
        x: Integer-valued tensor with values in ``{0, ..., levels - 1}``, any shape.
        levels: Number of quantization levels (17 for digits, 256 for 8-bit images).
        generator: CPU generator for ``u`` (reproducible noise); ``None`` uses the global RNG.
        dtype: Floating dtype of the result (default: ``torch.get_default_dtype()``).
        noise: Explicit ``u`` shaped like ``x`` (overrides ``generator``).

    Returns:
        Values in ``[0, 1)``, shaped like ``x``, on ``x``'s device.

    Raises:
        ValueError: for values outside ``{0, ..., levels - 1}`` or a badly shaped ``noise``.
    """
    levels = _check_levels(levels)
    dtype = dtype or torch.get_default_dtype()
    if x.numel() and (
        x.min() < 0 or x.max() > levels - 1 or (x.is_floating_point() and (x != x.round()).any())
    ):
        raise ValueError(
            f"expected integer values in [0, {levels - 1}]; "
            f"got values in [{float(x.min())}, {float(x.max())}]"
        )
    if noise is None:
        noise = torch.rand(x.shape, generator=generator, dtype=dtype)
    elif noise.shape != x.shape:
        raise ValueError(f"expected noise shaped {tuple(x.shape)}; got {tuple(noise.shape)}")
    return (x.to(dtype) + noise.to(device=x.device, dtype=dtype)) / levels


def logit_transform(v: Tensor, alpha: float = 0.05) -> tuple[Tensor, Tensor]:
    """``y = logit(alpha + (1 - 2 alpha) v)`` and its per-example log|det dy/dv|.

    Shapes:
        v: ``(B, *event)``; returns ``y`` shaped like ``v`` and the log-det of shape ``(B,)``.
    """
    alpha = _check_alpha(alpha)
    p = alpha + (1.0 - 2.0 * alpha) * v
    y = torch.log(p) - torch.log1p(-p)
    elementwise = math.log(1.0 - 2.0 * alpha) - torch.log(p) - torch.log1p(-p)
    return y, elementwise.flatten(1).sum(1)


def bits_per_dim(log_prob_y: Tensor, logit_logabsdet: Tensor, num_dims: int, levels: int) -> Tensor:
    """Bits/dim of the dequantized integer data (see the module docstring for the formula).

    Args:
        log_prob_y: ``log p_Y(y)`` of the flow on the pre-processed data, shape ``(B,)``.
        logit_logabsdet: ``log|det dy/dv|`` from :func:`logit_transform`, shape ``(B,)``.
        num_dims: ``D``, the number of dimensions of one example.
        levels: Quantization levels of the integer data.

    Returns:
        Per-example bits/dim, shape ``(B,)``.
    """
    levels = _check_levels(levels)
    nll = -(log_prob_y + logit_logabsdet) + num_dims * math.log(levels)
    return nll / (num_dims * math.log(2.0))


@dataclass(frozen=True)
class LogitPreprocessing:
    """Dequantization + logit pre-processing bound to a number of levels.

    Attributes:
        levels: Quantization levels of the integer data.
        alpha: Logit margin (0.05 as in the paper).
    """

    levels: int
    alpha: float = 0.05

    def __post_init__(self) -> None:
        _check_levels(self.levels)
        _check_alpha(self.alpha)

    def __call__(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Integer images to ``(y, log|det dy/dv|)`` with fresh (or given) dequantization noise.

        ``noise`` (``u ~ U[0, 1)`` shaped like ``x``) overrides ``generator``, see
        :func:`dequantize`.
        """
        return logit_transform(dequantize(x, self.levels, generator, dtype, noise), self.alpha)

    def bits_per_dim(self, log_prob_y: Tensor, logit_logabsdet: Tensor, num_dims: int) -> Tensor:
        """Per-example bits/dim; see :func:`bits_per_dim`."""
        return bits_per_dim(log_prob_y, logit_logabsdet, num_dims, self.levels)

    def to_unit(self, y: Tensor) -> Tensor:
        """Inverse of the logit: model space back to images in ``[0, 1]`` (for sample grids)."""
        return ((torch.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)).clamp(0.0, 1.0)
