"""LCMAMerge inside normflows' MultiscaleFlow: log_prob vs brute force, sampling."""

from __future__ import annotations

import normflows as nf
import pytest
import torch

from lcma_ext import normflows as lnf
from lcma_ext import splits as S
from lcma_ext.normflows import LCMAMerge, SplitMerge

from brute_force import jacobian

pytestmark = pytest.mark.usefixtures("float64")


def _model(merge: nf.flows.Flow) -> nf.MultiscaleFlow:
    """Two levels on 1x4x4: the data-side level squeezes to 4x2x2 and splits 2 + 2 channels."""
    torch.manual_seed(0)
    q0 = [
        nf.distributions.DiagGaussian((8, 1, 1), trainable=False),  # deepest level
        nf.distributions.DiagGaussian((2, 2, 2), trainable=False),  # factored at the split
    ]
    flows = [
        [nf.flows.GlowBlock(8, 8, init_zeros=False), nf.flows.Squeeze()],
        [nf.flows.GlowBlock(4, 8, init_zeros=False), nf.flows.Squeeze()],
    ]
    model = nf.MultiscaleFlow(q0, flows, [merge], class_cond=False)
    model.log_prob(torch.randn(16, 1, 4, 4), None)  # ActNorm data-dependent initialization
    return model


def _merges() -> dict[str, SplitMerge]:
    generator = torch.Generator().manual_seed(1)
    contributions = torch.randn(4, 2, 2, generator=generator)
    return {
        "lcma": LCMAMerge(contributions),
        "high": LCMAMerge(contributions, factor_out="high"),
        "checkerboard": SplitMerge(S.CheckerboardSplit((4, 2, 2))),
    }


@pytest.mark.parametrize("name", ["lcma", "high", "checkerboard"])
def test_log_prob_sampling_and_exactness(name: str) -> None:
    model = _model(_merges()[name])
    x = torch.randn(3, 1, 4, 4)
    log_prob = model.log_prob(x, None)

    def latents(batch: torch.Tensor) -> torch.Tensor:
        z, _ = model.inverse_and_log_det(batch)
        return torch.cat([zi.reshape(-1) for zi in z])

    for row, value in zip(x, log_prob):
        _, logabsdet = torch.linalg.slogdet(jacobian(latents, row))
        z, _ = model.inverse_and_log_det(row.unsqueeze(0))
        base = sum(q0.log_prob(zi) for q0, zi in zip(model.q0, z))
        torch.testing.assert_close(value, (base + logabsdet)[0], rtol=1e-9, atol=1e-9)

    z, log_det = model.inverse_and_log_det(x)
    x_back, log_det_back = model.forward_and_log_det(z)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log_det_back, -log_det, rtol=1e-10, atol=1e-10)

    samples, sample_log_q = model.sample(5)
    assert samples.shape == (5, 1, 4, 4) and torch.isfinite(samples).all()
    torch.testing.assert_close(model.log_prob(samples, None), sample_log_q, rtol=1e-8, atol=1e-8)


def test_merge_follows_the_core_split() -> None:
    contributions = torch.tensor([[5.0, 0.0], [1.0, 9.0], [7.0, 8.0], [3.0, 1.0]]).view(4, 1, 2)
    merge = LCMAMerge(contributions)
    x = torch.arange(8, dtype=torch.float64).view(1, 4, 1, 2)
    (kept, factored), log_det = merge.inverse(x)
    assert kept.tolist() == [[[[0.0, 3.0]], [[4.0, 5.0]]]]  # the two highest per block
    assert factored.tolist() == [[[[2.0, 1.0]], [[6.0, 7.0]]]]
    assert torch.equal(log_det, torch.zeros(1))
    merged, _ = merge([kept, factored])
    assert torch.equal(merged, x)
    state = merge.state_dict()
    other = LCMAMerge(torch.randn(4, 1, 2))
    other.load_state_dict(state)
    assert torch.equal(other.inverse(x)[0][0], kept)


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"expected a lcma_ext\.splits\.Split"):
        SplitMerge("channel")
    merge = LCMAMerge(torch.randn(4, 2, 2))
    with pytest.raises(ValueError, match="expected a pair"):
        merge([torch.zeros(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="finite"):
        LCMAMerge(torch.full((4, 2, 2), float("nan")))


def test_lcma_ext_multiscale_flow_log_prob_without_labels() -> None:
    model = _model(_merges()["lcma"])
    ours = lnf.MultiscaleFlow(list(model.q0), list(model.flows), list(model.merges), None, False)
    x = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(ours.log_prob(x), model.log_prob(x, None), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.forward_kld(x), -model.log_prob(x, None).mean())
    conditional = lnf.MultiscaleFlow(list(model.q0), list(model.flows), list(model.merges))
    with pytest.raises(ValueError, match=r"expected class labels y .* got None"):
        conditional.log_prob(x)
