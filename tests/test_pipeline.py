"""Algorithm 1 end to end with a small Glow level factory: NMS -> contributions -> LCMA flow."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import Transform
from torch import nn

from lcma_ext import (
    ContributionMaps,
    LCMASplit,
    build_multiscale_transform,
    build_nms_transform,
    estimate_contributions,
    lcma_from_nms,
    plot_contributions,
)
from lcma_ext import splits as S
from lcma_ext import transforms as T

SHAPE = (1, 8, 8)
LEVELS = 3


class _ConvNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, out_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def make_factory(
    placement: str = "post_squeeze",
) -> Callable[[int, tuple[int, ...]], T.CompositeTransform]:
    def factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
        layers: list[nn.Module] = []
        if placement == "post_squeeze":
            layers.append(T.SqueezeTransform())
            shape = (4 * shape[0], shape[1] // 2, shape[2] // 2)
        channels = shape[0]
        for step in range(2):
            layers.append(T.ActNorm(channels))
            if channels >= 2:
                mask = torch.tensor([1 if (i + step) % 2 else -1 for i in range(channels)])
                layers.append(T.OneByOneConvolution(channels))
                layers.append(T.AffineCouplingTransform(mask, _ConvNet))
        return T.CompositeTransform(layers)

    return factory


def _data(n: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(n, *SHAPE, generator=generator)
    ramp = torch.linspace(-1, 1, 8).view(1, 1, 1, 8)
    return base * (0.2 + ramp.abs()) + ramp  # a spatially varying scale


def _train(flow: Flow, data: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for step in range(steps):
        batch = data[(step * 16) % len(data) :][:16]
        loss = -flow.log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _reference_factored(
    levels: Sequence[Transform], data_maps: Sequence[torch.Tensor], placement: str
) -> list[list[int]]:
    """Data indices factored out at each split point, by a plain loop over the local blocks.

    ``level.carry`` (tested against the levels' Jacobians elsewhere) gives each level's
    rearrangement; the blocks, the top-two rule with the TL, BR, TR, BL tie-break and the kept
    half's layout (block ``(c, i, j)`` -> channels ``2c, 2c + 1`` at its site, by block
    position) are written out here from the module docstring of lcma_ext.splits.
    """
    priority = {0: 0, 3: 1, 1: 2, 2: 3}
    positions = torch.arange(64).view(1, *SHAPE)
    factored_all = []
    for index, level in enumerate(levels[:-1]):
        out = level.carry(positions)[0]
        if placement == "squeeze":  # the split squeezes: block k = 2 dy + dx of each channel
            c, h, w = out.shape
            cells = {(ch, i, j): [out[ch, 2 * i + k // 2, 2 * j + k % 2] for k in range(4)]
                     for ch in range(c) for i in range(h // 2) for j in range(w // 2)}  # fmt: skip
            kept_shape = (2 * c, h // 2, w // 2)
        else:  # the level squeezed: block k is channel 4g + k
            c4, h, w = out.shape
            cells = {(g, i, j): [out[4 * g + k, i, j] for k in range(4)]
                     for g in range(c4 // 4) for i in range(h) for j in range(w)}  # fmt: skip
            kept_shape = (c4 // 2, h, w)
        kept = torch.empty(kept_shape, dtype=torch.long)
        factored = []
        for (group, i, j), block in cells.items():
            values = [float(data_maps[index].reshape(-1)[int(d)]) for d in block]
            order = sorted(range(4), key=lambda k: (-values[k], priority[k]))
            for r, k in enumerate(sorted(order[:2])):
                kept[2 * group + r, i, j] = block[k]
            factored += [int(block[k]) for k in order[2:]]
        factored_all.append(factored)
        positions = kept.unsqueeze(0)
    return factored_all


@pytest.mark.parametrize("placement", S.PLACEMENTS)
def test_three_line_workflow(placement: str, tmp_path: Path) -> None:
    factory = make_factory(placement)
    data = _data()
    torch.manual_seed(0)
    nms = build_nms_transform(factory, SHAPE, LEVELS, placement=placement)
    z, _ = nms(data[:2])  # the NMS flow keeps every dimension (not flattened)
    assert z.shape[1:].numel() == 64
    nms_flow = Flow(nms, StandardNormal(list(z.shape[1:])))
    _train(nms_flow, data, steps=3)  # partially trained, as the paper allows

    maps = estimate_contributions(
        nms_flow, data, factory, SHAPE, placement=placement, progress=False
    )
    flow = build_multiscale_transform(factory, SHAPE, LEVELS, "lcma", maps, placement=placement)
    model = Flow(flow, StandardNormal([64]))

    assert len(flow.splits) == LEVELS - 1
    assert all(isinstance(s, LCMASplit) and s.placement == placement for s in flow.splits)
    # independent reference: per local block, the two data dimensions of highest averaged
    # contribution survive, found by a plain loop over the blocks of each split's input
    expected = _reference_factored(flow._transforms, maps.data_maps, placement)
    carried = flow.carry(torch.arange(64).view(1, *SHAPE))[0].tolist()
    for index, factored in enumerate(expected):
        start = sum(len(f) for f in expected[:index])
        assert sorted(carried[start : start + len(factored)]) == sorted(factored)
    log_prob = model.log_prob(data[:5])
    assert log_prob.shape == (5,) and torch.isfinite(log_prob).all()
    samples = model.sample(4)
    assert samples.shape == (4, *SHAPE) and torch.isfinite(samples).all()
    _train(model, data, steps=2)  # the new flow trains
    # the flow's levels are copies: a second flow does not share parameters with the first
    again = build_multiscale_transform(factory, SHAPE, LEVELS, "lcma", maps, placement=placement)
    assert all(a is not b for a, b in zip(again.parameters(), flow.parameters()))

    plot_contributions(maps, tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 0


def test_lcma_from_nms_and_ablation_splits() -> None:
    factory = make_factory()
    data = _data()
    torch.manual_seed(0)
    nms = build_nms_transform(factory, SHAPE, LEVELS)
    flow, maps = lcma_from_nms(nms, factory, SHAPE, LEVELS, data, progress=False)
    # the flow reuses the very level instances the maps were measured with
    assert all(a is b for a, b in zip(flow._transforms, maps.levels))
    high, high_maps = lcma_from_nms(nms, factory, SHAPE, LEVELS, data, split="high", progress=False)
    assert high_maps.factor_out == "high" and high.splits[0].factor_out == "high"
    # same level layout at the first split point: the reverse keeps the complement there
    first_low = S.LCMASplit(high_maps.maps[0], "low")
    assert torch.equal(
        high.splits[0].carry(torch.arange(64).view(1, 4, 4, 4))[1],
        first_low.carry(torch.arange(64).view(1, 4, 4, 4))[0],
    )
    x = data[:3]
    for name in S.SPLIT_NAMES:
        contributions = maps if name in ("lcma", "high") else None
        built = build_multiscale_transform(factory, SHAPE, LEVELS, name, contributions)
        z, logabsdet = built(x)
        assert z.shape == (3, 64) and torch.isfinite(logabsdet).all()
        x_back = built.inverse(z)[0]
        torch.testing.assert_close(x_back, x, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="expected split 'lcma' or 'high'"):
        lcma_from_nms(nms, factory, SHAPE, LEVELS, data, split="channel", progress=False)
    with pytest.raises(ValueError, match="expected a split name"):
        build_multiscale_transform(factory, SHAPE, LEVELS, "max")
    with pytest.raises(ValueError, match="expected placement 'post_squeeze'"):
        build_multiscale_transform(factory, SHAPE, LEVELS, "lcma", maps, placement="squeeze")


def test_loaded_maps_with_freshly_built_levels(tmp_path: Path) -> None:
    factory = make_factory()
    data = _data(16)
    nms = build_nms_transform(factory, SHAPE, LEVELS)
    torch.manual_seed(5)
    maps = estimate_contributions(nms, data, factory, progress=False)
    maps.save(tmp_path / "maps.pt")
    loaded = ContributionMaps.load(tmp_path / "maps.pt")
    torch.manual_seed(6)  # other 1x1-convolution permutations
    with pytest.raises(RuntimeError, match="rearrange dimensions"):
        build_multiscale_transform(factory, SHAPE, LEVELS, "lcma", loaded)
    torch.manual_seed(5)  # the same seed rebuilds the same permutations
    flow = build_multiscale_transform(factory, SHAPE, LEVELS, "lcma", loaded)
    assert all(torch.equal(a.index, b.index) for a, b in zip(flow.splits, maps.splits()))
    assert math.isfinite(float(Flow(flow, StandardNormal([64])).log_prob(data[:2]).sum().detach()))
