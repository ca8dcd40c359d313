"""The library refuses what it cannot honour (issue 24, items 8-12), written as a user hits them.

8. A level factory given to the builders is used, whatever levels the maps hold in memory, so
   the LCMA flow's initial weights follow ``torch.manual_seed`` like every other split's.
9. ``add_transform(level, shape, split=LCMASplit(maps.maps[l]))`` with levels the maps do not
   belong to is refused, and the advice in the message works.
10. A class-conditional normflows model takes its labels (checked against brute force), and one
    without class conditioning refuses labels instead of ignoring them.
11. Raw integer images are refused by the contribution estimators, with advice that works.
12. ``log_prob`` of an empty batch has shape ``(0,)`` and initialises nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import normflows as nf
import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import Transform
from torch.utils.data import DataLoader, TensorDataset

from lcma_ext import (
    ContributionMultiscaleFlow,
    LCMASplit,
    build_multiscale_transform,
    build_nms_transform,
    estimate_contributions,
)
from lcma_ext import normflows as lnf
from lcma_ext import splits as S
from lcma_ext.contributions import ContributionMaps
from lcma_ext.data import LogitPreprocessing
from lcma_ext.models import build_flow, count_parameters, make_level_factory
from lcma_ext.multiscale import LevelFactory, build_levels, level_output_shape

from brute_force import jacobian, slogdet

SHAPE = (1, 8, 8)


def _images(n: int = 32) -> torch.Tensor:
    """Integer images with 17 grey levels, like the digits."""
    return torch.randint(0, 17, (n, *SHAPE), generator=torch.Generator().manual_seed(0))


def _data(n: int = 32) -> torch.Tensor:
    return LogitPreprocessing(17)(_images(n), generator=torch.Generator().manual_seed(1))[0]


def _maps(factory: LevelFactory) -> ContributionMaps:
    torch.manual_seed(0)
    nms = build_flow(build_nms_transform(factory, SHAPE, 3), SHAPE)
    return estimate_contributions(nms, _data(), factory, SHAPE, progress=False)


def _level_parameters(flow: ContributionMultiscaleFlow) -> list[torch.Tensor]:
    return [p.detach().clone() for level in flow.levels for p in level.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- 8: the factory is never ignored ----------------------------------------------------------


def test_the_builder_uses_the_factory_it_is_given() -> None:
    small = make_level_factory("glow", "tiny")
    maps = _maps(small)  # the maps hold the tiny levels in memory
    large = make_level_factory("glow", "tiny", hidden=48)
    flow = build_multiscale_transform(large, SHAPE, 3, "lcma", maps)
    channel = build_multiscale_transform(large, SHAPE, 3, "channel")
    measured = build_multiscale_transform(None, SHAPE, 3, "lcma", maps)  # the maps' own levels
    assert count_parameters(flow) == count_parameters(channel) > count_parameters(measured)
    # the contributions are mapped onto the new levels (their own 1x1-convolution permutations)
    tracked = maps.track(flow.levels, check=False)
    assert all(torch.equal(a.index, b.index) for a, b in zip(flow.splits, tracked.splits))
    assert math.isfinite(float(Flow(flow, StandardNormal([64])).log_prob(_data(4)).sum().detach()))


def test_the_lcma_flow_follows_the_seed_like_channel() -> None:
    factory = make_level_factory("glow", "tiny")
    maps = _maps(factory)
    weights = {}
    for seed in (1, 2):
        for split in ("lcma", "channel"):
            torch.manual_seed(seed)
            contributions = maps if split == "lcma" else None
            flow = build_multiscale_transform(factory, SHAPE, 3, split, contributions)
            weights[split, seed] = _level_parameters(flow)
    assert _same(weights["lcma", 1], weights["channel", 1])  # same seed: same level weights
    assert not _same(weights["lcma", 1], weights["lcma", 2])  # another seed: other weights
    # no factory: copies of the levels the maps were measured with, as before
    copies = build_multiscale_transform(None, SHAPE, 3, "lcma", maps)
    stored = [p.detach() for level in maps.levels for p in level.parameters()]
    assert _same(_level_parameters(copies), stored)
    assert all(a is not b for a, b in zip(copies.parameters(), maps.levels[0].parameters()))


def _normflows_level(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
    c = 4 * shape[0]
    return [nf.flows.GlowBlock(c, 8, split_mode="channel", scale=True) for _ in range(2)] + [
        nf.flows.Squeeze()
    ]


def _normflows_level_wide(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
    c = 4 * shape[0]
    return [nf.flows.GlowBlock(c, 24, split_mode="channel", scale=True), nf.flows.Squeeze()]


def test_the_normflows_builder_uses_the_factory_it_is_given() -> None:
    torch.manual_seed(0)
    x = _data()
    nms = lnf.build_nms_model(_normflows_level, SHAPE, 3)
    maps = lnf.estimate_model_contributions(nms, x, _normflows_level, progress=False)
    model = lnf.build_multiscale_model(_normflows_level_wide, SHAPE, 3, "lcma", maps)
    channel = lnf.build_multiscale_model(_normflows_level_wide, SHAPE, 3, "channel")
    assert count_parameters(model) == count_parameters(channel)
    weights = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        built = lnf.build_multiscale_model(_normflows_level, SHAPE, 3, "lcma", maps)
        weights.append([p.detach().clone() for p in built.flows.parameters()])
    assert _same(weights[0], weights[1]) and not _same(weights[0], weights[2])


# --- 9: hand-assembled flows check their maps -------------------------------------------------


def _assemble(
    levels: Sequence[Transform], maps_per_split: Sequence[torch.Tensor]
) -> ContributionMultiscaleFlow:
    """README's hand-assembly route: add_transform level by level with LCMASplit(map)."""
    flow = ContributionMultiscaleFlow(len(levels))
    shape = SHAPE
    for index, level in enumerate(levels):
        output_shape = level_output_shape(level, shape)
        split = LCMASplit(maps_per_split[index]) if index < len(levels) - 1 else None
        shape = flow.add_transform(level, output_shape, split=split)
    return flow


