"""lcma-ext for normflows: per-dimension log-dets, LCMA merges and Algorithm 1.

normflows' ``inverse`` is the data-to-noise direction; ``forward_with_diag`` on these classes
runs it (:mod:`lcma_ext.normflows.adapters`). :mod:`lcma_ext.normflows.pipeline` builds the NMS
model, estimates the contributions and builds the multi-scale model from one level factory;
:mod:`lcma_ext.normflows.multiscale` holds the models.
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
    estimate_contributions,
)
from lcma_ext.normflows.residual import InvertibleResNetBlock, ResidualFlowBlock
from lcma_ext.normflows.splits import LCMASplit, SplitMerge

__all__ = [
    "ActNorm",
    "AffineCouplingBlock",
    "GlowBlock",
    "Invertible1x1Conv",
    "InvertibleResNetBlock",
    "LCMASplit",
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
    "estimate_contributions",
    "inverse_and_log_det_with_diag",
    "require_supported",
]
