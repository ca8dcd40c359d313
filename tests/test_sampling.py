"""lcma_ext.sampling: temperature 0 is the mode, the latent std scales with T, interpolations.

Flows: nflows multi-scale flows of test_multiscale.build with Glow's conditional prior (random
prior weights, so the conditionals are real ones) and a normflows LCMA model, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import normflows as nf
import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from test_multiscale import build

from lcma_ext import normflows as lnf
from lcma_ext.data import LogitPreprocessing
from lcma_ext.sampling import decode, encode, interpolate, sample, sample_images

SHAPE = (1, 8, 8)
D = math.prod(SHAPE)


pytestmark = pytest.mark.usefixtures("float64")


def _randomise(modules: Iterable[torch.nn.Module | None], scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prior in filter(None, modules):
            for parameter in prior.parameters():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def _flow(prior: str = "conditional") -> Flow:
    transform = build("lcma", "post_squeeze", SHAPE, 3, prior=prior)
    _randomise(transform.priors)
    return Flow(transform, StandardNormal([D]))


def _normflows_model() -> lnf.MultiscaleFlow:
    def level(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
        c = 4 * shape[0]
        return [nf.flows.GlowBlock(c, 8, init_zeros=False), nf.flows.Squeeze()]

    torch.manual_seed(0)
    model = lnf.build_multiscale_model(level, SHAPE, 3, "checkerboard", prior="conditional")
    model.log_prob(torch.randn(8, *SHAPE))  # ActNorm's data-dependent initialization
    _randomise(model.priors)
    with torch.no_grad():  # non-standard bases: loc and log_scale matter
        for base in model.q0:
            base.loc.normal_(0, 0.2)
            base.log_scale.normal_(0, 0.2)
    return model


def _chunks(flow: Flow, z: torch.Tensor) -> list[torch.Tensor]:
    """Each level's factored half and the last level's output, flattened."""
    sizes = [math.prod(shape) for shape in flow._transform._output_shapes]
    return list(torch.split(z, sizes, dim=1))


# --- temperature ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", ["standard", "conditional"])
def test_temperature_zero_gives_the_mode(prior: str) -> None:
    flow = _flow(prior)
    with torch.no_grad():
        mode = flow._transform.inverse(torch.zeros(1, D))[0]
    samples = sample(flow, 3, 0.0, seed=5)
    torch.testing.assert_close(samples, mode.expand(3, *SHAPE), rtol=0, atol=1e-12)
    preprocessing = LogitPreprocessing(17)
    images = sample(flow, 3, 0, preprocessing=preprocessing)
    torch.testing.assert_close(images, preprocessing.to_unit(mode).expand(3, *SHAPE))


def test_temperature_zero_gives_the_mode_of_a_normflows_model() -> None:
    model = _normflows_model()
    with torch.no_grad():
        mode = model.forward_and_log_det([base.loc for base in model.q0])[0]
    torch.testing.assert_close(sample(model, 2, 0.0), mode.expand(2, *SHAPE), rtol=0, atol=1e-12)


def _five_standard_errors(values: torch.Tensor, temperature: float) -> tuple[float, float]:
    """|std - T| and its bound, 5 standard errors of a normal sample's std: 5 T / sqrt(2 n)."""
    return abs(float(values.std()) - temperature), 5 * temperature / math.sqrt(2 * values.numel())


