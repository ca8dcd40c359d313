"""lcma-ext for normflows: per-dimension log-dets, LCMA merges and Algorithm 1.

normflows' ``inverse`` is the data-to-noise direction; ``forward_with_diag`` on these classes
runs it (:mod:`lcma_ext.normflows.adapters`). :mod:`lcma_ext.normflows.pipeline` builds the NMS
model, estimates the contributions and builds the multi-scale model from one level factory;
:mod:`lcma_ext.normflows.multiscale` holds the models.

``LCMASplit`` and ``estimate_contributions`` are the deprecated names of :class:`LCMAMerge` and
:func:`estimate_model_contributions` (they shadowed the core split and estimator); they still
import, with a ``DeprecationWarning`` on use, for one release.
"""

from lcma_ext.normflows.adapters import (
    ActNorm,
    AffineCouplingBlock,
    GlowBlock,
    Invertible1x1Conv,
    Permute,
    Squeeze,
    carry_data_to_noise,
    data_to_noise_with_diag,
    per_sample_log_det,
    require_supported,
)
from lcma_ext.normflows.multiscale import (
    MultiscaleFlow,
    NMSFlow,
    NormflowsLevel,
    inverse_and_log_det_with_diag,
)
from lcma_ext.normflows.pipeline import (
    build_multiscale_model,
    build_nms_model,
    estimate_model_contributions,
    takes_labels,
)
from lcma_ext.normflows.pipeline import (
    estimate_contributions as estimate_contributions,  # deprecated: not in __all__
)
from lcma_ext.normflows.residual import InvertibleResNetBlock, ResidualFlowBlock
from lcma_ext.normflows.splits import LCMAMerge, SplitMerge
from lcma_ext.normflows.splits import LCMASplit as LCMASplit  # deprecated: not in __all__

__all__ = [
    "ActNorm",
    "AffineCouplingBlock",
    "GlowBlock",
    "Invertible1x1Conv",
    "InvertibleResNetBlock",
    "LCMAMerge",
    "MultiscaleFlow",
    "NMSFlow",
    "NormflowsLevel",
    "Permute",
    "ResidualFlowBlock",
    "SplitMerge",
    "Squeeze",
    "build_multiscale_model",
    "build_nms_model",
    "carry_data_to_noise",
    "data_to_noise_with_diag",
    "estimate_model_contributions",
    "inverse_and_log_det_with_diag",
    "per_sample_log_det",
    "require_supported",
    "takes_labels",
]
