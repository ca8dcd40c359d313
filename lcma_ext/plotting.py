"""Figures: contribution heatmaps with kept and factored dimensions, learning curves, image grids.

matplotlib is imported inside each function, with the Agg backend, so importing this module
draws in nothing. Every function saves its figure, closes it and returns it (a closed
``matplotlib.figure.Figure``, whose titles, labels and legends can still be read).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lcma_ext.contributions import ContributionMaps
from lcma_ext.diagnostics import split_diagnostics
from lcma_ext.splits import kept_block_positions

if TYPE_CHECKING:
    from matplotlib.lines import Line2D

__all__ = [
    "CONTRIBUTION_UNITS",
    "plot_contributions",
    "plot_learning_curves",
    "sample_title",
    "save_image_grid",
]

#: Colourbar label of the contribution heatmaps.
CONTRIBUTION_UNITS = "mean contribution to log|det J| (nats)"
#: Mask colours of the heatmaps: factored out earlier, factored out here, kept.
MASK_COLOURS = ("#bdbdbd", "#ff9933", "#33aa33")
#: Line styles and markers that tell the seeds of an arm apart in the learning curves.
SEED_STYLES: tuple[Literal["-", "--", ":", "-."], ...] = ("-", "--", ":", "-.")
SEED_MARKERS = ("o", "s", "^", "D", "v", "P")


def _alive_masks(maps: ContributionMaps, index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Data-layout masks at split point ``index``: kept here, factored here, factored earlier."""
    numel = math.prod(maps.input_shape)
    kept = torch.zeros(numel, dtype=torch.bool)
    factored = torch.zeros(numel, dtype=torch.bool)
    kept[maps.kept_positions[index].reshape(-1)] = True
    factored[maps.factored_positions[index].reshape(-1)] = True
    earlier = ~(kept | factored)
    shape = maps.input_shape
    return kept.view(shape), factored.view(shape), earlier.view(shape)


