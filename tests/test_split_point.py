"""The one split-point step (SplitPoint) and the one level walk (walk_levels).

SplitPoint is checked against brute force: the autograd Jacobian of the data-to-noise map
``x -> (factored, kept)`` of every split kind, with and without a randomised conditional prior,
its slogdet and its diagonal. The walk's shapes are checked against the tensors that actually
run through built levels and splits. States saved by lcma_ext before the split points were
modules (tests/data/state_d3b381b.pt, written by commit d3b381b) still load and give the same
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import normflows as nf
import pytest
import torch

from lcma_ext import normflows as lnf
from lcma_ext import splits as S
from lcma_ext import transforms as T
from lcma_ext.models import make_level_factory
from lcma_ext.multiscale import (
    ContributionMultiscaleFlow,
    SplitPoint,
    build_levels,
    walk_levels,
)
from lcma_ext.pipeline import build_multiscale_transform, build_nms_transform

from brute_force import jacobian, slogdet

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _split(name: str, shape: tuple[int, ...]) -> S.Split:
    generator = torch.Generator().manual_seed(2)
    if name == "channel":
        return S.ChannelSplit()
    if name == "lcma":
        return S.LCMASplit(torch.randn(shape, generator=generator))
    return S.make_split(name, shape, seed=4)


def _randomise(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.4 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("prior", ["standard", "conditional"])
@pytest.mark.parametrize("name", ["channel", "checkerboard", "random", "lcma"])
def test_split_point_against_brute_force(name: str, prior: str) -> None:
    shape = (8, 2, 2)
    point = SplitPoint.build(_split(name, shape), shape, prior)
    assert (point.factored_shape, point.kept_shape) == ((4, 2, 2), (4, 2, 2))
    _randomise(point)  # a conditional prior's mean and scale now depend on the kept half
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    factored, kept, logabsdet = point(x)

    def step(batch: torch.Tensor) -> torch.Tensor:
        out = point(batch)
        return torch.cat([out.factored.flatten(1), out.kept.flatten(1)], 1)

    source = torch.cat([t.flatten(1) for t in point.carry(torch.arange(32).view(1, *shape))], 1)
    diag = point.forward_with_diag(x, torch.zeros_like(x))
    for b in range(3):
        jac = jacobian(step, x[b])
        sign, expected = slogdet(jac)
        assert sign != 0
        assert math.isclose(float(logabsdet[b].detach()), expected, rel_tol=1e-12, abs_tol=1e-12)
        # output q is carried from input source[q]; the map is block-triangular in that order
        own = torch.log(jac[torch.arange(32), source[0]].abs())
        entries = torch.cat([diag.factored_diag[b].flatten(), diag.kept_diag[b].flatten()])
        torch.testing.assert_close(entries, own, rtol=1e-12, atol=1e-12)
    if prior == "standard":
        assert torch.equal(logabsdet, torch.zeros(3))
        assert torch.equal(
            torch.cat([factored.flatten(1), kept.flatten(1)], 1), x.flatten(1)[:, source[0]]
        )
    assert all(torch.equal(a, b) for a, b in zip(diag[:3], (factored, kept, logabsdet)))
    back, inverse_logabsdet = point.inverse(factored, kept)
    torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-12, atol=1e-12)


def test_split_point_errors() -> None:
    with pytest.raises(TypeError, match=r"expected a lcma_ext\.splits\.Split; got str"):
        SplitPoint("channel")
    with pytest.raises(TypeError, match=r"expected a lcma_ext\.splits\.Split; got str"):
        SplitPoint.build("channel", (8, 2, 2), "conditional")
    with pytest.raises(TypeError, match="expected prior=None or a ConditionalGaussianPrior"):
        SplitPoint(S.ChannelSplit(), "conditional")
    with pytest.raises(ValueError, match="expected prior in"):
        SplitPoint.build(S.ChannelSplit(), (8, 2, 2), "glow")
    with pytest.raises(ValueError, match=r"expected a prior for halves \(4, 2, 2\)"):
        SplitPoint(S.ChannelSplit(), T.ConditionalGaussianPrior((2, 2, 2), (6, 2, 2)), (8, 2, 2))
    unbound = SplitPoint(S.ChannelSplit())
    assert unbound.input_shape is None and unbound.kept_shape is None


def test_nflows_and_normflows_take_the_same_step() -> None:
    shape = (8, 2, 2)
    point = SplitPoint.build(_split("lcma", shape), shape, "conditional")
    _randomise(point)
    merge = lnf.SplitMerge(point.split, point.prior)
    assert isinstance(merge.point, SplitPoint) and merge.split is point.split
    x = torch.randn(4, *shape)
    (kept, factored), log_det = merge.inverse(x)
    ours = point(x)
    assert torch.equal(kept, ours.kept) and torch.equal(factored, ours.factored)
    assert torch.equal(log_det, ours.logabsdet)
    flow = ContributionMultiscaleFlow(2)
    flow.add_transform(T.ActNorm(8), shape, point.split, point.prior)
    flow.add_transform(T.ActNorm(4), (4, 2, 2))
    assert flow.points[0].split is point.split and flow.points[0].prior is point.prior


# --- the level walk ---------------------------------------------------------------------------


@pytest.mark.parametrize("placement", S.PLACEMENTS)
def test_walk_shapes_are_the_shapes_that_run(placement: str) -> None:
    def factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
        layers = [T.SqueezeTransform()] if placement == "post_squeeze" else []
        channels = 4 * shape[0] if placement == "post_squeeze" else shape[0]
        return T.CompositeTransform([*layers, T.ActNorm(channels)])

    torch.manual_seed(0)
    levels = build_levels(factory, (2, 8, 8), 3, placement)
    steps = list(walk_levels(levels, (2, 8, 8), placement=placement))
    x = torch.randn(2, 2, 8, 8)
    for step, level in zip(steps, levels, strict=True):
        assert step.level is level and tuple(x.shape[1:]) == step.input_shape
        out = level(x)[0]
        assert tuple(out.shape[1:]) == step.output_shape
        assert torch.equal(
            step.positions, level.carry(torch.arange(x[0].numel()).view(1, *x.shape[1:]))[0]
        )
        if not step.is_split_point:
            assert step.factored_shape is None
            break
        factored, x = S.CheckerboardSplit(step.output_shape, placement)(out)
        assert (tuple(factored.shape[1:]), tuple(x.shape[1:])) == (
            step.factored_shape,
            step.kept_shape,
        )
    # the same walk over the levels' rearrangements, and the NMS walk
    for got, step in zip(
        walk_levels([s.positions for s in steps], (2, 8, 8), placement=placement), steps
    ):
        assert torch.equal(got.positions, step.positions)
    torch.manual_seed(0)
    nms = build_nms_transform(factory, (2, 8, 8), 3, placement)
    x = torch.randn(2, 2, 8, 8)
    for step, level in zip(
        walk_levels(factory, (2, 8, 8), 3, placement, multiscale=False), nms._transforms
    ):
        assert tuple(x.shape[1:]) == step.input_shape and step.kept_shape is None
        x = level(x)[0]
    assert tuple(x.shape[1:]) == ((128, 1, 1) if placement == "post_squeeze" else (32, 2, 2))


def test_walk_counts_and_endless_factory() -> None:
    factory = make_level_factory("realnvp", "tiny")
    with pytest.raises(ValueError, match="expected 2 levels; got 3"):
        list(walk_levels(build_levels(factory, (1, 8, 8), 3), (1, 8, 8), 2))
    calls = []

    def counting(index: int, shape: tuple[int, ...]) -> T.SqueezeTransform:
        calls.append((index, shape))
        return T.SqueezeTransform()

    for step in walk_levels(counting, (1, 8, 8)):  # no count: levels until stopped
        if step.index == 1:
            break
    assert calls == [(0, (1, 8, 8)), (1, (2, 4, 4))]
    with pytest.raises(ValueError, match="expected placement"):
        next(walk_levels(counting, (1, 8, 8), placement="middle"))


def test_from_levels_walks_splits_of_other_shapes() -> None:
    # ChannelSplit along the height (nflows' split_dim=2): the next level gets (4, 1, 2)
    levels = [T.ActNorm(4), T.ActNorm(4)]
    flow = ContributionMultiscaleFlow.from_levels(levels, (4, 2, 2), [S.ChannelSplit(dim=2)])
    assert flow.output_shapes == [(4, 1, 2), (4, 1, 2)]


# --- states saved before the split points were modules ----------------------------------------


def _nflows_level(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
    c = 4 * shape[0]
    return T.CompositeTransform([T.SqueezeTransform(), T.ActNorm(c), T.OneByOneConvolution(c)])


def _normflows_level(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
    c = 4 * shape[0]
    return [nf.flows.ActNorm((c, 1, 1)), nf.flows.Invertible1x1Conv(c), nf.flows.Squeeze()]


def _contribution_map() -> torch.Tensor:
    return torch.arange(16, dtype=torch.float64).view(4, 2, 2).flip(0) % 5


def test_states_saved_before_split_points_still_load() -> None:
    saved = torch.load(DATA / "state_d3b381b.pt", weights_only=False)
    assert any(key.startswith("_splits.0.") for key in saved["nflows_state"])  # the old form
    assert any(key.startswith("merges.0.prior.") for key in saved["normflows_state"])
    x = saved["x"]
    torch.manual_seed(11)  # other weights than the saved ones
    levels = build_levels(_nflows_level, (1, 4, 4), 2)
    ours = ContributionMultiscaleFlow.from_levels(
        levels, (1, 4, 4), [S.LCMASplit(_contribution_map())], prior="conditional"
    )
    ours.load_state_dict(saved["nflows_state"])
    z, logabsdet = ours(x)
    torch.testing.assert_close(z, saved["nflows_z"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logabsdet, saved["nflows_logabsdet"], rtol=1e-12, atol=1e-12)
    assert any(key.startswith("_points.0.prior.") for key in ours.state_dict())

    model = lnf.build_multiscale_model(
        _normflows_level, (1, 4, 4), 2, "lcma", [_contribution_map()], prior="conditional"
    )
    model.load_state_dict(saved["normflows_state"])
    torch.testing.assert_close(
        model.log_prob(x), saved["normflows_log_prob"], rtol=1e-12, atol=1e-12
    )
    # a saved state of the other prior is still refused
    standard = lnf.build_multiscale_model(
        _normflows_level, (1, 4, 4), 2, "lcma", [_contribution_map()]
    )
    with pytest.raises(RuntimeError, match="Unexpected key"):
        standard.load_state_dict(saved["normflows_state"])


def test_flow_built_by_the_builder_holds_split_points() -> None:
    factory = make_level_factory("glow", "tiny")
    flow = build_multiscale_transform(factory, (1, 8, 8), 3, "random", prior="conditional")
    assert all(isinstance(point, SplitPoint) for point in flow.points)
    assert [p.split for p in flow.points] == flow.splits
    assert [p.prior for p in flow.points] == flow.priors
    assert flow.output_shapes == [(2, 4, 4), (4, 2, 2), (16, 1, 1)]