def test_add_transform_refuses_maps_of_other_levels() -> None:
    factory = make_level_factory("glow", "tiny")
    maps = _maps(factory)
    torch.manual_seed(5)
    fresh = build_levels(factory, SHAPE, 3)  # other random 1x1-convolution permutations
    with pytest.raises(RuntimeError, match=r"split point \d .*maps\.track\(levels, check=False\)"):
        _assemble(fresh, maps.maps)
    # the advice works: the contributions mapped onto these levels
    flow = _assemble(fresh, maps.track(fresh, check=False).maps)
    reference = build_multiscale_transform(None, SHAPE, 3, "lcma", maps, levels=fresh, remap=True)
    assert all(torch.equal(a.index, b.index) for a, b in zip(flow.splits, reference.splits))
    # the levels the maps were measured with take them as they are
    assert len(_assemble(maps.levels, maps.maps).splits) == 2


def test_add_transform_refuses_a_later_map_after_other_splits() -> None:
    factory = make_level_factory("realnvp", "tiny")  # no random permutation: same layout
    maps = _maps(factory)
    levels = maps.levels
    flow = ContributionMultiscaleFlow(3)
    shape = flow.add_transform(levels[0], level_output_shape(levels[0], SHAPE), S.ChannelSplit())
    # maps.maps[1] assumes the LCMA survivors of split point 0, not the channel split's
    with pytest.raises(RuntimeError, match="split point 1"):
        flow.add_transform(levels[1], level_output_shape(levels[1], shape), LCMASplit(maps.maps[1]))


# --- 10: class labels on the normflows path ---------------------------------------------------


def _class_base(shape: tuple[int, ...]) -> nf.distributions.ClassCondDiagGaussian:
    return nf.distributions.ClassCondDiagGaussian(shape, 3)


def test_class_conditional_normflows_model_against_brute_force() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        with pytest.raises(ValueError, match="class_cond=True"):
            lnf.build_multiscale_model(_normflows_level, SHAPE, 2, "checkerboard", base=_class_base)
        model = lnf.build_multiscale_model(
            _normflows_level, SHAPE, 2, "checkerboard", base=_class_base, class_cond=True
        )
        x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))
        y = torch.tensor([0, 2, 1, 2])
        model.log_prob(x, y)  # ActNorm's data-dependent initialisation
        with torch.no_grad():
            for base in model.q0:
                base.loc.normal_(0, 0.5)
                base.log_scale.normal_(0, 0.3)
        log_prob = model.log_prob(x, y)

        def latents(batch: torch.Tensor) -> torch.Tensor:
            return torch.cat([z.flatten(1) for z in model.inverse_and_log_det(batch)[0]], 1)

        for b in range(4):
            z = model.inverse_and_log_det(x[b : b + 1])[0]
            reference = sum(
                torch.distributions.Normal(base.loc[..., y[b]], base.log_scale[..., y[b]].exp())
                .log_prob(latent[0])
                .sum()
                for base, latent in zip(model.q0, z)
            )
            sign, logabsdet = slogdet(jacobian(latents, x[b]))
            assert sign != 0
            assert math.isclose(float(log_prob[b]), float(reference) + logabsdet, rel_tol=1e-10)
        other = model.log_prob(x, torch.tensor([1, 0, 0, 0]))
        assert not torch.allclose(other, log_prob)  # the labels are used
        torch.testing.assert_close(model.forward_kld(x, y), -log_prob.mean())
        samples, log_q = model.sample(3, torch.tensor([0, 1, 2]))
        torch.testing.assert_close(model.log_prob(samples, torch.tensor([0, 1, 2])), log_q)
        with pytest.raises(ValueError, match="expected class labels y"):
            model.log_prob(x)
    finally:
        torch.set_default_dtype(previous)


