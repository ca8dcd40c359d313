"""Glow's conditional prior in normflows models: brute force, exactness, sampling, errors.

``build_multiscale_model(..., prior="conditional")`` puts the core's
:class:`ConditionalGaussianPrior` into each split point's :class:`SplitMerge`. With non-zero
prior weights, ``log_prob`` is compared on 1x4x4 and 1x8x8 float64 inputs, for every split kind,
with the autograd Jacobian of the whole data-to-noise map (every latent, concatenated), its
slogdet and the standard normal.
"""

from __future__ import annotations

import normflows as nf
import pytest
import torch

from lcma_ext import normflows as lnf
from lcma_ext import transforms as T
from lcma_ext.contributions import ContributionMaps
from lcma_ext.splits import ChannelSplit, CheckerboardSplit, LCMASplit, RandomSplit

from brute_force import standard_normal_log_prob

TOL = 1e-9
#: Every split kind: the name given to the builder and the core split class it gives.
SPLIT_KINDS = {
    "channel": ChannelSplit,
    "checkerboard": CheckerboardSplit,
    "random": RandomSplit,
    "lcma": LCMASplit,
    "high": LCMASplit,
}
CASES = [((1, 4, 4), 2), ((1, 8, 8), 3)]


pytestmark = pytest.mark.usefixtures("float64")


def _glow_level(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
    """normflows' Glow example with random coupling weights: Glow steps, then the squeeze."""
    c = 4 * shape[0]
    return [nf.flows.GlowBlock(c, 8, split_mode="channel", init_zeros=False) for _ in range(2)] + [
        nf.flows.Squeeze()
    ]


def _standard_normal(shape: tuple[int, ...]) -> nf.distributions.DiagGaussian:
    return nf.distributions.DiagGaussian(shape, trainable=False)


def _data(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, shape[-1]).view(1, 1, 1, -1)
    return torch.randn(n, *shape, generator=generator) * (0.3 + ramp.abs()) + ramp


def _maps(shape: tuple[int, ...], num_levels: int) -> ContributionMaps:
    """Contributions of an untrained NMS model (enough for the LCMA split logic)."""
    torch.manual_seed(5)
    nms = lnf.build_nms_model(_glow_level, shape, num_levels)
    return lnf.estimate_model_contributions(nms, _data(16, shape), _glow_level, progress=False)


def _model(
    split: str,
    shape: tuple[int, ...],
    num_levels: int,
    prior: str = "conditional",
    maps: ContributionMaps | None = None,
) -> lnf.MultiscaleFlow:
    torch.manual_seed(0)
    model = lnf.build_multiscale_model(
        _glow_level, shape, num_levels, split, maps, seed=3, base=_standard_normal, prior=prior
    )
    model.log_prob(_data(8, shape))  # ActNorm's data-dependent initialization
    return model


def _randomise(model: lnf.MultiscaleFlow, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prior in filter(None, model.priors):
            for parameter in prior.parameters():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def _latents(model: nf.MultiscaleFlow, batch: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.flatten(1) for z in model.inverse_and_log_det(batch)[0]], 1)


@pytest.fixture(scope="module")
def maps_by_shape() -> dict[tuple[int, ...], ContributionMaps]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return {shape: _maps(shape, levels) for shape, levels in CASES}
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("split", SPLIT_KINDS)
@pytest.mark.parametrize(("shape", "num_levels"), CASES)
def test_log_prob_equals_brute_force_with_any_split(
    split: str,
    shape: tuple[int, ...],
    num_levels: int,
    maps_by_shape: dict[tuple[int, ...], ContributionMaps],
) -> None:
    model = _model(split, shape, num_levels, maps=maps_by_shape[shape])
    _randomise(model)
    priors = model.priors
    assert len(priors) == num_levels - 1
    assert all(isinstance(p, T.ConditionalGaussianPrior) for p in priors)
    assert all(type(m.split) is SPLIT_KINDS[split] for m in model.merges)
    x = _data(2, shape)
    with torch.no_grad():
        log_prob = model.log_prob(x)
    torch.testing.assert_close(
        log_prob,
        standard_normal_log_prob(lambda batch: _latents(model, batch), x),
        rtol=0,
        atol=TOL,
    )
    with torch.no_grad():
        z, log_det = model.inverse_and_log_det(x)
        x_back, log_det_back = model.forward_and_log_det(z)
        z_diag, log_det_diag, diags = model.inverse_and_log_det_with_diag(x)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_det_back, -log_det, rtol=0, atol=1e-10)
    # per-dimension protocol: the entries still sum to the log-det, prior included
    for got, expected in zip(z_diag, z, strict=True):
        assert torch.equal(got, expected)
    torch.testing.assert_close(log_det_diag, log_det, rtol=0, atol=1e-10)
    total = sum(diag.flatten(1).sum(1) for diag in diags)
    torch.testing.assert_close(total, log_det, rtol=0, atol=1e-10)


