"""Datasets (embedded and torchvision) and the dequantization + logit pre-processing.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
"""

from lcma_ext.data.datasets import (
    DATASETS,
    EMBEDDED_DATASETS,
    VISION_DATASETS,
    ImageDataset,
    load_dataset,
    load_digits_dataset,
    load_patches_dataset,
    load_vision_dataset,
)
from lcma_ext.data.preprocess import LogitPreprocessing, bits_per_dim, dequantize, logit_transform

__all__ = [
    "DATASETS",
    "EMBEDDED_DATASETS",
    "VISION_DATASETS",
    "ImageDataset",
    "LogitPreprocessing",
    "bits_per_dim",
    "dequantize",
    "load_dataset",
    "load_digits_dataset",
    "load_patches_dataset",
    "load_vision_dataset",
    "logit_transform",
]
