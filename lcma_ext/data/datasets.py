"""Image datasets as integer tensors: two embedded sets and torchvision sets from a local root.

Every loader returns an :class:`ImageDataset` whose ``train`` and ``test`` tensors hold integer
levels ``0 .. levels-1`` as ``uint8``, shaped ``(N, C, H, W)``. Pre-processing (dequantization and
logit) is applied per batch by :class:`lcma_ext.data.LogitPreprocessing`.

Embedded (no files, no network):

``digits``
    scikit-learn's ``load_digits``: 1797 images, ``1 x 8 x 8``, 17 levels (0..16). Fixed split:
    a permutation with seed 0, the last 360 images are the test set.
``patches``
    RGB ``16 x 16`` patches, 256 levels, cut from the two photographs of scikit-learn's
    ``load_sample_images`` at positions drawn with a fixed seed. Train patches come from the left
    75 % of each photograph and test patches from the right 25 %, so no test pixel is seen in
    training.

torchvision (``pip install "lcma-ext[vision]"``), read from ``data_root``, never downloaded:

``mnist`` (``1 x 28 x 28``), ``cifar10`` (``3 x 32 x 32``), ``celeba`` (central ``148 x 148``
crop resized to ``64 x 64``, as in the paper) and ``imagefolder`` (``data_root/train`` and
``data_root/test`` class folders if present, else one folder split 90/10 with seed 0; images are
converted to RGB and centre-cropped/resized to ``image_size`` when given).

References:
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 4.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "EMBEDDED_DATASETS",
    "VISION_DATASETS",
    "ImageDataset",
    "load_dataset",
    "load_digits_dataset",
    "load_patches_dataset",
    "load_vision_dataset",
]

EMBEDDED_DATASETS = ("digits", "patches")
VISION_DATASETS = ("mnist", "cifar10", "celeba", "imagefolder")
DATASETS = EMBEDDED_DATASETS + VISION_DATASETS

VISION_HINT = 'pip install "lcma-ext[vision]"'


@dataclass
class ImageDataset:
    """Integer image data with a fixed train/test split.

    Attributes:
        name: Dataset name.
        train: ``uint8`` tensor ``(N_train, C, H, W)`` of levels ``0 .. levels-1``.
        test: ``uint8`` tensor ``(N_test, C, H, W)``.
        levels: Number of quantization levels.
    """

    name: str
    train: Tensor
    test: Tensor
    levels: int

    def __post_init__(self) -> None:
        for split, tensor in (("train", self.train), ("test", self.test)):
            if tensor.dim() != 4:
                raise ValueError(
                    f"expected {split} images shaped (N, C, H, W); got {tuple(tensor.shape)}"
                )
            if tensor.shape[0] == 0:
                raise ValueError(f"expected a non-empty {split} split; got 0 images")
        if self.train.shape[1:] != self.test.shape[1:]:
            raise ValueError(
                f"expected train and test images of one shape; got {tuple(self.train.shape[1:])} "
                f"and {tuple(self.test.shape[1:])}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Event shape ``(C, H, W)``."""
        c, h, w = self.train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_dims(self) -> int:
        """``D = C H W``."""
        c, h, w = self.shape
        return c * h * w

    def limit(self, max_train: int | None = None, max_test: int | None = None) -> ImageDataset:
        """A copy keeping the first ``max_train`` / ``max_test`` examples of each split."""
        return ImageDataset(
            self.name,
            self.train[:max_train] if max_train else self.train,
            self.test[:max_test] if max_test else self.test,
            self.levels,
        )


