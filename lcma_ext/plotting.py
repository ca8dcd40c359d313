"""Figures: contribution heatmaps with kept and factored dimensions, learning curves, image grids.

matplotlib is imported inside each function, with the Agg backend, so importing this module
draws in nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lcma_ext.contributions import ContributionMaps
from lcma_ext.diagnostics import split_diagnostics
from lcma_ext.splits import kept_block_positions

__all__ = ["plot_contributions", "plot_learning_curves", "save_image_grid"]


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
) -> None:
    """Save a heatmap per split point, in the data's layout, with kept vs factored dimensions.

    One row per split point: for each data channel (at most ``max_channels``), the averaged
    cumulative contribution of the dimensions still in the flow at that split point (those
    factored out earlier are blank), and a mask in the paper's colours: green = kept (more
    flow layers), orange = factored out here, grey = factored out earlier. Image data gets a
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

    Raises:
        ValueError: for split indices out of range or maps without positions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if not maps.kept_positions:
        raise ValueError("expected maps with kept/factored positions; got none")
    indices = list(range(len(maps.data_maps))) if splits is None else list(splits)
    for index in indices:
        if not 0 <= index < len(maps.data_maps):
            raise ValueError(
                f"expected split indices in [0, {len(maps.data_maps) - 1}]; got {index}"
            )
    shape = maps.input_shape
    images = (lambda t: t.view(1, 1, -1)) if len(shape) == 1 else (lambda t: t)
    channels = min(max_channels, 1 if len(shape) == 1 else shape[0])
    columns = 2 * channels + (len(shape) == 3)
    fig, axes = plt.subplots(
        len(indices), columns, figsize=(3.2 * columns, 3.0 * len(indices)), squeeze=False
    )
    colours = ListedColormap(["#bdbdbd", "#ff9933", "#33aa33"])
    for row, index in enumerate(indices):
        kept, factored, earlier = (images(m) for m in _alive_masks(maps, index))
        values = images(maps.data_maps[index].clone())
        values[earlier] = float("nan")
        category = kept.long() * 2 + factored.long()
        for channel in range(channels):
            ax = axes[row, 2 * channel]
            shown = ax.imshow(values[channel].numpy(), cmap="viridis", interpolation="nearest")
            fig.colorbar(shown, ax=ax, fraction=0.046)
            ax.set_title(f"split {index}: L^({index + 1}), ch {channel}", fontsize=9)
            ax = axes[row, 2 * channel + 1]
            ax.imshow(
                category[channel].numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest"
            )
            ax.set_title("kept (green) / factored (orange)", fontsize=9)
        if len(shape) == 3:
            _plot_kept_positions(fig, axes[row, -1], maps, index)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


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


def plot_learning_curves(
    runs: dict[str, list[dict[str, Any]]], path: str | Path, nms: dict[str, Any] | None = None
) -> None:
    """Train and test bits/dim per epoch, one colour per arm, one line per seed.

    Args:
        runs: Per arm, run summaries with ``train_bpd_curve`` and ``test_bpd_curve``
            (``(epoch, bpd)`` pairs), as ``runs/<arm>_seed<k>.json`` hold them.
        path: The PNG to write.
        nms: The NMS run summary, drawn dashed in black (optional).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (arm, arm_runs) in enumerate(runs.items()):
        colour = colours[index % len(colours)]
        for k, run in enumerate(arm_runs):
            label = arm if k == 0 else None
            train = run["train_bpd_curve"]
            axes[0].plot(range(1, len(train) + 1), train, color=colour, alpha=0.7, label=label)
            if run["test_bpd_curve"]:
                epochs, values = zip(*run["test_bpd_curve"])
                axes[1].plot(epochs, values, color=colour, alpha=0.7, label=label)
    if nms and nms["test_bpd_curve"]:
        epochs, values = zip(*nms["test_bpd_curve"])
        axes[1].plot(epochs, values, color="black", linestyle="--", label="nms (no split)")
    for axis, title in zip(axes, ("train bits/dim", "test bits/dim")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    # Zoom on the converged part: the first epochs are far above.
    finals = [
        v
        for arm_runs in runs.values()
        for r in arm_runs
        for _, v in r["test_bpd_curve"]
        if math.isfinite(v)
    ]
    if finals:
        low = min(finals)
        axes[1].set_ylim(low - 0.05, low + max(0.5, 4 * (statistics.median(finals) - low)))
    figure.tight_layout()
    figure.savefig(str(path), dpi=100, format="png")
    plt.close(figure)


def save_image_grid(images: Tensor, path: str | Path, nrow: int = 8) -> None:
    """Save ``(N, C, H, W)`` images in ``[0, 1]`` as one grid PNG.

    Uses ``torchvision.utils.save_image`` when torchvision is installed, else matplotlib.
    """
    import numpy as np

    images = torch.nan_to_num(images.float(), nan=0.0).clamp(0, 1)
    try:
        from torchvision.utils import save_image
    except ImportError:
        save_image = None
    if save_image is not None:
        save_image(images, str(path), nrow=nrow, padding=1, format="png")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.float32)
    for index in range(n):
        r, q = divmod(index, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = (
            images[index].permute(1, 2, 0).numpy()
        )
    figure = plt.figure(figsize=(nrow * 0.6, rows * 0.6), dpi=100)
    axis = figure.add_axes((0, 0, 1, 1))
    axis.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    axis.axis("off")
    figure.savefig(str(path), format="png")
    plt.close(figure)
