"""lcma-ext: likelihood-contribution based multi-scale architecture for nflows and normflows.

Importing the package has no side effects: no data is loaded and torchvision is not imported.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows.
"""

from lcma_ext import transforms
from lcma_ext.flows import log_prob_with_contributions

__version__ = "0.1.0"

__all__ = ["__version__", "log_prob_with_contributions", "transforms"]
