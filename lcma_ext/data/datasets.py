"""Image datasets as integer tensors: embedded sets, ``.npz`` files, image folders, torchvision.

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

Your own data, no extra dependency:

``npz:PATH``
    A numpy ``.npz`` archive (read with ``allow_pickle=False``) with integer arrays ``train`` and
    ``test`` shaped ``(N, C, H, W)``, ``(N, H, W, C)`` or ``(N, H, W)`` (one channel) and an
    optional integer scalar ``levels`` in 2..256 (default 256); see :func:`load_npz_dataset` for
    how the layout is told apart.
``imagefolder``
    Image files read with Pillow from ``data_root``: ``data_root/train`` and ``data_root/test`` if
    both exist, else one folder split 90/10 with seed 0. Each folder holds class subfolders (as
    torchvision's ``ImageFolder``) and/or flat image files, centre-cropped/resized to
    ``image_size`` when given (256 levels). A folder of grey images stays one channel, any colour
    image makes it RGB; transparency is refused unless dropped on request (see
    :func:`load_image_folder`); every conversion is listed in :attr:`ImageDataset.notes`.

torchvision (``pip install "lcma-ext[vision]"``), read from ``data_root``, never downloaded:

``mnist`` (``1 x 28 x 28``), ``cifar10`` (``3 x 32 x 32``) and ``celeba`` (central ``148 x 148``
crop resized to ``64 x 64``, as in the paper).

Bad files raise ``ValueError`` ("expected ...; got ...") naming the file at fault, and so do
options that a dataset cannot honour (``image_size`` resizes ``imagefolder`` only).
:func:`check_dataset_size` warns about splits too small to train on or to score.

References:
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 4.
"""

from __future__ import annotations

import importlib
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
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
    "IMG_EXTENSIONS",
    "MIN_SPLIT_IMAGES",
    "NPZ_PREFIX",
    "RESIZABLE_DATASETS",
    "VISION_DATASETS",
    "ImageDataset",
    "TinyDatasetWarning",
    "check_dataset_options",
    "check_dataset_size",
    "dataset_slug",
    "image_files",
    "load_dataset",
    "load_digits_dataset",
    "load_image_folder",
    "load_npz_dataset",
    "load_patches_dataset",
    "load_vision_dataset",
    "npz_path",
]

EMBEDDED_DATASETS = ("digits", "patches")
#: Datasets read from ``data_root`` (``imagefolder`` with Pillow, the others with torchvision).
VISION_DATASETS = ("mnist", "cifar10", "celeba", "imagefolder")
DATASETS = EMBEDDED_DATASETS + VISION_DATASETS
#: A dataset name ``NPZ_PREFIX + PATH`` loads the ``.npz`` file ``PATH``.
NPZ_PREFIX = "npz:"
#: The file endings ``imagefolder`` reads (torchvision's ``IMG_EXTENSIONS``, any case).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: The datasets that ``image_size`` resizes (the others have one fixed image size).
RESIZABLE_DATASETS = ("imagefolder",)
#: Fewer images than this in a split draw a warning (:func:`check_dataset_size`).
MIN_SPLIT_IMAGES = 32

VISION_HINT = 'pip install "lcma-ext[vision]"'
#: Sizes of a channel axis when telling ``(N, C, H, W)`` from ``(N, H, W, C)``.
CHANNEL_SIZES = (1, 3, 4)


