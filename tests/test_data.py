"""Datasets, pre-processing and bits/dim, checked against independent computations."""

from __future__ import annotations

import math
import re
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from lcma_ext.data import (
    MIN_SPLIT_IMAGES,
    ImageDataset,
    LogitPreprocessing,
    TinyDatasetWarning,
    bits_per_dim,
    check_dataset_options,
    check_dataset_size,
    dataset_slug,
    dequantize,
    image_files,
    load_dataset,
    load_digits_dataset,
    load_image_folder,
    load_npz_dataset,
    load_patches_dataset,
    load_vision_dataset,
    logit_transform,
    npz_path,
)

from brute_force import jacobian

if TYPE_CHECKING:
    from PIL import Image

ALPHA = 0.05


def test_digits_fixed_split() -> None:
    first, second = load_digits_dataset(), load_dataset("digits")
    assert first.shape == (1, 8, 8) and first.levels == 17
    assert first.train.shape[0] + first.test.shape[0] == 1797
    assert first.test.shape[0] == 360
    assert first.train.dtype == torch.uint8 and int(first.train.max()) == 16
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    assert load_dataset("digits", limit=10).train.shape[0] == 10


def test_patches_fixed_disjoint_split() -> None:
    data = load_patches_dataset(num_train=200, num_test=50)
    assert data.shape == (3, 16, 16) and data.levels == 256
    assert data.train.shape[0] == 200 and data.test.shape[0] == 50
    again = load_patches_dataset(num_train=200, num_test=50)
    assert torch.equal(data.train, again.train) and torch.equal(data.test, again.test)
    train = {bytes(p.numpy().tobytes()) for p in data.train}
    assert not any(bytes(p.numpy().tobytes()) in train for p in data.test)
    assert data.train.float().std() > 10  # natural images, not constant patches


def test_dataset_validation() -> None:
    with pytest.raises(ValueError, match="expected a dataset in"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match=r"expected train images shaped \(N, C, H, W\)"):
        ImageDataset("x", torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(1, 1, 8, 8), 2)
    with pytest.raises(ValueError, match="expected train and test images of one shape"):
        ImageDataset("x", torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 4, 4), 2)


