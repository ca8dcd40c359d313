"""Split granularity of LCMA (site, region, channel): crafted kept sets, exactness, state, errors.

The brute-force helpers (autograd Jacobian + standard normal) come from brute_force.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from test_multiscale import glow_factory

from lcma_ext import ContributionMultiscaleFlow, build_multiscale_transform
from lcma_ext import splits as S
from lcma_ext.contributions import ContributionMaps, _maps_from_data, estimate_contributions
from lcma_ext.diagnostics import split_diagnostics
from lcma_ext.multiscale import build_levels, level_output_shape
from lcma_ext.pipeline import build_nms_transform
from lcma_ext.plotting import plot_contributions

from brute_force import transform_log_prob

# --- a crafted map -------------------------------------------------------------------------
# Two channel groups on a 2 x 4 grid of local blocks; values per site as (TL, TR, BL, BR).
# Group 0, tile A = columns 0-1, tile B = columns 2-3 (region_size 2):
GROUP0 = [
    [(8, 0, 1, 0), (0, 8, 1, 0), (0, 0, 4, 4), (0, 0, 4, 4)],
    [(8, 0, 0, 1), (8, 0, 0, 1), (3, 0, 0, 2), (3, 0, 0, 2)],
]
# per site (the paper): the two highest of each block, ties by TL, BR, TR, BL
SITE0 = [[(0, 2), (1, 2), (2, 3), (2, 3)], [(0, 3), (0, 3), (0, 3), (0, 3)]]
# tile means: A = (6, 2, .5, .5) keeps TL+TR, B = (1.5, 0, 2, 3) keeps BL+BR
REGION0 = [[(0, 1), (0, 1), (2, 3), (2, 3)], [(0, 1), (0, 1), (2, 3), (2, 3)]]
# means over all 8 sites: (3.75, 1, 1.25, 1.75) keeps TL+BR
CHANNEL0 = [[(0, 3)] * 4] * 2
# Group 1 keeps TR+BL at every site whatever the granularity.
GROUP1 = [[(1, 5, 4, 0)] * 4] * 2
KEPT1 = [[(1, 2)] * 4] * 2
EXPECTED = {
    ("site", 1): [SITE0, KEPT1],
    ("region", 2): [REGION0, KEPT1],
    ("channel", 4): [CHANNEL0, KEPT1],
}


def _blocks() -> torch.Tensor:
    """``(G, 4, h, w)`` = (2, 4, 2, 4) block values of the crafted map."""
    values = torch.tensor([GROUP0, GROUP1], dtype=torch.float64)  # (G, h, w, 4)
    return values.permute(0, 3, 1, 2).contiguous()


def _map(blocks: torch.Tensor, placement: str) -> torch.Tensor:
    """The map in a split's input layout: ``(4G, h, w)`` or the ``(G, 2h, 2w)`` image."""
    groups, _, h, w = blocks.shape
    if placement == "post_squeeze":  # channel 4g + k
        return blocks.reshape(4 * groups, h, w)
    # pixel (2i + dy, 2j + dx) of channel g holds position k = 2 dy + dx of block (g, i, j)
    return blocks.view(groups, 2, 2, h, w).permute(0, 3, 1, 4, 2).reshape(groups, 2 * h, 2 * w)


def _flat_index(placement: str, group: int, k: int, i: int, j: int, h: int, w: int) -> int:
    if placement == "post_squeeze":
        return ((4 * group + k) * h + i) * w + j
    dy, dx = divmod(k, 2)
    return (group * 2 * h + 2 * i + dy) * 2 * w + 2 * j + dx


def _expected_index(
    placement: str, kept_sets: Sequence[Sequence[Sequence[tuple[int, ...]]]], h: int = 2, w: int = 4
) -> torch.Tensor:
    """Flat input indices of the kept half ``(2G, h, w)``: channel ``2g + r`` holds the ``r``-th
    kept position (increasing) of group ``g``'s block."""
    out = torch.zeros(2 * len(kept_sets), h, w, dtype=torch.long)
    for group, rows in enumerate(kept_sets):
        for i, row in enumerate(rows):
            for j, pair in enumerate(row):
                for r, k in enumerate(sorted(pair)):
                    out[2 * group + r, i, j] = _flat_index(placement, group, k, i, j, h, w)
    return out


def _complement(
    kept_sets: Sequence[Sequence[Sequence[tuple[int, ...]]]],
) -> list[list[list[tuple[int, ...]]]]:
    return [
        [[tuple(k for k in range(4) if k not in p) for p in row] for row in g] for g in kept_sets
    ]


