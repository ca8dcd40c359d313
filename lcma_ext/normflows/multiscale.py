"""normflows models for Algorithm 1: the NMS flow, the multi-scale flow and one level.

normflows' ``MultiscaleFlow(q0, flows, merges)`` numbers its levels from the noise side: data
enters ``flows[L - 1]`` (run in reverse, each flow's ``inverse``), ``merges[L - 2].inverse``
splits its output into ``[z, z_]`` (``z`` is kept and goes on to ``flows[L - 2]``, ``z_`` is
factored out and scored by ``q0[L - 1]``), and so on; ``q0[0]`` scores the last level's output.
lcma-ext numbers levels from the data side, as nflows does: data-side level ``l`` is normflows'
``flows[L - 1 - l]`` and split point ``l`` is ``merges[L - 2 - l]``.

* :class:`NormflowsLevel` wraps one level's list of normflows flows (normflows order, noise to
  data) as a diag-aware nflows transform (data to noise), so the core's estimator and its one
  tracker (:func:`lcma_ext.contributions.track_splits`) run unchanged on normflows levels.
* :class:`NMSFlow` is ``normflows.NormalizingFlow`` that also knows where its levels begin.
* :class:`MultiscaleFlow` is ``normflows.MultiscaleFlow`` whose ``log_prob(x)`` works without
  class labels for unconditional models, with per-dimension log-dets for the whole model
  (:func:`inverse_and_log_det_with_diag`, which also takes a plain ``normflows.MultiscaleFlow``).
  Glow's conditional prior of a factored half lives in its merge
  (:class:`lcma_ext.normflows.SplitMerge` with a
  :class:`lcma_ext.transforms.ConditionalGaussianPrior`; :attr:`MultiscaleFlow.priors`).

References:
    V. Stimper et al. normflows: A PyTorch Package for Normalizing Flows. JOSS 2023.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2-3.4, Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import normflows as nf
import torch
from nflows.transforms import base as nflows_base
from torch import Tensor, nn

from lcma_ext.normflows.adapters import (
    carry_data_to_noise,
    data_to_noise_with_diag,
    per_sample_log_det,
    require_supported,
)
from lcma_ext.normflows.splits import SplitMerge
from lcma_ext.splits import PLACEMENTS
from lcma_ext.transforms.base import DiagMixin, check_diag
from lcma_ext.transforms.factor_prior import ConditionalGaussianPrior

__all__ = ["MultiscaleFlow", "NMSFlow", "NormflowsLevel", "inverse_and_log_det_with_diag"]


def _check_context(context: Tensor | None, name: str) -> None:
    if context is not None:
        raise ValueError(f"{name}: expected context=None (normflows flows); got a tensor")


class NormflowsLevel(DiagMixin, nflows_base.Transform):
    """One level of normflows flows as a diag-aware nflows transform (data to noise).

    The flows are the very module instances given (an ``nn.ModuleList`` in normflows order,
    noise to data), so training either object trains both. ``forward`` runs them in reverse,
    each flow's ``inverse`` (normflows' data-to-noise direction); ``inverse`` runs each flow's
    ``forward``. ``forward_with_diag`` uses :func:`lcma_ext.normflows.data_to_noise_with_diag`
    and ``carry`` :func:`lcma_ext.normflows.carry_data_to_noise`.

    Args:
        flows: A list of normflows flows (normflows order), or one flow.

    Shapes:
        inputs: ``(B, *level_input_shape)``; outputs: ``(B, *level_output_shape)``.

    Raises:
        TypeError: for an entry without a per-dimension adapter (the message names its class).
        ValueError: for an empty list.

    References:
        V. Stimper et al. normflows: A PyTorch Package for Normalizing Flows. JOSS 2023.
    """

    def __init__(self, flows: Sequence[nf.flows.Flow] | nf.flows.Flow) -> None:
        super().__init__()
        if isinstance(flows, nf.flows.Flow):
            flows = [flows]
        if not isinstance(flows, list | tuple | nn.ModuleList):
            raise TypeError(
                f"NormflowsLevel: expected a list of normflows flows; got {type(flows).__name__}"
            )
        flows = list(flows)
        if not flows:
            raise ValueError("NormflowsLevel: expected at least one flow; got an empty list")
        for index, flow in enumerate(flows):
            require_supported(flow, f"level entry {index}")
        self.flows = nn.ModuleList(flows)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to noise: each flow's ``inverse``, last flow first; ``(outputs, log_det)``."""
        _check_context(context, type(self).__name__)
        log_det = inputs.new_zeros(inputs.shape[0])
        for flow in reversed(cast("Sequence[nf.flows.Flow]", self.flows)):
            inputs, step = flow.inverse(inputs)
            log_det = log_det + per_sample_log_det(step, inputs)
        return inputs, log_det

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise to data: each flow's ``forward``, first flow first; ``(outputs, log_det)``."""
        _check_context(context, type(self).__name__)
        log_det = inputs.new_zeros(inputs.shape[0])
        for flow in self.flows:
            inputs, step = flow(inputs)
            log_det = log_det + per_sample_log_det(step, inputs)
        return inputs, log_det

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_context(context, type(self).__name__)
        return data_to_noise_with_diag(self.flows, inputs, diag)

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """The level's data-to-noise rearrangement of ``tensor`` (squeezes, permutations)."""
        for flow in reversed(cast("Sequence[nf.flows.Flow]", self.flows)):
            tensor = carry_data_to_noise(flow, tensor)
        return tensor


