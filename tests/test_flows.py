"""The flow-level helper ``log_prob_with_contributions``."""

from __future__ import annotations

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.nn.nets import ConvResidualNet
from nflows.transforms import AffineCouplingTransform as NflowsAffineCoupling

from lcma_ext import log_prob_with_contributions
from lcma_ext import transforms as T


def _net(i: int, o: int) -> ConvResidualNet:
    return ConvResidualNet(i, o, hidden_channels=8, num_blocks=1)


def _glow_flow(shape: tuple[int, ...] = (1, 4, 4)) -> Flow:
    torch.manual_seed(0)
    c = shape[0] * 4
    transform = T.CompositeTransform(
        [
            T.SqueezeTransform(),
            T.ActNorm(c),
            T.OneByOneConvolution(c, identity_init=False),
            T.AffineCouplingTransform(torch.tensor([1, 0] * (c // 2)), _net),
        ]
    )
    flow = Flow(transform, StandardNormal([c, shape[1] // 2, shape[2] // 2])).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return flow


def test_log_prob_equals_flow_log_prob_and_map_sums_to_logabsdet() -> None:
    flow = _glow_flow()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    flow.train()
    flow.log_prob(x)  # ActNorm init
    flow.eval()
    with torch.no_grad():
        log_prob, contributions = log_prob_with_contributions(flow, x)
        _, logabsdet = flow._transform(x)
        expected = flow.log_prob(x)
    torch.testing.assert_close(log_prob, expected, rtol=1e-12, atol=1e-12)
    assert contributions.shape == (5, 4, 2, 2)
    torch.testing.assert_close(contributions.flatten(1).sum(1), logabsdet, rtol=0, atol=1e-12)


def test_input_layout_undoes_the_squeeze() -> None:
    flow = _glow_flow()
    flow.eval()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        _, out_layout = log_prob_with_contributions(flow, x, layout="output")
        _, in_layout = log_prob_with_contributions(flow, x, layout="input")
    assert in_layout.shape == x.shape
    squeeze = T.SqueezeTransform()
    assert torch.equal(squeeze.carry(in_layout), out_layout)


def test_errors() -> None:
    flow = _glow_flow()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected layout"):
        log_prob_with_contributions(flow, x, layout="pixels")
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="expected finite inputs; got 1"):
        log_prob_with_contributions(flow, x)
    plain = Flow(
        NflowsAffineCoupling(torch.tensor([1, 0]), lambda i, o: torch.nn.Linear(i, o)),
        StandardNormal([2]),
    )
    with pytest.raises(TypeError, match="diag-aware"):
        log_prob_with_contributions(plain, torch.randn(2, 2))
