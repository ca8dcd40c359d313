"""Monte Carlo likelihood estimates of flows whose ``log_prob`` is a stochastic lower bound.

Two kinds of flow in lcma-ext have no exact ``log_prob``:

* a flow with a :class:`VAEPrior` base (Flow-VAE, paper 001 Eq. 11): ``log_prob`` is the ELBO;
* a flow with :class:`lcma_ext.transforms.CrossUnitCoupling` layers (DenseFlow, paper 003
  Eq. 9): every ``forward`` draws noise and ``log_prob`` is one log importance weight.

For both, :func:`log_importance_weights` returns ``K`` log weights ``log w_k`` per example with
``E[log w_k] = ELBO <= log p(x)`` and ``E[w_k] = p(x)``. :func:`mc_log_prob` reduces them to
the ELBO estimate ``mean_k log w_k`` and the importance-weighted (IWAE-K) bound
``log mean_k w_k`` with their Monte Carlo standard errors: ``std_k(log w_k) / sqrt(K)`` for the
ELBO and, by the delta method, ``std_k(w_k) / (sqrt(K) mean_k(w_k))`` for IWAE-K (a first-order
approximation that underestimates the error when the weights are heavy-tailed). Bits/dim from
either is an upper bound in expectation on the model's bits/dim, never an exact value.

References:
    Y. Burda, R. Grosse, R. Salakhutdinov. Importance Weighted Autoencoders. ICLR 2016.
    M. Grcic, I. Grubisic, S. Segvic. Densely connected normalizing flows (paper 003), Sec. 2.1.
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 3.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lcma_ext.distributions.vae_prior import VAEPrior
from lcma_ext.flows import eval_mode, flow_dtype_device, flow_parts
from lcma_ext.transforms.residual import InvertibleResNetBlock, ResidualFlowBlock

_RESIDUAL_BLOCKS = (InvertibleResNetBlock, ResidualFlowBlock)

__all__ = [
    "RESIDUAL_KINDS",
    "MCEstimate",
    "bpd_kind",
    "evaluate_bpd_mc",
    "is_bound_only",
    "is_stochastic",
    "log_importance_weights",
    "mc_log_prob",
]


def is_stochastic(module: nn.Module) -> bool:
    """Whether any submodule's forward draws noise (has ``stochastic = True``)."""
    return any(getattr(m, "stochastic", False) for m in module.modules())


#: Labels of :func:`bpd_kind` for flows with residual blocks (see
#: :mod:`lcma_ext.transforms.residual`): their eval-mode ``log_prob`` is an estimate.
RESIDUAL_KINDS = ("roulette estimate", "truncated series")


def bpd_kind(flow: nn.Module, num_samples: int | None = None) -> str:
    """How a flow's bits/dim must be labelled.

    Returns:
        ``"IWAE-K"`` (or ``"ELBO bound"`` without ``num_samples``) for bound-only flows (a
        :class:`VAEPrior` base or a stochastic transform); ``"truncated series"`` when any
        non-exact :class:`~lcma_ext.transforms.InvertibleResNetBlock` is present (a biased
        estimate, bias at most ``D Lip^(n+1) / ((n+1)(1-Lip))`` per block); ``"roulette
        estimate"`` when the non-exact residual blocks are all Residual Flow blocks (an
        unbiased estimate of the exact log-likelihood); else ``"exact"``.
    """
    if is_bound_only(flow):
        return f"IWAE-{num_samples}" if num_samples else "ELBO bound"
    residual = [m for m in flow.modules() if isinstance(m, _RESIDUAL_BLOCKS) and not m.exact]
    if any(isinstance(m, InvertibleResNetBlock) for m in residual):
        return RESIDUAL_KINDS[1]
    return RESIDUAL_KINDS[0] if residual else "exact"


def is_bound_only(flow: nn.Module) -> bool:
    """Whether a flow's ``log_prob`` is a stochastic lower bound (scored by IWAE-K)."""
    transform, distribution, _ = flow_parts(flow)
    return is_stochastic(transform) or isinstance(distribution, VAEPrior)


