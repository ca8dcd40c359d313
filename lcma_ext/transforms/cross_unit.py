"""DenseFlow cross-unit coupling: augment a latent with preconditioned noise (paper 003, Eq. 6-9).

Given the current latent ``z_i`` (``C`` channels) and earlier latents ``z_{<i}``, the coupling
draws ``e ~ p*(e) = N(0, I)`` with ``k`` channels and returns::

    z_aug = [z_i, sigma * e + mu],   (mu, sigma) = g(z_i, z_{<i})          (Eq. 6)

together with the per-sample term ``log|det diag(sigma)| - log p*(e)`` (Eq. 8-9). Added to a
flow's log-det, the flow's ``log_prob(x)`` becomes a one-sample Monte Carlo estimate of the
lower bound of Eq. 9 (a log importance weight); averaged over many draws of ``e`` it estimates
the bound, and ``logmeanexp`` over draws is the tighter importance-weighted bound (see
:func:`lcma_ext.distributions.mc_log_prob`). The inverse drops the noise channels.

Per-dimension protocol: the ``C`` latent channels carry their incoming contribution unchanged;
noise channel ``j`` carries ``log sigma_j - log p*(e_j)`` (``p*`` factorizes), i.e. its
Jacobian term ``log|sigma_j|`` (Eq. 7) plus its share of the entropy term, so
``diag_out.sum() - diag.sum()`` equals the returned term per sample. ``carry`` appends the noise
channels filled with ``-1`` for integer tensors ("no input dimension": :func:`carry_positions`
marks new dimensions with ``-1``) and with ``0`` otherwise.

The conditioner ``g`` sees ``z_i`` concatenated along channels with the ``previous`` tensors
(inside :class:`lcma_ext.models.denseflow.DenseFlowBlock`: every earlier latent of the block,
the dense cross-unit connectivity of Fig. 1c). Its output layer starts at zero, so initially
``mu = 0``, ``sigma = 1`` and the noise enters as ``N(0, I)``.

References:
    M. Grcic, I. Grubisic, S. Segvic. Densely connected normalizing flows (DenseFlow, paper
    003), Sec. 2.1, Eq. 6-9, Fig. 1c.
    C. Huang, L. Dinh, A. Courville. Augmented Normalizing Flows. 2020.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from nflows.transforms.base import Transform
from torch import Tensor, nn

from lcma_ext.transforms.base import DiagMixin, check_diag

__all__ = ["CrossUnitCoupling", "default_conditioner"]

_LOG_2PI = math.log(2.0 * math.pi)
_SCALE_SHIFT = math.log(math.e - 1.0)  # softplus(_SCALE_SHIFT) == 1


def default_conditioner(in_channels: int, out_channels: int, hidden: int = 32) -> nn.Module:
    """Small conditioner ``g``: two 3x3 convolutions (images) with a zero-initialized output."""
    net = nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.SiLU(),
        nn.Conv2d(hidden, out_channels, 3, padding=1),
    )
    last = cast(nn.Conv2d, net[-1])  # the output layer built just above
    nn.init.zeros_(last.weight)
    nn.init.zeros_(cast(Tensor, last.bias))  # built with bias=True
    return net


def _vector_conditioner(in_features: int, out_features: int, hidden: int = 32) -> nn.Module:
    net = nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out_features),
    )
    last = cast(nn.Linear, net[-1])  # the output layer built just above
    nn.init.zeros_(last.weight)
    nn.init.zeros_(cast(Tensor, last.bias))  # built with bias=True
    return net


class CrossUnitCoupling(DiagMixin, Transform):
    """Cross-unit coupling ``z -> [z, sigma(g) * e + mu(g)]`` with ``e ~ N(0, I)``.

    Not a bijection: ``forward`` is stochastic (fresh ``e`` per call unless ``noise`` is given)
    and returns the lower-bound term in place of a log-det; ``inverse`` drops the noise
    channels and returns a zero log-det (sampling needs no density).

    Args:
        in_channels: ``C``, channels (or features, for ``(B, C)`` vectors) of ``z_i``.
        noise_channels: ``k``, the growth rate.
        cond_channels: Channels of ``g``'s input (``C`` plus those of every ``previous``
            tensor); default ``in_channels``.
        conditioner: ``conditioner(cond_channels, 2 k) -> nn.Module`` returning the raw
            ``(mu, sigma)`` stacked along channels; default :func:`default_conditioner`
            (images) or a small MLP (with ``vector=True``).
        hidden: Width of the default conditioner.
        min_scale: Lower bound of ``sigma`` (``sigma = softplus(raw + log(e - 1)) + min_scale``).
        vector: The latents are ``(B, C)`` vectors rather than ``(B, C, H, W)`` images.

    Shapes:
        inputs: ``(B, C, H, W)`` (or ``(B, C)``); outputs ``(B, C + k, H, W)`` (or ``(B, C + k)``).
    """

    #: Marks transforms whose ``forward`` draws noise (see ``lcma_ext.distributions``).
    stochastic = True

    def __init__(
        self,
        in_channels: int,
        noise_channels: int,
        cond_channels: int | None = None,
        conditioner: Callable[[int, int], nn.Module] | None = None,
        hidden: int = 32,
        min_scale: float = 1e-3,
        vector: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("noise_channels", noise_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} a positive int; got {value!r}")
        cond_channels = in_channels if cond_channels is None else cond_channels
        if not isinstance(cond_channels, int) or cond_channels < in_channels:
            raise ValueError(
                f"expected cond_channels an int >= in_channels ({in_channels}); "
                f"got {cond_channels!r}"
            )
        if not min_scale > 0:
            raise ValueError(f"expected a positive min_scale; got {min_scale!r}")
        self.in_channels = in_channels
        self.noise_channels = noise_channels
        self.cond_channels = cond_channels
        self.min_scale = float(min_scale)
        self.vector = bool(vector)
        if conditioner is not None:
            self.conditioner = conditioner(cond_channels, 2 * noise_channels)
        elif self.vector:
            self.conditioner = _vector_conditioner(cond_channels, 2 * noise_channels, hidden)
        else:
            self.conditioner = default_conditioner(cond_channels, 2 * noise_channels, hidden)

    def _check(self, inputs: Tensor, previous: Sequence[Tensor]) -> None:
        ndim = 2 if self.vector else 4
        if inputs.dim() != ndim or inputs.shape[1] != self.in_channels:
            expected = "(B, C)" if self.vector else "(B, C, H, W)"
            raise ValueError(
                f"CrossUnitCoupling: expected a {expected} input with C = {self.in_channels}; "
                f"got shape {tuple(inputs.shape)}"
            )
        channels = inputs.shape[1] + sum(p.shape[1] for p in previous)
        if channels != self.cond_channels:
            raise ValueError(
                f"CrossUnitCoupling: expected {self.cond_channels} conditioning channels "
                f"(inputs + previous); got {channels}"
            )

    def noise_shape(self, inputs: Tensor) -> tuple[int, ...]:
        """Shape of ``e`` for ``inputs``: ``(B, k, H, W)`` or ``(B, k)``."""
        return (inputs.shape[0], self.noise_channels, *inputs.shape[2:])

    def parameters_of_noise(
        self, inputs: Tensor, previous: Sequence[Tensor] = ()
    ) -> tuple[Tensor, Tensor]:
        """``(mu, sigma) = g(inputs, previous)``, each shaped like ``e``."""
        self._check(inputs, previous)
        cond = torch.cat([inputs, *previous], dim=1) if previous else inputs
        mu, raw = self.conditioner(cond).chunk(2, dim=1)
        return mu, F.softplus(raw + _SCALE_SHIFT) + self.min_scale

    def augment(
        self, inputs: Tensor, noise: Tensor, previous: Sequence[Tensor] = ()
    ) -> tuple[Tensor, Tensor]:
        """The deterministic part at fixed ``noise``: ``([z, sigma * e + mu], log sigma)``.

        ``log sigma`` (shaped like ``noise``) sums to the log|det| of ``[z, e] -> z_aug``.
        """
        mu, sigma = self.parameters_of_noise(inputs, previous)
        if noise.shape != mu.shape:
            raise ValueError(f"expected noise of shape {tuple(mu.shape)}; got {tuple(noise.shape)}")
        return torch.cat([inputs, sigma * noise + mu], dim=1), torch.log(sigma)

    def _draw(self, inputs: Tensor, noise: Tensor | None) -> Tensor:
        if noise is not None:
            return noise
        return torch.randn(self.noise_shape(inputs), dtype=inputs.dtype, device=inputs.device)

    @staticmethod
    def _neg_log_base(noise: Tensor) -> Tensor:
        """``-log p*(e_j)`` per noise dimension."""
        return 0.5 * noise.square() + 0.5 * _LOG_2PI

    def forward(
        self,
        inputs: Tensor,
        context: Tensor | None = None,
        noise: Tensor | None = None,
        previous: Sequence[Tensor] = (),
    ) -> tuple[Tensor, Tensor]:
        """``(z_aug, log|det diag sigma| - log p*(e))``; ``noise`` fixes ``e`` (else drawn)."""
        noise = self._draw(inputs, noise)
        outputs, log_sigma = self.augment(inputs, noise, previous)
        term = (log_sigma + self._neg_log_base(noise)).flatten(1).sum(1)
        return outputs, term

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Drop the ``k`` noise channels; the returned log-det is 0 (no density is implied)."""
        ndim = 2 if self.vector else 4
        if inputs.dim() != ndim or inputs.shape[1] != self.in_channels + self.noise_channels:
            raise ValueError(
                f"CrossUnitCoupling.inverse: expected {self.in_channels + self.noise_channels} "
                f"channels; got shape {tuple(inputs.shape)}"
            )
        return inputs[:, : self.in_channels], inputs.new_zeros(inputs.shape[0])

    def forward_with_diag(
        self,
        inputs: Tensor,
        context: Tensor | None = None,
        diag: Tensor | None = None,
        noise: Tensor | None = None,
        previous: Sequence[Tensor] = (),
    ) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`forward`, plus ``diag_out``: carried ``diag``, then per noise dimension
        ``log sigma_j - log p*(e_j)``."""
        diag = check_diag(inputs, diag)
        noise = self._draw(inputs, noise)
        outputs, log_sigma = self.augment(inputs, noise, previous)
        noise_diag = log_sigma + self._neg_log_base(noise)
        return outputs, noise_diag.flatten(1).sum(1), torch.cat([diag, noise_diag], dim=1)

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.forward_with_diag(inputs, context, diag)

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """Append ``k`` channels: ``-1`` for integer tensors (new dimensions), else ``0``."""
        fill = -1 if not (tensor.is_floating_point() or tensor.is_complex()) else 0
        extra = tensor.new_full(self.noise_shape(tensor), fill)
        return torch.cat([tensor, extra], dim=1)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, noise_channels={self.noise_channels}, "
            f"cond_channels={self.cond_channels}"
        )