def test_dequantize_range_and_errors() -> None:
    x = torch.tensor([[0, 16], [3, 5]])
    v = dequantize(x, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert v.dtype == torch.float64
    assert torch.all(v >= x / 17) and torch.all(v < (x + 1) / 17)
    noise = torch.full((2, 2), 0.5)
    torch.testing.assert_close(dequantize(x, 17, noise=noise), (x + 0.5) / 17)
    with pytest.raises(ValueError, match=r"expected integer values in \[0, 16\]"):
        dequantize(torch.tensor([17]), 17)
    with pytest.raises(ValueError, match="expected integer values"):
        dequantize(torch.tensor([0.5]), 17)
    with pytest.raises(ValueError, match="expected levels to be an integer >= 2"):
        dequantize(x, 1)
    with pytest.raises(ValueError, match="expected alpha in"):
        LogitPreprocessing(17, alpha=0.5)


def test_logit_logdet_is_the_jacobian() -> None:
    v = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    y, logdet = logit_transform(v, ALPHA)
    jac = jacobian(lambda batch: logit_transform(batch, ALPHA)[0], v[0])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(
        y, torch.from_numpy(special.logit(ALPHA + (1 - 2 * ALPHA) * v.numpy()))
    )
    back = LogitPreprocessing(17, ALPHA).to_unit(y)
    torch.testing.assert_close(back, v)


def test_bpd_standard_normal_identity_flow_by_hand() -> None:
    """Identity flow with a standard normal base, against scipy and finite differences."""
    levels, x = 256, torch.tensor([[[[0, 255], [17, 128]]]])
    noise = torch.tensor([[[[0.25, 0.5], [0.75, 0.1]]]], dtype=torch.float64)
    v = dequantize(x, levels, noise=noise, dtype=torch.float64)
    y, logdet = logit_transform(v, ALPHA)
    log_prob = torch.distributions.Normal(0.0, 1.0).log_prob(y).flatten(1).sum(1)
    bpd = bits_per_dim(log_prob, logdet, 4, levels)

    s = x.numpy().ravel() + noise.numpy().ravel()  # dequantized data on [0, levels)
    ys = lambda s: special.logit(ALPHA + (1 - 2 * ALPHA) * s / levels)  # noqa: E731
    h = 1e-6
    dyds = (ys(s + h) - ys(s - h)) / (2 * h)
    log_density = stats.norm.logpdf(ys(s)).sum() + np.log(dyds).sum()  # density of s
    expected = -log_density / (4 * math.log(2))
    assert bpd.item() == pytest.approx(expected, rel=1e-7)


def test_bpd_of_the_uniform_density_is_log2_levels() -> None:
    # The density of y under a uniform density of v on [0, 1)^D is exp(-log|dy/dv|).
    for levels in (17, 256):
        x = torch.randint(0, levels, (5, 3, 4, 4))
        _, logdet = LogitPreprocessing(levels, ALPHA)(x, torch.Generator().manual_seed(1))
        bpd = bits_per_dim(-logdet, logdet, 48, levels)
        torch.testing.assert_close(bpd, torch.full((5,), math.log2(levels)))


def test_bpd_density_integrates_to_the_base_mass() -> None:
    """For D = 1, 2^(-bpd(s)) is a density of s = x + u; its integral over [0, levels) is the
    normal mass between logit(alpha) and logit(1 - alpha)."""
    levels = 17

    def density(s: float) -> float:
        v = torch.tensor([[s / levels]], dtype=torch.float64)
        y, logdet = logit_transform(v, ALPHA)
        log_prob = torch.distributions.Normal(0.0, 1.0).log_prob(y).sum(1)
        return float(2.0 ** (-bits_per_dim(log_prob, logdet, 1, levels)))

    mass, _ = integrate.quad(density, 0, levels, limit=200)
    edge = special.logit(1 - ALPHA)
    assert mass == pytest.approx(stats.norm.cdf(edge) - stats.norm.cdf(-edge), rel=1e-8)


# --- torchvision datasets: a fake module that reads the files the tests write -----------------


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _fake_torchvision(calls: list) -> types.ModuleType:
    from PIL import Image

    def no_download(name: str, download: bool) -> None:
        calls.append((name, download))
        if download:
            raise AssertionError("a dataset was asked to download")

    class MNIST:
        def __init__(self, root: str | Path, train: bool = True, download: bool = False) -> None:
            no_download("MNIST", download)
            self.data = torch.from_numpy(np.load(Path(root) / f"mnist_{int(train)}.npy"))

    class CIFAR10:
        def __init__(self, root: str | Path, train: bool = True, download: bool = False) -> None:
            no_download("CIFAR10", download)
            self.data = np.load(Path(root) / f"cifar_{int(train)}.npy")

    class ImageFolder:
        def __init__(self, root: str | Path) -> None:
            self.files = sorted(Path(root).glob("*/*.png"))

        def __len__(self) -> int:
            return len(self.files)

        def __getitem__(self, index: int) -> tuple[Image.Image, int]:
            return Image.open(self.files[index]), 0

    class CelebA(ImageFolder):
        def __init__(
            self, root: str | Path, split: str = "train", download: bool = False, **kwargs
        ) -> None:
            no_download("CelebA", download)
            super().__init__(Path(root) / "celeba" / split)

    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(
        MNIST=MNIST, CIFAR10=CIFAR10, CelebA=CelebA, ImageFolder=ImageFolder
    )
    return module


def test_vision_loaders_with_tiny_local_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "torchvision", _fake_torchvision(calls))
    rng = np.random.default_rng(0)
    for train, n in ((1, 6), (0, 3)):
        np.save(tmp_path / f"mnist_{train}.npy", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        np.save(
            tmp_path / f"cifar_{train}.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        )
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            image = rng.integers(0, 256, (160, 150, 3), dtype=np.uint8)
            _write_png(tmp_path / "celeba" / split / "a" / f"{i}.png", image)
    mnist = load_vision_dataset("mnist", tmp_path)
    assert mnist.shape == (1, 28, 28) and mnist.train.shape[0] == 6 and mnist.levels == 256
    np.testing.assert_array_equal(mnist.test[:, 0].numpy(), np.load(tmp_path / "mnist_0.npy"))
    cifar = load_vision_dataset("cifar10", tmp_path, limit=4)
    assert cifar.shape == (3, 32, 32) and cifar.train.shape[0] == 4
    np.testing.assert_array_equal(
        cifar.test.permute(0, 2, 3, 1).numpy(), np.load(tmp_path / "cifar_0.npy")
    )
    celeba = load_vision_dataset("celeba", tmp_path)
    assert celeba.shape == (3, 64, 64) and celeba.test.shape[0] == 2
    assert calls and all(download is False for _, download in calls)


def test_imagefolder_split_and_resize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", _fake_torchvision([]))
    rng = np.random.default_rng(1)
    for i in range(20):
        _write_png(
            tmp_path / "one" / f"c{i % 2}" / f"{i}.png",
            rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        )
    data = load_vision_dataset("imagefolder", tmp_path / "one")
    assert data.train.shape == (18, 3, 8, 8) and data.test.shape == (2, 3, 8, 8)
    for split in ("train", "test"):
        for i in range(3):
            size = (12 + i, 10, 3)
            _write_png(
                tmp_path / "two" / split / "c" / f"{i}.png",
                rng.integers(0, 256, size, dtype=np.uint8),
            )
    with pytest.raises(ValueError, match="expected images of one size"):
        load_vision_dataset("imagefolder", tmp_path / "two")
    resized = load_vision_dataset("imagefolder", tmp_path / "two", image_size=8)
    assert resized.train.shape == (3, 3, 8, 8)


def test_missing_torchvision_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"lcma-ext\[vision\]"):
        load_dataset("cifar10", data_root=tmp_path)
    with pytest.raises(ValueError, match="expected --data-root"):
        load_vision_dataset("mnist", None)
    with pytest.raises(ValueError, match="expected data_root to be an existing folder"):
        load_vision_dataset("mnist", tmp_path / "missing")


def test_real_torchvision_imagefolder(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for i in range(2):
            _write_png(
                tmp_path / split / "c" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            )
    data = load_vision_dataset("imagefolder", tmp_path)
    assert data.train.shape == (2, 3, 8, 8) and data.test.shape == (2, 3, 8, 8)


# --- npz:PATH: your own data in a numpy archive ------------------------------------------------


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("shape", "to_nchw"),
    [
        ((5, 3, 8, 8), lambda a: a),
        ((5, 8, 8, 3), lambda a: a.transpose(0, 3, 1, 2)),
        ((5, 8, 8), lambda a: a[:, None]),
        ((5, 8, 8, 1), lambda a: a.transpose(0, 3, 1, 2)),
        ((5, 8, 8, 2), lambda a: a.transpose(0, 3, 1, 2)),  # no channel size: square images
        ((5, 2, 8, 8), lambda a: a),
        ((5, 3, 4, 4), lambda a: a),  # both channel sizes: square images decide
        ((5, 4, 4, 3), lambda a: a.transpose(0, 3, 1, 2)),
        ((5, 4, 4, 4), lambda a: a),  # ambiguous: NCHW
    ],
)
def test_npz_layouts_round_trip_exact_values(
    tmp_path: Path, shape: tuple[int, ...], to_nchw: Callable[[np.ndarray], np.ndarray]
) -> None:
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, shape, dtype=np.uint8)
    test = rng.integers(0, 256, (2, *shape[1:]), dtype=np.uint8)
    path = _npz(tmp_path / "mine.npz", train=train, test=test)
    data = load_dataset(f"npz:{path}")
    assert data.levels == 256 and data.name == f"npz:{path}"
    assert data.train.dtype == torch.uint8 and data.train.is_contiguous()
    np.testing.assert_array_equal(data.train.numpy(), to_nchw(train))
    np.testing.assert_array_equal(data.test.numpy(), to_nchw(test))


