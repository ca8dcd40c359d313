"""Transforms that expose their per-dimension log|det J| (the LCMA "diagonal").

Each class subclasses the nflows class of the same name and takes the same constructor
arguments, so ``from lcma_ext import transforms`` replaces ``from nflows import transforms``.
See :mod:`lcma_ext.transforms.base` for the protocol.
"""

from lcma_ext.transforms.autoregressive import MaskedAffineAutoregressiveTransform
from lcma_ext.transforms.base import (
    CompositeTransform,
    DiagMixin,
    DiagTransform,
    carry_positions,
    check_diag,
    is_diag_aware,
    require_diag_aware,
)
from lcma_ext.transforms.coupling import (
    AdditiveCouplingTransform,
    AffineCouplingTransform,
    PiecewiseRationalQuadraticCouplingTransform,
)
from lcma_ext.transforms.cross_unit import CrossUnitCoupling
from lcma_ext.transforms.factor_prior import PRIORS, ConditionalGaussianPrior
from lcma_ext.transforms.haar import HAAR_SUBBANDS, HaarSqueezeTransform, haar_matrix
from lcma_ext.transforms.lu import ATTRIBUTIONS, LULinear, OneByOneConvolution, svd_attribution
from lcma_ext.transforms.nonlinearities import PiecewiseRationalQuadraticCDF
from lcma_ext.transforms.normalization import ActNorm
from lcma_ext.transforms.permutations import Permutation, RandomPermutation, ReversePermutation
from lcma_ext.transforms.reshape import SqueezeTransform
from lcma_ext.transforms.residual import (
    InvertibleResNetBlock,
    ResidualFlowBlock,
    low_variance_estimation,
)

__all__ = [
    "ATTRIBUTIONS",
    "HAAR_SUBBANDS",
    "PRIORS",
    "ActNorm",
    "AdditiveCouplingTransform",
    "AffineCouplingTransform",
    "CompositeTransform",
    "ConditionalGaussianPrior",
    "CrossUnitCoupling",
    "DiagMixin",
    "DiagTransform",
    "HaarSqueezeTransform",
    "InvertibleResNetBlock",
    "LULinear",
    "MaskedAffineAutoregressiveTransform",
    "OneByOneConvolution",
    "Permutation",
    "PiecewiseRationalQuadraticCDF",
    "PiecewiseRationalQuadraticCouplingTransform",
    "RandomPermutation",
    "ResidualFlowBlock",
    "ReversePermutation",
    "SqueezeTransform",
    "carry_positions",
    "check_diag",
    "haar_matrix",
    "is_diag_aware",
    "low_variance_estimation",
    "require_diag_aware",
    "svd_attribution",
]
