"""Cross-unit coupling (DenseFlow, paper 003 Eq. 6-9) and the DenseFlow-style builder."""

from __future__ import annotations

import math

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow

from lcma_ext import transforms as T
from lcma_ext.distributions import bpd_kind, is_stochastic, mc_log_prob
from lcma_ext.models.denseflow import DenseFlowBlock, build_denseflow

from brute_force import joint_jacobian

LOG_2PI = math.log(2 * math.pi)


def _perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _image_coupling(previous_channels: int = 0) -> T.CrossUnitCoupling:
    coupling = T.CrossUnitCoupling(2, 3, 2 + previous_channels, hidden=8).double()
    _perturb(coupling)
    return coupling


@pytest.mark.parametrize("previous_channels", [0, 3])
def test_deterministic_part_jacobian_at_fixed_noise(previous_channels: int) -> None:
    coupling = _image_coupling(previous_channels)
    z = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    e = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    previous = [torch.randn(2, previous_channels, 2, 2, dtype=torch.float64)][:previous_channels]
    for b in range(2):
        nz = z[b].numel()

        def joint(zb: torch.Tensor, eb: torch.Tensor, b: int = b) -> torch.Tensor:
            return coupling.augment(zb, eb, [p[b : b + 1] for p in previous])[0]

        jac = joint_jacobian(joint, [z[b], e[b]])
        sign, brute = torch.linalg.slogdet(jac)
        assert sign != 0
        _, log_sigma = coupling.augment(
            z[b : b + 1], e[b : b + 1], [p[b : b + 1] for p in previous]
        )
        torch.testing.assert_close(brute, log_sigma.sum(), rtol=1e-10, atol=1e-10)
        # latent part passes unchanged; noise part is diagonal in e (Eq. 7)
        torch.testing.assert_close(jac[:nz, :nz], torch.eye(nz, dtype=torch.float64))
        assert jac[:nz, nz:].abs().max() == 0
        noise_block = jac[nz:, nz:]
        torch.testing.assert_close(noise_block, torch.diag(log_sigma.exp().reshape(-1)))
    _, term = coupling(z, noise=e, previous=previous)
    _, log_sigma = coupling.augment(z, e, previous)
    expected = log_sigma.flatten(1).sum(1) + (0.5 * e.square() + 0.5 * LOG_2PI).flatten(1).sum(1)
    torch.testing.assert_close(term, expected)  # log|det diag sigma| - log p*(e)


def test_forward_with_diag_sum_invariant_and_noise_dims() -> None:
    coupling = _image_coupling(3)
    z = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    previous = [torch.randn(4, 3, 2, 2, dtype=torch.float64)]
    incoming = torch.randn_like(z)
    torch.manual_seed(5)
    outputs, term = coupling(z, previous=previous)
    torch.manual_seed(5)
    out_d, term_d, diag = coupling.forward_with_diag(z, diag=incoming, previous=previous)
    assert torch.equal(outputs, out_d) and torch.equal(term, term_d)
    assert diag.shape == outputs.shape == (4, 5, 2, 2)
    torch.testing.assert_close(
        diag.flatten(1).sum(1) - incoming.flatten(1).sum(1), term, rtol=0, atol=1e-12
    )
    assert torch.equal(diag[:, :2], incoming)
    e = (outputs[:, 2:] - coupling.parameters_of_noise(z, previous)[0]) / (
        coupling.parameters_of_noise(z, previous)[1]
    )
    _, log_sigma = coupling.augment(z, e, previous)
    torch.testing.assert_close(diag[:, 2:], log_sigma + 0.5 * e.square() + 0.5 * LOG_2PI)


def test_inverse_drops_noise_and_carry_marks_new_dims() -> None:
    coupling = _image_coupling()
    z = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    outputs, _ = coupling(z)
    recovered, logabsdet = coupling.inverse(outputs)
    assert torch.equal(recovered, z) and torch.equal(logabsdet, torch.zeros(3, dtype=z.dtype))
    positions = T.carry_positions(coupling, (2, 2, 2))
    assert positions.shape == (5, 2, 2)
    assert positions[:2].reshape(-1).tolist() == list(range(8))
    assert (positions[2:] == -1).all()
    assert torch.equal(coupling.carry(torch.ones(1, 2, 2, 2))[:, 2:], torch.zeros(1, 3, 2, 2))


