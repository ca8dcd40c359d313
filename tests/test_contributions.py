"""estimate_contributions: averaging, tracking across split points, save/load, mismatch errors.

The hand-built NMS flows use fixed elementwise scales, so each dimension's cumulative
contribution is known in closed form (the sum of the log-scales it went through), and the
expected maps at later split points follow from an independent reference: data indices run
through the levels' ``forward`` (not ``carry``) and a loop-based LCMA rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from nflows.transforms import Transform
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lcma_ext import ContributionMaps, build_multiscale_transform, estimate_contributions
from lcma_ext import transforms as T
from lcma_ext.multiscale import build_levels
from lcma_ext.storage import CorruptFileError
from lcma_ext.transforms.base import DiagMixin

SHAPE = (1, 8, 8)


class FixedScale(DiagMixin, Transform):
    """``y = x * exp(s)`` with a fixed log-scale per position; contribution ``s``."""

    def __init__(self, log_scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("log_scale", log_scale)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logabsdet = self.log_scale.sum().expand(inputs.shape[0])
        return inputs * torch.exp(self.log_scale), logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logabsdet = -self.log_scale.sum().expand(inputs.shape[0])
        return inputs * torch.exp(-self.log_scale), logabsdet

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        outputs, logabsdet = self.forward(inputs)
        return outputs, logabsdet, diag + self.log_scale


class SoftTanh(DiagMixin, Transform):
    """``y = x + tanh(x) / 2`` elementwise (data-dependent contribution)."""

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        outputs, _, diag = self._forward_with_diag(inputs, context, torch.zeros_like(inputs))
        return outputs, diag.flatten(1).sum(1)

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        derivative = 1 + 0.5 / torch.cosh(inputs) ** 2
        outputs = inputs + 0.5 * torch.tanh(inputs)
        return outputs, torch.log(derivative).flatten(1).sum(1), diag + torch.log(derivative)


def _rearrange(shape: tuple[int, ...]) -> tuple[list[Transform], tuple[int, ...]]:
    """Squeeze (when spatial) and a random channel permutation; returns the layers and shape."""
    layers: list[Transform] = []
    if shape[1] > 1:
        layers.append(T.SqueezeTransform())
        shape = (4 * shape[0], shape[1] // 2, shape[2] // 2)
    layers.append(T.RandomPermutation(shape[0], dim=1))
    return layers, shape


def ms_factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
    layers, shape = _rearrange(shape)
    return T.CompositeTransform([*layers, FixedScale(torch.zeros(shape, dtype=torch.float64))])


def hand_built_nms(num_levels: int, seed: int) -> tuple[T.CompositeTransform, list[torch.Tensor]]:
    """NMS levels with fixed scales ``g_l`` given per data dimension; returns (nms, g)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    scales = [
        torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(num_levels)
    ]
    positions = torch.arange(64, dtype=torch.float64).view(1, *SHAPE)
    shape, levels = SHAPE, []
    for index in range(num_levels):
        layers, shape = _rearrange(shape)
        for layer in layers:
            positions = layer(positions)[0]
        scale = scales[index].reshape(-1)[positions[0].long()]
        levels.append(T.CompositeTransform([*layers, FixedScale(scale)]))
    return T.CompositeTransform(levels), scales


