"""Flow-VAE: a learned low-dimensional prior over a flow's latent (paper 001, Sec. 3.1, Eq. 11).

The flow maps data ``x`` to a latent ``z`` of dimension ``D``; instead of ``N(0, I)``, ``z`` is
modelled by a VAE over a noise space ``eps`` of dimension ``d < D``::

    p(eps) = N(0, I_d),   p(z | eps) = N(mu_theta(eps), diag sigma_theta(eps)^2),
    q(eps | z) = N(m_phi(z), diag s_phi(z)^2).

``VAEPrior.log_prob(z)`` is the evidence lower bound (ELBO)
``E_q[log p(eps) + log p(z|eps) - log q(eps|z)] <= log p(z)``, so ``nflows.flows.Flow(transform,
VAEPrior(...)).log_prob(x)`` is Eq. 11's lower bound on ``log p(x)`` and the flow trains end to
end on it. :meth:`VAEPrior.iwae_log_prob` is the tighter importance-weighted bound with ``K``
samples (Burda et al.), for evaluation. Bits/dim computed from either is an UPPER bound (in
expectation) on the model's true bits/dim; never report it as exact.

References:
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 3.1, Eq. 11.
    D. Kingma, M. Welling. Auto-Encoding Variational Bayes. ICLR 2014.
    Y. Burda, R. Grosse, R. Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from nflows.distributions.base import Distribution
from torch import Tensor, nn

__all__ = ["VAEPrior", "gaussian_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)
#: ``softplus(_SCALE_SHIFT) == 1``: a zero raw output means unit scale.
_SCALE_SHIFT = math.log(math.e - 1.0)


def gaussian_log_prob(x: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """``log N(x; mean, diag scale^2)`` summed over all but the first dimension."""
    z = (x - mean) / scale
    return (-0.5 * z.square() - torch.log(scale) - 0.5 * _LOG_2PI).flatten(1).sum(1)


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out_features),
    )
    # Zero output layer: at initialization q = p(eps) = N(0, I) and p(z | eps) = N(0, I) (up to
    # min_scale), so the flow starts from the standard-normal prior's objective.
    last = cast(nn.Linear, net[-1])  # the output layer built just above
    nn.init.zeros_(last.weight)
    nn.init.zeros_(cast(Tensor, last.bias))  # built with bias=True
    return net


class VAEPrior(Distribution):
    """nflows ``Distribution`` over ``z`` whose ``log_prob`` is a VAE's ELBO (Flow-VAE prior).

    Args:
        shape: Event shape of ``z``: a vector ``(D,)`` or an image ``(C, H, W)`` (any shape;
            the default nets flatten it).
        latent_dim: ``d = dim(eps)``, at least 1 and below ``D``.
        hidden: Width of the default two-hidden-layer MLP encoder and decoder.
        encoder: Optional module ``(B, *shape) -> (B, 2 d)``: the mean of ``q(eps|z)`` then the
            raw scale (``scale = softplus(raw + log(e - 1)) + min_scale``, so 0 means 1).
        decoder: Optional module ``(B, d) -> (B, 2 D)``: the mean of ``p(z|eps)`` (flattened)
            then its raw scale, mapped the same way.
        num_samples: Monte Carlo samples of ``eps`` per ``log_prob`` call (the ELBO estimate).
        analytic_kl: Use the closed-form ``KL(q || p(eps))`` instead of its one-sample estimate
            in ``log_prob`` (same bound, lower variance).
        min_scale: Lower bound of every scale.

    Shapes:
        z: ``(B, *shape)``; ``eps``: ``(B, d)``.

    Raises:
        ValueError: for ``latent_dim`` outside ``[1, D)``, a non-positive ``num_samples`` or
            ``min_scale``.
    """

    def __init__(
        self,
        shape: Sequence[int] | int,
        latent_dim: int,
        hidden: int = 64,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        num_samples: int = 1,
        analytic_kl: bool = True,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"expected a non-empty event shape of positive sizes; got {shape}")
        features = math.prod(shape)
        if not isinstance(latent_dim, int) or not 1 <= latent_dim < features:
            raise ValueError(
                f"expected latent_dim (dim(eps)) an int in [1, {features}) for latents of shape "
                f"{shape} (D = {features}); got {latent_dim!r}"
            )
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"expected num_samples a positive int; got {num_samples!r}")
        if not min_scale > 0:
            raise ValueError(f"expected a positive min_scale; got {min_scale!r}")
        self._shape = torch.Size(shape)
        self.features = features
        self.latent_dim = latent_dim
        self.num_samples = num_samples
        self.analytic_kl = bool(analytic_kl)
        self.min_scale = float(min_scale)
        self.encoder = encoder if encoder is not None else _mlp(features, hidden, 2 * latent_dim)
        self.decoder = decoder if decoder is not None else _mlp(latent_dim, hidden, 2 * features)

    # ------------------------------------------------------------------------------------------
    # the two conditionals

    def _scale(self, raw: Tensor) -> Tensor:
        return F.softplus(raw + _SCALE_SHIFT) + self.min_scale

    def _check_z(self, z: Tensor) -> None:
        if tuple(z.shape[1:]) != tuple(self._shape):
            raise ValueError(
                f"VAEPrior: expected z of shape (B, {', '.join(map(str, self._shape))}); got "
                f"{tuple(z.shape)}"
            )

    def encode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and scale of ``q(eps | z)``, each ``(B, d)``."""
        self._check_z(z)
        out = self.encoder(z)
        if out.shape != (z.shape[0], 2 * self.latent_dim):
            raise ValueError(
                f"expected the encoder to return (B, 2 d) = {(z.shape[0], 2 * self.latent_dim)}; "
                f"got {tuple(out.shape)}"
            )
        mean, raw = out.chunk(2, dim=1)
        return mean, self._scale(raw)

    def decode(self, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and scale of ``p(z | eps)``, each ``(B, *shape)``."""
        out = self.decoder(eps)
        if out.shape != (eps.shape[0], 2 * self.features):
            raise ValueError(
                f"expected the decoder to return (B, 2 D) = {(eps.shape[0], 2 * self.features)}; "
                f"got {tuple(out.shape)}"
            )
        mean, raw = out.chunk(2, dim=1)
        shape = (eps.shape[0], *self._shape)
        return mean.reshape(shape), self._scale(raw).reshape(shape)

    # ------------------------------------------------------------------------------------------
    # bounds

    def log_weights(self, z: Tensor, num_samples: int) -> Tensor:
        """Log importance weights ``log p(eps) + log p(z|eps) - log q(eps|z)``, ``eps ~ q``.

        Each entry is an unbiased-in-expectation estimate of the ELBO; ``logmeanexp`` over the
        ``K`` columns is the IWAE-K bound.

        Returns:
            ``(B, K)`` with ``K = num_samples``.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"expected num_samples a positive int; got {num_samples!r}")
        mean, scale = self.encode(z)
        batch = z.shape[0]
        u = torch.randn(batch, num_samples, self.latent_dim, dtype=z.dtype, device=z.device)
        eps = mean.unsqueeze(1) + scale.unsqueeze(1) * u  # (B, K, d)
        flat_eps = eps.reshape(batch * num_samples, self.latent_dim)
        log_q = (-0.5 * u.square() - torch.log(scale).unsqueeze(1) - 0.5 * _LOG_2PI).sum(2)
        log_prior = (-0.5 * eps.square() - 0.5 * _LOG_2PI).sum(2)
        dec_mean, dec_scale = self.decode(flat_eps)
        z_rep = z.unsqueeze(1).expand(batch, num_samples, *self._shape)
        z_rep = z_rep.reshape(batch * num_samples, *self._shape)
        log_lik = gaussian_log_prob(z_rep, dec_mean, dec_scale).view(batch, num_samples)
        return log_prior + log_lik - log_q

    def elbo(self, z: Tensor, num_samples: int | None = None) -> Tensor:
        """Monte Carlo estimate of the ELBO per example, ``(B,)`` (``num_samples`` draws).

        With ``analytic_kl`` the estimate is ``mean_k log p(z|eps_k) - KL(q || N(0, I))``.
        """
        num_samples = self.num_samples if num_samples is None else num_samples
        if not self.analytic_kl:
            return self.log_weights(z, num_samples).mean(1)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"expected num_samples a positive int; got {num_samples!r}")
        mean, scale = self.encode(z)
        batch = z.shape[0]
        u = torch.randn(batch, num_samples, self.latent_dim, dtype=z.dtype, device=z.device)
        eps = (mean.unsqueeze(1) + scale.unsqueeze(1) * u).reshape(-1, self.latent_dim)
        dec_mean, dec_scale = self.decode(eps)
        z_rep = z.unsqueeze(1).expand(batch, num_samples, *self._shape)
        z_rep = z_rep.reshape(batch * num_samples, *self._shape)
        log_lik = gaussian_log_prob(z_rep, dec_mean, dec_scale).view(batch, num_samples).mean(1)
        kl = 0.5 * (mean.square() + scale.square() - 1.0).sum(1) - torch.log(scale).sum(1)
        return log_lik - kl

    def iwae_log_prob(self, z: Tensor, num_samples: int) -> Tensor:
        """Importance-weighted bound ``log (1/K) sum_k w_k`` with ``K = num_samples``, ``(B,)``.

        ``E[IWAE-K] <= E[IWAE-2K] <= log p(z)``, and it tends to ``log p(z)`` as ``K`` grows.
        """
        weights = self.log_weights(z, num_samples)
        return torch.logsumexp(weights, dim=1) - math.log(num_samples)

    def _log_prob(self, inputs: Tensor, context: Tensor | None) -> Tensor:
        if context is not None:
            raise ValueError(f"VAEPrior: expected context=None; got {type(context).__name__}")
        return self.elbo(inputs)

    # ------------------------------------------------------------------------------------------
    # sampling

    def sample_at_temperature(
        self, num_samples: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Decode ``eps ~ N(0, T^2 I)`` and add decoder noise scaled by ``T``.

        Returns:
            ``(num_samples, *shape)`` on the module's device and dtype.
        """
        parameter = next(self.decoder.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
        device = parameter.device if parameter is not None else torch.device("cpu")
        eps = torch.randn(num_samples, self.latent_dim, generator=generator, dtype=dtype)
        noise = torch.randn(num_samples, *self._shape, generator=generator, dtype=dtype)
        mean, scale = self.decode(temperature * eps.to(device))
        return mean + temperature * scale * noise.to(device)

    def _sample(self, num_samples: int, context: Tensor | None) -> Tensor:
        if context is not None:
            raise ValueError(f"VAEPrior: expected context=None; got {type(context).__name__}")
        return self.sample_at_temperature(num_samples)

    def extra_repr(self) -> str:
        return (
            f"shape={tuple(self._shape)}, latent_dim={self.latent_dim}, "
            f"num_samples={self.num_samples}, analytic_kl={self.analytic_kl}"
        )