def log_importance_weights(flow: Any, inputs: Tensor, num_samples: int) -> Tensor:
    """``(B, K)`` log importance weights of an nflows ``Flow`` (see the module docstring).

    For a deterministic transform with a :class:`VAEPrior` the transform runs once and the
    prior draws ``K`` samples of ``eps``; otherwise the inputs are repeated ``K`` times so a
    stochastic transform draws fresh noise for each column. For a flow that is neither, every
    column is the exact ``log_prob``.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"expected num_samples a positive int; got {num_samples!r}")
    transform, distribution, _ = flow_parts(flow)
    vae = isinstance(distribution, VAEPrior)
    batch = inputs.shape[0]
    if vae and not is_stochastic(transform):
        z, logabsdet = transform(inputs)
        return distribution.log_weights(z, num_samples) + logabsdet.unsqueeze(1)
    repeated = inputs.repeat_interleave(num_samples, dim=0)
    z, logabsdet = transform(repeated)
    base = distribution.log_weights(z, 1)[:, 0] if vae else distribution.log_prob(z)
    return (base + logabsdet).view(batch, num_samples)


@dataclass
class MCEstimate:
    """Per-example Monte Carlo estimates (all ``(B,)``, in nats).

    Attributes:
        iwae: ``log mean_k w_k`` (IWAE-K bound).
        iwae_se: Its delta-method standard error.
        elbo: ``mean_k log w_k``.
        elbo_se: Its standard error ``std_k(log w_k) / sqrt(K)`` (0 for ``K = 1``).
        num_samples: ``K``.
    """

    iwae: Tensor
    iwae_se: Tensor
    elbo: Tensor
    elbo_se: Tensor
    num_samples: int


def mc_log_prob(flow: Any, inputs: Tensor, num_samples: int, chunk: int = 4096) -> MCEstimate:
    """IWAE-K and ELBO estimates of ``log p(inputs)`` with their standard errors.

    Args:
        flow: nflows ``Flow`` (VAE prior and/or stochastic transform).
        inputs: ``(B, *event)``.
        num_samples: ``K`` draws per example.
        chunk: Upper bound on ``B' * K`` per forward pass (memory).
    """
    per = max(1, chunk // num_samples)
    weights = torch.cat(
        [
            log_importance_weights(flow, inputs[s : s + per], num_samples)
            for s in range(0, inputs.shape[0], per)
        ]
    )
    k = num_samples
    iwae = torch.logsumexp(weights, dim=1) - math.log(k)
    elbo = weights.mean(1)
    if k > 1:
        elbo_se = weights.std(1) / math.sqrt(k)
        w = torch.exp(weights - weights.max(1, keepdim=True).values)
        iwae_se = w.std(1) / (math.sqrt(k) * w.mean(1))
    else:
        elbo_se = iwae_se = torch.zeros_like(elbo)
    return MCEstimate(iwae, iwae_se, elbo, elbo_se, k)


@torch.no_grad()
def evaluate_bpd_mc(
    flow: Any,
    data: Tensor,
    preprocessing: Any,
    num_samples: int = 100,
    batch_size: int = 100,
    seed: int = 2024,
    mc_seed: int = 0,
) -> dict[str, Any]:
    """Test bits/dim of a bound-only flow: IWAE-K and ELBO with Monte Carlo standard errors.

    Same dequantization noise as :func:`lcma_ext.training.evaluate_bpd` (``seed``); the
    Monte Carlo draws use ``mc_seed`` (the global RNG is restored afterwards). The standard
    errors are those of the test-set mean given the dequantized test set (Monte Carlo error
    only): ``sqrt(sum_i se_i^2) / N``.

    Args:
        flow: nflows ``Flow`` over pre-processed images.
        data: Integer images ``(N, C, H, W)``.
        preprocessing: :class:`lcma_ext.data.LogitPreprocessing`.
        num_samples: ``K`` draws per image.
        batch_size: Images per batch.
        seed: Dequantization noise seed.
        mc_seed: Seed of the Monte Carlo draws.

    Returns:
        ``{"bpd_iwae", "bpd_iwae_se", "bpd_elbo", "bpd_elbo_se", "num_samples", "bpd_kind"}``.
    """
    dtype, device = flow_dtype_device(flow)
    generator = torch.Generator().manual_seed(seed)
    num_dims = data[0].numel()
    scale = 1.0 / (num_dims * math.log(2.0))
    sums = {"iwae": 0.0, "elbo": 0.0, "iwae_var": 0.0, "elbo_var": 0.0}
    count = 0
    devices = [device] if device.type == "cuda" else []
    with eval_mode(flow), torch.random.fork_rng(devices=devices):
        torch.manual_seed(mc_seed)
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size].to(device)
            y, logit_logdet = preprocessing(batch, generator=generator, dtype=dtype)
            estimate = mc_log_prob(flow, y, num_samples)
            for name in ("iwae", "elbo"):
                value = getattr(estimate, name)
                bpd = preprocessing.bits_per_dim(value, logit_logdet, num_dims)
                sums[name] += float(bpd.double().sum())
                se = getattr(estimate, f"{name}_se").double() * scale
                sums[f"{name}_var"] += float(se.square().sum())
            count += batch.shape[0]
    n = max(count, 1)
    return {
        "bpd_iwae": sums["iwae"] / n,
        "bpd_iwae_se": math.sqrt(sums["iwae_var"]) / n,
        "bpd_elbo": sums["elbo"] / n,
        "bpd_elbo_se": math.sqrt(sums["elbo_var"]) / n,
        "num_samples": num_samples,
        "bpd_kind": f"IWAE-{num_samples}",
    }