class NMSFlow(nf.NormalizingFlow):
    """``normflows.NormalizingFlow`` that records its levels: the non-multi-scale (NMS) flow.

    Same constructor as normflows, plus the level sizes. ``flows`` is in normflows order (noise
    to data), so data-side level 0 is the *last* ``level_sizes[0]`` flows. It trains like any
    normflows model (``model.forward_kld(x)``); :func:`lcma_ext.normflows.estimate_contributions`
    reads the level boundaries from it.

    Args:
        q0, flows, p: As in normflows.
        level_sizes: Number of flows of each level, data side first (they sum to
            ``len(flows)``); ``None`` leaves them to be derived from the level factory.
        input_shape: Event shape of the data, if known.
        placement: The placement the NMS levels were built for, if known.

    Shapes:
        x: ``(B, *input_shape)``; the latent keeps every dimension.

    Raises:
        ValueError: for level sizes that are not positive or do not sum to ``len(flows)``.

    References:
        S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture
        for Generative Flows, Sec. 3.4, Algorithm 1.
    """

    def __init__(
        self,
        q0: nf.distributions.BaseDistribution,
        flows: Sequence[nf.flows.Flow],
        p: nf.distributions.Target | None = None,
        *,
        level_sizes: Sequence[int] | None = None,
        input_shape: Sequence[int] | None = None,
        placement: str | None = None,
    ) -> None:
        super().__init__(q0, flows, p)
        if level_sizes is not None:
            level_sizes = [int(size) for size in level_sizes]
            if any(size < 1 for size in level_sizes) or sum(level_sizes) != len(self.flows):
                raise ValueError(
                    f"NMSFlow: expected positive level sizes summing to {len(self.flows)} "
                    f"(the number of flows); got {level_sizes}"
                )
        self.level_sizes = level_sizes
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if placement is not None and placement not in PLACEMENTS:
            raise ValueError(f"NMSFlow: expected placement in {PLACEMENTS}; got {placement!r}")
        self.placement = placement

    def level_flows(self) -> list[list[nf.flows.Flow]]:
        """The flows of each level, data side first, each list in normflows order.

        Raises:
            RuntimeError: if the level sizes are unknown.
        """
        if self.level_sizes is None:
            raise RuntimeError("NMSFlow: expected level_sizes; got None (pass a level_factory)")
        return split_levels(list(self.flows), self.level_sizes)

    def log_prob(self, x: Tensor) -> Tensor:
        """normflows' ``log_prob``; an empty batch gives shape ``(0,)`` without running the model.

        (normflows' ``ActNorm`` would initialise itself from the statistics of no data.)
        """
        if x.shape[0] == 0:
            return x.new_zeros(0)
        return super().log_prob(x)

    def forward_kld(self, x: Tensor) -> Tensor:
        """Forward KL divergence (mean negative log-likelihood) in the dtype of ``x``.

        normflows' own accumulates in the default dtype; this one uses :meth:`log_prob`.
        """
        return -torch.mean(self.log_prob(x))