def test_labels_are_refused_by_a_model_without_class_conditioning() -> None:
    torch.manual_seed(0)
    model = lnf.build_multiscale_model(_normflows_level, SHAPE, 2, "checkerboard")
    x, y = _data(4), torch.tensor([0, 1, 2, 1])
    for call in (
        lambda: model.log_prob(x, y),
        lambda: model.forward_kld(x, y),
        lambda: model.sample(4, y),
    ):
        with pytest.raises(ValueError, match=r"expected y=None .* class_cond=True"):
            call()
    with pytest.raises(ValueError, match="without class labels for the NMS model"):
        lnf.build_nms_model(_normflows_level, SHAPE, 2, base=_class_base)
    with pytest.raises(ValueError, match="expected class-conditional base distributions"):
        lnf.build_multiscale_model(_normflows_level, SHAPE, 2, class_cond=True)


# --- 11: integer images -----------------------------------------------------------------------


def test_integer_images_are_refused_with_advice_that_works() -> None:
    factory = make_level_factory("realnvp", "tiny")
    torch.manual_seed(0)
    nms = build_nms_transform(factory, SHAPE, 3)
    images = _images(8)
    loader = DataLoader(TensorDataset(images.to(torch.uint8), torch.zeros(8)), batch_size=4)
    for data in (images, loader):
        with pytest.raises(
            ValueError, match=r"LogitPreprocessing\(levels\).*got torch\.(int64|uint8)"
        ):
            estimate_contributions(nms, data, factory, SHAPE, progress=False)
    normflows_nms = lnf.build_nms_model(_normflows_level, SHAPE, 3)
    with pytest.raises(ValueError, match="pre-processed as the flow sees it"):
        lnf.estimate_model_contributions(normflows_nms, images, _normflows_level, progress=False)
    x, _ = LogitPreprocessing(17)(images)  # the advice
    assert estimate_contributions(nms, x, factory, SHAPE, progress=False).num_examples == 8


# --- 12: empty batches ------------------------------------------------------------------------


@pytest.mark.parametrize("prior", ["standard", "conditional"])
@pytest.mark.parametrize("split", ["lcma", "channel", "checkerboard", "random", "lcma-region"])
def test_empty_batches_on_nflows_flows(split: str, prior: str) -> None:
    factory = make_level_factory("glow", "tiny")
    maps = _maps(factory) if split.startswith("lcma") else None
    transform = build_multiscale_transform(factory, SHAPE, 3, split, maps, prior=prior)
    flow = build_flow(transform, SHAPE)
    empty = torch.zeros(0, *SHAPE)
    assert flow.log_prob(empty).shape == (0,)
    x, logabsdet = transform.inverse(torch.zeros(0, 64))
    assert x.shape == (0, *SHAPE) and logabsdet.shape == (0,)
    assert [t.shape for t in transform.forward_with_diag(empty)] == [(0, 64), (0,), (0, 64)]


def test_an_empty_batch_initialises_nothing() -> None:
    factory = make_level_factory("glow", "tiny")
    torch.manual_seed(0)
    nms = build_flow(build_nms_transform(factory, SHAPE, 3), SHAPE)
    torch.manual_seed(0)
    fresh = build_flow(build_nms_transform(factory, SHAPE, 3), SHAPE)
    assert nms.log_prob(torch.zeros(0, *SHAPE)).shape == (0,)
    x = _data(8)
    assert torch.equal(nms.log_prob(x), fresh.log_prob(x))  # ActNorm initialised on x only
    torch.manual_seed(0)
    normflows_nms = lnf.build_nms_model(_normflows_level, SHAPE, 3)
    torch.manual_seed(0)
    normflows_fresh = lnf.build_nms_model(_normflows_level, SHAPE, 3)
    assert normflows_nms.log_prob(torch.zeros(0, *SHAPE)).shape == (0,)
    assert torch.equal(normflows_nms.log_prob(x), normflows_fresh.log_prob(x))
    model = lnf.build_multiscale_model(
        _normflows_level, SHAPE, 3, "checkerboard", prior="conditional"
    )
    assert model.log_prob(torch.zeros(0, *SHAPE)).shape == (0,)
    z, log_det, diag = model.inverse_and_log_det_with_diag(torch.zeros(0, *SHAPE))
    assert log_det.shape == (0,) and [t.shape[0] for t in z + diag] == [0] * 6
    assert not any(bool(b) for name, b in model.named_buffers() if "init" in name)