def _carry(split: S.Split, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    factored, kept = split.carry(torch.arange(math.prod(shape)).view(1, *shape))
    return factored[0], kept[0]


@pytest.mark.parametrize("placement", S.PLACEMENTS)
@pytest.mark.parametrize(("granularity", "region_size"), list(EXPECTED))
def test_crafted_map_gives_the_expected_kept_sets(
    placement: str, granularity: str, region_size: int
) -> None:
    values = _map(_blocks(), placement)
    shape = tuple(values.shape)
    expected = EXPECTED[(granularity, region_size)]
    for factor_out, kept_sets in (("low", expected), ("high", _complement(expected))):
        split = S.LCMASplit(values, factor_out, placement, granularity, region_size)
        factored, kept = _carry(split, shape)
        assert torch.equal(kept, _expected_index(placement, kept_sets))
        assert torch.equal(factored, _expected_index(placement, _complement(kept_sets)))
        positions = torch.tensor(kept_sets).permute(0, 3, 1, 2)  # (G, 2, h, w)
        assert torch.equal(split.kept_positions, positions)
        x = torch.randn(3, *shape, dtype=torch.float64)
        assert torch.equal(split.inverse(*split(x)), x)


@pytest.mark.parametrize("placement", S.PLACEMENTS)
def test_region_extremes_equal_site_and_channel(placement: str) -> None:
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randn(2, 4, 4, 4, generator=generator, dtype=torch.float64)
    values = _map(blocks, placement)
    for factor_out in S.FACTOR_OUT:
        site = S.LCMASplit(values, factor_out, placement)
        channel = S.LCMASplit(values, factor_out, placement, "channel")
        assert torch.equal(
            S.LCMASplit(values, factor_out, placement, "region", 1).index, site.index
        )
        assert torch.equal(
            S.LCMASplit(values, factor_out, placement, "region", 4).index, channel.index
        )
        # a random map: the three granularities really differ
        assert not torch.equal(site.index, channel.index)
        region = S.LCMASplit(values, factor_out, placement, "region", 2)
        assert not torch.equal(region.index, site.index)
        assert not torch.equal(region.index, channel.index)
        # channel granularity is static: each group keeps the same pair at every site
        kept = channel.kept_positions
        assert torch.equal(kept, kept[:, :, :1, :1].expand_as(kept))


@pytest.mark.parametrize("placement", S.PLACEMENTS)
@pytest.mark.parametrize("ties", [False, True])
def test_channel_on_a_spatially_constant_map_equals_site(placement: str, ties: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    per_position = torch.randn(3, 4, 1, 1, generator=generator, dtype=torch.float64)
    if ties:  # exact ties inside blocks: the tie-break must agree too
        per_position = (per_position > 0).double()
    values = _map(per_position.expand(3, 4, 4, 2).contiguous(), placement)
    for factor_out in S.FACTOR_OUT:
        site = S.LCMASplit(values, factor_out, placement, "site")
        for granularity, size in (("channel", 4), ("region", 2)):
            other = S.LCMASplit(values, factor_out, placement, granularity, size)
            assert torch.equal(other.index, site.index)
            assert torch.equal(other.kept_positions, site.kept_positions)


def test_vector_data_accepts_only_site() -> None:
    values = torch.tensor([3.0, 9.0, 1.0, 7.0, 5.0, 0.0])
    site = S.LCMASplit(values, granularity="site")
    assert torch.equal(site.index, S.LCMASplit(values).index)
    assert site.kept_positions.tolist() == [1, 3, 4]
    for granularity in ("channel", "region"):
        with pytest.raises(ValueError, match=r"expected an image map \(C, H, W\)"):
            S.LCMASplit(values, granularity=granularity)
        with pytest.raises(ValueError, match="expected an image map"):
            S.make_split(f"lcma-{granularity}", (6,), values)


# --- brute force ---------------------------------------------------------------------------


def _build(
    name: str, placement: str, shape: tuple[int, ...], num_levels: int, region_size: int = 2
) -> ContributionMultiscaleFlow:
    torch.manual_seed(0)
    levels = build_levels(glow_factory(placement), shape, num_levels, placement)
    generator = torch.Generator().manual_seed(5)
    splits, current = [], tuple(shape)
    for level in levels[:-1]:
        out = level_output_shape(level, current)
        values = torch.randn(out, generator=generator, dtype=torch.float64)
        splits.append(S.make_split(name, out, values, placement=placement, region_size=region_size))
        current = S.kept_shape(out, placement)
    return ContributionMultiscaleFlow.from_levels(levels, shape, splits)


@pytest.mark.parametrize("name", S.GRANULAR_SPLIT_NAMES)
@pytest.mark.parametrize("placement", S.PLACEMENTS)
@pytest.mark.usefixtures("float64")
def test_log_prob_equals_brute_force_change_of_variables(name: str, placement: str) -> None:
    shape = (1, 8, 8)
    transform = _build(name, placement, shape, 3)
    # split 0 has a 4 x 4 grid: region_size 2 is a real region; split 1 (2 x 2) is capped
    granularity = name.partition("-")[2]
    assert [s.granularity for s in transform.splits] == [granularity] * 2
    if granularity == "region":
        assert [s.region_size for s in transform.splits] == [2, 2]
    flow = Flow(transform, StandardNormal([64]))
    x = torch.randn(2, *shape)
    torch.testing.assert_close(
        flow.log_prob(x), transform_log_prob(transform, x), rtol=1e-9, atol=1e-9
    )
    z, logabsdet = transform(x)
    x_back, inverse_logabsdet = transform.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-10, atol=1e-10)
    outputs, _, diag = transform.forward_with_diag(x)
    assert torch.equal(outputs, z)
    torch.testing.assert_close(diag.sum(1), logabsdet, rtol=1e-10, atol=1e-10)


# --- pipeline: later split points see the survivors of the coarse split ----------------------


@pytest.fixture(scope="module")
def maps() -> ContributionMaps:
    torch.manual_seed(0)
    factory = glow_factory("post_squeeze")
    nms = build_nms_transform(factory, (1, 8, 8), 3)
    data = torch.randn(16, 1, 8, 8)
    measured = estimate_contributions(nms, data, factory, (1, 8, 8), progress=False)
    # An untrained NMS flow gives spatially static maps (site = channel); random data maps make
    # the granularities choose different survivors.
    generator = torch.Generator().manual_seed(6)
    data_maps = [torch.randn(1, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2)]
    return dataclasses.replace(measured, data_maps=data_maps)


@pytest.mark.parametrize("name", S.GRANULAR_SPLIT_NAMES)
def test_pipeline_tracks_survivors_of_the_granular_split(maps: ContributionMaps, name: str) -> None:
    flow = build_multiscale_transform(None, (1, 8, 8), 3, name, maps, region_size=2)
    rule, _, granularity = name.partition("-")
    first, second = flow.splits
    assert first.factor_out == ("low" if rule == "lcma" else "high")
    assert first.granularity == granularity and second.granularity == granularity
    site_first = S.LCMASplit(first.contributions, first.factor_out)
    assert not torch.equal(first.index, site_first.index)  # the survivors really differ
    # the first map is the tracked map; the second belongs to the dimensions that this very
    # flow's first split keeps, carried through its second level
    levels = flow._transforms
    positions = levels[0].carry(torch.arange(64).view(1, 1, 8, 8))
    assert torch.equal(first.contributions, maps.data_maps[0].reshape(-1)[positions[0]])
    _, kept = first.carry(positions)
    positions = levels[1].carry(kept)
    assert torch.equal(second.contributions, maps.data_maps[1].reshape(-1)[positions[0]])
    x = torch.randn(3, 1, 8, 8)
    z, _ = flow(x)
    torch.testing.assert_close(flow.inverse(z)[0], x, rtol=1e-5, atol=1e-5)


def test_plot_has_the_kept_position_panel(maps: ContributionMaps, tmp_path: Path) -> None:
    path = tmp_path / "contributions.png"
    full = _maps_from_data(maps.data_maps, maps.levels, (1, 8, 8), "post_squeeze", "low", 16)
    assert full.diagnostics[0]["agrees_with_channel_granularity"] < 1.0
    plot_contributions(full, path)
    assert path.stat().st_size > 0


# --- diagnostics ---------------------------------------------------------------------------


def _entropy(counts: Sequence[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c)


@pytest.mark.parametrize("placement", S.PLACEMENTS)
def test_diagnostics_agreement_and_entropy_on_the_crafted_map(placement: str) -> None:
    diagnostics = split_diagnostics(_map(_blocks(), placement), placement)
    # group 0: 4 of 8 sites keep TL+BR (the channel choice); group 1 agrees everywhere
    assert diagnostics["agrees_with_channel_granularity"] == pytest.approx(12 / 16, abs=1e-15)
    # group 0 keeps TL 5, TR 1, BL 4, BR 6 times; group 1 keeps TR and BL at every site (1 bit)
    position = (_entropy([5, 1, 4, 6]) + 1.0) / 2
    assert diagnostics["kept_position_entropy"] == pytest.approx(position, abs=1e-12)
    # group 0 patterns TL+BL 1, TR+BL 1, BL+BR 2, TL+BR 4 (1.75 bits); group 1 one pattern
    assert diagnostics["kept_pattern_entropy"] == pytest.approx(1.75 / 2, abs=1e-12)
    constant = _map(_blocks()[:, :, :1, :1].expand(2, 4, 2, 4), placement)
    static = split_diagnostics(constant, placement)
    assert static["agrees_with_channel_granularity"] == 1.0
    assert static["kept_position_entropy"] == 1.0 and static["kept_pattern_entropy"] == 0.0


# --- state_dict ----------------------------------------------------------------------------


@pytest.mark.parametrize("placement", S.PLACEMENTS)
@pytest.mark.parametrize(("granularity", "region_size"), [("region", 2), ("channel", 4)])
def test_state_dict_round_trip_restores_granularity(
    placement: str, granularity: str, region_size: int
) -> None:
    generator = torch.Generator().manual_seed(3)
    blocks = torch.randn(2, 4, 4, 4, generator=generator, dtype=torch.float64)
    split = S.LCMASplit(_map(blocks, placement), "high", placement, granularity, region_size)
    state = split.state_dict()
    assert {"index", "contributions"} <= set(state)
    assert not {"inverse_index", "kept_positions", "granularity_code"} & set(state)  # derived
    other = S.LCMASplit(
        _map(torch.randn(2, 4, 4, 4, generator=generator), placement), "high", placement
    )
    assert not torch.equal(other.index, split.index)
    other.load_state_dict(state)
    assert (other.granularity, other.region_size) == (granularity, region_size)
    assert torch.equal(other.kept_positions, split.kept_positions)
    x = torch.randn(2, *split.input_shape, generator=generator)
    for a, b in zip(split(x), other(x)):
        assert torch.equal(a, b)


# --- errors --------------------------------------------------------------------------------


def test_errors_are_clear() -> None:
    values = torch.randn(8, 4, 4)
    with pytest.raises(ValueError, match=r"expected granularity in \('site', 'region', 'channel'"):
        S.LCMASplit(values, granularity="pixel")
    with pytest.raises(ValueError, match="expected a region_size dividing the 4x4 grid"):
        S.LCMASplit(values, granularity="region", region_size=3)
    with pytest.raises(ValueError, match="expected a region_size dividing the 4x4 grid"):
        S.LCMASplit(torch.randn(1, 8, 8), "low", "squeeze", "region", 3)
    with pytest.raises(ValueError, match="expected a region_size dividing the 2x2 grid"):
        S.LCMASplit(torch.randn(8, 2, 2), granularity="region", region_size=4)
    with pytest.raises(ValueError, match="expected region_size as a positive int"):
        S.LCMASplit(values, granularity="region", region_size=0)
    with pytest.raises(ValueError, match="expected a split name"):
        S.make_split("lcma-pixel", (8, 4, 4), values)
    with pytest.raises(ValueError, match="expected a contribution map; got None"):
        S.make_split("high-channel", (8, 4, 4))
    with pytest.raises(ValueError, match="expected contributions; got None"):
        build_multiscale_transform(glow_factory("post_squeeze"), (1, 8, 8), 3, "lcma-region")
    # make_split caps the tile at the grid; a capped size that still does not divide raises
    assert S.make_split("lcma-region", (8, 2, 2), torch.randn(8, 2, 2)).region_size == 2
    assert S.fit_region_size((8, 6, 6), 4) == 4
    with pytest.raises(ValueError, match="expected a region_size dividing the 6x6 grid"):
        S.make_split("lcma-region", (8, 6, 6), torch.randn(8, 6, 6), region_size=4)


# --- docs/granularity.md -------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "granularity.md"
DOC_BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(DOC_BLOCKS)))
def test_docs_python_block_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(DOC_BLOCKS[index], f"granularity.md block {index}", "exec"), {"__name__": "doc"})
    assert capsys.readouterr().out.strip(), "each example prints what it shows"
