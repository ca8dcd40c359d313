"""lcma-ext: likelihood-contribution based multi-scale architecture for nflows and normflows.

zuko users: :mod:`lcma_ext.zuko`, an optional extra (``pip install "lcma-ext[zuko]"``).

Importing the package has no side effects: no data is loaded, and neither torchvision nor zuko
is imported.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows.
"""

from lcma_ext import distributions, transforms
from lcma_ext.contributions import ContributionMaps, estimate_contributions
from lcma_ext.flows import log_prob_with_contributions
from lcma_ext.multiscale import ContributionMultiscaleFlow
from lcma_ext.pipeline import build_multiscale_transform, build_nms_transform, lcma_from_nms
from lcma_ext.plotting import plot_contributions
from lcma_ext.splits import ChannelSplit, CheckerboardSplit, LCMASplit, RandomSplit, make_split

__version__ = "0.1.0"

__all__ = [
    "ChannelSplit",
    "CheckerboardSplit",
    "ContributionMaps",
    "ContributionMultiscaleFlow",
    "LCMASplit",
    "RandomSplit",
    "__version__",
    "build_multiscale_transform",
    "build_nms_transform",
    "distributions",
    "estimate_contributions",
    "lcma_from_nms",
    "log_prob_with_contributions",
    "make_split",
    "plot_contributions",
    "transforms",
]
