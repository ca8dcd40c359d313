"""One tracker result per maps, one mode helper, one parts helper, one shape walk, one name each.

Issue 25's core-library part: ``ContributionMaps`` tracks once and keeps the result; the
``__init__`` files only re-export; the normflows merge and estimator have names of their own
(the old ones warn); the level shapes of the model families come from the one level walk.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import normflows as nf
import pytest
import torch
from nflows.flows import Flow
from torch import nn

import lcma_ext
from lcma_ext import contributions as C
from lcma_ext import normflows as lnf
from lcma_ext import splits as S
from lcma_ext.contributions import ContributionMaps
from lcma_ext.flows import build_flow, eval_mode, flow_parts
from lcma_ext.models import level_shapes, make_level_factory, max_num_levels
from lcma_ext.multiscale import walk_levels
from lcma_ext.pipeline import build_nms_transform

SHAPE = (1, 8, 8)
PACKAGE = Path(lcma_ext.__file__).parent


def _maps() -> ContributionMaps:
    factory = make_level_factory("glow", "tiny")
    torch.manual_seed(0)
    nms = build_nms_transform(factory, SHAPE, 3)
    data = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1))
    return C.estimate_contributions(nms, data, factory, SHAPE, progress=False)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = C.track_splits

    def counted(*args, **kwargs) -> C.TrackedSplits:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(C, "track_splits", counted)
    return calls


def test_the_tracker_runs_once_per_maps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = _counting(monkeypatch)
    maps = _maps()
    assert len(calls) == 1  # the estimate itself, kept for the derived properties
    for _ in range(2):
        maps.maps, maps.factored_positions, maps.kept_positions, maps.diagnostics, maps.splits()
    assert len(calls) == 1
    maps.save(tmp_path / "maps.pt")
    loaded = C.ContributionMaps.load(tmp_path / "maps.pt")
    loaded.maps, loaded.kept_positions, loaded.diagnostics, loaded.splits()
    assert len(calls) == 2  # once for the loaded maps
    for a, b in zip(loaded.maps, maps.maps, strict=True):
        assert torch.equal(a, b)


def test_the_kept_result_follows_its_fields() -> None:
    maps = _maps()
    first = maps.kept_positions
    maps.factor_out = "high"  # another rule: derived again
    high = maps.kept_positions
    assert not all(torch.equal(a, b) for a, b in zip(first, high))
    maps.factor_out = "low"
    assert all(torch.equal(a, b) for a, b in zip(first, maps.kept_positions))
    maps.data_maps = [-m for m in maps.data_maps]  # the reverse ranking keeps the complement
    reversed_ = maps.kept_positions[0].flatten().sort().values
    assert torch.equal(reversed_, high[0].flatten().sort().values)


def test_splits_are_new_modules_and_maps_know_their_layout() -> None:
    maps = _maps()
    first, second = maps.splits(), maps.splits()
    assert all(a is not b and torch.equal(a.index, b.index) for a, b in zip(first, second))
    for index, tensor in enumerate(maps.maps):
        layout = S.map_layout(tensor)
        assert layout is not None and layout.data_shape == SHAPE
        assert torch.equal(
            layout.positions.flatten().sort().values,
            (
                torch.arange(64)
                if index == 0
                else maps.kept_positions[index - 1].flatten().sort().values
            ),
        )
    assert S.map_layout(maps.maps[0].clone()) is None


# --- modes and parts ---------------------------------------------------------------------------


def test_eval_mode_restores_every_submodule_also_after_an_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Dropout(), nn.Linear(2, 2)))
    model.train()
    model[1][0].eval()  # a frozen submodule inside a training model
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == before


def test_flow_parts() -> None:
    factory = make_level_factory("realnvp", "tiny")
    transform = build_nms_transform(factory, SHAPE, 2)
    flow = build_flow(transform, SHAPE)
    parts = flow_parts(flow)
    assert parts.transform is transform and parts.distribution is flow._distribution
    with pytest.raises(TypeError, match=r"expected an nflows\.flows\.Flow; got .*Linear"):
        flow_parts(nn.Linear(2, 2))
    assert isinstance(flow, Flow)


# --- names -------------------------------------------------------------------------------------


def _glow_level(index: int, shape: tuple[int, ...]) -> list[nf.flows.Flow]:
    c = 4 * shape[0]
    return [nf.flows.GlowBlock(c, 8, split_mode="channel", scale=True), nf.flows.Squeeze()]


def test_the_old_normflows_names_warn_and_still_work() -> None:
    assert "LCMASplit" not in lnf.__all__ and "estimate_contributions" not in lnf.__all__
    contributions = torch.randn(8, 2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DeprecationWarning, match="use lcma_ext.normflows.LCMAMerge"):
        old = lnf.LCMASplit(contributions, factor_out="high")
    new = lnf.LCMAMerge(contributions, factor_out="high")
    assert isinstance(old, lnf.LCMAMerge) and torch.equal(old.split.index, new.split.index)
    torch.manual_seed(0)
    nms = lnf.build_nms_model(_glow_level, SHAPE, 2)
    x = torch.randn(8, *SHAPE)
    with pytest.warns(
        DeprecationWarning, match="use lcma_ext.normflows.estimate_model_contributions"
    ):
        old_maps = lnf.estimate_contributions(nms, x, _glow_level, progress=False)
    new_maps = lnf.estimate_model_contributions(nms, x, _glow_level, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(old_maps.data_maps, new_maps.data_maps))
    assert lcma_ext.estimate_contributions is C.estimate_contributions  # the core name is its own


def test_init_files_only_re_export() -> None:
    for path in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            names = (
                [t.id for t in node.targets if isinstance(t, ast.Name)]
                if isinstance(node, ast.Assign)
                else []
            )
            allowed = isinstance(node, ast.Import | ast.ImportFrom) or docstring
            allowed = allowed or (set(names) <= {"__all__", "__version__"} and bool(names))
            assert allowed, f"{path.relative_to(PACKAGE.parent)}:{node.lineno} is not a re-export"


# --- the shapes of the model families ----------------------------------------------------------


def _reference_max_levels(shape: tuple[int, ...]) -> int:
    _, h, w = shape
    levels = 0
    while h % 2 == 0 and w % 2 == 0:
        h, w, levels = h // 2, w // 2, levels + 1
    return levels


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 6, 8), (2, 12, 4), (1, 1, 1)])
def test_level_shapes_and_max_num_levels(shape: tuple[int, ...]) -> None:
    assert max_num_levels(shape) == _reference_max_levels(shape)
    levels = max_num_levels(shape)
    if levels == 0:
        return
    steps = list(level_shapes(shape, levels))
    c, h, w = shape
    for step in steps:  # every level squeezes; every split point halves the channels
        assert step.input_shape == (c, h, w)
        c, h, w = 4 * c, h // 2, w // 2
        assert step.output_shape == (c, h, w)
        if step.is_split_point:
            c = c // 2
            assert step.kept_shape == step.factored_shape == (c, h, w)
    # the levels a factory builds have the same shapes
    if levels >= 2:
        factory = make_level_factory("realnvp", "tiny")
        built = walk_levels(factory, shape, levels)
        for a, b in zip(steps, built, strict=True):
            assert (a.input_shape, a.output_shape, a.kept_shape) == (
                b.input_shape,
                b.output_shape,
                b.kept_shape,
            )
    with pytest.raises(ValueError, match=r"expected an image shape \(C, H, W\)"):
        max_num_levels(shape[1:])


@pytest.mark.parametrize(("shape", "levels"), [((1, 8, 8), 3), ((3, 64, 64), 4), ((1, 24, 48), 3)])
def test_region_tile_at_every_split_point(shape: tuple[int, ...], levels: int) -> None:
    """The check a run does before training: the capped tile divides each split's grid."""
    for region_size, step in itertools.product((1, 2, 3, 4, 5), level_shapes(shape, levels)):
        if not step.is_split_point:
            continue
        _, h, w = step.output_shape  # post_squeeze: the grid of local blocks
        side = min(region_size, h, w)
        if h % side or w % side:
            with pytest.raises(ValueError, match="expected a region_size dividing"):
                S.region_tile(step.output_shape, region_size)
        else:
            assert S.region_tile(step.output_shape, region_size) == (side, side)
    with pytest.raises(ValueError, match="with sites"):
        S.region_tile((8,), 2)