def plot_contributions(
    maps: ContributionMaps,
    path: str | Path,
    splits: Sequence[int] | None = None,
    max_channels: int = 3,
) -> Any:
    """Save a heatmap per split point, in the data's layout, with kept vs factored dimensions.

    One row per split point: for each data channel (at most ``max_channels``), the averaged
    cumulative contribution of the dimensions still in the flow at that split point (colourbar:
    :data:`CONTRIBUTION_UNITS`; those factored out earlier are grey), and a mask in the paper's
    colours: green = kept (more flow layers), orange = factored out here, grey = factored out
    earlier, explained in the figure's legend. Image data gets a
    last panel, the kept-position map: the kept pair of block positions at every site of the
    split's block grid (channel groups side by side), titled with the share of sites that agree
    with the channel-granularity choice and the kept-position entropy (see
    :func:`lcma_ext.diagnostics.split_diagnostics`). Vector data is drawn as a ``1 x D`` image.
    matplotlib is imported here, with the Agg backend.

    Args:
        maps: Contribution maps with positions (from :func:`estimate_contributions`).
        path: Output image file (format from the suffix, e.g. ``.png``).
        splits: Indices of the split points to draw; all by default.
        max_channels: Data channels drawn per split point.

    Returns:
        The (closed) matplotlib figure.

    Raises:
        ValueError: for split indices out of range or maps without positions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not maps.kept_positions:
        raise ValueError("expected maps with kept/factored positions; got none")
    indices = list(range(len(maps.data_maps))) if splits is None else list(splits)
    for index in indices:
        if not 0 <= index < len(maps.data_maps):
            raise ValueError(
                f"expected split indices in [0, {len(maps.data_maps) - 1}]; got {index}"
            )
    shape = maps.input_shape
    images: Callable[[Tensor], Tensor] = (
        (lambda t: t.view(1, 1, -1)) if len(shape) == 1 else (lambda t: t)
    )
    channels = min(max_channels, 1 if len(shape) == 1 else shape[0])
    columns = 2 * channels + (len(shape) == 3)
    fig, axes = plt.subplots(
        len(indices), columns, figsize=(3.2 * columns, 3.0 * len(indices) + 0.4), squeeze=False
    )
    colours = ListedColormap(list(MASK_COLOURS))
    # the dimensions factored out earlier in the mask's grey
    heat = matplotlib.colormaps["viridis"].with_extremes(bad=MASK_COLOURS[0])
    for row, index in enumerate(indices):
        kept, factored, earlier = (images(m) for m in _alive_masks(maps, index))
        values = images(maps.data_maps[index].clone())
        values[earlier] = float("nan")
        category = kept.long() * 2 + factored.long()
        for channel in range(channels):
            ax = axes[row, 2 * channel]
            shown = ax.imshow(values[channel].numpy(), cmap=heat, interpolation="nearest")
            bar = fig.colorbar(shown, ax=ax, fraction=0.046)
            bar.set_label(CONTRIBUTION_UNITS, fontsize=7)
            ax.set_title(f"split {index}: L^({index + 1}), ch {channel}", fontsize=9)
            ax = axes[row, 2 * channel + 1]
            ax.imshow(
                category[channel].numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest"
            )
            ax.set_title("kept (green) / factored here (orange) / earlier (grey)", fontsize=8)
        if len(shape) == 3:
            _plot_kept_positions(fig, axes[row, -1], maps, index)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    labels = (
        "factored out at an earlier split point (grey, also in the heatmap)",
        "factored out at this split point",
        "kept (goes on through more flow layers)",
    )
    handles = [Patch(facecolor=c, edgecolor="black", label=t) for c, t in zip(MASK_COLOURS, labels)]
    fig.legend(handles=handles[::-1], loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / (3.0 * len(indices) + 0.4), 1, 1))  # room for the legend
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
    return fig


def _plot_kept_positions(fig: Any, ax: Any, maps: ContributionMaps, index: int) -> None:
    """The per-site kept pair of block positions at split point ``index`` (groups side by side)."""
    from matplotlib.colors import ListedColormap

    contribution = maps.maps[index]
    kept, _ = kept_block_positions(contribution, maps.placement, maps.factor_out)
    codes = (1 << kept).sum(1)  # (G, h, w) bitmask of the kept pair
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    category = torch.full(codes.shape, -1, dtype=torch.long)
    for number, (a, b) in enumerate(pairs):
        category[codes == (1 << a) + (1 << b)] = number
    groups, h, w = category.shape
    image = torch.full((h, groups * (w + 1) - 1), float("nan"))
    for group in range(groups):
        image[:, group * (w + 1) : group * (w + 1) + w] = category[group].double()
    colours = ListedColormap(["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"])
    shown = ax.imshow(image.numpy(), cmap=colours, vmin=-0.5, vmax=5.5, interpolation="nearest")
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, ticks=range(6))
    names = ("TL", "TR", "BL", "BR")
    bar.ax.set_yticklabels([f"{names[a]}+{names[b]}" for a, b in pairs], fontsize=7)
    stats = split_diagnostics(contribution, maps.placement)
    ax.set_title(
        f"kept positions per site ({groups} group{'s' * (groups > 1)})\n"
        f"agree w/ channel gran. {stats['agrees_with_channel_granularity']:.2f}, "
        f"H {stats['kept_position_entropy']:.2f} bit"
        + (" (of the low rule)" if maps.factor_out == "high" else ""),
        fontsize=8,
    )


def _finite_values(curve: Sequence[Any]) -> list[float]:
    """The finite bits/dim of a curve of ``(epoch, bpd)`` pairs or of plain values."""
    values = [point[1] if isinstance(point, (list, tuple)) else point for point in curve]
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _points(curve: Sequence[Any]) -> tuple[list[float], list[float]]:
    """``(epochs, values)`` of a test curve (``(epoch, bpd)`` pairs) or a train curve."""
    if curve and isinstance(curve[0], (list, tuple)):
        epochs, values = zip(*curve)
        return list(epochs), list(values)
    return list(range(1, len(curve) + 1)), list(curve)


def _zoom(
    runs: dict[str, list[dict[str, Any]]], nms: dict[str, Any] | None
) -> tuple[float, float] | None:
    """y-limits of the test panel: the arms' converged part, and the whole NMS curve."""
    finals = [v for arm_runs in runs.values() for r in arm_runs
              for v in _finite_values(r["test_bpd_curve"])]  # fmt: skip
    if not finals:
        return None
    low = min(finals)
    high = low + max(0.5, 4 * (statistics.median(finals) - low))  # the first epochs are far above
    nms_values = _finite_values(nms["test_bpd_curve"]) if nms else []
    if nms_values:
        low, high = min(low, min(nms_values)), max(high, max(nms_values))
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def _curve_legend(
    arms: Sequence[str], colours: Sequence[str], seeds: Sequence[Any], nms: bool
) -> list[Line2D]:
    """Legend handles: one colour per arm, one line style and marker per seed, the NMS."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, linewidth=2, label=arm) for arm, c in zip(arms, colours)]
    handles += [
        Line2D([], [], color="grey", linestyle=SEED_STYLES[k % len(SEED_STYLES)],
               marker=SEED_MARKERS[k % len(SEED_MARKERS)], label=f"seed {seed}")
        for k, seed in enumerate(seeds)
    ]  # fmt: skip
    if nms:
        handles.append(
            Line2D([], [], color="black", linewidth=2.5, marker="x", label="nms (no split, seed 0)")
        )
    return handles


def plot_learning_curves(
    runs: dict[str, list[dict[str, Any]]], path: str | Path, nms: dict[str, Any] | None = None
) -> Any:
    """Train and test bits/dim per epoch: colour per arm, line style and marker per seed.

    x: epoch, y: bits/dim, one panel for the training set and one for the test set, a legend
    naming every arm, every seed and the NMS flow. The test panel zooms on the arms' converged
    part (their first epochs are far above) but always shows the whole NMS curve.

    Args:
        runs: Per arm, run summaries with ``train_bpd_curve`` and ``test_bpd_curve``
            (``(epoch, bpd)`` pairs) and ``seed``, as ``runs/<arm>_seed<k>.json`` hold them.
        path: The PNG to write.
        nms: The NMS run summary, drawn in black with crosses (optional).

    Returns:
        The (closed) matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = [cycle[index % len(cycle)] for index in range(len(runs))]
    seeds = list(dict.fromkeys(r.get("seed", k) for rs in runs.values() for k, r in enumerate(rs)))
    for colour, arm_runs in zip(colours, runs.values()):
        for k, run in enumerate(arm_runs):
            number = seeds.index(run.get("seed", k))
            style = {
                "color": colour,
                "alpha": 0.8,
                "linestyle": SEED_STYLES[number % len(SEED_STYLES)],
                "marker": SEED_MARKERS[number % len(SEED_MARKERS)],
                "markersize": 3,
            }
            for axis, key in zip(axes, ("train_bpd_curve", "test_bpd_curve")):
                if run.get(key):
                    axis.plot(*_points(run[key]), **style)
    has_nms = bool(nms and nms.get("test_bpd_curve"))
    if nms:
        for axis, key in zip(axes, ("train_bpd_curve", "test_bpd_curve")):
            if nms.get(key):
                axis.plot(*_points(nms[key]), color="black", linewidth=2.5, marker="x")
    for axis, title, label in zip(
        axes, ("training set", "test set"), ("train bits/dim", "test bits/dim")
    ):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(label)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    limits = _zoom(runs, nms)
    if limits is not None:
        axes[1].set_ylim(*limits)
    handles = _curve_legend(list(runs), colours, seeds, has_nms)
    figure.legend(handles=handles, loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 0.82, 1))
    figure.savefig(str(path), dpi=100, format="png")
    plt.close(figure)
    return figure


