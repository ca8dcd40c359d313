"""Networks used inside transforms: Lipschitz-constrained nets for invertible residual blocks.

See :mod:`lcma_ext.nets.lipschitz`.
"""

from lcma_ext.nets.lipschitz import (
    ACTIVATIONS,
    LipschitzConvNet,
    LipschitzMLP,
    LipSwish,
    SpectralNormConv2d,
    SpectralNormLinear,
    empirical_lipschitz,
    frozen_lipschitz,
    lipschitz_bound,
    operator_norm,
    spectral_layers,
    update_lipschitz,
    updated_then_frozen_lipschitz,
)

__all__ = [
    "ACTIVATIONS",
    "LipSwish",
    "LipschitzConvNet",
    "LipschitzMLP",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "empirical_lipschitz",
    "frozen_lipschitz",
    "lipschitz_bound",
    "operator_norm",
    "spectral_layers",
    "update_lipschitz",
    "updated_then_frozen_lipschitz",
]