@pytest.mark.parametrize("temperature", [0.4, 0.9])
def test_temperature_scales_every_latent_including_each_factored_half(temperature: float) -> None:
    flow = _flow()
    x = sample(flow, 1500, temperature, seed=0)
    with torch.no_grad():
        z = flow._transform(x)[0]
    for index, chunk in enumerate(_chunks(flow, z)):  # split 0, split 1, the last level
        error, bound = _five_standard_errors(chunk, temperature)
        assert error < bound, (index, error, bound)
        assert abs(float(chunk.mean())) < 5 * temperature / math.sqrt(chunk.numel()), index
    # the conditional prior: split 0's factored half is mu(k) + T sigma(k) eps given its kept half
    noise = temperature * torch.randn(
        (1500, D), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    transform = flow._transform
    with torch.no_grad():
        factored, kept = transform.splits[0](transform._transforms[0](x)[0])
        mean, log_scale = transform.priors[0].mean_and_log_scale(kept)
    eps = noise[:, : factored[0].numel()].reshape(factored.shape)
    assert log_scale.abs().max() > 0.01
    # the random test flow sends a few samples far out (|x| ~ 1e6), where the round trip
    # through level 0 loses digits; the others are compared to 1e-9
    moderate = x.flatten(1).abs().amax(1) < 1e3
    assert moderate.sum() > 1000
    torch.testing.assert_close(
        (factored - mean)[moderate], (log_scale.exp() * eps)[moderate], rtol=0, atol=1e-9
    )


def test_temperature_scales_the_standardised_latents_of_a_normflows_model() -> None:
    model = _normflows_model()
    temperature = 0.6
    eps = encode(model, sample(model, 600, temperature, seed=1))
    error, bound = _five_standard_errors(eps, temperature)
    assert error < bound


def test_sample_images_is_sample_with_the_runners_noise() -> None:
    flow = _flow()
    preprocessing = LogitPreprocessing(17)
    noise = 0.7 * torch.randn((5, D), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = preprocessing.to_unit(flow._transform.inverse(noise)[0])
    assert torch.equal(sample_images(flow, preprocessing, 5, 0.7, seed=3), expected)


def test_seeds_and_the_global_random_state() -> None:
    flow = _flow()
    flow.train()
    state = torch.random.get_rng_state()
    first, again = sample(flow, 4, seed=2), sample(flow, 4, seed=2)
    assert torch.equal(first, again) and not torch.equal(first, sample(flow, 4, seed=3))
    assert torch.equal(torch.random.get_rng_state(), state)  # own generator
    assert flow.training  # the mode is restored
    torch.manual_seed(9)
    global_draw = sample(flow, 4)
    torch.manual_seed(9)
    assert torch.equal(sample(flow, 4), global_draw)


# --- interpolation -------------------------------------------------------------------------------


def _pair(flow: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(6, D, generator=generator)
    x = decode(flow, z)
    return x[:3], x[3:]


@pytest.mark.parametrize("mode", ["linear", "spherical"])
def test_interpolation_ends_at_the_reconstructions(mode: str) -> None:
    flow = _flow()
    x0, x1 = _pair(flow)
    path = interpolate(flow, x0, x1, 6, mode)
    assert path.shape == (3, 6, *SHAPE)
    reconstruct = lambda x: decode(flow, encode(flow, x))  # noqa: E731
    # the reconstructions to float precision (a batch of B * steps is not bit-identical to B)
    torch.testing.assert_close(path[:, 0], reconstruct(x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path[:, -1], reconstruct(x1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path[:, 0], x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(path[:, -1], x1, rtol=0, atol=1e-10)
    preprocessing = LogitPreprocessing(17)
    images = interpolate(flow, x0, x1, 6, mode, preprocessing=preprocessing)
    torch.testing.assert_close(images, preprocessing.to_unit(path))


def test_spherical_norms_go_linearly_and_the_angle_evenly() -> None:
    flow = _flow()
    x0, x1 = _pair(flow, seed=1)
    steps = 7
    t = torch.linspace(0, 1, steps)
    z0, z1 = encode(flow, x0), encode(flow, x1)
    latents = encode(flow, interpolate(flow, x0, x1, steps, "spherical").flatten(0, 1))
    latents = latents.view(3, steps, D)
    norms = latents.norm(dim=2)
    expected = (1 - t) * z0.norm(dim=1, keepdim=True) + t * z1.norm(dim=1, keepdim=True)
    torch.testing.assert_close(norms, expected, rtol=0, atol=1e-8)
    unit = latents / norms.unsqueeze(2)
    angles = torch.arccos((unit[:, 1:] * unit[:, :-1]).sum(2).clamp(-1, 1))  # (3, steps - 1)
    torch.testing.assert_close(angles, angles[:, :1].expand_as(angles), rtol=0, atol=1e-6)
    # the linear path cuts through the low-norm interior (random latents are near-orthogonal)
    linear = encode(flow, interpolate(flow, x0, x1, steps, "linear").flatten(0, 1))
    middle = linear.view(3, steps, D)[:, steps // 2].norm(dim=1)
    assert (middle < 0.85 * norms[:, steps // 2]).all()


def test_interpolation_of_a_normflows_model_ends_at_its_data() -> None:
    model = _normflows_model()
    x = model.sample(4)[0].detach()
    path = interpolate(model, x[:2], x[2:], 4, "spherical")
    torch.testing.assert_close(path[:, 0], x[:2], rtol=0, atol=1e-9)
    torch.testing.assert_close(path[:, -1], x[2:], rtol=0, atol=1e-9)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f, x: sample(f, 2, -0.5), "expected temperature as a finite number >= 0; got -0.5"),
        (lambda f, x: sample(f, 2, math.nan), "expected temperature as a finite number >= 0"),
        (lambda f, x: sample(f, 0), "expected num as an integer >= 1; got 0"),
        (lambda f, x: interpolate(f, x, x, 1), "expected steps as an integer >= 2; got 1"),
        (lambda f, x: interpolate(f, x, x[:2], 3), "expected x0 and x1 of the same shape"),
        (lambda f, x: interpolate(f, x[0, 0, 0], x[0, 0, 0], 3), r"\*event_shape\); got \(8,\)"),
        (lambda f, x: interpolate(f, x, x, 3, "cubic"), "expected mode in linear, spherical"),
    ],
)
def test_bad_input_says_what_was_expected(
    call: Callable[[torch.nn.Module, torch.Tensor], object], message: str
) -> None:
    flow = _flow()
    x = torch.randn(3, *SHAPE)
    with pytest.raises(ValueError, match=message) as info:
        call(flow, x)
    assert "; got " in str(info.value)


def test_a_normflows_model_needs_gaussian_bases() -> None:
    model = _normflows_model()
    model.q0[0] = nf.distributions.UniformGaussian(D, [0])
    with pytest.raises(TypeError, match="expected normflows DiagGaussian base distributions"):
        sample(model, 2)
