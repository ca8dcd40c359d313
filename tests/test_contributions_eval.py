"""estimate_contributions runs the NMS flow in eval mode, without gradient, and restores the mode.

The NMS levels hold a transform whose log-scales differ between training and eval mode (like a
batch normalization: batch statistics in training, running ones in eval), so maps measured in the
wrong mode differ from the right ones by 1 per dimension. The expected maps are closed form: the
eval log-scales are drawn per data dimension and moved into each level's layout by a loop-based
squeeze written from the documented nflows layout (not by ``carry``), so the cumulative
contribution of data dimension ``d`` after level ``l`` is the sum of its own log-scales.
"""

from __future__ import annotations

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import Transform
from torch import Tensor

from lcma_ext import estimate_contributions
from lcma_ext import transforms as T
from lcma_ext.transforms.base import DiagMixin

from brute_force import jacobian, log_abs_diagonal, slogdet

SHAPE = (1, 8, 8)
NUM_LEVELS = 3
NUM_EXAMPLES = 10
BATCH_SIZE = 4  # three batches: 4, 4, 2


class ModeDependentScale(DiagMixin, Transform):
    """``y = x * exp(s)``, ``s = train_log_scale`` in training mode and ``eval_log_scale`` in eval.

    A bijection with a diagonal Jacobian in either mode; contribution ``s`` per dimension. Each
    ``forward_with_diag`` call records ``(self.training, torch.is_grad_enabled())``.
    """

    def __init__(self, train_log_scale: torch.Tensor, eval_log_scale: torch.Tensor) -> None:
        super().__init__()
        self.train_log_scale = torch.nn.Parameter(train_log_scale.clone())
        self.eval_log_scale = torch.nn.Parameter(eval_log_scale.clone())
        self.calls: list[tuple[bool, bool]] = []

    def log_scale(self) -> torch.Tensor:
        return self.train_log_scale if self.training else self.eval_log_scale

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.log_scale()
        if inputs.shape[1:] != s.shape:
            raise ValueError(f"expected inputs of shape (B, {tuple(s.shape)}); got {inputs.shape}")
        return inputs * torch.exp(s), s.sum().expand(inputs.shape[0])

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = self.log_scale()
        return inputs * torch.exp(-s), -s.sum().expand(inputs.shape[0])

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        self.calls.append((self.training, torch.is_grad_enabled()))
        outputs, logabsdet = self.forward(inputs, context)
        return outputs, logabsdet, diag + self.log_scale()


