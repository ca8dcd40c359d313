"""Datasets, pre-processing and bits/dim, checked against independent computations."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from lcma_ext.data import (
    ImageDataset,
    LogitPreprocessing,
    bits_per_dim,
    dequantize,
    load_dataset,
    load_digits_dataset,
    load_patches_dataset,
    load_vision_dataset,
    logit_transform,
)

ALPHA = 0.05


def test_digits_fixed_split():
    first, second = load_digits_dataset(), load_dataset("digits")
    assert first.shape == (1, 8, 8) and first.levels == 17
    assert first.train.shape[0] + first.test.shape[0] == 1797
    assert first.test.shape[0] == 360
    assert first.train.dtype == torch.uint8 and int(first.train.max()) == 16
    assert torch.equal(first.train, second.train) and torch.equal(first.test, second.test)
    assert load_dataset("digits", limit=10).train.shape[0] == 10


def test_patches_fixed_disjoint_split():
    data = load_patches_dataset(num_train=200, num_test=50)
    assert data.shape == (3, 16, 16) and data.levels == 256
    assert data.train.shape[0] == 200 and data.test.shape[0] == 50
    again = load_patches_dataset(num_train=200, num_test=50)
    assert torch.equal(data.train, again.train) and torch.equal(data.test, again.test)
    train = {bytes(p.numpy().tobytes()) for p in data.train}
    assert not any(bytes(p.numpy().tobytes()) in train for p in data.test)
    assert data.train.float().std() > 10  # natural images, not constant patches


def test_dataset_validation():
    with pytest.raises(ValueError, match="expected a dataset in"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match=r"expected train images shaped \(N, C, H, W\)"):
        ImageDataset("x", torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(1, 1, 8, 8), 2)
    with pytest.raises(ValueError, match="expected train and test images of one shape"):
        ImageDataset("x", torch.zeros(2, 1, 8, 8), torch.zeros(1, 1, 4, 4), 2)


def test_dequantize_range_and_errors():
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


def test_logit_logdet_is_the_jacobian():
    v = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    y, logdet = logit_transform(v, ALPHA)
    jacobian = torch.autograd.functional.jacobian(
        lambda flat: logit_transform(flat.view(1, -1), ALPHA)[0].view(-1), v[0].flatten()
    )
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jacobian)[1])
    torch.testing.assert_close(
        y, torch.from_numpy(special.logit(ALPHA + (1 - 2 * ALPHA) * v.numpy()))
    )
    back = LogitPreprocessing(17, ALPHA).to_unit(y)
    torch.testing.assert_close(back, v)


def test_bpd_standard_normal_identity_flow_by_hand():
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


def test_bpd_of_the_uniform_density_is_log2_levels():
    # The density of y under a uniform density of v on [0, 1)^D is exp(-log|dy/dv|).
    for levels in (17, 256):
        x = torch.randint(0, levels, (5, 3, 4, 4))
        _, logdet = LogitPreprocessing(levels, ALPHA)(x, torch.Generator().manual_seed(1))
        bpd = bits_per_dim(-logdet, logdet, 48, levels)
        torch.testing.assert_close(bpd, torch.full((5,), math.log2(levels)))


def test_bpd_density_integrates_to_the_base_mass():
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

    def no_download(name, download):
        calls.append((name, download))
        if download:
            raise AssertionError("a dataset was asked to download")

    class MNIST:
        def __init__(self, root, train=True, download=False):
            no_download("MNIST", download)
            self.data = torch.from_numpy(np.load(Path(root) / f"mnist_{int(train)}.npy"))

    class CIFAR10:
        def __init__(self, root, train=True, download=False):
            no_download("CIFAR10", download)
            self.data = np.load(Path(root) / f"cifar_{int(train)}.npy")

    class ImageFolder:
        def __init__(self, root):
            self.files = sorted(Path(root).glob("*/*.png"))

        def __len__(self):
            return len(self.files)

        def __getitem__(self, index):
            return Image.open(self.files[index]), 0

    class CelebA(ImageFolder):
        def __init__(self, root, split="train", download=False, **kwargs):
            no_download("CelebA", download)
            super().__init__(Path(root) / "celeba" / split)

    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(
        MNIST=MNIST, CIFAR10=CIFAR10, CelebA=CelebA, ImageFolder=ImageFolder
    )
    return module


def test_vision_loaders_with_tiny_local_files(tmp_path, monkeypatch):
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


def test_imagefolder_split_and_resize(tmp_path, monkeypatch):
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


def test_missing_torchvision_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match=r"lcma-ext\[vision\]"):
        load_dataset("cifar10", data_root=tmp_path)
    with pytest.raises(ValueError, match="expected --data-root"):
        load_vision_dataset("mnist", None)
    with pytest.raises(ValueError, match="expected data_root to be an existing folder"):
        load_vision_dataset("mnist", tmp_path / "missing")


def test_real_torchvision_imagefolder(tmp_path):
    pytest.importorskip("torchvision")
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        for i in range(2):
            _write_png(
                tmp_path / split / "c" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            )
    data = load_vision_dataset("imagefolder", tmp_path)
    assert data.train.shape == (2, 3, 8, 8) and data.test.shape == (2, 3, 8, 8)