def sample_title(
    arm: str,
    temperature: float,
    bpd: float,
    seed: int | None = None,
    kind: str = "exact",
) -> str:
    """The title of a sample grid: ``"lcma, seed 0: T = 0.7, test 1.234 bits/dim"``.

    ``kind`` (the bits/dim kind of :func:`lcma_ext.distributions.bpd_kind`) is named unless
    ``"exact"``.
    """
    who = arm if seed is None else f"{arm}, seed {seed}"
    value = f"{bpd:.3f}" if math.isfinite(bpd) else "non-finite"
    label = "" if kind == "exact" else f" ({kind})"
    return f"{who}: T = {temperature:g}, test {value} bits/dim{label}"


def _grid(images: Tensor, nrow: int) -> Any:
    """``(N, C, H, W)`` images as one ``(rows (H + 1) + 1, nrow (W + 1) + 1, C)`` array."""
    import numpy as np

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.float32)
    for index in range(n):
        r, q = divmod(index, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = (
            images[index].permute(1, 2, 0).numpy()
        )
    return grid


def save_image_grid(
    images: Tensor, path: str | Path, nrow: int = 8, title: str | None = None
) -> Any:
    """Save ``(N, C, H, W)`` images in ``[0, 1]`` as one grid PNG, with an optional title.

    Each image pixel is drawn as a block of screen pixels (about 48 per image side), images
    separated by white lines; non-finite values are drawn black.

    Args:
        images: ``(N, C, H, W)``, ``C`` 1 (grey) or 3 (RGB).
        path: The PNG to write.
        nrow: Images per row.
        title: Drawn above the grid (e.g. :func:`sample_title`).

    Returns:
        The (closed) matplotlib figure.
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = torch.nan_to_num(images.detach().float().cpu(), nan=0.0).clamp(0, 1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W); got shape {tuple(images.shape)}")
    nrow = max(1, min(nrow, images.shape[0]))
    grid = _grid(images, nrow)
    scale = max(1, round(48 / max(images.shape[2:])))
    width, height = grid.shape[1] * scale / 100, grid.shape[0] * scale / 100
    top = 0.45 if title else 0.0
    wide = min(0.07 * len(title), 6.0) if title else 1.0  # room for the title on one line
    figure = plt.figure(figsize=(max(width, wide), height + top), dpi=100)
    axis = figure.add_axes((0, 0, 1, height / (height + top)))
    gray = grid.shape[2] == 1
    shown = grid[..., 0] if gray else grid
    axis.imshow(shown, cmap="gray" if gray else None, vmin=0, vmax=1, interpolation="nearest")
    axis.axis("off")
    if title:
        wrapped = textwrap.fill(title, int(max(width, wide) / 0.07))
        axis.set_title(wrapped, fontsize=8 if "\n" in wrapped else 9)
    figure.savefig(str(path), format="png")
    plt.close(figure)
    return figure
