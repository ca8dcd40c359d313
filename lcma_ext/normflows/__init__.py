"""Adapters giving normflows' flows the per-dimension log-det protocol.

normflows' ``inverse`` is the data-to-noise direction; ``forward_with_diag`` on these classes
runs it. See :mod:`lcma_ext.normflows.adapters`.
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
    "Permute",
    "ResidualFlowBlock",
    "SplitMerge",
    "Squeeze",
    "carry_data_to_noise",
    "data_to_noise_with_diag",
]