@dataclass
class ImageDataset:
    """Integer image data with a fixed train/test split.

    Attributes:
        name: Dataset name.
        train: ``uint8`` tensor ``(N_train, C, H, W)`` of levels ``0 .. levels-1``.
        test: ``uint8`` tensor ``(N_test, C, H, W)``.
        levels: Number of quantization levels.
        notes: What the loader did to the files to reach this shape (e.g. grey images converted
            to RGB in a mixed folder, an alpha channel dropped), one sentence each; empty when
            the data were used as stored. :meth:`summary` prints them with the shape.
    """

    name: str
    train: Tensor
    test: Tensor
    levels: int
    notes: tuple[str, ...] = ()

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

    def summary(self) -> str:
        """One line for a run's log: the name, image shape, levels, split sizes and the notes.

        Example:
            >>> import torch
            >>> images = torch.zeros(100, 1, 8, 8, dtype=torch.uint8)
            >>> data = ImageDataset("mine", images[:90], images[90:], levels=256)
            >>> data.summary()
            'mine: 1 x 8 x 8 images (C x H x W), 256 levels, 90 train and 10 test images'
        """
        c, h, w = self.shape
        line = (
            f"{self.name}: {c} x {h} x {w} images (C x H x W), {self.levels} levels, "
            f"{self.train.shape[0]} train and {self.test.shape[0]} test images"
        )
        return "; ".join([line, *self.notes])

    def limit(self, max_train: int | None = None, max_test: int | None = None) -> ImageDataset:
        """A copy keeping the first ``max_train`` / ``max_test`` examples of each split."""
        return ImageDataset(
            self.name,
            self.train[:max_train] if max_train else self.train,
            self.test[:max_test] if max_test else self.test,
            self.levels,
            self.notes,
        )


class TinyDatasetWarning(UserWarning):
    """A split too small for its figures to mean much (:func:`check_dataset_size`)."""


def check_dataset_size(
    dataset: ImageDataset, batch_size: int, min_images: int = MIN_SPLIT_IMAGES
) -> list[str]:
    """Warn (:class:`TinyDatasetWarning`) about splits too small to train on or to score.

    The rule, one message per broken condition:

    - fewer training images than one batch (``N_train < batch_size``): every epoch is a single
      partial batch, so ``batch_size`` and the number of steps are not what the run says;
    - fewer than ``min_images`` (default :data:`MIN_SPLIT_IMAGES`, 32) training images: the
      flow sees almost nothing of the data;
    - fewer than ``min_images`` test images: the test bits/dim is the score of a handful of
      images, so differences between arms are mostly noise.

    Call it on the data actually used (after ``limit``), e.g. in a runner that also prints the
    returned messages with :meth:`ImageDataset.summary`.

    Args:
        dataset: The loaded data.
        batch_size: The global batch size of the training.
        min_images: Smallest split that draws no warning.

    Returns:
        The messages warned about (empty when the data set is large enough).

    Example:
        >>> import warnings
        >>> import torch
        >>> images = torch.zeros(43, 1, 8, 8, dtype=torch.uint8)
        >>> data = ImageDataset("mine", images[:3], images[3:], levels=256)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     messages = check_dataset_size(data, batch_size=64)
        >>> for message in messages:
        ...     print(message)
        mine: 3 training images, fewer than one batch (64): each epoch is one step
        mine: 3 training images, fewer than 32: too few to learn the data from
    """
    if batch_size < 1 or min_images < 1:
        raise ValueError(
            f"expected batch_size >= 1 and min_images >= 1; got {batch_size} and {min_images}"
        )
    num_train, num_test = int(dataset.train.shape[0]), int(dataset.test.shape[0])
    messages = []
    if num_train < batch_size:
        messages.append(
            f"{dataset.name}: {num_train} training images, fewer than one batch ({batch_size}): "
            f"each epoch is one step"
        )
    if num_train < min_images:
        messages.append(
            f"{dataset.name}: {num_train} training images, fewer than {min_images}: too few to "
            f"learn the data from"
        )
    if num_test < min_images:
        messages.append(
            f"{dataset.name}: {num_test} test images, fewer than {min_images}: the test "
            f"bits/dim is the score of a handful of images"
        )
    for message in messages:
        warnings.warn(message, TinyDatasetWarning, stacklevel=2)
    return messages