def load_digits_dataset(test_size: int = 360, seed: int = 0) -> ImageDataset:
    """scikit-learn digits as ``1 x 8 x 8`` images with 17 levels, fixed split."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.uint8)).unsqueeze(1)
    if not 0 < test_size < images.shape[0]:
        raise ValueError(f"expected 0 < test_size < {images.shape[0]}; got {test_size}")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    images = images[order]
    return ImageDataset("digits", images[:-test_size], images[-test_size:], levels=17)


def load_patches_dataset(
    patch_size: int = 16,
    num_train: int = 3000,
    num_test: int = 600,
    seed: int = 0,
    train_fraction: float = 0.75,
) -> ImageDataset:
    """RGB patches of scikit-learn's sample photographs, 256 levels, spatially disjoint split.

    Args:
        patch_size: Side of the square patches.
        num_train: Number of training patches (split evenly over the two photographs).
        num_test: Number of test patches.
        seed: Seed of the patch positions.
        train_fraction: Train patches lie in the left ``train_fraction`` of each photograph's
            width, test patches in the rest.
    """
    from sklearn.datasets import load_sample_images

    if patch_size < 2 or num_train < 2 or num_test < 2:
        raise ValueError(
            f"expected patch_size, num_train and num_test >= 2; got {patch_size}, "
            f"{num_train}, {num_test}"
        )
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    train, test = [], []
    for index, photo in enumerate(photos):
        height, width, _ = photo.shape
        boundary = int(width * train_fraction)
        for out, count, lo, hi in (
            (train, num_train, 0, boundary - patch_size),
            (test, num_test, boundary, width - patch_size),
        ):
            n = count // len(photos) + (index < count % len(photos))
            rows = rng.integers(0, height - patch_size + 1, size=n)
            cols = rng.integers(lo, hi + 1, size=n)
            for r, c in zip(rows, cols):
                out.append(photo[r : r + patch_size, c : c + patch_size])
    to_tensor = lambda patches: torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2)  # noqa: E731
    return ImageDataset("patches", to_tensor(train).contiguous(), to_tensor(test).contiguous(), 256)


def _import_torchvision(dataset: str) -> ModuleType:
    try:
        return importlib.import_module("torchvision")
    except ImportError as error:
        raise ImportError(
            f"expected torchvision for dataset {dataset!r} (install the vision extra: "
            f"{VISION_HINT}); got {type(error).__name__}: {error}"
        ) from error


def _pil_to_uint8(image: Any, mode: str | None) -> np.ndarray:
    if mode is not None and getattr(image, "mode", mode) != mode:
        image = image.convert(mode)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _center_crop_resize(image: Any, crop: int | None, size: int | None) -> Any:
    from PIL import Image

    if crop is not None:
        width, height = image.size
        side = min(crop, width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if size is not None and image.size != (size, size):
        if crop is None:
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        image = image.resize((size, size), Image.BICUBIC)
    return image


def _stack_pil(
    dataset: Any,
    mode: str | None,
    transform: Callable[[Any], Any] | None,
    limit: int | None,
    indices: list[int] | None = None,
) -> Tensor:
    indices = list(range(len(dataset))) if indices is None else indices
    if limit:
        indices = indices[:limit]
    arrays = []
    for i in indices:
        image = dataset[i][0]
        if transform is not None:
            image = transform(image)
        arrays.append(_pil_to_uint8(image, mode))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"expected images of one size (pass image_size to resize); got sizes {sorted(shapes)}"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _as_uint8_nchw(data: Any, channels_last: bool) -> Tensor:
    tensor = torch.as_tensor(np.asarray(data), dtype=torch.uint8)
    if tensor.dim() == 3:
        return tensor.unsqueeze(1).contiguous()
    return (tensor.permute(0, 3, 1, 2) if channels_last else tensor).contiguous()


def load_vision_dataset(
    name: str,
    data_root: str | Path,
    limit: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> ImageDataset:
    """Load a torchvision dataset from a local folder (``download=False`` always).

    Args:
        name: One of ``VISION_DATASETS``.
        data_root: Folder laid out as torchvision expects (or an ImageFolder root).
        limit: Keep at most this many images per split.
        image_size: ImageFolder only: centre-crop and resize to ``image_size x image_size``.
        seed: ImageFolder only: seed of the 90/10 split when there are no train/test folders.

    Raises:
        ImportError: if torchvision is missing (the message names the ``vision`` extra).
        ValueError: for an unknown name or a missing ``data_root``.
    """
    if name not in VISION_DATASETS:
        raise ValueError(f"expected a dataset in {VISION_DATASETS}; got {name!r}")
    if data_root is None:
        raise ValueError(f"expected --data-root for dataset {name!r}; got None")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ValueError(f"expected data_root to be an existing folder; got {str(root)!r}")
    tv = _import_torchvision(name)
    datasets = tv.datasets
    if name == "mnist":
        splits = [datasets.MNIST(str(root), train=t, download=False) for t in (True, False)]
        tensors = [_as_uint8_nchw(s.data, channels_last=False) for s in splits]
    elif name == "cifar10":
        splits = [datasets.CIFAR10(str(root), train=t, download=False) for t in (True, False)]
        tensors = [_as_uint8_nchw(s.data, channels_last=True) for s in splits]
    elif name == "celeba":
        crop = lambda image: _center_crop_resize(image, 148, 64)  # noqa: E731
        tensors = [
            _stack_pil(datasets.CelebA(str(root), split=s, download=False), "RGB", crop, limit)
            for s in ("train", "test")
        ]
    else:
        crop = (lambda image: _center_crop_resize(image, None, image_size)) if image_size else None
        if (root / "train").is_dir() and (root / "test").is_dir():
            tensors = [
                _stack_pil(datasets.ImageFolder(str(root / s)), "RGB", crop, limit)
                for s in ("train", "test")
            ]
        else:
            folder = datasets.ImageFolder(str(root))
            if len(folder) < 2:
                raise ValueError(
                    f"expected at least 2 images under {str(root)!r}; got {len(folder)}"
                )
            order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))
            num_test = max(1, len(folder) // 10)
            test_idx, train_idx = order[:num_test].tolist(), order[num_test:].tolist()
            tensors = [
                _stack_pil(folder, "RGB", crop, limit, train_idx),
                _stack_pil(folder, "RGB", crop, limit, test_idx),
            ]
    if limit:
        tensors = [t[:limit] for t in tensors]
    return ImageDataset(name, tensors[0], tensors[1], levels=256)


def load_dataset(
    name: str = "digits",
    data_root: str | Path | None = None,
    limit: int | None = None,
    image_size: int | None = None,
) -> ImageDataset:
    """Load any dataset of ``DATASETS`` by name (embedded ones ignore ``data_root``)."""
    if name == "digits":
        dataset = load_digits_dataset()
    elif name == "patches":
        dataset = load_patches_dataset()
    elif name in VISION_DATASETS:
        return load_vision_dataset(name, data_root, limit=limit, image_size=image_size)
    else:
        raise ValueError(f"expected a dataset in {DATASETS}; got {name!r}")
    return dataset.limit(limit, limit) if limit else dataset