def test_npz_levels_integer_dtypes_and_limit(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    train = rng.integers(0, 17, (6, 1, 8, 8)).astype(np.int16)
    train[0, 0, 0, 0] = 16
    test = rng.integers(0, 17, (3, 1, 8, 8)).astype(np.int64)
    path = _npz(tmp_path / "levels.npz", train=train, test=test, levels=np.int32(17))
    data = load_npz_dataset(path)
    assert data.levels == 17 and data.shape == (1, 8, 8)
    np.testing.assert_array_equal(data.train.numpy(), train)
    np.testing.assert_array_equal(data.test.numpy(), test)
    limited = load_dataset(f"npz:{path}", limit=2)
    assert limited.train.shape[0] == 2 and limited.test.shape[0] == 2
    assert npz_path("npz:~/x.npz") == Path("~/x.npz").expanduser()
    assert npz_path("digits") is None and npz_path("npz:") is None
    assert dataset_slug(f"npz:{path}") == "npz-levels" and dataset_slug("digits") == "digits"


def _good(n: int = 3) -> np.ndarray:
    return np.zeros((n, 1, 8, 8), dtype=np.uint8)


def _write_bad_npz(path: Path, case: str) -> None:
    arrays: dict[str, object] = {"train": _good(), "test": _good()}
    if case == "missing":
        return
    if case == "text":
        path.write_text("not an archive")
        return
    if case == "npy":
        with open(path, "wb") as handle:
            np.save(handle, _good())
        return
    if case == "truncated":
        _npz(path, **arrays)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    changes: dict[str, dict[str, object]] = {
        "no test": {"test": None},
        "object array": {"test": np.array([None, 1], dtype=object)},
        "float": {"train": _good().astype(np.float32)},
        "bool": {"train": _good().astype(bool)},
        "rank 2": {"train": np.zeros((3, 64), dtype=np.uint8)},
        "rank 5": {"train": np.zeros((3, 1, 1, 8, 8), dtype=np.uint8)},
        "empty": {"test": np.zeros((0, 1, 8, 8), dtype=np.uint8)},
        "at levels": {"train": _good() + 4, "levels": 4},
        "negative": {"train": _good().astype(np.int8) - 1},
        "levels 1": {"levels": 1},
        "levels 300": {"levels": 300},
        "levels float": {"levels": 2.5},
        "levels vector": {"levels": np.array([2, 3])},
        "shapes differ": {"test": np.zeros((3, 1, 4, 4), dtype=np.uint8)},
    }[case]
    arrays.update(changes)
    _npz(path, **{key: value for key, value in arrays.items() if value is not None})


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "expected an existing .npz file"),
        ("text", "expected a numpy .npz archive"),
        ("npy", "expected a numpy .npz archive of arrays train and test"),
        ("truncated", "expected a numpy .npz archive"),
        ("no test", "expected arrays train and test in"),
        ("object array", "expected readable numeric arrays"),
        ("float", "of dtype uint8 (or integers in 0..255); got float32"),
        ("bool", "of dtype uint8"),
        ("rank 2", "shaped (N, C, H, W), (N, H, W, C) or (N, H, W); got (3, 64)"),
        ("rank 5", "shaped (N, C, H, W)"),
        ("empty", "expected a non-empty array test"),
        ("at levels", "with values in 0..3 (levels 4); got values in 4..4"),
        ("negative", "got values in -1..-1"),
        ("levels 1", "expected levels in"),
        ("levels 300", "as an integer scalar in 2..256; got 300"),
        ("levels float", "as an integer scalar in 2..256; got 2.5"),
        ("levels vector", "as an integer scalar"),
        ("shapes differ", "with one image shape; got (1, 8, 8) and (1, 4, 4)"),
    ],
)
def test_bad_npz_files_are_named(tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / f"bad_{case.replace(' ', '_')}.npz"
    _write_bad_npz(path, case)
    with pytest.raises(ValueError) as info:
        load_dataset(f"npz:{path}")
    text = str(info.value)
    assert text.startswith("expected") and "; got" in text
    assert path.name in text and message in text


# --- imagefolder: Pillow, no torchvision ---------------------------------------------------------


def _rgb(rng: np.random.Generator, height: int = 8, width: int = 8) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_imagefolder_train_test_layout_without_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # any import of it would fail
    rng = np.random.default_rng(5)
    written = {}
    # flat files first (sorted), then class folders in name order, each walked recursively
    for relative in ("z.png", "b/1.png", "b/deep/0.PNG", "a/2.png", "a/10.png"):
        written[relative] = _rgb(rng)
        _write_png(tmp_path / "train" / relative, written[relative])
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    _write_png(tmp_path / "test" / "g.png", gray)
    data = load_dataset("imagefolder", data_root=tmp_path)
    assert data.name == "imagefolder" and data.levels == 256
    order = ["z.png", "a/10.png", "a/2.png", "b/1.png", "b/deep/0.PNG"]
    expected = np.stack([written[name] for name in order]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(data.train.numpy(), expected)
    np.testing.assert_array_equal(data.test.numpy(), np.stack([gray] * 3)[None])  # L -> RGB
    assert image_files(tmp_path / "train") == [tmp_path / "train" / name for name in order]
    limited = load_image_folder(tmp_path, limit=2)
    np.testing.assert_array_equal(limited.train.numpy(), expected[:2])


def test_imagefolder_single_folder_split_and_resize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    rng = np.random.default_rng(6)
    images = [_rgb(rng, 8, 16) for _ in range(20)]
    for i, image in enumerate(images):
        _write_png(tmp_path / "one" / f"{i:02d}.png", image)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()
    data = load_vision_dataset("imagefolder", tmp_path / "one", image_size=8)
    crop = np.stack(images)[:, :, 4:12].transpose(0, 3, 1, 2)  # central 8x8, no resampling
    np.testing.assert_array_equal(data.test.numpy(), crop[order[:2]])
    np.testing.assert_array_equal(data.train.numpy(), crop[order[2:]])
    for i, size in enumerate(((12, 10), (9, 30))):
        _write_png(tmp_path / "mixed" / f"{i}.png", _rgb(rng, *size))
    resized = load_image_folder(tmp_path / "mixed", image_size=4)
    assert resized.train.shape == (1, 3, 4, 4) and resized.test.shape == (1, 3, 4, 4)


def test_bad_image_folders_are_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    _write_png(tmp_path / "sizes" / "a.png", _rgb(rng, 8, 8))
    _write_png(tmp_path / "sizes" / "b.png", _rgb(rng, 8, 12))
    with pytest.raises(ValueError, match="expected images of one size") as info:
        load_image_folder(tmp_path / "sizes")
    text = str(info.value)  # which file is the odd one depends on the 90/10 split
    assert "a.png' of 8x8 pixels" in text and "b.png' of 12x8 pixels" in text
    _write_png(tmp_path / "broken" / "a.png", _rgb(rng))
    (tmp_path / "broken" / "c" / "bad.jpg").parent.mkdir()
    (tmp_path / "broken" / "c" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"expected a readable image file; got '.*bad\.jpg'"):
        load_image_folder(tmp_path / "broken")
    _write_png(tmp_path / "split" / "train" / "a.png", _rgb(rng))
    (tmp_path / "split" / "test").mkdir()
    (tmp_path / "split" / "test" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"expected image files .* in '.*test' .*; got none"):
        load_image_folder(tmp_path / "split")
    with pytest.raises(ValueError, match=r"expected at least 2 images under '.*train'; got 1"):
        load_image_folder(tmp_path / "split" / "train")
    with pytest.raises(ValueError, match=r"existing folder; got '.*nowhere'"):
        load_dataset("imagefolder", data_root=tmp_path / "nowhere")


# --- input is never silently reinterpreted: channels, alpha, options, tiny sets ---------------


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _grey(rng: np.random.Generator, size: int = 8) -> np.ndarray:
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def test_a_folder_of_grey_pngs_stays_one_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    images = {split: [_grey(rng) for _ in range(3)] for split in ("train", "test")}
    for split, arrays in images.items():
        for i, array in enumerate(arrays):
            _write_png(tmp_path / split / f"{i}.png", array)  # Pillow mode L
    data = load_dataset("imagefolder", data_root=tmp_path)
    assert data.shape == (1, 8, 8) and data.num_dims == 64  # not 3 x 8 x 8
    np.testing.assert_array_equal(data.train[:, 0].numpy(), np.stack(images["train"]))
    np.testing.assert_array_equal(data.test[:, 0].numpy(), np.stack(images["test"]))
    assert data.notes == ()
    assert data.summary().startswith("imagefolder: 1 x 8 x 8 images (C x H x W), 256 levels")
    forced = load_dataset("imagefolder", data_root=tmp_path, channels=3)
    assert forced.shape == (3, 8, 8)
    np.testing.assert_array_equal(forced.train.numpy(), np.repeat(data.train.numpy(), 3, axis=1))
    first = str(tmp_path / "train" / "0.png")
    assert forced.notes == (f"6 of 6 files: grey images were converted to RGB (e.g. {first!r})",)


def test_a_mixed_folder_is_rgb_and_says_which_files_were_converted(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(11)
    colour = _rgb(rng)
    grey = _grey(rng)
    _write_png(tmp_path / "train" / "colour.png", colour)
    _write_png(tmp_path / "train" / "grey.png", grey)
    _write_png(tmp_path / "test" / "grey.png", grey)
    data = load_dataset("imagefolder", data_root=tmp_path)
    assert data.shape == (3, 8, 8)
    np.testing.assert_array_equal(data.train[0].numpy(), colour.transpose(2, 0, 1))
    np.testing.assert_array_equal(data.train[1].numpy(), np.stack([grey] * 3))
    (note,) = data.notes
    assert note.startswith("2 of 3 files: grey images were converted to RGB")
    assert "grey.png" in note and note in data.summary()
    as_grey = load_dataset("imagefolder", data_root=tmp_path, channels=1)
    assert as_grey.shape == (1, 8, 8)
    luma = np.asarray(Image.fromarray(colour).convert("L"))  # ITU-R 601-2, as Pillow
    np.testing.assert_array_equal(as_grey.train[0, 0].numpy(), luma)
    np.testing.assert_array_equal(as_grey.train[1, 0].numpy(), grey)
    (note,) = as_grey.notes
    assert (
        note.startswith("1 of 3 files: colour images were converted to grey") and "colour" in note
    )
    with pytest.raises(ValueError, match="expected channels None, 1 or 3; got 2"):
        load_dataset("imagefolder", data_root=tmp_path, channels=2)


def test_transparency_is_refused_naming_the_file_unless_dropped(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(12)
    rgba = np.concatenate([_rgb(rng), np.full((8, 8, 1), 255, dtype=np.uint8)], axis=2)
    rgba[0, 0, 3] = 0  # one transparent pixel
    for split in ("train", "test"):
        _write_png(tmp_path / split / "plain.png", _rgb(rng))
    path = _save(tmp_path / "train" / "see-through.png", Image.fromarray(rgba, "RGBA"))
    with pytest.raises(ValueError) as info:
        load_dataset("imagefolder", data_root=tmp_path)
    text = str(info.value)
    assert text.startswith("expected images without transparency (pass drop_alpha=True")
    assert f"got {str(path)!r} with transparent pixels (Pillow mode RGBA)" in text
    data = load_dataset("imagefolder", data_root=tmp_path, drop_alpha=True)
    assert data.shape == (3, 8, 8)
    np.testing.assert_array_equal(data.train[1].numpy(), rgba[:, :, :3].transpose(2, 0, 1))
    assert data.notes == (
        f"1 of 3 files: an alpha channel that had transparent pixels was dropped (e.g. "
        f"{str(path)!r})",
    )
    # a fully opaque alpha channel holds nothing: dropped without asking, and said
    rgba[0, 0, 3] = 255
    _save(path, Image.fromarray(rgba, "RGBA"))
    opaque = load_dataset("imagefolder", data_root=tmp_path)
    np.testing.assert_array_equal(opaque.train.numpy(), data.train.numpy())
    assert opaque.notes == (
        f"1 of 3 files: an alpha channel that was fully opaque was dropped (e.g. {str(path)!r})",
    )
    # grey with alpha (LA) stays grey
    la = np.stack([_grey(rng), np.full((8, 8), 128, dtype=np.uint8)], axis=2)
    folder = tmp_path / "la"
    for i in range(2):
        _save(folder / f"{i}.png", Image.fromarray(la, "LA"))
    with pytest.raises(
        ValueError, match=r"got '.*la/\d\.png' with transparent pixels \(Pillow mode LA"
    ):
        load_image_folder(folder)
    grey = load_image_folder(folder, drop_alpha=True)
    assert grey.shape == (1, 8, 8)
    np.testing.assert_array_equal(grey.test[0, 0].numpy(), la[:, :, 0])


def test_16_bit_images_are_refused_naming_the_file(tmp_path: Path) -> None:
    from PIL import Image

    deep = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000  # values above 255
    for i in range(2):
        _save(tmp_path / f"{i}.png", Image.fromarray(deep))
    with pytest.raises(
        ValueError, match=r"expected 8-bit images \(256 levels\); got '.*\.png' with"
    ):
        load_image_folder(tmp_path)


def test_image_size_is_refused_where_nothing_is_resized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # refused before torchvision is needed
    path = _npz(tmp_path / "mine.npz", train=_good(), test=_good())
    with pytest.raises(ValueError) as info:
        load_dataset(f"npz:{path}", image_size=16)
    text = str(info.value)
    assert text.startswith("expected image_size, channels and drop_alpha only with a dataset in")
    assert text.endswith(f"; got image_size=16 for dataset 'npz:{path}'")
    for name in ("digits", "patches", "mnist", "cifar10", "celeba"):
        with pytest.raises(ValueError, match=f"got image_size=8 for dataset '{name}'"):
            load_dataset(name, data_root=tmp_path, image_size=8)
    with pytest.raises(ValueError, match="got channels=1, drop_alpha=True for dataset 'mnist'"):
        load_vision_dataset("mnist", tmp_path, channels=1, drop_alpha=True)
    check_dataset_options("imagefolder", image_size=8, channels=1, drop_alpha=True)  # applies
    check_dataset_options(f"npz:{path}")  # nothing asked: nothing refused
    with pytest.raises(ValueError, match="expected image_size to be a positive integer; got 0"):
        check_dataset_options("imagefolder", image_size=0)


def test_the_command_line_refuses_image_size_with_an_npz_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lcma_ext.cli import main

    path = _npz(tmp_path / "mine.npz", train=_good(48), test=_good(16))
    out = tmp_path / "run"
    argv = ["run", "--dataset", f"npz:{path}", "--image-size", "16", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mine.npz" in err and re.search(r"image[_-]size", err)
    assert not (out / "results.json").exists()


def test_three_images_draw_a_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    for i in range(3):
        _write_png(tmp_path / f"{i}.png", _rgb(rng))
    data = load_dataset("imagefolder", data_root=tmp_path)  # 2 train, 1 test
    with pytest.warns(TinyDatasetWarning) as caught:
        messages = check_dataset_size(data, batch_size=64)
    assert [str(w.message) for w in caught] == messages
    assert messages == [
        "imagefolder: 2 training images, fewer than one batch (64): each epoch is one step",
        f"imagefolder: 2 training images, fewer than {MIN_SPLIT_IMAGES}: too few to learn the "
        "data from",
        f"imagefolder: 1 test images, fewer than {MIN_SPLIT_IMAGES}: the test bits/dim is the "
        "score of a handful of images",
    ]
    assert issubclass(TinyDatasetWarning, UserWarning)
    digits = load_dataset("digits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real data set warns about nothing
        assert check_dataset_size(digits, batch_size=64) == []
    # the threshold is the rule: exactly MIN_SPLIT_IMAGES per split and one batch is enough
    edge = digits.limit(MIN_SPLIT_IMAGES, MIN_SPLIT_IMAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_dataset_size(edge, batch_size=MIN_SPLIT_IMAGES) == []
    with pytest.warns(TinyDatasetWarning, match="fewer than one batch"):
        assert len(check_dataset_size(edge, batch_size=MIN_SPLIT_IMAGES + 1)) == 1
    with pytest.raises(ValueError, match="expected batch_size >= 1 and min_images >= 1; got 0"):
        check_dataset_size(digits, batch_size=0)


def test_limit_keeps_the_notes() -> None:
    images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8)
    data = ImageDataset("x", images[:8], images[8:], 256, notes=("converted",))
    assert data.limit(2, 1).notes == ("converted",)
    assert data.summary() == (
        "x: 1 x 8 x 8 images (C x H x W), 256 levels, 8 train and 2 test images; converted"
    )


# --- npz data through the configuration and a whole quick run ------------------------------------


def test_npz_dataset_in_the_configuration(tmp_path: Path) -> None:
    from lcma_ext.experiments import ExperimentConfig

    config = ExperimentConfig(dataset=f"npz:{tmp_path / 'mine.npz'}")
    config.validate()  # no known shape: the file is read (and checked) by the runner
    assert config.out_dir == Path("runs/run-npz-mine-realnvp-tiny")
    for name in ("npz:", "svhn"):
        with pytest.raises(ValueError, match=r"expected dataset in digits, .* or npz:PATH"):
            ExperimentConfig(dataset=name).validate()
    with pytest.raises(ValueError, match=r"mine\.npz' with height and width divisible by 4"):
        config.check_shape((1, 6, 6))
    with pytest.raises(ValueError, match=r"mine\.npz' with .*; got shape \(1, 8, 6\)"):
        config.replace(levels=2).check_shape((1, 8, 6))


def test_quick_run_on_an_npz_file(tmp_path: Path) -> None:
    from lcma_ext.experiments import ExperimentConfig, run_comparison

    rng = np.random.default_rng(8)
    path = _npz(
        tmp_path / "tiny.npz",
        train=rng.integers(0, 4, (48, 8, 8), dtype=np.uint8),
        test=rng.integers(0, 4, (16, 8, 8), dtype=np.uint8),
        levels=4,
    )
    config = ExperimentConfig(
        dataset=f"npz:{path}",
        quick=True,
        arms=("channel",),
        seeds=1,
        epochs=1,
        nms_epochs=1,
        progress=False,
        out=tmp_path / "out",
    )
    results = run_comparison(config)
    assert list(results["arms"]) == ["channel"]
    assert math.isfinite(results["arms"]["channel"]["bpd_mean"])
    assert results["uniform_bpd"] == pytest.approx(2.0)  # log2(4 levels)
    stored = results["config"]
    assert stored["dataset"] == f"npz:{path}" and stored["shape"] == [1, 8, 8]
    assert (stored["num_train"], stored["num_test"]) == (48, 16)


def test_cli_names_a_missing_npz_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lcma_ext.cli import main

    missing = tmp_path / "absent.npz"
    argv = ["run", "--dataset", f"npz:{missing}", "--out", str(tmp_path / "x"), "--no-progress"]
    assert main(argv) == 2
    assert f"expected an existing .npz file; got '{missing}'" in capsys.readouterr().err