def check_dataset_options(
    name: str, image_size: int | None = None, channels: int | None = None, drop_alpha: bool = False
) -> None:
    """Refuse loading options that dataset ``name`` cannot honour, before anything is read.

    ``image_size``, ``channels`` and ``drop_alpha`` act on image files, so only ``imagefolder``
    (:data:`RESIZABLE_DATASETS`) takes them; the embedded, ``npz:PATH`` and torchvision datasets
    have one fixed size and channel count. :func:`load_dataset` calls it; a command line or
    configuration can call it to fail before any work.

    Raises:
        ValueError: "expected ...; got ..." naming the option and the dataset.
    """
    if name in RESIZABLE_DATASETS:
        if image_size is not None and (int(image_size) != image_size or image_size < 1):
            raise ValueError(f"expected image_size to be a positive integer; got {image_size!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"expected channels None, 1 or 3; got {channels!r}")
        return
    given = [
        f"{option}={value!r}"
        for option, value, default in (
            ("image_size", image_size, None),
            ("channels", channels, None),
            ("drop_alpha", drop_alpha, False),
        )
        if value != default
    ]
    if given:
        raise ValueError(
            f"expected image_size, channels and drop_alpha only with a dataset in "
            f"{RESIZABLE_DATASETS} (image files, resized and converted on loading); got "
            f"{', '.join(given)} for dataset {name!r}"
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
    train: list[np.ndarray[Any, Any]] = []
    test: list[np.ndarray[Any, Any]] = []
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

    def to_tensor(patches: list[np.ndarray[Any, Any]]) -> Tensor:
        return torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2)

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
        # Pillow's types lack the constant that Pillow < 9.1 (no Image.Resampling) also has
        image = image.resize((size, size), Image.BICUBIC)  # type: ignore[attr-defined]
    return image


def _stack_pil(
    dataset: Any,
    mode: str | None,
    transform: Callable[[Any], Any] | None,
    limit: int | None,
) -> Tensor:
    arrays = []
    for i in range(min(len(dataset), limit) if limit else len(dataset)):
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


# --- npz files ----------------------------------------------------------------------------------


def npz_path(name: str) -> Path | None:
    """The file of a dataset name ``npz:PATH`` (``~`` expanded); ``None`` for any other name."""
    if not isinstance(name, str) or not name.startswith(NPZ_PREFIX):
        return None
    path = name[len(NPZ_PREFIX) :]
    return Path(path).expanduser() if path.strip() else None


def dataset_slug(name: str) -> str:
    """A dataset name fit for a folder name: ``npz-<file stem>`` for ``npz:PATH``, else ``name``."""
    path = npz_path(name)
    return name if path is None else f"npz-{path.stem}"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays ``train``, ``test`` and (if present) ``levels`` of the ``.npz`` file ``path``."""
    if not path.is_file():
        raise ValueError(f"expected an existing .npz file; got {str(path)!r} (no such file)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"expected a numpy .npz archive; got {str(path)!r} ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"expected a numpy .npz archive of arrays train and test; got {str(path)!r} holding "
            f"a single array (a .npy file?)"
        )
    with archive:
        missing = [key for key in ("train", "test") if key not in archive.files]
        if missing:
            raise ValueError(
                f"expected arrays train and test in {str(path)!r}; got arrays "
                f"{sorted(archive.files)} (missing {', '.join(missing)})"
            )
        keys = [key for key in ("train", "test", "levels") if key in archive.files]
        try:
            return {key: archive[key] for key in keys}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"expected readable numeric arrays in {str(path)!r}; got "
                f"{type(error).__name__}: {error}"
            ) from error


def _npz_levels(arrays: dict[str, np.ndarray], path: Path) -> int:
    """The scalar ``levels`` of an npz file (default 256), checked to be an integer in 2..256."""
    if "levels" not in arrays:
        return 256
    value = arrays["levels"]
    if value.shape != () or value.dtype.kind not in "iu" or not 2 <= int(value) <= 256:
        raise ValueError(
            f"expected levels in {str(path)!r} as an integer scalar in 2..256; got "
            f"{value.tolist()!r} (dtype {value.dtype}, shape {value.shape})"
        )
    return int(value)


def _check_npz_images(array: np.ndarray, key: str, levels: int, path: Path) -> None:
    """Dtype, rank, size and value range of the array ``key`` of an npz file."""
    where = f"array {key} of {str(path)!r}"
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"expected {where} of dtype uint8 (or integers in 0..{levels - 1}); got {array.dtype}"
        )
    if array.ndim not in (3, 4):
        raise ValueError(
            f"expected {where} shaped (N, C, H, W), (N, H, W, C) or (N, H, W); got {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"expected a non-empty {where}; got shape {array.shape}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= levels:
        raise ValueError(
            f"expected {where} with values in 0..{levels - 1} (levels {levels}); got values in "
            f"{low}..{high}"
        )


def _channels_last(shape: Sequence[int]) -> bool:
    """Whether a 4-D shape is ``(N, H, W, C)`` (the rule of :func:`load_npz_dataset`)."""
    _, first, middle, last = shape
    first_is_channel, last_is_channel = first in CHANNEL_SIZES, last in CHANNEL_SIZES
    if first_is_channel != last_is_channel:
        return last_is_channel
    square_if_first, square_if_last = middle == last, first == middle
    if square_if_first != square_if_last:
        return square_if_last
    return False


def _npz_tensor(array: np.ndarray, channels_last: bool) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint8))
    if tensor.dim() == 3:
        return tensor.unsqueeze(1).contiguous()
    return (tensor.permute(0, 3, 1, 2) if channels_last else tensor).contiguous()


def load_npz_dataset(path: str | Path, limit: int | None = None) -> ImageDataset:
    """Load your own images from a numpy ``.npz`` archive (no pickles; ``np.load`` only).

    The archive holds arrays ``train`` and ``test`` of one image shape and an optional scalar
    ``levels`` (an integer in 2..256, default 256). The arrays are ``uint8`` or any other integer
    dtype whose values all lie in ``0 .. levels-1``, shaped ``(N, H, W)`` (one channel),
    ``(N, C, H, W)`` or ``(N, H, W, C)``. A 4-D array is read as ``(N, H, W, C)`` when

    1. its last axis has a channel size (1, 3 or 4) and axis 1 has not, or
    2. both or neither have one, and only ``(N, H, W, C)`` gives square images (``H == W``);

    otherwise (also when it stays ambiguous, as for ``(N, 4, 4, 4)``) it is read as
    ``(N, C, H, W)``.

    Args:
        path: The ``.npz`` file.
        limit: Keep the first ``limit`` images of each split (all values are checked first).

    Raises:
        ValueError: "expected ...; got ..." naming the file, for a missing or unreadable file,
            a missing array, a non-integer dtype, a wrong rank, an empty split, values outside
            ``0 .. levels-1``, a bad ``levels`` or train and test image shapes that differ.
    """
    path = Path(path).expanduser()
    arrays = _read_npz(path)
    levels = _npz_levels(arrays, path)
    for key in ("train", "test"):
        _check_npz_images(arrays[key], key, levels, path)
    train, test = arrays["train"], arrays["test"]
    if train.shape[1:] != test.shape[1:]:
        raise ValueError(
            f"expected arrays train and test of {str(path)!r} with one image shape; got "
            f"{train.shape[1:]} and {test.shape[1:]}"
        )
    channels_last = train.ndim == 4 and _channels_last(train.shape)
    dataset = ImageDataset(
        f"{NPZ_PREFIX}{path}",
        _npz_tensor(train, channels_last),
        _npz_tensor(test, channels_last),
        levels,
    )
    return dataset.limit(limit, limit) if limit else dataset


# --- image folders (Pillow) ----------------------------------------------------------------------


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` in a fixed order (no class labels are kept).

    First the image files directly in ``folder`` (sorted by name), then those of each subfolder
    in name order, each walked as torchvision's ``ImageFolder`` walks a class folder
    (``sorted(os.walk(..., followlinks=True))``, file names sorted), so a class-folder layout
    lists its files in ``ImageFolder``'s order. Only names ending in :data:`IMG_EXTENSIONS` (any
    case) count.
    """
    folder = Path(folder)
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    files = [folder / e.name for e in entries if e.is_file() and _is_image_file(e.name)]
    for entry in entries:
        if entry.is_dir():
            for root, _, names in sorted(os.walk(folder / entry.name, followlinks=True)):
                files.extend(Path(root) / name for name in sorted(names) if _is_image_file(name))
    return files


def _folder_files(folder: Path) -> list[Path]:
    files = image_files(folder)
    if not files:
        raise ValueError(
            f"expected image files ({', '.join(IMG_EXTENSIONS)}) in {str(folder)!r} or its "
            f"subfolders; got none"
        )
    return files


#: Pillow modes read as grey (one channel); every other 8-bit mode is read as RGB.
GREY_MODES = ("1", "L", "LA", "La")
#: Pillow modes with an alpha channel (others may carry transparency in ``info``).
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class _Image:
    """One decoded image file: ``pixels`` ``(H, W, 1)`` (grey) or ``(H, W, 3)`` (RGB)."""

    path: Path
    pixels: np.ndarray
    mode: str  # Pillow mode of the file
    alpha: str | None  # None: no transparency; "opaque": alpha all 255; "dropped": transparent


def _transparency(image: Any, path: Path, drop_alpha: bool) -> str | None:
    """Whether (and how) the image has transparency; refused unless ``drop_alpha``."""
    if image.mode not in ALPHA_MODES and image.info.get("transparency") is None:
        return None
    if image.convert("RGBA").getchannel("A").getextrema() == (255, 255):
        return "opaque"
    if not drop_alpha:
        raise ValueError(
            f"expected images without transparency (pass drop_alpha=True to drop the alpha "
            f"channel); got {str(path)!r} with transparent pixels (Pillow mode {image.mode})"
        )
    return "dropped"


def _read_image(
    path: Path, image_size: int | None, channels: int | None, drop_alpha: bool
) -> _Image:
    """One image file, grey or RGB (``channels`` 1 or 3 forces one), resized when ``image_size``."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image: Image.Image = Image.open(handle)
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"expected a readable image file; got {str(path)!r} ({type(error).__name__}: {error})"
        ) from error
    mode = image.mode
    if mode == "F" or mode.startswith("I"):
        raise ValueError(
            f"expected 8-bit images (256 levels); got {str(path)!r} with 16-bit, 32-bit or float "
            f"pixels (Pillow mode {mode})"
        )
    alpha = _transparency(image, path, drop_alpha)
    grey = mode in GREY_MODES if channels is None else channels == 1
    image = image.convert("L" if grey else "RGB")
    if image_size:
        image = _center_crop_resize(image, None, image_size)
    pixels = np.asarray(image, dtype=np.uint8)
    return _Image(path, pixels[:, :, None] if grey else pixels, mode, alpha)


def _conversion_notes(images: Sequence[_Image], channels: int) -> list[str]:
    """One sentence per kind of conversion applied to the files (count and one example)."""
    kinds: dict[str, list[Path]] = {}
    for image in images:
        grey = image.mode in GREY_MODES
        if image.alpha is not None:
            what = "was fully opaque" if image.alpha == "opaque" else "had transparent pixels"
            kinds.setdefault(f"an alpha channel that {what} was dropped", []).append(image.path)
        if grey and channels == 3:
            kinds.setdefault("grey images were converted to RGB", []).append(image.path)
        elif not grey and channels == 1:
            kinds.setdefault("colour images were converted to grey", []).append(image.path)
        elif image.mode not in ("L", "RGB", "LA", "RGBA") and not (grey and channels == 1):
            kinds.setdefault(f"Pillow mode {image.mode} was converted to RGB", []).append(
                image.path
            )
    return [
        f"{len(paths)} of {len(images)} files: {kind} (e.g. {str(paths[0])!r})"
        for kind, paths in kinds.items()
    ]


def _read_images(
    splits: Sequence[Sequence[Path]],
    image_size: int | None,
    channels: int | None = None,
    drop_alpha: bool = False,
) -> tuple[list[Tensor], list[str]]:
    """Every split's files as one ``uint8`` tensor ``(N, C, H, W)``, all of one size, and the
    notes on their conversion.

    ``channels=None``: one channel if every file is grey (:data:`GREY_MODES`), else RGB (the grey
    files converted, which :func:`_conversion_notes` says).
    """
    first: tuple[Path, tuple[int, ...]] | None = None
    decoded: list[list[_Image]] = []
    for files in splits:
        images = []
        for path in files:
            image = _read_image(path, image_size, channels, drop_alpha)
            size = image.pixels.shape[:2]
            if first is None:
                first = (path, size)
            elif size != first[1]:
                raise ValueError(
                    f"expected images of one size (pass image_size to resize); got "
                    f"{str(path)!r} of {size[1]}x{size[0]} pixels and "
                    f"{str(first[0])!r} of {first[1][1]}x{first[1][0]} pixels"
                )
            images.append(image)
        decoded.append(images)
    every = [image for images in decoded for image in images]
    if channels is None:
        channels = 1 if all(image.pixels.shape[2] == 1 for image in every) else 3
    tensors = []
    for images in decoded:
        arrays = [np.broadcast_to(i.pixels, (*i.pixels.shape[:2], channels)) for i in images]
        tensors.append(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous())
    return tensors, _conversion_notes(every, channels)


def load_image_folder(
    root: str | Path,
    limit: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    channels: int | None = None,
    drop_alpha: bool = False,
) -> ImageDataset:
    """Load an image folder with Pillow (no torchvision): grey or RGB, 256 levels.

    ``root/train`` and ``root/test`` are the splits if both exist; otherwise the files of
    ``root`` are split 90/10 (at least one test image) by a permutation with ``seed``. Files are
    listed by :func:`image_files` (class subfolders and/or flat image files).

    Channels: a folder whose files are all grey (Pillow modes ``1``, ``L``, ``LA``) gives one
    channel; one colour file makes the whole data set RGB, its grey files converted (each grey
    value copied to R, G and B, nothing lost). ``channels`` 1 or 3 asks for one of them instead
    (``channels=1`` converts colour files to grey by Pillow's ITU-R 601-2 luma). An alpha channel
    is refused (the error names the file) unless it is fully opaque or ``drop_alpha`` is set;
    16-bit and float images are refused. Every conversion is listed in
    :attr:`ImageDataset.notes`.

    Args:
        root: The folder.
        limit: Keep at most this many images per split (only those files are read).
        image_size: Centre-crop to a square and resize to ``image_size x image_size``; without it
            every image must have one size.
        seed: Seed of the 90/10 split.
        channels: ``None`` (grey folders stay grey, else RGB), 1 or 3.
        drop_alpha: Drop the alpha channel of images with transparent pixels.

    Raises:
        ValueError: "expected ...; got ..." naming the folder or file: a missing folder, a split
            without images, an unreadable image, images of different sizes, an image with
            transparent pixels (without ``drop_alpha``) or with more than 8 bits per channel.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     for i in range(10):
        ...         Image.new("L", (8, 8), color=10 * i).save(Path(folder) / f"{i}.png")
        ...     data = load_image_folder(folder)
        >>> data.shape, data.train.shape[0], data.test.shape[0], data.notes
        ((1, 8, 8), 9, 1, ())
    """
    check_dataset_options("imagefolder", image_size, channels, drop_alpha)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"expected data_root to be an existing folder; got {str(root)!r}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        splits = [_folder_files(root / split) for split in ("train", "test")]
    else:
        files = _folder_files(root)
        if len(files) < 2:
            raise ValueError(f"expected at least 2 images under {str(root)!r}; got {len(files)}")
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
        num_test = max(1, len(files) // 10)
        splits = [[files[i] for i in order[num_test:]], [files[i] for i in order[:num_test]]]
    if limit:
        splits = [files[:limit] for files in splits]
    (train, test), notes = _read_images(splits, image_size, channels, drop_alpha)
    return ImageDataset("imagefolder", train, test, levels=256, notes=tuple(notes))


# --- torchvision ---------------------------------------------------------------------------------


def load_vision_dataset(
    name: str,
    data_root: str | Path | None,
    limit: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    channels: int | None = None,
    drop_alpha: bool = False,
) -> ImageDataset:
    """Load a dataset of ``VISION_DATASETS`` from a local folder (never downloaded).

    ``imagefolder`` is read with Pillow (:func:`load_image_folder`), the others with torchvision
    (``download=False`` always).

    Args:
        name: One of ``VISION_DATASETS``.
        data_root: Folder laid out as torchvision expects (or an image folder root).
        limit: Keep at most this many images per split.
        image_size: ImageFolder only: centre-crop and resize to ``image_size x image_size``.
        seed: ImageFolder only: seed of the 90/10 split when there are no train/test folders.
        channels, drop_alpha: ImageFolder only, see :func:`load_image_folder`.

    Raises:
        ImportError: if torchvision is missing for mnist, cifar10 or celeba (the message names
            the ``vision`` extra).
        ValueError: for an unknown name, a missing ``data_root``, a bad image folder, or an
            ImageFolder-only option given for another dataset (:func:`check_dataset_options`).
    """
    if name not in VISION_DATASETS:
        raise ValueError(f"expected a dataset in {VISION_DATASETS}; got {name!r}")
    check_dataset_options(name, image_size, channels, drop_alpha)
    if data_root is None:
        raise ValueError(f"expected --data-root for dataset {name!r}; got None")
    root = Path(data_root).expanduser()
    if name == "imagefolder":
        return load_image_folder(
            root,
            limit=limit,
            image_size=image_size,
            seed=seed,
            channels=channels,
            drop_alpha=drop_alpha,
        )
    if not root.is_dir():
        raise ValueError(f"expected data_root to be an existing folder; got {str(root)!r}")
    datasets = _import_torchvision(name).datasets
    if name == "mnist":
        splits = [datasets.MNIST(str(root), train=t, download=False) for t in (True, False)]
        tensors = [_as_uint8_nchw(s.data, channels_last=False) for s in splits]
    elif name == "cifar10":
        splits = [datasets.CIFAR10(str(root), train=t, download=False) for t in (True, False)]
        tensors = [_as_uint8_nchw(s.data, channels_last=True) for s in splits]
    else:
        crop = lambda image: _center_crop_resize(image, 148, 64)  # noqa: E731
        tensors = [
            _stack_pil(datasets.CelebA(str(root), split=s, download=False), "RGB", crop, limit)
            for s in ("train", "test")
        ]
    if limit:
        tensors = [t[:limit] for t in tensors]
    return ImageDataset(name, tensors[0], tensors[1], levels=256)


def load_dataset(
    name: str = "digits",
    data_root: str | Path | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    drop_alpha: bool = False,
) -> ImageDataset:
    """Load a dataset of ``DATASETS`` or ``npz:PATH`` by name (only vision ones use ``data_root``).

    Args:
        name: A name of ``DATASETS``, or ``npz:PATH`` for :func:`load_npz_dataset`.
        data_root: The folder of a ``VISION_DATASETS`` dataset.
        limit: Keep at most this many images per split.
        image_size: ``imagefolder`` only: centre-crop and resize to ``image_size x image_size``.
        channels, drop_alpha: ``imagefolder`` only, see :func:`load_image_folder`.

    Raises:
        ValueError: for an unknown name, bad files (named), or an ``imagefolder``-only option
            given for another dataset (:func:`check_dataset_options`), e.g. ``image_size`` with
            ``npz:PATH``.
    """
    path = npz_path(name)
    if name not in DATASETS and path is None:
        raise ValueError(f"expected a dataset in {DATASETS} or npz:PATH; got {name!r}")
    check_dataset_options(name, image_size, channels, drop_alpha)
    if path is not None:
        return load_npz_dataset(path, limit=limit)
    if name == "digits":
        dataset = load_digits_dataset()
    elif name == "patches":
        dataset = load_patches_dataset()
    else:
        return load_vision_dataset(
            name,
            data_root,
            limit=limit,
            image_size=image_size,
            channels=channels,
            drop_alpha=drop_alpha,
        )
    return dataset.limit(limit, limit) if limit else dataset
