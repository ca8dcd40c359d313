"""Figures carry what they show: grid titles, curve labels and legends, heatmap units.

The plotting functions return their (closed) matplotlib figures; the tests read titles, labels,
legends, line styles and limits from them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from lcma_ext.contributions import ContributionMaps
from lcma_ext.plotting import (
    CONTRIBUTION_UNITS,
    MASK_COLOURS,
    plot_contributions,
    plot_learning_curves,
    sample_title,
    save_image_grid,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _legend_texts(figure: Figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def test_image_grid_has_its_title_and_draws_every_image(tmp_path: Path) -> None:
    images = torch.rand(10, 1, 8, 8)
    title = sample_title("lcma+cond", 0.7, 2.34567, seed=1)
    assert title == "lcma+cond, seed 1: T = 0.7, test 2.346 bits/dim"
    figure = save_image_grid(images, tmp_path / "grid.png", nrow=4, title=title)
    assert (tmp_path / "grid.png").stat().st_size > 0
    (axis,) = figure.axes
    assert " ".join(axis.get_title().split()) == title  # wrapped only when too long
    grid = axis.get_images()[0].get_array()
    assert grid.shape == (3 * 9 + 1, 4 * 9 + 1)  # 3 rows of 4, one-pixel separators
    torch.testing.assert_close(torch.as_tensor(grid[1:9, 1:9]), images[0, 0])
    untitled = save_image_grid(torch.rand(2, 3, 4, 4), tmp_path / "rgb.png")
    assert untitled.axes[0].get_title() == ""


def test_sample_title_names_a_bound_and_a_non_finite_figure() -> None:
    assert sample_title("flow-vae-4", 1.0, 3.2, 0, "IWAE-128").endswith("bits/dim (IWAE-128)")
    assert "non-finite" in sample_title("lcma", 1.0, math.nan)


def _runs() -> dict[str, list[dict[str, Any]]]:
    def run(seed: int, offset: float) -> dict[str, Any]:
        test = [[epoch, 2.5 + offset - 0.1 * epoch] for epoch in (1, 2, 3)]
        return {"seed": seed, "train_bpd_curve": [2.6, 2.5, 2.4], "test_bpd_curve": test}

    return {arm: [run(0, k * 0.01), run(1, k * 0.01 + 0.005)] for k, arm in enumerate(("a", "b"))}


def test_learning_curves_are_labelled_seeds_apart_and_the_nms_unclipped(tmp_path: Path) -> None:
    nms = {"train_bpd_curve": [9.0, 5.0, 3.0], "test_bpd_curve": [[1, 8.5], [2, 4.0], [3, 2.1]]}
    figure = plot_learning_curves(_runs(), tmp_path / "curves.png", nms)
    train, test = figure.axes
    assert [axis.get_xlabel() for axis in (train, test)] == ["epoch", "epoch"]
    assert (train.get_ylabel(), test.get_ylabel()) == ("train bits/dim", "test bits/dim")
    low, high = test.get_ylim()
    assert low < 2.1 and high > 8.5  # the whole NMS curve, far above the arms' zoom
    texts = _legend_texts(figure)
    assert {"a", "b", "seed 0", "seed 1", "nms (no split, seed 0)"} <= set(texts)
    arms = test.get_lines()[:4]  # a seed 0, a seed 1, b seed 0, b seed 1
    colours = [line.get_color() for line in arms]
    styles = [(line.get_linestyle(), line.get_marker()) for line in arms]
    assert colours[0] == colours[1] != colours[2] == colours[3]
    assert styles[0] == styles[2] != styles[1] == styles[3]


def test_learning_curves_zoom_on_the_arms_without_an_nms(tmp_path: Path) -> None:
    figure = plot_learning_curves(_runs(), tmp_path / "curves.png")
    low, high = figure.axes[1].get_ylim()
    assert low < 2.2 and high < 3.0  # the converged part, not a far-off first epoch
    assert "nms (no split, seed 0)" not in _legend_texts(figure)


def test_heatmap_colourbar_has_units_and_the_grey_cells_a_legend(
    maps: ContributionMaps, tmp_path: Path
) -> None:
    figure = plot_contributions(maps, tmp_path / "maps.png", splits=[1])
    labels = [axis.get_ylabel() for axis in figure.axes]
    assert CONTRIBUTION_UNITS in labels and "nats" in CONTRIBUTION_UNITS
    texts = _legend_texts(figure)
    assert any(text.startswith("factored out at an earlier split point") for text in texts)
    assert "factored out at this split point" in texts and len(texts) == 3
    heatmap = figure.axes[0].get_images()[0]
    values = heatmap.get_array()
    assert values.mask.any()  # split 1: the dimensions factored out at split 0 are blank ...
    bad = heatmap.get_cmap().get_bad()
    grey = tuple(int(MASK_COLOURS[0][i : i + 2], 16) / 255 for i in (1, 3, 5))
    assert tuple(bad[:3]) == pytest.approx(grey)  # ... and drawn in the legend's grey
