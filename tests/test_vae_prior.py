"""VAEPrior (Flow-VAE, paper 001 Eq. 11): bounds against a closed-form linear-Gaussian marginal.

Decoder p(z|eps) = N(W eps + b, diag s^2), prior p(eps) = N(0, I), so the exact marginal is
p(z) = N(b, W W^T + diag s^2). The encoder is a deliberately imperfect linear-Gaussian q so the
ELBO gap is strictly positive. Stochastic checks use tolerances of 4 standard errors computed
from the draws themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from torch import nn

from lcma_ext import transforms as T
from lcma_ext.distributions import (
    VAEPrior,
    bpd_kind,
    evaluate_bpd_mc,
    log_importance_weights,
    mc_log_prob,
)

D, d = 4, 2
MIN_SCALE = 1e-3
SHIFT = math.log(math.e - 1.0)
LOG_2PI = math.log(2 * math.pi)


def _raw(scale: torch.Tensor) -> torch.Tensor:
    """Inverse of VAEPrior's ``softplus(raw + shift) + min_scale``."""
    return torch.log(torch.expm1(scale - MIN_SCALE)) - SHIFT


class LinearGaussian:
    """Parameters, exact marginal, exact posterior and closed-form ELBO of the test model."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, d, generator=g, dtype=torch.float64)
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        self.s = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
        precision = torch.eye(d, dtype=torch.float64) + self.W.T @ torch.diag(self.s**-2) @ self.W
        self.post_cov = torch.linalg.inv(precision)
        self.gain = self.post_cov @ self.W.T @ torch.diag(self.s**-2)  # posterior mean = gain (z-b)
        # imperfect q: shifted mean, inflated diagonal scale
        self.q_offset = torch.tensor([0.4, -0.3], dtype=torch.float64)
        self.q_scale = 1.4 * self.post_cov.diagonal().sqrt()

    def prior(self, analytic_kl: bool = True) -> VAEPrior:
        encoder = nn.Linear(D, 2 * d).double()
        decoder = nn.Linear(d, 2 * D).double()
        with torch.no_grad():
            encoder.weight.zero_()
            encoder.weight[:d] = self.gain
            encoder.bias[:d] = -self.gain @ self.b + self.q_offset
            encoder.bias[d:] = _raw(self.q_scale)
            decoder.weight.zero_()
            decoder.weight[:D] = self.W
            decoder.bias[:D] = self.b
            decoder.bias[D:] = _raw(self.s)
        return VAEPrior(
            D, d, encoder=encoder, decoder=decoder, analytic_kl=analytic_kl, min_scale=MIN_SCALE
        )

    def exact_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + torch.diag(self.s**2)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(z)

    def exact_elbo(self, z: torch.Tensor) -> torch.Tensor:
        m = (z - self.b) @ self.gain.T + self.q_offset
        sq = self.q_scale
        e_log_prior = -0.5 * (m.square() + sq.square()).sum(1) - 0.5 * d * LOG_2PI
        resid = z - m @ self.W.T - self.b
        trace = (self.W.square() * sq.square()).sum(1)  # diag(W diag(sq^2) W^T)
        e_log_lik = (
            -0.5 * ((resid.square() + trace) / self.s.square()).sum(1)
            - torch.log(self.s).sum()
            - 0.5 * D * LOG_2PI
        )
        entropy = torch.log(sq).sum() + 0.5 * d * (1 + LOG_2PI)
        return e_log_prior + e_log_lik + entropy


@pytest.fixture(scope="module")
def model() -> LinearGaussian:
    return LinearGaussian()


@pytest.fixture(scope="module")
def points(model: LinearGaussian) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    cov = model.W @ model.W.T + torch.diag(model.s**2)
    return (
        model.b
        + torch.randn(16, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    )


@pytest.mark.parametrize("analytic_kl", [True, False])
def test_elbo_estimate_matches_closed_form_and_is_below_exact(
    model: LinearGaussian, points: torch.Tensor, analytic_kl: bool
) -> None:
    torch.manual_seed(0)
    prior = model.prior(analytic_kl)
    exact_elbo = model.exact_elbo(points)
    exact = model.exact_log_prob(points)
    assert (exact_elbo < exact - 1e-3).all()  # a strict gap: q is not the posterior
    with torch.no_grad():
        draws = torch.stack([prior.log_prob(points) for _ in range(400)])  # (R, N)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert (se > 0).all()
    assert ((mean - exact_elbo).abs() <= 4 * se + 1e-12).all()
    assert (mean <= exact + 4 * se).all()


def test_iwae_rises_towards_exact_as_k_grows(model: LinearGaussian, points: torch.Tensor) -> None:
    torch.manual_seed(0)
    prior = model.prior()
    exact = model.exact_log_prob(points).mean()
    repeats = 100
    means, ses = [], []
    with torch.no_grad():
        for k in (1, 4, 16, 64, 256):
            draws = torch.stack([prior.iwae_log_prob(points, k).mean() for _ in range(repeats)])
            means.append(draws.mean())
            ses.append(draws.std() / math.sqrt(repeats))
    # IWAE-1 is the ELBO
    assert abs(means[0] - model.exact_elbo(points).mean()) <= 4 * ses[0]
    for j in range(len(means) - 1):  # never significantly lower than the previous K
        assert means[j + 1] >= means[j] - 4 * math.sqrt(ses[j] ** 2 + ses[j + 1] ** 2)
    assert means[-1] - means[0] > 4 * math.sqrt(ses[0] ** 2 + ses[-1] ** 2)  # it does rise
    assert means[-1] <= exact + 4 * ses[-1]  # still a bound
    assert exact - means[-1] < 0.1 * (exact - means[0])  # and closes most of the gap


def test_sampling_matches_the_marginal_moments(model: LinearGaussian) -> None:
    torch.manual_seed(0)
    prior = model.prior()
    n = 20000
    with torch.no_grad():
        samples = prior.sample(n)
    assert samples.shape == (n, D) and samples.dtype == torch.float64
    cov = model.W @ model.W.T + torch.diag(model.s**2)
    se = (cov.diagonal() / n).sqrt()
    assert ((samples.mean(0) - model.b).abs() <= 4 * se).all()
    # variance: SE of the sample variance of a Gaussian is var * sqrt(2 / n)
    var_se = cov.diagonal() * math.sqrt(2 / n)
    assert ((samples.var(0) - cov.diagonal()).abs() <= 4 * var_se).all()


def test_image_latents_flow_round_trip_and_training_step() -> None:
    torch.manual_seed(0)
    shape = (2, 4, 4)
    prior = VAEPrior(shape, 8, hidden=16)
    flow = Flow(T.CompositeTransform([T.SqueezeTransform(), T.ActNorm(8)]), VAEPrior((8, 2, 2), 8))
    x = torch.randn(5, *shape)
    log_prob = flow.log_prob(x)
    assert log_prob.shape == (5,) and torch.isfinite(log_prob).all()
    log_prob.mean().backward()
    grads = [p.grad for p in flow._distribution.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    samples = flow.sample(3)
    assert samples.shape == (3, *shape)
    z, _ = flow._transform(samples)
    torch.testing.assert_close(flow._transform.inverse(z)[0], samples, rtol=1e-5, atol=1e-5)
    # initialization: q = N(0, I) and p(z|eps) = N(0, (1 + min_scale)^2 I), so the ELBO is the
    # exact log-density of that Gaussian (zero KL, zero variance)
    with torch.no_grad():
        z = torch.randn(7, *shape)
        expected = torch.distributions.Normal(0.0, 1.0 + 1e-3).log_prob(z).flatten(1).sum(1)
        torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-5, atol=1e-4)
        assert prior.sample(4).shape == (4, *shape)
        assert prior.iwae_log_prob(z, 3).shape == (7,)


def test_estimators_label_and_reduce(model: LinearGaussian, points: torch.Tensor) -> None:
    torch.manual_seed(0)
    flow = Flow(T.ActNorm(D), model.prior()).double()
    with torch.no_grad():
        flow._transform(points)  # ActNorm data init, then fixed
        flow.eval()
        weights = log_importance_weights(flow, points, 32)
        assert weights.shape == (points.shape[0], 32)
        estimate = mc_log_prob(flow, points, 32, chunk=64)  # several chunks
        z, logabsdet = flow._transform(points)
        exact = model.exact_log_prob(z) + logabsdet
        assert (estimate.iwae_se > 0).all() and (estimate.elbo_se > 0).all()
        assert (estimate.elbo <= exact + 4 * estimate.elbo_se).all()
        assert (estimate.iwae >= estimate.elbo).all()  # Jensen, per draw set
    assert bpd_kind(flow) == "ELBO bound" and bpd_kind(flow, 32) == "IWAE-32"
    exact_flow = Flow(T.ActNorm(D), StandardNormal([D]))
    assert bpd_kind(exact_flow) == "exact"
    with torch.no_grad():
        estimate = mc_log_prob(exact_flow, points.float(), 5)
        torch.testing.assert_close(estimate.iwae, exact_flow.log_prob(points.float()))
        assert torch.equal(estimate.iwae_se, torch.zeros_like(estimate.iwae_se))


def test_evaluate_bpd_mc_on_images() -> None:
    from lcma_ext.data import LogitPreprocessing

    torch.manual_seed(0)
    shape = (1, 4, 4)
    flow = Flow(T.CompositeTransform([T.SqueezeTransform()]), VAEPrior((4, 2, 2), 4))
    data = torch.randint(0, 17, (6, *shape))
    result = evaluate_bpd_mc(flow, data, LogitPreprocessing(17), num_samples=8, batch_size=4)
    assert result["bpd_kind"] == "IWAE-8" and result["num_samples"] == 8
    assert result["bpd_iwae"] <= result["bpd_elbo"] + 1e-9  # IWAE bound is tighter
    assert result["bpd_iwae_se"] > 0 and result["bpd_elbo_se"] > 0
    again = evaluate_bpd_mc(flow, data, LogitPreprocessing(17), num_samples=8, batch_size=4)
    assert again == result  # seeded draws


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"expected latent_dim \(dim\(eps\)\) an int in \[1, 16\)"):
        VAEPrior((1, 4, 4), 16)
    with pytest.raises(ValueError, match="expected latent_dim"):
        VAEPrior(8, 0)
    with pytest.raises(ValueError, match="expected num_samples a positive int"):
        VAEPrior(8, 2, num_samples=0)
    prior = VAEPrior(8, 2)
    with pytest.raises(ValueError, match=r"expected z of shape \(B, 8\); got \(3, 7\)"):
        prior.log_prob(torch.randn(3, 7))
    with pytest.raises(ValueError, match="expected num_samples a positive int"):
        prior.iwae_log_prob(torch.randn(3, 8), 0)