def split_levels(
    flows: Sequence[nf.flows.Flow], level_sizes: Sequence[int]
) -> list[list[nf.flows.Flow]]:
    """Cut a normflows-ordered list of flows into levels, data side (list end) first."""
    levels, end = [], len(flows)
    for size in level_sizes:
        levels.append(list(flows[end - size : end]))
        end -= size
    return levels


def _merge_inverse(merge: nn.Module, tensor: Tensor, where: str) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(merge, nf.flows.Merge):
        cls = type(merge)
        raise TypeError(
            f"expected a normflows Merge (or lcma_ext.normflows.SplitMerge) as {where}; got "
            f"{cls.__module__}.{cls.__qualname__}, whose split has no per-dimension adapter"
        )
    (kept, factored), log_det = merge.inverse(tensor)
    return kept, factored, per_sample_log_det(log_det, tensor)


def inverse_and_log_det_with_diag(
    model: nf.MultiscaleFlow, x: Tensor, attribution: str | None = None
) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """normflows ``MultiscaleFlow.inverse_and_log_det`` with the per-dimension log-dets.

    Data to noise through the whole model: the optional ``transform``, every level and every
    merge. A merge only moves dimensions (log-det 0), so it splits the running map exactly as
    it splits the data (normflows' ``Merge`` in any mode, and :class:`SplitMerge`); a
    :class:`SplitMerge` with Glow's conditional prior also adds ``-log sigma(z_kept)`` to each
    dimension of its factored half.

    Args:
        model: A ``normflows.MultiscaleFlow`` (or :class:`MultiscaleFlow`) of supported flows.
        x: Data.
        attribution: For the 1x1 convolutions, as in :func:`data_to_noise_with_diag`.

    Returns:
        ``(z, log_det, diag)``: ``z`` and ``log_det`` equal ``model.inverse_and_log_det(x)``
        (``z[0]`` the deepest latent, ``z[i]`` factored out at ``merges[i - 1]``); ``diag[i]``
        is shaped like ``z[i]`` and holds each latent dimension's cumulative contribution.
        Per example, the entries of all ``diag[i]`` sum to ``log_det``.

    Shapes:
        x: ``(B, *input_shape)``; z[i], diag[i]: ``(B, *q0[i].shape)``; log_det: ``(B,)``.

    Raises:
        TypeError: for a model that is not a ``MultiscaleFlow``, or a transform, flow or merge
            without a per-dimension adapter (the message names the class).

    References:
        S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture
        for Generative Flows, Sec. 3.2-3.3.
    """
    if not isinstance(model, nf.MultiscaleFlow):
        cls = type(model)
        raise TypeError(
            f"expected a normflows MultiscaleFlow; got {cls.__module__}.{cls.__qualname__} "
            "(not multi-scale: use lcma_ext.normflows.data_to_noise_with_diag on its flows)"
        )
    diag = check_diag(x, None)
    log_det = x.new_zeros(x.shape[0])
    if model.transform is not None:
        require_supported(model.transform, "MultiscaleFlow.transform")
        x, step, diag = data_to_noise_with_diag(model.transform, x, diag, attribution)
        log_det = log_det + step
    num_levels = len(model.q0)
    z: list[Tensor] = [x] * num_levels
    diags: list[Tensor] = [diag] * num_levels
    for i in range(num_levels - 1, -1, -1):
        for j, flow in enumerate(model.flows[i]):
            require_supported(flow, f"MultiscaleFlow.flows[{i}][{j}]")
        x, step, diag = data_to_noise_with_diag(model.flows[i], x, diag, attribution)
        log_det = log_det + step
        if i == 0:
            z[0], diags[0] = x, diag
            break
        merge = model.merges[i - 1]
        if isinstance(merge, SplitMerge):  # also its conditional prior's -log sigma
            (x, z[i]), step, (diag, diags[i]) = merge.inverse_with_diag(x, diag)
        else:
            where = f"MultiscaleFlow.merges[{i - 1}]"
            x, z[i], step = _merge_inverse(merge, x, where)
            diag, diags[i], _ = _merge_inverse(merge, diag, where)
        log_det = log_det + step
    return z, log_det, diags