def _squeeze_by_loops(tensor: torch.Tensor) -> torch.Tensor:
    """nflows' squeeze of one event ``(C, H, W) -> (4C, H/2, W/2)``: output channel
    ``4c + 2dy + dx`` at site ``(i, j)`` holds input ``(c, 2i + dy, 2j + dx)``."""
    c, h, w = tensor.shape
    out = torch.empty(4 * c, h // 2, w // 2, dtype=tensor.dtype)
    for ch in range(c):
        for i in range(h // 2):
            for j in range(w // 2):
                for dy in range(2):
                    for dx in range(2):
                        out[4 * ch + 2 * dy + dx, i, j] = tensor[ch, 2 * i + dy, 2 * j + dx]
    return out


def _in_layout(per_data_dimension: torch.Tensor, level: int) -> torch.Tensor:
    """A map given per data dimension, in the layout of NMS level ``level``'s input."""
    tensor = per_data_dimension
    for _ in range(level):
        tensor = _squeeze_by_loops(tensor)
    return tensor


def _nms(seed: int = 0) -> tuple[T.CompositeTransform, list[torch.Tensor]]:
    """NMS flow of ``[ModeDependentScale, squeeze]`` levels; returns it and the eval log-scales
    per data dimension (one ``SHAPE`` tensor per level)."""
    generator = torch.Generator().manual_seed(seed)
    levels, eval_scales = [], []
    for index in range(NUM_LEVELS):
        eval_scale = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
        train_scale = eval_scale + 1.0  # every dimension differs by 1 between the modes
        level = T.CompositeTransform(
            [
                ModeDependentScale(_in_layout(train_scale, index), _in_layout(eval_scale, index)),
                T.SqueezeTransform(),
            ]
        )
        levels.append(level)
        eval_scales.append(eval_scale)
    return T.CompositeTransform(levels), eval_scales


def _ms_factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
    return T.CompositeTransform([T.SqueezeTransform()])


def _data(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_EXAMPLES, *SHAPE, generator=generator, dtype=torch.float64)


def _scales(nms: torch.nn.Module) -> list[ModeDependentScale]:
    return [m for m in nms.modules() if isinstance(m, ModeDependentScale)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mode_dependent_scale_is_a_protocol_transform(mode: str) -> None:
    """The test transform itself against brute force, in both modes."""
    scale = ModeDependentScale(torch.randn(2, 2, 2), torch.randn(2, 2, 2)).double()
    scale.train(mode == "train")
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    incoming = torch.randn_like(x)
    with torch.no_grad():
        outputs, logabsdet, diag = scale.forward_with_diag(x, diag=incoming)
        assert torch.equal(outputs, scale(x)[0]) and torch.equal(logabsdet, scale(x)[1])
    for b in range(3):
        jac = jacobian(lambda batch: scale(batch)[0], x[b])
        assert torch.count_nonzero(jac - torch.diag(torch.diagonal(jac))) == 0
        torch.testing.assert_close(float(logabsdet[b]), slogdet(jac)[1], rtol=0, atol=1e-12)
        torch.testing.assert_close(
            (diag - incoming)[b].reshape(-1), log_abs_diagonal(jac), rtol=0, atol=1e-12
        )
    with torch.no_grad():
        torch.testing.assert_close(scale.inverse(outputs)[0], x, rtol=0, atol=1e-12)


def test_loop_squeeze_matches_the_squeeze_transform() -> None:
    """Guards the reference layout: the loops agree with SqueezeTransform on data."""
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    outputs, _ = T.SqueezeTransform()(x)
    for b in range(2):
        assert torch.equal(_squeeze_by_loops(x[b]), outputs[b])


@pytest.mark.parametrize("wrapper", ["transform", "flow"])
@pytest.mark.parametrize("start", ["train", "eval"])
def test_maps_are_measured_in_eval_mode_without_gradient_and_mode_is_restored(
    start: str, wrapper: str
) -> None:
    nms, eval_scales = _nms()
    module = nms if wrapper == "transform" else Flow(nms, StandardNormal([64]))
    module.train(start == "train")
    data = _data()
    maps = estimate_contributions(
        module, data, _ms_factory, SHAPE, batch_size=BATCH_SIZE, progress=False
    )
    # Closed form: after level l, data dimension d holds sum_{k <= l} eval_scales[k][d].
    assert len(maps.data_maps) == NUM_LEVELS - 1 and maps.num_examples == NUM_EXAMPLES
    expected = torch.zeros(SHAPE, dtype=torch.float64)
    for index, data_map in enumerate(maps.data_maps):
        expected = expected + eval_scales[index]
        assert data_map.dtype == torch.float64 and not data_map.requires_grad
        torch.testing.assert_close(data_map, expected, rtol=0, atol=1e-12)
    # Every measured call ran in eval mode with gradients off (the last level is not run).
    scales = _scales(nms)
    for scale in scales[:-1]:
        assert scale.calls == [(False, False)] * 3  # one call per batch
    assert scales[-1].calls == []
    # The mode is restored on the module and every submodule.
    assert module.training == (start == "train")
    assert all(m.training == (start == "train") for m in module.modules())


@pytest.mark.parametrize("start", ["train", "eval"])
def test_mode_is_restored_when_the_measurement_fails(start: str) -> None:
    nms, _ = _nms()
    nms.train(start == "train")
    data = _data()
    data[BATCH_SIZE + 1, 0, 2, 3] = float("nan")  # second batch
    with pytest.raises(ValueError, match="expected finite data"):
        estimate_contributions(nms, data, _ms_factory, SHAPE, batch_size=BATCH_SIZE, progress=False)
    assert all(scale.calls == [(False, False)] for scale in _scales(nms)[:-1])  # first batch ran
    assert all(m.training == (start == "train") for m in nms.modules())