def test_the_prior_adds_minus_log_sigma_to_each_factored_dimension(
    maps_by_shape: dict[tuple[int, ...], ContributionMaps],
) -> None:
    shape, num_levels = CASES[1]
    conditional = _model("lcma", shape, num_levels, maps=maps_by_shape[shape])
    standard = _model("lcma", shape, num_levels, "standard", maps=maps_by_shape[shape])
    _randomise(conditional)
    x = _data(2, shape)
    with torch.no_grad():
        _, _, diags = conditional.inverse_and_log_det_with_diag(x)
        _, _, standard_diags = standard.inverse_and_log_det_with_diag(x)
        # split point 0 is merges[-1]; its data-side input is level 0's output
        hidden = x
        for flow in reversed(conditional.flows[-1]):
            hidden, _ = flow.inverse(hidden)
        _, kept = conditional.merges[-1].split(hidden)
        _, log_scale = conditional.priors[0].mean_and_log_scale(kept)
    assert log_scale.abs().max() > 0.01  # a real conditional, not the standard normal
    # z[-1] (and diag[-1]) is split point 0's factored half
    torch.testing.assert_close(diags[-1] - standard_diags[-1], -log_scale, rtol=0, atol=1e-12)


@pytest.mark.parametrize("split", SPLIT_KINDS)
def test_zero_initialised_prior_is_the_standard_model_exactly(
    split: str, maps_by_shape: dict[tuple[int, ...], ContributionMaps]
) -> None:
    shape, num_levels = CASES[1]
    conditional = _model(split, shape, num_levels, maps=maps_by_shape[shape])
    standard = _model(split, shape, num_levels, "standard", maps=maps_by_shape[shape])
    assert all(p is None for p in standard.priors)
    x = _data(3, shape)
    with torch.no_grad():
        assert torch.equal(conditional.log_prob(x), standard.log_prob(x))
        (z, log_det), (z_standard, log_det_standard) = (
            m.inverse_and_log_det(x) for m in (conditional, standard)
        )
        assert torch.equal(log_det, log_det_standard)
        assert all(torch.equal(a, b) for a, b in zip(z, z_standard, strict=True))
        back, back_standard = (m.forward_and_log_det(z)[0] for m in (conditional, standard))
    assert torch.equal(back, back_standard)


def test_sampling_draws_the_factored_half_from_its_conditional(
    maps_by_shape: dict[tuple[int, ...], ContributionMaps],
) -> None:
    shape, num_levels = CASES[1]
    model = _model("lcma", shape, num_levels, maps=maps_by_shape[shape])
    _randomise(model, scale=0.1)
    torch.manual_seed(4)
    with torch.no_grad():
        samples, sample_log_prob = model.sample(4)
        torch.testing.assert_close(model.log_prob(samples), sample_log_prob, rtol=0, atol=1e-9)
        z, _ = model.inverse_and_log_det(samples)
        eps = z[-1]  # split point 0's noise
        hidden = samples
        for flow in reversed(model.flows[-1]):
            hidden, _ = flow.inverse(hidden)
        factored, kept = model.merges[-1].split(hidden)
        mean, log_scale = model.priors[0].mean_and_log_scale(kept)
    assert log_scale.abs().max() > 0.01
    torch.testing.assert_close(factored, mean + log_scale.exp() * eps, rtol=0, atol=1e-9)


def test_state_dict_holds_the_priors(
    maps_by_shape: dict[tuple[int, ...], ContributionMaps],
) -> None:
    shape, num_levels = CASES[0]
    model = _model("checkerboard", shape, num_levels)
    _randomise(model)
    assert any(key.startswith("merges.0.point.prior.") for key in model.state_dict())
    again = _model("checkerboard", shape, num_levels)
    again.load_state_dict(model.state_dict())
    x = _data(2, shape)
    with torch.no_grad():
        assert torch.equal(again.log_prob(x), model.log_prob(x))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _model("checkerboard", shape, num_levels, "standard").load_state_dict(model.state_dict())


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="expected prior in"):
        lnf.build_multiscale_model(_glow_level, (1, 8, 8), 3, prior="glow")
    with pytest.raises(ValueError, match="expected 2 priors"):
        lnf.build_multiscale_model(_glow_level, (1, 8, 8), 3, prior=["conditional"])
    split = CheckerboardSplit((4, 4, 4))
    with pytest.raises(ValueError, match=r"expected a prior for halves \(2, 4, 4\)"):
        lnf.SplitMerge(split, T.ConditionalGaussianPrior((3, 4, 4), (1, 4, 4)))
    with pytest.raises(TypeError, match="expected prior=None or a ConditionalGaussianPrior"):
        lnf.SplitMerge(split, "conditional")
