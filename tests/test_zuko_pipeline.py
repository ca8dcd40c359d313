"""Algorithm 1 for zuko: NMS flow, contributions (brute force) and the multi-scale flow.

The contributions of a zuko NMS flow of single autoregressive levels are compared in float64
with a brute-force reference (``log|J_ii|`` of each level's autograd Jacobian, summed over the
levels and averaged over the examples), with and without a context. Skipped when zuko is not
installed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

zuko = pytest.importorskip("zuko")

from zuko.flows import MaskedAutoregressiveTransform  # noqa: E402

from lcma_ext.contributions import estimate_contributions as core_estimate  # noqa: E402
from lcma_ext.models import make_level_factory  # noqa: E402
from lcma_ext.pipeline import build_nms_transform  # noqa: E402
from lcma_ext.zuko import (  # noqa: E402
    MultiscaleFlow,
    NMSFlow,
    ZukoLevel,
    build_multiscale_flow,
    build_nms_flow,
    estimate_contributions,
    image_level_factory,
)

from brute_force import jacobian, log_abs_diagonal, slogdet  # noqa: E402

SHAPE = (6,)
LEVELS = 3


def _level(context: int) -> Callable[[int, tuple[int, ...]], MaskedAutoregressiveTransform]:
    """One autoregressive transform per level: a triangular Jacobian, nothing moved."""

    def level(index: int, shape: tuple[int, ...]) -> MaskedAutoregressiveTransform:
        return MaskedAutoregressiveTransform(shape[0], context, hidden_features=(8,))

    return level


def _trained_nms(context: int) -> tuple[NMSFlow, torch.Tensor, torch.Tensor | None]:
    torch.manual_seed(0)
    nms = build_nms_flow(_level(context), SHAPE, LEVELS).double()
    x = torch.randn(12, *SHAPE, dtype=torch.float64) * torch.linspace(0.5, 2.0, 6)
    c = torch.randn(12, context, dtype=torch.float64) if context else None
    optimizer = torch.optim.Adam(nms.parameters(), lr=1e-2)
    for _ in range(5):  # a partially trained NMS flow, as Algorithm 1 has
        loss = -nms(c).log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return nms, x, c


def _brute_force_maps(nms: NMSFlow, x: torch.Tensor, c: torch.Tensor | None) -> list[np.ndarray]:
    """Per split point, the mean over examples of ``sum_{k <= l} log|J_k,ii|`` by autograd."""
    sums = np.zeros((LEVELS - 1, *SHAPE))
    for b in range(x.shape[0]):
        hidden, cumulative = x[b], torch.zeros(SHAPE, dtype=torch.float64)
        for index, lazy in enumerate(nms.levels[:-1]):
            transform = lazy(None if c is None else c[b])
            jac = jacobian(lambda batch, t=transform: t(batch), hidden)
            cumulative = cumulative + log_abs_diagonal(jac).view(SHAPE)
            sums[index] += cumulative.numpy()
            with torch.no_grad():
                hidden = transform(hidden)
    return list(sums / x.shape[0])


@pytest.mark.parametrize("context", [0, 3])
def test_contributions_match_brute_force(context: int) -> None:
    nms, x, c = _trained_nms(context)
    maps = estimate_contributions(nms, x, _level(context), context=c, batch_size=5, progress=False)
    expected = _brute_force_maps(nms, x, c)
    assert maps.num_examples == 12 and maps.input_shape == SHAPE
    for got, want in zip(maps.data_maps, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    assert all(isinstance(level, ZukoLevel) for level in maps.levels)


def test_unconditional_estimate_is_the_core_estimator_on_the_zuko_levels() -> None:
    nms, x, _ = _trained_nms(0)
    levels = [_level(0)(index, shape) for index, shape in enumerate([(6,), (3,), (1,)])]
    maps = estimate_contributions(nms, [(x[:7], None), (x[7:], None)], levels, progress=False)
    wrapped = [ZukoLevel(lazy, (6,)) for lazy in nms.levels]
    from lcma_ext.transforms import CompositeTransform

    core = core_estimate(CompositeTransform(wrapped), x, maps.levels, SHAPE, progress=False)
    for got, want in zip(maps.data_maps, core.data_maps):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert [level.transform for level in maps.levels] == levels  # the very zuko modules


@pytest.mark.parametrize("split", ["lcma", "high"])
def test_multiscale_flow_uses_the_maps_splits(split: str) -> None:
    nms, x, c = _trained_nms(3)
    factor_out = "low" if split == "lcma" else "high"
    maps = estimate_contributions(
        nms, x, _level(3), context=c, factor_out=factor_out, progress=False
    )
    flow = build_multiscale_flow(_level(3), SHAPE, LEVELS, split, maps, prior="conditional")
    assert isinstance(flow, MultiscaleFlow)
    for ours, theirs in zip(flow.splits, maps.splits()):
        assert torch.equal(ours.index, theirs.index)
    assert flow.double()(c).log_prob(x).shape == (12,)
    kept = maps.kept_positions[0]
    ranked = torch.argsort(maps.data_maps[0], descending=split == "lcma")[: len(kept)]
    assert sorted(kept.tolist()) == sorted(ranked.tolist())


def test_estimation_restores_training_modes_and_leaves_weights() -> None:
    nms, x, _ = _trained_nms(0)
    nms.train()
    state = {key: value.clone() for key, value in nms.state_dict().items()}
    estimate_contributions(nms, x, _level(0), progress=False)
    assert all(module.training for module in nms.modules())
    assert all(torch.equal(state[key], value) for key, value in nms.state_dict().items())


def test_images_with_squeeze_placement_end_to_end() -> None:
    torch.manual_seed(0)
    level = image_level_factory(context=2, hidden=4, steps=1)
    nms = build_nms_flow(level, (1, 8, 8), 2, placement="squeeze").double()
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    c = torch.randn(10, 2, dtype=torch.float64)
    assert nms(c).log_prob(x).shape == (10,)
    maps = estimate_contributions(nms, x, level, context=c, progress=False)
    assert maps.placement == "squeeze" and maps.data_maps[0].shape == (1, 8, 8)
    flow = build_multiscale_flow(level, (1, 8, 8), 2, "lcma", maps, placement="squeeze").double()
    flow.eval()
    transform = flow(c[0]).transform
    jac = jacobian(lambda batch: transform(batch), x[0])
    sign, logabsdet = slogdet(jac)
    with torch.no_grad():
        z = transform(x[0])
        expected = float(torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()) + logabsdet
        got = float(flow(c[0]).log_prob(x[0]))
    assert sign != 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_nflows_levels_from_core_contributions_are_refused() -> None:
    torch.manual_seed(0)
    factory = make_level_factory("glow", "tiny", hidden=4, steps=1)
    nms = build_nms_transform(factory, (1, 4, 4), 2)
    maps = core_estimate(nms, torch.randn(6, 1, 4, 4), factory, progress=False)
    with pytest.raises(TypeError, match="expected zuko levels"):
        build_multiscale_flow(None, (1, 4, 4), 2, "lcma", maps)
    # the same lcma-ext levels, passed explicitly, go into a zuko flow
    flow = build_multiscale_flow(None, (1, 4, 4), 2, "lcma", maps, levels=list(maps.levels))
    assert flow().log_prob(torch.randn(3, 1, 4, 4)).shape == (3,)


def test_clear_errors() -> None:
    nms, x, c = _trained_nms(3)
    flow = build_multiscale_flow(_level(3), SHAPE, LEVELS, "channel")
    with pytest.raises(TypeError, match="MultiscaleFlow"):
        estimate_contributions(flow, x, _level(3), context=c, progress=False)
    plain = zuko.lazy.Flow(list(nms.levels), nms.base)
    with pytest.raises(ValueError, match="expected input_shape"):
        estimate_contributions(plain, x, _level(3), context=c, progress=False)
    with pytest.raises(ValueError, match="one row per example"):
        estimate_contributions(nms, x, _level(3), context=c[:5], progress=False)
    with pytest.raises(ValueError, match="as tensors"):
        estimate_contributions(nms, [x], _level(3), context=c, progress=False)
    with pytest.raises(ValueError, match="expected input_shape"):
        estimate_contributions(nms, x, _level(3), (5,), context=c, progress=False)
    with pytest.raises(TypeError, match=r"flow\.transform"):
        build_nms_flow(lambda index, shape: zuko.flows.MAF(shape[0]), SHAPE, 2)
    maps = estimate_contributions(plain, x, _level(3), SHAPE, context=c, progress=False)
    assert maps.num_examples == 12  # a plain zuko Flow of one lazy transform per level works
