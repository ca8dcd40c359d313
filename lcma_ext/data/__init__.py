"""Datasets (embedded, ``.npz`` files, image folders, torchvision) and the pre-processing.

The pre-processing is dequantization + logit, scored in bits/dim.

References:
    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
"""

from lcma_ext.data.datasets import (
    DATASETS,
    EMBEDDED_DATASETS,
    IMG_EXTENSIONS,
    MIN_SPLIT_IMAGES,
    NPZ_PREFIX,
    RESIZABLE_DATASETS,
    VISION_DATASETS,
    ImageDataset,
    TinyDatasetWarning,
    check_dataset_options,
    check_dataset_size,
    dataset_slug,
    image_files,
    load_dataset,
    load_digits_dataset,
    load_image_folder,
    load_npz_dataset,
    load_patches_dataset,
    load_vision_dataset,
    npz_path,
)
from lcma_ext.data.preprocess import LogitPreprocessing, bits_per_dim, dequantize, logit_transform

__all__ = [
    "DATASETS",
    "EMBEDDED_DATASETS",
    "IMG_EXTENSIONS",
    "MIN_SPLIT_IMAGES",
    "NPZ_PREFIX",
    "RESIZABLE_DATASETS",
    "VISION_DATASETS",
    "ImageDataset",
    "LogitPreprocessing",
    "TinyDatasetWarning",
    "bits_per_dim",
    "check_dataset_options",
    "check_dataset_size",
    "dataset_slug",
    "dequantize",
    "image_files",
    "load_dataset",
    "load_digits_dataset",
    "load_image_folder",
    "load_npz_dataset",
    "load_patches_dataset",
    "load_vision_dataset",
    "logit_transform",
    "npz_path",
]
