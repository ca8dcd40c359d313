"""Splits as normflows ``MultiscaleFlow`` merges (``LCMASplit`` and any other split).

normflows' ``MultiscaleFlow(q0, flows, merges)`` runs noise to data in ``forward``: each merge's
``forward([z, z_new])`` joins the latent ``z`` coming from the deeper levels with the newly
sampled ``z_new`` of this level, and its ``inverse(z)`` (data to noise) returns ``[z, z_new]``
again. Here ``z`` is the half that is *kept* (it goes on through the deeper levels) and
``z_new`` the half *factored out* (scored by this level's base distribution ``q0``).
:class:`SplitMerge` wraps any :class:`lcma_ext.splits.Split` in that interface, so the LCMA
split of the core package drops into a normflows model unchanged.

In normflows' Glow example each level's flows end with ``normflows.flows.Squeeze`` (a squeeze in
the data-to-noise direction, with nflows' channel ordering ``4c + 2 dy + dx``), so the merge
acts on the squeezed tensor: the default ``placement="post_squeeze"``.

References:
    V. Stimper et al. normflows: A PyTorch Package for Normalizing Flows. JOSS 2023.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.3.
"""

from __future__ import annotations

from collections.abc import Sequence

import normflows as nf
import torch
from torch import Tensor

from lcma_ext import splits as core

__all__ = ["LCMASplit", "SplitMerge"]


class SplitMerge(nf.flows.Merge):
    """A normflows merge built from any :class:`lcma_ext.splits.Split` (log-det 0).

    It subclasses ``normflows.flows.Merge``, so code that checks for a merge accepts it; the
    split object replaces normflows' ``mode`` (channel or checkerboard halves).

    Args:
        split: A bound split (an index split built with its input shape, or a ChannelSplit).

    Shapes:
        forward: ``[kept (B, *kept_shape), factored (B, *factored_shape)]`` ->
        ``(B, *input_shape)``; inverse: the reverse.
    """

    def __init__(self, split: core.Split) -> None:
        super().__init__(mode="channel")
        if not isinstance(split, core.Split):
            raise TypeError(f"expected a lcma_ext.splits.Split; got {type(split).__name__}")
        self.split = split

    def forward(self, z: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Merge ``[z_kept, z_factored]`` (noise to data); returns ``(z, log_det)``."""
        if not isinstance(z, (list, tuple)) or len(z) != 2:
            raise ValueError(
                f"expected a pair [z_kept, z_factored]; got {type(z).__name__} of "
                f"{len(z) if isinstance(z, (list, tuple)) else 'no'} entries"
            )
        kept, factored = z
        merged = self.split.inverse(factored, kept)
        return merged, torch.zeros(merged.shape[0], dtype=merged.dtype, device=merged.device)

    def inverse(self, z: Tensor) -> tuple[list[Tensor], Tensor]:
        """Split ``z`` (data to noise); returns ``([z_kept, z_factored], log_det)``."""
        factored, kept = self.split(z)
        return [kept, factored], torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)


class LCMASplit(SplitMerge):
    """The LCMA split as a normflows ``MultiscaleFlow`` merge.

    Same arguments as :class:`lcma_ext.LCMASplit`: inside each local ``2 x 2`` block keep the two
    dimensions with the highest contribution and factor out the two lowest (``"high"``: the
    reverse). ``contributions`` is the map in the layout of the merge's data-side tensor (after
    the level's squeeze for ``placement="post_squeeze"``).

    Args:
        contributions: ``(4C, H, W)``, ``(C, H, W)`` (``placement="squeeze"``) or ``(D,)``.
        factor_out: ``"low"`` (default) or ``"high"``.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.
    """

    def __init__(
        self, contributions: Tensor, factor_out: str = "low", placement: str = "post_squeeze"
    ) -> None:
        super().__init__(core.LCMASplit(contributions, factor_out, placement))
