"""Splits as normflows ``MultiscaleFlow`` merges (:class:`LCMAMerge` and any other split).

normflows' ``MultiscaleFlow(q0, flows, merges)`` runs noise to data in ``forward``: each merge's
``forward([z, z_new])`` joins the latent ``z`` coming from the deeper levels with the newly
sampled ``z_new`` of this level, and its ``inverse(z)`` (data to noise) returns ``[z, z_new]``
again. Here ``z`` is the half that is *kept* (it goes on through the deeper levels) and
``z_new`` the half *factored out* (scored by this level's base distribution ``q0``).
:class:`SplitMerge` wraps any :class:`lcma_ext.splits.Split` in that interface, so the LCMA
split of the core package drops into a normflows model unchanged. The step itself (split, prior,
log-det, the per-dimension map) is the core's :class:`lcma_ext.multiscale.SplitPoint`, the same
one nflows' :class:`lcma_ext.ContributionMultiscaleFlow` runs.

With a :class:`lcma_ext.transforms.ConditionalGaussianPrior` (Glow's learned prior of the
factored half, ``build_multiscale_model(..., prior="conditional")``) the merge also carries the
affine map ``eps = (z_new - mu(z)) / sigma(z)`` conditioned on the kept half: ``inverse``
returns ``[z, eps]`` with log-det ``-sum log sigma(z)``, ``forward`` joins ``mu(z) + sigma(z) *
eps``. The base distribution then scores ``eps``, so normflows' ``MultiscaleFlow`` (its
``log_prob``, ``sample`` and ``forward_and_log_det``) runs unchanged and sampling draws every
factored half from its conditional given the kept half.

In normflows' Glow example each level's flows end with ``normflows.flows.Squeeze`` (a squeeze in
the data-to-noise direction, with nflows' channel ordering ``4c + 2 dy + dx``), so the merge
acts on the squeezed tensor: the default ``placement="post_squeeze"``.

References:
    V. Stimper et al. normflows: A PyTorch Package for Normalizing Flows. JOSS 2023.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.3.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import normflows as nf
from torch import Tensor

from lcma_ext import splits as core
from lcma_ext.multiscale import SplitPoint, migrate_state_keys
from lcma_ext.transforms.factor_prior import ConditionalGaussianPrior

__all__ = ["LCMAMerge", "SplitMerge"]

#: Keys of a :class:`SplitMerge` state saved before its step was a :class:`SplitPoint`.
_STATE_RENAMES = ((r"split\.", "point.split."), (r"prior\.", "point.prior."))


class SplitMerge(nf.flows.Merge):
    """A normflows merge built from any :class:`lcma_ext.splits.Split`, optionally with a prior.

    It subclasses ``normflows.flows.Merge``, so code that checks for a merge accepts it; the
    split object replaces normflows' ``mode`` (channel or checkerboard halves). Without a prior
    it only moves dimensions (log-det 0); with a :class:`ConditionalGaussianPrior` the factored
    half leaves (data to noise) as ``eps = (z_new - mu(z)) / sigma(z)``, ``z`` the kept half.
    The step is a :class:`lcma_ext.multiscale.SplitPoint` (:attr:`point`); states saved before
    (with ``split`` and ``prior`` keys) still load.

    Args:
        split: A bound split (an index split built with its input shape, or a ChannelSplit).
        prior: ``None`` (default; the base distribution scores the factored half itself) or
            Glow's conditional prior built for the split's halves.

    Shapes:
        forward: ``[kept (B, *kept_shape), factored (B, *factored_shape)]`` ->
        ``(B, *input_shape)``; inverse: the reverse; log_det: ``(B,)``.

    Raises:
        TypeError: for a split that is not a :class:`lcma_ext.splits.Split`, or another prior.
        ValueError: for a prior of other halves than the (bound index) split's.

    References:
        D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
        NeurIPS 2018 (``split2d``).
    """

    def __init__(self, split: core.Split, prior: ConditionalGaussianPrior | None = None) -> None:
        super().__init__(mode="channel")
        self.point = SplitPoint(split, prior)

    @property
    def split(self) -> core.Split:
        """The split."""
        return self.point.split

    @property
    def prior(self) -> ConditionalGaussianPrior | None:
        """The conditional prior of the factored half, or ``None``."""
        return self.point.prior

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        migrate_state_keys(state_dict, prefix, _STATE_RENAMES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Merge ``[z_kept, z_factored]`` (noise to data); returns ``(z, log_det)``."""
        if not isinstance(z, (list, tuple)) or len(z) != 2:
            raise ValueError(
                f"expected a pair [z_kept, z_factored]; got {type(z).__name__} of "
                f"{len(z) if isinstance(z, (list, tuple)) else 'no'} entries"
            )
        kept, factored = z
        return self.point.inverse(factored, kept)

    def inverse(self, z: Tensor) -> tuple[list[Tensor], Tensor]:
        """Split ``z`` (data to noise); returns ``([z_kept, z_factored], log_det)``."""
        factored, kept, log_det = self.point(z)
        return [kept, factored], log_det

    def inverse_with_diag(
        self, z: Tensor, diag: Tensor
    ) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """:meth:`inverse` and the per-dimension log-dets ``diag`` (shaped like ``z``) split alike.

        The prior adds its ``-log sigma(z_kept)`` to each factored dimension's entry.

        Returns:
            ``([z_kept, z_factored], log_det, [diag_kept, diag_factored])``.
        """
        step = self.point.forward_with_diag(z, diag)
        return [step.kept, step.factored], step.logabsdet, [step.kept_diag, step.factored_diag]


class LCMAMerge(SplitMerge):
    """The LCMA split as a normflows ``MultiscaleFlow`` merge.

    Same arguments as :class:`lcma_ext.LCMASplit`: inside each local ``2 x 2`` block keep the two
    dimensions with the highest contribution and factor out the two lowest (``"high"``: the
    reverse). ``contributions`` is the map in the layout of the merge's data-side tensor (after
    the level's squeeze for ``placement="post_squeeze"``).

    Args:
        contributions: ``(4C, H, W)``, ``(C, H, W)`` (``placement="squeeze"``) or ``(D,)``.
        factor_out: ``"low"`` (default) or ``"high"``.
        placement: ``"post_squeeze"`` (default) or ``"squeeze"``.
        prior: As in :class:`SplitMerge`.
    """

    def __init__(
        self,
        contributions: Tensor,
        factor_out: str = "low",
        placement: str = "post_squeeze",
        prior: ConditionalGaussianPrior | None = None,
    ) -> None:
        super().__init__(core.LCMASplit(contributions, factor_out, placement), prior)


class LCMASplit(LCMAMerge):
    """Deprecated name of :class:`LCMAMerge` (it is a merge; :class:`lcma_ext.LCMASplit` is the
    core split). Kept for one release: using it warns with a ``DeprecationWarning``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "lcma_ext.normflows.LCMASplit is deprecated and will be removed in the next "
            "release: use lcma_ext.normflows.LCMAMerge (lcma_ext.LCMASplit is the core split)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)