class MultiscaleFlow(nf.MultiscaleFlow):
    """``normflows.MultiscaleFlow`` with ``log_prob(x)`` for unconditional models.

    Same constructor as normflows (``q0, flows, merges, transform=None, class_cond=True``).
    normflows 1.7.3 requires ``y`` in ``log_prob`` even with ``class_cond=False`` (fixed
    upstream, unreleased); here ``y`` defaults to ``None``, and labels given to a model without
    class conditioning are refused (normflows would ignore them in ``log_prob``,
    ``forward_kld`` and ``sample``). Its ``log_prob`` also fails when
    the data-side flows return scalar log-dets first (``Squeeze`` then ``ActNorm``: the running
    sum becomes a 0-dim tensor); here the sum starts at shape ``(B,)``, as its
    ``inverse_and_log_det`` does. Also gives the per-dimension log-dets of the whole model
    (:meth:`inverse_and_log_det_with_diag`). A factored half with Glow's conditional prior
    (:func:`lcma_ext.normflows.build_multiscale_model` with ``prior="conditional"``) has it in
    its merge, a :class:`lcma_ext.normflows.SplitMerge`: the base distribution scores
    ``eps = (z_new - mu(z)) / sigma(z)`` and ``sample`` draws ``mu(z) + sigma(z) * eps``.

    Shapes:
        x: ``(B, *input_shape)``; log_prob: ``(B,)``.

    References:
        V. Stimper et al. normflows: A PyTorch Package for Normalizing Flows. JOSS 2023.
        L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    """

    def _check_labels(self, y: Tensor | None, *, required: bool) -> None:
        if self.class_cond and required and y is None:
            raise ValueError(
                "MultiscaleFlow: expected class labels y for a class-conditional model "
                "(class_cond=True); got None. Pass y, or build it with class_cond=False"
            )
        if not self.class_cond and y is not None:
            raise ValueError(
                "MultiscaleFlow: expected y=None for a model without class conditioning "
                "(class_cond=False); got labels, which it would ignore. Build it with "
                "class-conditional bases and class_cond=True (build_multiscale_model(..., "
                "base=..., class_cond=True))"
            )

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Log-likelihood of ``x`` (``y``: class labels, only for ``class_cond=True``).

        An empty batch gives an empty result (shape ``(0,)``) without running the model.

        Raises:
            ValueError: for a class-conditional model without ``y``, or labels given to a
                model without class conditioning.
        """
        self._check_labels(y, required=True)
        if x.shape[0] == 0:  # as nflows: shape (0,); no data-dependent initialisation on it
            return x.new_zeros(0)
        z, log_q = self.inverse_and_log_det(x)
        for q0, latent in zip(self.q0, z):
            log_q = log_q + (q0.log_prob(latent, y) if self.class_cond else q0.log_prob(latent))
        return log_q

    def sample(
        self, num_samples: int = 1, y: Tensor | None = None, temperature: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """normflows' ``sample``: ``(x, log_q)`` of ``num_samples`` draws.

        ``y``: class labels of the draws, only for ``class_cond=True`` (``None`` draws them
        uniformly, as normflows does).

        Raises:
            ValueError: for labels given to a model without class conditioning.
        """
        self._check_labels(y, required=False)
        return super().sample(num_samples, y, temperature)

    @property
    def priors(self) -> list[ConditionalGaussianPrior | None]:
        """Per split point, data side first, its conditional prior (``None``: none).

        Split point ``l`` is ``merges[L - 2 - l]``; a merge other than a
        :class:`lcma_ext.normflows.SplitMerge` has none.
        """
        return [getattr(merge, "prior", None) for merge in reversed(self.merges)]

    def inverse_and_log_det_with_diag(
        self, x: Tensor, attribution: str | None = None
    ) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """:func:`inverse_and_log_det_with_diag` of this model: ``(z, log_det, diag)``."""
        return inverse_and_log_det_with_diag(self, x, attribution)
