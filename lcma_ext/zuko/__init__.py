"""lcma-ext for zuko: per-dimension log-dets, multi-scale lazy flows and Algorithm 1.

An optional extra: ``pip install "lcma-ext[zuko]"``. ``import lcma_ext`` never imports zuko;
this sub-package does, and raises an ``ImportError`` that says how to install it when zuko is
missing.

zuko's flows map data to noise in their transform's forward call, the direction of lcma-ext's
per-dimension protocol, so nothing is reversed here:

* :mod:`lcma_ext.zuko.adapters`: ``call_and_ladj_with_diag`` and ``carry`` for the torch
  transforms zuko levels are built from (elementwise and monotonic maps, the affine and spline
  couplings, MAF's autoregressive transforms, permutations, rotations, LU linear maps, inverses
  and compositions). Any other transform raises a ``TypeError`` naming its class.
* :mod:`lcma_ext.zuko.levels`: :class:`ZukoLevel` gives zuko lazy transforms the core's protocol
  (so the core's estimator, tracker and builder run on them unchanged), and
  :class:`NflowsTransform` gives an lcma-ext (nflows) transform zuko's lazy interface.
* :mod:`lcma_ext.zuko.images`: conditional image levels built from the package's conv nets.
* :mod:`lcma_ext.zuko.multiscale`: :class:`MultiscaleFlow`, a ``zuko.lazy.Flow`` with any split of
  :mod:`lcma_ext.splits` at every split point, and :class:`NMSFlow`.
* :mod:`lcma_ext.zuko.pipeline`: Algorithm 1 (``build_nms_flow``, ``estimate_contributions``,
  ``build_multiscale_flow``).

References:
    F. Rozet et al. Zuko: Normalizing flows in PyTorch. 2022.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Algorithm 1.
"""

from lcma_ext.zuko.adapters import (
    DEFAULT_ATTRIBUTION,
    call_and_ladj_with_diag,
    carry,
    require_supported,
)
from lcma_ext.zuko.images import ContextConvResNet, image_level_factory
from lcma_ext.zuko.levels import NflowsBijection, NflowsTransform, ZukoLevel, as_lazy_transform
from lcma_ext.zuko.multiscale import MultiscaleFlow, MultiscaleTransform, NMSFlow
from lcma_ext.zuko.pipeline import build_multiscale_flow, build_nms_flow, estimate_contributions

__all__ = [
    "DEFAULT_ATTRIBUTION",
    "ContextConvResNet",
    "MultiscaleFlow",
    "MultiscaleTransform",
    "NMSFlow",
    "NflowsBijection",
    "NflowsTransform",
    "ZukoLevel",
    "as_lazy_transform",
    "build_multiscale_flow",
    "build_nms_flow",
    "call_and_ladj_with_diag",
    "carry",
    "estimate_contributions",
    "image_level_factory",
    "require_supported",
]