def test_bound_and_iwae_against_exact_marginal() -> None:
    """Flow([z, sigma e + mu]) with a N(0, I) base: p(z) = N(z; 0, I) exactly (e integrates out),
    the bound is log N(z) - KL(N(mu, sigma^2) || N(0, 1)) and IWAE-K approaches log N(z)."""
    torch.manual_seed(0)
    coupling = T.CrossUnitCoupling(3, 2, vector=True, hidden=8).double()
    _perturb(coupling, scale=0.1)
    # mu near (0.6, -0.4), sigma near (1.2, 0.9): sigma^2 > 1/2 keeps the weights' variance finite
    sigma = torch.tensor([1.2, 0.9], dtype=torch.float64)
    raw = torch.log(torch.expm1(sigma - coupling.min_scale)) - math.log(math.e - 1)
    with torch.no_grad():
        coupling.conditioner[-1].bias.copy_(torch.cat([torch.tensor([0.6, -0.4]), raw]))
    flow = Flow(coupling, StandardNormal([5])).double()
    z = torch.randn(8, 3, dtype=torch.float64)
    exact = StandardNormal([3]).log_prob(z)
    with torch.no_grad():
        mu, sigma = coupling.parameters_of_noise(z)
        kl = (0.5 * (mu.square() + sigma.square() - 1) - torch.log(sigma)).sum(1)
        assert (kl > 1e-2).all()  # a strict gap
        estimate = mc_log_prob(flow, z, 2000)
        assert ((estimate.elbo - (exact - kl)).abs() <= 4 * estimate.elbo_se).all()
        repeats = torch.stack([mc_log_prob(flow, z, 256).iwae for _ in range(40)])
    iwae, se = repeats.mean(0), repeats.std(0) / math.sqrt(repeats.shape[0])
    assert ((iwae - exact).abs() <= 4 * se + 0.02 * kl).all()
    assert (iwae - (exact - kl) > 4 * se).all()  # far tighter than the one-sample bound
    assert bpd_kind(flow, 256) == "IWAE-256" and is_stochastic(flow)


def test_denseflow_block_protocol_round_trip_and_shapes() -> None:
    torch.manual_seed(0)
    block = DenseFlowBlock((1, 4, 4), units=3, steps=1, growth=2, hidden=8).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    block(x)  # ActNorm data init
    _perturb(block, seed=1, scale=0.1)
    incoming = torch.randn_like(x)
    torch.manual_seed(1)
    outputs, logabsdet = block(x)
    torch.manual_seed(1)
    out_d, logabsdet_d, diag = block.forward_with_diag(x, diag=incoming)
    assert outputs.shape == (3, 8, 2, 2) and block.output_channels == 8
    torch.testing.assert_close(out_d, outputs)
    torch.testing.assert_close(logabsdet_d, logabsdet)
    torch.testing.assert_close(
        diag.flatten(1).sum(1) - incoming.flatten(1).sum(1), logabsdet, rtol=0, atol=1e-9
    )
    recovered, _ = block.inverse(outputs)
    torch.testing.assert_close(recovered, x, rtol=1e-9, atol=1e-9)
    positions = T.carry_positions(block, (1, 4, 4))
    assert positions.shape == (8, 2, 2)
    assert sorted(p for p in positions.reshape(-1).tolist() if p >= 0) == list(range(16))
    assert (positions == -1).sum() == 16  # two couplings x 2 noise channels x 2 x 2 sites


def test_build_denseflow_samples_and_scores() -> None:
    torch.manual_seed(0)
    flow = build_denseflow((1, 8, 8), num_levels=3, size="tiny", squeeze="haar")
    x = torch.randn(4, 1, 8, 8)
    log_prob = flow.log_prob(x)
    assert log_prob.shape == (4,) and torch.isfinite(log_prob).all()
    log_prob.mean().backward()
    with torch.no_grad():
        samples = flow.sample(3)
        assert samples.shape == (3, 1, 8, 8)
        z, _ = flow._transform(samples)
        torch.testing.assert_close(flow._transform.inverse(z)[0], samples, rtol=1e-4, atol=1e-4)
        estimate = mc_log_prob(flow, x, 16)
    assert (estimate.iwae >= estimate.elbo).all() and (estimate.iwae_se > 0).all()


def test_clear_errors() -> None:
    coupling = T.CrossUnitCoupling(2, 3)
    with pytest.raises(ValueError, match=r"expected a \(B, C, H, W\) input with C = 2; got"):
        coupling(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="expected 2 conditioning channels"):
        coupling(torch.randn(1, 2, 2, 2), previous=[torch.randn(1, 1, 2, 2)])
    with pytest.raises(ValueError, match=r"expected noise of shape \(1, 3, 2, 2\)"):
        coupling(torch.randn(1, 2, 2, 2), noise=torch.randn(1, 2, 2, 2))
    with pytest.raises(ValueError, match="expected 5 channels"):
        coupling.inverse(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="expected noise_channels a positive int; got 0"):
        T.CrossUnitCoupling(2, 0)
    with pytest.raises(ValueError, match="expected cond_channels an int >= in_channels"):
        T.CrossUnitCoupling(2, 1, cond_channels=1)
    with pytest.raises(ValueError, match="DenseFlowBlock: expected even H and W; got 3x4"):
        DenseFlowBlock((1, 3, 4))