def reference_maps(
    levels: Sequence[Transform], cumulative: Sequence[torch.Tensor], factor_out: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Expected maps per split point, and kept data indices, without lcma_ext's tracking."""
    positions = torch.arange(64, dtype=torch.float64).view(1, *SHAPE)
    maps, kept_all = [], []
    for index, level in enumerate(levels[:-1]):
        positions = level(positions)[0]  # pure rearrangement: values are data indices
        out = positions[0].long()
        values = cumulative[index].reshape(-1)[out]
        maps.append(values)
        c4, h, w = out.shape
        kept = torch.empty(c4 // 2, h, w, dtype=torch.long)
        for group in range(c4 // 4):
            for i in range(h):
                for j in range(w):
                    block = [(values[4 * group + k, i, j].item(), k) for k in range(4)]
                    block.sort(reverse=factor_out == "low")
                    chosen = sorted(k for _, k in block[:2])
                    for r, k in enumerate(chosen):
                        kept[2 * group + r, i, j] = out[4 * group + k, i, j]
        kept_all.append(kept)
        positions = kept.double().unsqueeze(0)
    return maps, kept_all


@pytest.mark.parametrize("num_levels", [3, 4])  # two and three split points
@pytest.mark.parametrize("factor_out", ["low", "high"])
def test_tracking_matches_closed_form(num_levels: int, factor_out: str) -> None:
    nms, scales = hand_built_nms(num_levels, seed=num_levels)
    cumulative = list(torch.cumsum(torch.stack(scales), 0))
    torch.manual_seed(100)  # the multi-scale permutations differ from the NMS ones
    levels = build_levels(ms_factory, SHAPE, num_levels)
    data = torch.randn(10, *SHAPE, dtype=torch.float64)
    maps = estimate_contributions(
        nms, data, levels, factor_out=factor_out, batch_size=4, progress=False
    )
    assert maps.num_levels == num_levels and maps.num_examples == 10
    for index in range(num_levels - 1):  # data layout: the closed form itself
        torch.testing.assert_close(maps.data_maps[index], cumulative[index], rtol=0, atol=1e-12)
    expected_maps, expected_kept = reference_maps(levels, cumulative, factor_out)
    assert len(maps.maps) == num_levels - 1
    for got, expected in zip(maps.maps, expected_maps):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for got, expected in zip(maps.kept_positions, expected_kept):
        assert torch.equal(got, expected)
    for diagnostics in maps.diagnostics:
        assert diagnostics["ties"] == 0 and diagnostics["near_ties"] == 0

    # the flow built from the maps (on copies of their levels: no factory) keeps exactly those
    # dimensions at every split point
    split = "lcma" if factor_out == "low" else "high"
    flow = build_multiscale_transform(None, SHAPE, num_levels, split, maps)
    positions = torch.arange(64).view(1, *SHAPE)
    for level, split_object, expected in zip(flow._transforms, flow.splits, expected_kept):
        _, positions = split_object.carry(level.carry(positions))
        assert torch.equal(positions[0], expected)
    # and so do the maps' own splits, by the rule the maps were tracked with (for
    # factor_out="high" too: later split points rank the survivors of the high rule)
    positions = torch.arange(64).view(1, *SHAPE)
    for level, split_object, expected in zip(levels, maps.splits(), expected_kept):
        assert split_object.factor_out == factor_out
        _, positions = split_object.carry(level.carry(positions))
        assert torch.equal(positions[0], expected)


def test_averages_over_data_tensor_and_dataloader() -> None:
    def level(shape: tuple[int, ...]) -> T.CompositeTransform:
        return T.CompositeTransform([T.SqueezeTransform(), SoftTanh()])

    nms = T.CompositeTransform([level(SHAPE), level((4, 4, 4))])
    levels = build_levels(lambda i, s: level(s), SHAPE, 2)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(23, *SHAPE, generator=generator, dtype=torch.float64)
    expected = torch.log(1 + 0.5 / torch.cosh(x) ** 2).mean(0)  # closed form, data layout
    from_tensor = estimate_contributions(nms, x, levels, batch_size=5, progress=False)
    loader = DataLoader(TensorDataset(x, torch.zeros(23)), batch_size=7)
    from_loader = estimate_contributions(nms, loader, levels, progress=False)
    for maps in (from_tensor, from_loader):
        assert maps.num_examples == 23
        torch.testing.assert_close(maps.data_maps[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(from_tensor.maps[0], from_loader.maps[0], rtol=1e-12, atol=1e-12)
    assert nms.training  # the mode is restored


def test_save_load_round_trip(tmp_path: Path) -> None:
    nms, _ = hand_built_nms(3, seed=0)
    maps = estimate_contributions(nms, torch.randn(4, *SHAPE), ms_factory, progress=False)
    assert maps.levels is not None and len(maps.levels) == 3
    path = tmp_path / "contributions.pt"
    maps.save(path)
    raw = torch.load(path, weights_only=True)  # plain content, no pickled classes
    assert raw["format"] == "lcma-ext-contributions"
    loaded = ContributionMaps.load(path)
    assert loaded.levels is None
    assert loaded.input_shape == maps.input_shape and loaded.placement == maps.placement
    assert loaded.diagnostics == maps.diagnostics and loaded.num_examples == 4
    for name in ("data_maps", "maps", "level_positions", "factored_positions", "kept_positions"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(loaded, name), getattr(maps, name)))
    assert all(torch.equal(a.index, b.index) for a, b in zip(loaded.splits(), maps.splits()))
    # only what was measured is stored (and a checksum of it); the rest is derived
    assert set(raw) == {
        "format", "version", "input_shape", "placement", "factor_out", "num_examples",
        "data_maps", "level_positions", "stamp",
    }  # fmt: skip
    assert set(raw["stamp"]) == {"checksum"}
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected an lcma-ext contributions file"):
        ContributionMaps.load(tmp_path / "other.pt")


def test_a_truncated_or_corrupt_file_names_itself(tmp_path: Path) -> None:
    nms, _ = hand_built_nms(3, seed=0)
    maps = estimate_contributions(nms, torch.randn(4, *SHAPE), ms_factory, progress=False)
    path = tmp_path / "contributions.pt"
    maps.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["contributions.pt"]  # no temporary left
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=r"contributions\.pt'; got a corrupt or truncated"):
        ContributionMaps.load(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"contributions\.pt"):
        ContributionMaps.load(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        ContributionMaps.load(tmp_path / "missing.pt")


def test_levels_with_another_rearrangement_are_detected() -> None:
    nms, _ = hand_built_nms(3, seed=0)
    data = torch.randn(4, *SHAPE, dtype=torch.float64)
    torch.manual_seed(1)
    levels_a = build_levels(ms_factory, SHAPE, 3)
    torch.manual_seed(2)
    levels_b = build_levels(ms_factory, SHAPE, 3)
    maps = estimate_contributions(nms, data, levels_a, progress=False)
    maps.check_levels(levels_a)
    with pytest.raises(RuntimeError, match="expected level 0 to rearrange dimensions"):
        build_multiscale_transform(ms_factory, SHAPE, 3, "lcma", maps, levels=levels_b)
    flow = build_multiscale_transform(
        ms_factory, SHAPE, 3, "lcma", maps, levels=levels_b, remap=True
    )
    direct = estimate_contributions(nms, data, levels_b, progress=False)
    for split, expected in zip(flow.splits, direct.maps):
        assert torch.equal(split.contributions, expected)
    # a loaded file has no levels: a factory seeded as before rebuilds matching ones
    maps.levels = None
    torch.manual_seed(1)
    rebuilt = build_multiscale_transform(ms_factory, SHAPE, 3, "lcma", maps)
    reference = build_multiscale_transform(ms_factory, SHAPE, 3, "lcma", maps, levels=levels_a)
    for a, b in zip(rebuilt.splits, reference.splits):
        assert torch.equal(a.index, b.index)


def test_errors() -> None:
    nms, _ = hand_built_nms(3, seed=0)
    data = torch.randn(4, *SHAPE)
    with pytest.raises(ValueError, match="expected finite data"):
        estimate_contributions(nms, data * float("nan"), ms_factory, progress=False)
    with pytest.raises(ValueError, match="expected 3 multi-scale levels"):
        levels = build_levels(ms_factory, SHAPE, 2)
        estimate_contributions(nms, data, levels, progress=False)
    with pytest.raises(TypeError, match="CompositeTransform of its levels"):
        estimate_contributions(T.SqueezeTransform(), data, ms_factory, progress=False)
    with pytest.raises(ValueError, match="expected at least one example"):
        estimate_contributions(nms, [], ms_factory, input_shape=SHAPE, progress=False)
    with pytest.raises(ValueError, match="expected batches of event shape"):
        estimate_contributions(nms, [data, torch.randn(2, 1, 4, 4)], ms_factory, progress=False)
    maps = estimate_contributions(nms, data, ms_factory, progress=False)
    with pytest.raises(ValueError, match=r"expected input_shape \(1, 8, 8\)"):
        build_multiscale_transform(ms_factory, (1, 4, 4), 3, "lcma", maps)
    with pytest.raises(ValueError, match="split 'lcma' expected contributions"):
        build_multiscale_transform(ms_factory, SHAPE, 3, "lcma", None)
    assert math.prod(maps.maps[0].shape) == 64
