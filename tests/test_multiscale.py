"""ContributionMultiscaleFlow: brute-force likelihood, exactness, nflows equivalence, state_dict.

Every split of the registry in test_splits.py, both placements, 1x4x4 and 1x8x8 float64 inputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import MultiscaleCompositeTransform
from test_splits import SPLITS
from torch import nn

from lcma_ext import ContributionMultiscaleFlow
from lcma_ext import splits as S
from lcma_ext import transforms as T
from lcma_ext.multiscale import build_levels, level_output_shape

from brute_force import jacobian_by_copies, transform_log_prob

pytestmark = pytest.mark.usefixtures("float64")


class _ConvNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class _Linear(nn.Linear):
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def _actnorm(channels: int) -> T.ActNorm:
    actnorm = T.ActNorm(channels)
    with torch.no_grad():
        actnorm.initialized.fill_(True)
        actnorm.log_scale.normal_(0.0, 0.3)
        actnorm.shift.normal_()
    return actnorm


def glow_factory(placement: str) -> Callable[[int, tuple[int, ...]], T.CompositeTransform]:
    """Small Glow-like levels: [squeeze], ActNorm, 1x1 conv, affine coupling (random weights)."""

    def factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
        layers: list[nn.Module] = []
        if placement == "post_squeeze":
            layers.append(T.SqueezeTransform())
            shape = (4 * shape[0], shape[1] // 2, shape[2] // 2)
        channels = shape[0]
        layers.append(_actnorm(channels))
        if channels >= 2:
            mask = torch.tensor([1 if i % 2 else -1 for i in range(channels)])
            layers.append(T.OneByOneConvolution(channels, identity_init=False))
            layers.append(T.AffineCouplingTransform(mask, _ConvNet))
        return T.CompositeTransform(layers)

    return factory


def build(
    name: str,
    placement: str,
    shape: tuple[int, ...],
    num_levels: int,
    seed: int = 0,
    prior: str = "standard",
) -> ContributionMultiscaleFlow:
    torch.manual_seed(seed)
    levels = build_levels(glow_factory(placement), shape, num_levels, placement)
    generator = torch.Generator().manual_seed(seed)
    splits, current = [], tuple(shape)
    for level in levels[:-1]:
        out = level_output_shape(level, current)
        splits.append(SPLITS[name](out, placement, generator))
        current = S.kept_shape(out, placement)
    return ContributionMultiscaleFlow.from_levels(levels, shape, splits, prior)


IMAGE_CASES = [((1, 4, 4), 2), ((1, 8, 8), 3)]


def test_batched_jacobian_matches_autograd_functional() -> None:
    transform = build("lcma", "post_squeeze", (1, 4, 4), 2)
    x = torch.randn(1, 4, 4)
    expected = torch.autograd.functional.jacobian(
        lambda flat: transform(flat.view(1, 1, 4, 4))[0].reshape(-1), x.reshape(-1)
    )
    torch.testing.assert_close(
        jacobian_by_copies(lambda batch: transform(batch)[0], x), expected, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("name", SPLITS)
@pytest.mark.parametrize("placement", S.PLACEMENTS)
@pytest.mark.parametrize(("shape", "num_levels"), IMAGE_CASES)
def test_log_prob_equals_brute_force_change_of_variables(
    name: str, placement: str, shape: tuple[int, ...], num_levels: int
) -> None:
    transform = build(name, placement, shape, num_levels)
    dimension = math.prod(shape)
    flow = Flow(transform, StandardNormal([dimension]))
    x = torch.randn(2, *shape)
    log_prob = flow.log_prob(x)
    torch.testing.assert_close(log_prob, transform_log_prob(transform, x), rtol=1e-9, atol=1e-9)

    # inverse(forward(x)) == x and the inverse log-det is minus the forward one
    z, logabsdet = transform(x)
    assert z.shape == (2, dimension)
    x_back, inverse_logabsdet = transform.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-10, atol=1e-10)

    # sampling works and agrees with log_prob
    samples, sample_log_prob = flow.sample_and_log_prob(3)
    assert samples.shape == (3, *shape) and torch.isfinite(samples).all()
    torch.testing.assert_close(flow.log_prob(samples), sample_log_prob, rtol=1e-8, atol=1e-8)

    # per-dimension protocol: same outputs, diag sums to the log-det
    outputs, logabsdet_diag, diag = transform.forward_with_diag(x)
    assert torch.equal(outputs, z) and torch.equal(logabsdet_diag, logabsdet)
    torch.testing.assert_close(diag.sum(1), logabsdet, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SPLITS)
def test_vector_data(name: str) -> None:
    torch.manual_seed(0)
    features = 6

    def factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
        mask = torch.tensor([1 if i % 2 else -1 for i in range(shape[0])])
        return T.CompositeTransform(
            [
                T.LULinear(shape[0], identity_init=False),
                T.AffineCouplingTransform(mask, _Linear),
            ]
        )

    levels = build_levels(factory, (features,), 2)
    split = SPLITS[name]((features,), "post_squeeze", torch.Generator().manual_seed(0))
    transform = ContributionMultiscaleFlow.from_levels(levels, (features,), [split])
    flow = Flow(transform, StandardNormal([features]))
    x = torch.randn(3, features)
    torch.testing.assert_close(
        flow.log_prob(x), transform_log_prob(transform, x), rtol=1e-9, atol=1e-9
    )
    torch.testing.assert_close(transform.inverse(transform(x)[0])[0], x, rtol=1e-10, atol=1e-10)


def test_carry_matches_forward_on_rearrangements() -> None:
    def factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
        squeezed = 4 * shape[0]
        return T.CompositeTransform([T.SqueezeTransform(), T.RandomPermutation(squeezed, dim=1)])

    torch.manual_seed(3)
    levels = build_levels(factory, (1, 8, 8), 3)
    generator = torch.Generator().manual_seed(5)
    splits, shape = [], (1, 8, 8)
    for level in levels[:-1]:
        out = level_output_shape(level, shape)
        splits.append(SPLITS["lcma"](out, "post_squeeze", generator))
        shape = S.kept_shape(out, "post_squeeze")
    transform = ContributionMultiscaleFlow.from_levels(levels, (1, 8, 8), splits)
    index = torch.arange(64).view(1, 1, 8, 8)
    assert torch.equal(transform.carry(index).double(), transform(index.double())[0])


@pytest.mark.parametrize(("shape", "num_levels"), IMAGE_CASES)
def test_channel_split_equals_nflows_multiscale(shape: tuple[int, ...], num_levels: int) -> None:
    ours = build("channel", "post_squeeze", shape, num_levels)
    theirs = MultiscaleCompositeTransform(num_levels)
    current = shape
    for level in ours._transforms:
        level = copy.deepcopy(level)
        current = theirs.add_transform(level, level_output_shape(level, current))
    # same parameter names: the channel split holds no state
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    assert ours._output_shapes == theirs._output_shapes
    x = torch.randn(4, *shape)
    z_ours, logabsdet_ours = ours(x)
    z_theirs, logabsdet_theirs = theirs(x)
    assert torch.equal(z_ours, z_theirs)
    assert torch.equal(logabsdet_ours, logabsdet_theirs)
    x_ours, inverse_ours = ours.inverse(z_ours)
    x_theirs, inverse_theirs = theirs.inverse(z_ours)
    assert torch.equal(x_ours, x_theirs) and torch.equal(inverse_ours, inverse_theirs)


def test_channel_split_equals_nflows_with_split_dim_and_float32() -> None:
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    levels = [T.ActNorm(6), T.ActNorm(3)]
    for level in levels:
        with torch.no_grad():
            level.initialized.fill_(True)
            level.log_scale.normal_()
    ours = ContributionMultiscaleFlow(2)
    theirs = MultiscaleCompositeTransform(2)
    assert ours.add_transform(levels[0], (6,)) == theirs.add_transform(levels[0], (6,)) == (3,)
    ours.add_transform(levels[1], (3,))
    theirs.add_transform(levels[1], (3,))
    x = torch.randn(5, 6)
    assert ours(x)[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(ours(x), theirs(x)))


@pytest.mark.parametrize("name", ["lcma", "random", "checkerboard"])
def test_state_dict_round_trip(name: str) -> None:
    first = build(name, "post_squeeze", (1, 8, 8), 3, seed=0)
    second = build(name, "post_squeeze", (1, 8, 8), 3, seed=1)  # other weights and maps
    x = torch.randn(3, 1, 8, 8)
    assert not torch.allclose(first(x)[0], second(x)[0])
    second.load_state_dict(first.state_dict())
    assert torch.equal(first(x)[0], second(x)[0])
    for a, b in zip(first.splits, second.splits):
        assert torch.equal(a.index, b.index)


def test_add_transform_errors() -> None:
    flow = ContributionMultiscaleFlow(2)
    level = T.ActNorm(8)
    with pytest.raises(TypeError, match=r"expected a lcma_ext\.splits\.Split"):
        flow.add_transform(level, (8, 2, 2), split="lcma")
    with pytest.raises(ValueError, match="divisible by 4"):
        flow.add_transform(level, (6, 2, 2), split=S.CheckerboardSplit())
    assert flow.add_transform(level, (8, 2, 2), split=S.CheckerboardSplit()) == (4, 2, 2)
    with pytest.raises(RuntimeError, match="expected exactly 2"):
        flow(torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match="expected split=None for the last"):
        flow.add_transform(T.ActNorm(4), (4, 2, 2), split=S.ChannelSplit())
    flow.add_transform(T.ActNorm(4), (4, 2, 2))
    with pytest.raises(RuntimeError, match="expected at most 2"):
        flow.add_transform(T.ActNorm(4), (4, 2, 2))
    with pytest.raises(ValueError, match="expected 32 features"):
        flow.inverse(torch.zeros(1, 31))
