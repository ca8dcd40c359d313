"""Glow's conditional prior of the factored halves, with every split: brute force and exactness.

The log-likelihood of a :class:`ContributionMultiscaleFlow` with ``prior="conditional"`` and
non-zero prior weights is compared, on 1x4x4 and 1x8x8 float64 inputs, with the autograd
Jacobian of the whole data-to-noise map plus the standard normal (``transform_log_prob``).
"""

from __future__ import annotations

import math

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from test_multiscale import IMAGE_CASES, _Linear, build, glow_factory
from test_splits import SPLITS

from lcma_ext import ContributionMultiscaleFlow, build_multiscale_transform
from lcma_ext import splits as S
from lcma_ext import transforms as T
from lcma_ext.multiscale import build_levels

from brute_force import transform_log_prob

pytestmark = pytest.mark.usefixtures("float64")


def _build(
    name: str, placement: str, shape: tuple[int, ...], num_levels: int, prior: str = "conditional"
) -> ContributionMultiscaleFlow:
    return build(name, placement, shape, num_levels, prior=prior)


def _randomise(flow: ContributionMultiscaleFlow, seed: int = 1, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prior in filter(None, flow.priors):
            for parameter in prior.parameters():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("name", SPLITS)
@pytest.mark.parametrize("placement", S.PLACEMENTS)
@pytest.mark.parametrize(("shape", "num_levels"), IMAGE_CASES)
def test_log_prob_equals_brute_force_with_any_split(
    name: str, placement: str, shape: tuple[int, ...], num_levels: int
) -> None:
    transform = _build(name, placement, shape, num_levels)
    _randomise(transform)
    assert all(isinstance(p, T.ConditionalGaussianPrior) for p in transform.priors)
    flow = Flow(transform, StandardNormal([math.prod(shape)]))
    x = torch.randn(2, *shape)
    torch.testing.assert_close(
        flow.log_prob(x), transform_log_prob(transform, x), rtol=1e-9, atol=1e-9
    )
    z, logabsdet = transform(x)
    x_back, inverse_logabsdet = transform.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-10, atol=1e-10)
    # per-dimension protocol: the prior adds -log sigma on its factored dimensions
    outputs, _, diag = transform.forward_with_diag(x)
    torch.testing.assert_close(outputs, z, rtol=0, atol=0)
    torch.testing.assert_close(diag.sum(1), logabsdet, rtol=1e-10, atol=1e-10)
    standard = _build(name, placement, shape, num_levels, prior="standard")
    _, _, standard_diag = standard.forward_with_diag(x)
    level_out, _ = transform._transforms[0](x)
    factored, kept = transform.splits[0](level_out)
    _, log_scale = transform.priors[0].mean_and_log_scale(kept)
    size = factored[0].numel()
    torch.testing.assert_close(
        diag[:, :size] - standard_diag[:, :size], -log_scale.reshape(2, -1), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", SPLITS)
def test_zero_initialised_prior_is_the_standard_flow(name: str) -> None:
    conditional = _build(name, "post_squeeze", (1, 8, 8), 3)
    standard = _build(name, "post_squeeze", (1, 8, 8), 3, prior="standard")
    x = torch.randn(3, 1, 8, 8)
    for a, b in zip(conditional(x), standard(x)):
        assert torch.equal(a, b)
    z = torch.randn(3, 64)
    for a, b in zip(conditional.inverse(z), standard.inverse(z)):
        assert torch.equal(a, b)


def test_sampling_draws_the_factored_half_from_its_conditional() -> None:
    transform = _build("lcma", "post_squeeze", (1, 8, 8), 3)
    _randomise(transform, scale=0.1)
    z = transform(torch.randn(4, 1, 8, 8))[0].detach()  # latents of moderate size
    size = transform._output_shapes[0]
    z[:, : math.prod(size)] = 0.0  # the mode of split 0's factored half given its kept half
    x = transform.inverse(z)[0]
    factored, kept = transform.splits[0](transform._transforms[0](x)[0])
    mean, log_scale = transform.priors[0].mean_and_log_scale(kept)
    assert log_scale.abs().max() > 0.01  # a real conditional, not the standard normal
    torch.testing.assert_close(factored, mean, rtol=1e-9, atol=1e-9)
    # with unit noise the factored half is mean + sigma * eps
    eps = torch.randn(4, *size)
    z[:, : math.prod(size)] = eps.reshape(4, -1)
    factored, kept = transform.splits[0](transform._transforms[0](transform.inverse(z)[0])[0])
    mean, log_scale = transform.priors[0].mean_and_log_scale(kept)
    torch.testing.assert_close(factored, mean + eps * log_scale.exp(), rtol=1e-9, atol=1e-9)


def test_vector_data() -> None:
    torch.manual_seed(0)

    def factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
        mask = torch.tensor([1 if i % 2 else -1 for i in range(shape[0])])
        return T.CompositeTransform(
            [T.LULinear(shape[0], identity_init=False), T.AffineCouplingTransform(mask, _Linear)]
        )

    levels = build_levels(factory, (7,), 2)
    transform = ContributionMultiscaleFlow.from_levels(
        levels, (7,), [S.ChannelSplit()], "conditional"
    )
    _randomise(transform)
    assert transform.priors[0].factored_shape == (4,) and transform.priors[0].kept_shape == (3,)
    x = torch.randn(3, 7)
    flow = Flow(transform, StandardNormal([7]))
    torch.testing.assert_close(
        flow.log_prob(x), transform_log_prob(transform, x), rtol=1e-9, atol=1e-9
    )


def test_pipeline_prior_per_split_point_and_state_dict() -> None:
    factory = glow_factory("post_squeeze")
    flow = build_multiscale_transform(
        factory, (1, 8, 8), 3, "checkerboard", prior=["conditional", "standard"]
    )
    assert isinstance(flow.priors[0], T.ConditionalGaussianPrior) and flow.priors[1] is None
    _randomise(flow)
    again = build_multiscale_transform(
        factory, (1, 8, 8), 3, "checkerboard", prior=["conditional", "standard"]
    )
    again.load_state_dict(flow.state_dict())
    x = torch.randn(2, 1, 8, 8)
    for a, b in zip(flow(x), again(x)):
        assert torch.equal(a, b)
    standard = build_multiscale_transform(factory, (1, 8, 8), 3, "checkerboard")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        standard.load_state_dict(flow.state_dict())


def test_errors_are_clear() -> None:
    factory = glow_factory("post_squeeze")
    with pytest.raises(ValueError, match="expected prior in"):
        build_multiscale_transform(factory, (1, 8, 8), 3, prior="glow")
    with pytest.raises(ValueError, match="expected 2 priors"):
        build_multiscale_transform(factory, (1, 8, 8), 3, prior=["conditional"])
    level = factory(0, (1, 8, 8))
    flow = ContributionMultiscaleFlow(1)
    with pytest.raises(ValueError, match="prior='standard' for the last transform"):
        flow.add_transform(level, (4, 4, 4), prior="conditional")
    flow = ContributionMultiscaleFlow(2)
    with pytest.raises(ValueError, match="same kind and spatial size"):
        T.ConditionalGaussianPrior((2, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match=r"expected a prior for halves \(2, 4, 4\)"):
        flow.add_transform(level, (4, 4, 4), prior=T.ConditionalGaussianPrior((3, 4, 4), (1, 4, 4)))
    prior = T.ConditionalGaussianPrior((2, 4, 4), (2, 4, 4))
    with pytest.raises(ValueError, match="expected kept of event shape"):
        prior(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="odd positive int kernel_size"):
        T.ConditionalGaussianPrior((2, 4, 4), (2, 4, 4), kernel_size=2)
