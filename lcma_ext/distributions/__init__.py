"""Base distributions beyond ``N(0, I)`` and likelihood estimators for bound-only flows.

``VAEPrior`` is the Flow-VAE learned low-dimensional prior (paper 001, Sec. 3.1); its
``log_prob`` is an ELBO. :func:`mc_log_prob` and :func:`evaluate_bpd_mc` turn any bound-only
flow (VAE prior or DenseFlow cross-unit coupling) into IWAE-K / ELBO estimates with standard
errors. See docs/latent_shaping.md.

References:
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 3.1.
    Y. Burda, R. Grosse, R. Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016.
"""

from lcma_ext.distributions.estimators import (
    RESIDUAL_KINDS,
    MCEstimate,
    bpd_kind,
    evaluate_bpd_mc,
    is_bound_only,
    is_stochastic,
    log_importance_weights,
    mc_log_prob,
)
from lcma_ext.distributions.vae_prior import VAEPrior, gaussian_log_prob

__all__ = [
    "RESIDUAL_KINDS",
    "MCEstimate",
    "VAEPrior",
    "bpd_kind",
    "evaluate_bpd_mc",
    "gaussian_log_prob",
    "is_bound_only",
    "is_stochastic",
    "log_importance_weights",
    "mc_log_prob",
]
