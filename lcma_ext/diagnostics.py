"""Split diagnostics: how decisive, and how static, the LCMA split of a contribution map is.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.3.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lcma_ext.splits import (
    CHECKERBOARD_KEPT,
    check_contributions,
    rank_blocks,
    rank_tiles,
    rank_vector,
    squeeze_layout,
)

__all__ = ["NEAR_TIE_RTOL", "split_diagnostics"]

#: Relative difference below which two contributions count as a near-tie in the diagnostics.
NEAR_TIE_RTOL = 1e-6

#: Bitmasks (bit ``k`` = block position ``k``) of the six possible kept pairs.
_PAIR_CODES = (3, 5, 9, 6, 10, 12)


def _mean_entropy_bits(shares: Tensor) -> float:
    """Mean over rows of the entropy in bits of each row's distribution (``0 log 0 = 0``)."""
    terms = torch.where(shares > 0, -shares * torch.log2(shares), torch.zeros_like(shares))
    return float(terms.sum(1).mean()) + 0.0  # + 0.0: no -0.0


def _pattern_name(mask: int) -> str:
    return "+".join(name for bit, name in enumerate(("TL", "TR", "BL", "BR")) if mask >> bit & 1)


@torch.no_grad()
def split_diagnostics(
    contributions: Tensor, placement: str = "post_squeeze", rtol: float = NEAR_TIE_RTOL
) -> dict[str, Any]:
    """How decisive, and how static, the LCMA split of one contribution map is.

    Per local block, the decision is between the 2nd and 3rd highest contributions.

    Returns:
        A dict of plain Python numbers (safe for ``torch.load(weights_only=True)``):
        ``blocks`` (number of local blocks; 1 for vector data), ``ties`` (blocks whose 2nd and
        3rd values are equal), ``near_ties`` (relative difference ``|a - b| / max(|a|, |b|)``
        below ``rtol``, ties included), ``differs_from_channel`` (fraction of blocks whose kept
        set differs from :class:`ChannelSplit`'s; in nflows' squeeze ordering the channel split
        keeps the bottom row of every block when there is one channel group (a one-channel
        image at the first level), but whole blocks or none when the number of groups is even,
        which makes this 1.0 by construction),
        ``differs_from_checkerboard``, ``differs_from_modal`` (from the most common within-block
        pattern over all blocks), ``differs_from_group_modal`` (from the most common pattern of
        the block's own channel group; 0.0 means the split is spatially static per channel, a
        static split in disguise), ``kept_overlap_with_channel`` (fraction of kept dimensions
        that ChannelSplit also keeps), ``patterns`` (count per kept pattern, e.g. "TL+BR"),
        and the spatial consistency of the per-site choice: ``agrees_with_channel_granularity``
        (fraction of blocks whose kept set equals the ``granularity="channel"`` choice of their
        channel group), ``kept_position_entropy`` (mean over channel groups of the entropy, in
        bits, of the histogram of kept block positions over the group's sites: 1.0 when every
        site keeps the same two positions, 2.0 when each position is kept at half the sites)
        and ``kept_pattern_entropy`` (likewise over the six kept pairs: 0.0 for a spatially
        static choice, at most ``log2(6)``). Vector data has one block: 1.0, 0.0 and 0.0.
    """
    values = check_contributions(contributions, placement).detach().to("cpu", torch.float64)
    if values.dim() == 1:
        d = values.shape[0]
        ranked = rank_vector(values)
        sorted_values = values[ranked]
        a, b = sorted_values[d // 2 - 1], sorted_values[d // 2]
        kept = torch.zeros(d, dtype=torch.bool)
        kept[ranked[: d // 2]] = True
        channel_kept = torch.arange(d) >= d - d // 2
        checker_kept = torch.arange(d) % 2 == 1
        tie = bool(a == b)
        near_tie = tie or bool((a - b).abs() < rtol * torch.maximum(a.abs(), b.abs()))
        return {
            "blocks": 1,
            "ties": int(tie),
            "near_ties": int(near_tie),
            "differs_from_channel": float(not torch.equal(kept, channel_kept)),
            "differs_from_checkerboard": float(not torch.equal(kept, checker_kept)),
            "differs_from_modal": 0.0,
            "differs_from_group_modal": 0.0,
            "kept_overlap_with_channel": float((kept & channel_kept).sum() / max(d // 2, 1)),
            "patterns": {},
            "agrees_with_channel_granularity": 1.0,
            "kept_position_entropy": 0.0,
            "kept_pattern_entropy": 0.0,
        }
    if placement == "squeeze":
        values = squeeze_layout(values)
    c4, h, w = values.shape
    groups = c4 // 4
    blocks = values.view(groups, 4, h, w)
    sorted_values = torch.sort(blocks, dim=1, descending=True).values
    a, b = sorted_values[:, 1], sorted_values[:, 2]
    ties = a == b
    near = ties | ((a - b).abs() < rtol * torch.maximum(a.abs(), b.abs()))
    ranked = rank_blocks(blocks)
    weights = torch.tensor([1, 2, 4, 8]).view(1, 4, 1, 1)
    kept_mask = torch.zeros(groups, 4, h, w, dtype=torch.long).scatter(1, ranked[:, :2], 1)
    mask = (kept_mask * weights).sum(1)  # (G, h, w) bitmask of kept positions
    channel_kept = (4 * torch.arange(groups).view(groups, 1) + torch.arange(4)) >= 2 * groups
    channel_mask = (channel_kept.long() * weights.view(1, 4)).sum(1).view(groups, 1, 1)
    checker_mask = sum(1 << k for k in CHECKERBOARD_KEPT)
    codes, counts = torch.unique(mask, return_counts=True)
    modal = int(codes[torch.argmax(counts)])
    group_modal = torch.mode(mask.view(groups, -1), dim=1).values.view(groups, 1, 1)
    overlap = (kept_mask.bool() & channel_kept.view(groups, 4, 1, 1)).sum()
    static = rank_tiles(blocks, (h, w))[:, :2, :1, :1]  # channel granularity, one per group
    static_mask = torch.zeros(groups, 4, 1, 1, dtype=torch.long).scatter(1, static, 1)
    agrees = mask == (static_mask * weights).sum(1)
    position_share = kept_mask.double().mean(dim=(2, 3)) / 2  # (G, 4), rows sum to 1
    pattern_share = torch.stack(
        [(mask == code).double().mean(dim=(1, 2)) for code in _PAIR_CODES], dim=1
    )  # (G, 6)
    return {
        "blocks": int(mask.numel()),
        "ties": int(ties.sum()),
        "near_ties": int(near.sum()),
        "differs_from_channel": float((mask != channel_mask).double().mean()),
        "differs_from_checkerboard": float((mask != checker_mask).double().mean()),
        "differs_from_modal": float((mask != modal).double().mean()),
        "differs_from_group_modal": float((mask != group_modal).double().mean()),
        "kept_overlap_with_channel": float(overlap / (2 * mask.numel())),
        "patterns": {_pattern_name(int(code)): int(count) for code, count in zip(codes, counts)},
        "agrees_with_channel_granularity": float(agrees.double().mean()),
        "kept_position_entropy": _mean_entropy_bits(position_share),
        "kept_pattern_entropy": _mean_entropy_bits(pattern_share),
    }
