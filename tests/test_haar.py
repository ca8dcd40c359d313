"""HaarSqueezeTransform: brute-force Jacobian, inverse, protocol, subband order, errors."""

from __future__ import annotations

import pytest
import torch

from lcma_ext import transforms as T
from lcma_ext.multiscale import ContributionMultiscaleFlow
from lcma_ext.splits import ChannelSplit

from brute_force import jacobian

SHAPE = (2, 4, 6)


def test_jacobian_is_orthonormal_with_zero_logdet() -> None:
    transform = T.HaarSqueezeTransform()
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    outputs, logabsdet = transform(x)
    assert outputs.shape == (3, 8, 2, 3)
    assert torch.equal(logabsdet, torch.zeros(3, dtype=torch.float64))
    jac = jacobian(lambda batch: transform(batch)[0], x[0])
    eye = torch.eye(jac.shape[0], dtype=jac.dtype)
    torch.testing.assert_close(jac @ jac.T, eye, rtol=0, atol=1e-12)
    _, brute = torch.linalg.slogdet(jac)
    torch.testing.assert_close(brute, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)
    # linear map: the Jacobian reproduces the outputs
    torch.testing.assert_close(jac @ x[0].reshape(-1), outputs[0].reshape(-1))


def test_subbands_match_the_definition_and_order() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]], dtype=torch.float64)  # a, b, c, d
    a, b, c, d = 1.0, 2.0, 3.0, 5.0
    expected = {
        "LL": (a + b + c + d) / 2,
        "LH": (a - b + c - d) / 2,
        "HL": (a + b - c - d) / 2,
        "HH": (a - b - c + d) / 2,
    }
    for order in [("HH", "HL", "LH", "LL"), ("LL", "LH", "HL", "HH"), ("LH", "LL", "HH", "HL")]:
        outputs, _ = T.HaarSqueezeTransform(order=order)(x)
        assert outputs.reshape(-1).tolist() == [expected[name] for name in order]


def test_constant_image_has_only_ll_energy_and_channel_split_factors_out_high_first() -> None:
    c = 3
    x = torch.randn(2, c, 1, 1, dtype=torch.float64).expand(2, c, 4, 4).contiguous()
    outputs, _ = T.HaarSqueezeTransform()(x)
    factored, kept = ChannelSplit()(outputs)
    # default order HH, HL | LH, LL: the factored half holds the two detail subbands HH and HL
    assert factored.abs().max() == 0
    torch.testing.assert_close(kept[:, c:], 2 * x[:, :, ::2, ::2])  # LL = 2 * block mean
    assert kept[:, :c].abs().max() == 0  # LH
    # a horizontal ramp puts energy in LH (high in x), not in HL
    ramp = torch.arange(4, dtype=torch.float64).expand(1, 1, 4, 4)
    out, _ = T.HaarSqueezeTransform()(ramp)
    hh, hl, lh, _ = out.split(1, dim=1)
    assert hh.abs().max() == 0 and hl.abs().max() == 0 and lh.abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_round_trip(dtype: torch.dtype) -> None:
    transform = T.HaarSqueezeTransform()
    x = torch.randn(4, *SHAPE, dtype=dtype)
    outputs, logabsdet = transform(x)
    recovered, inverse_logabsdet = transform.inverse(outputs)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(recovered, x, rtol=0, atol=tol)
    assert torch.equal(inverse_logabsdet, -logabsdet)
    z = torch.randn(4, 8, 2, 3, dtype=dtype)
    torch.testing.assert_close(transform(transform.inverse(z)[0])[0], z, rtol=0, atol=tol)


def test_diag_protocol_carry_is_block_ownership_permutation() -> None:
    transform = T.HaarSqueezeTransform()
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    incoming = torch.randn_like(x)
    outputs, logabsdet, diag_out = transform.forward_with_diag(x, diag=incoming)
    assert torch.equal(outputs, transform(x)[0])
    assert torch.equal(diag_out, transform.carry(incoming))
    torch.testing.assert_close(
        diag_out.flatten(1).sum(1) - incoming.flatten(1).sum(1), logabsdet, rtol=0, atol=1e-12
    )
    positions = T.carry_positions(transform, SHAPE)
    assert positions.dtype == torch.long
    assert sorted(positions.reshape(-1).tolist()) == list(range(x[0].numel()))
    # each coefficient is carried from a pixel of its own 2x2 block and its own channel
    c, h, w = SHAPE
    jac = jacobian(lambda batch: transform(batch)[0], x[0])
    for q, source in enumerate(positions.reshape(-1).tolist()):
        channel, rest = divmod(source, h * w)
        row, col = divmod(rest, w)
        out_channel, out_rest = divmod(q, (h // 2) * (w // 2))
        out_row, out_col = divmod(out_rest, w // 2)
        assert out_channel % c == channel and (row // 2, col // 2) == (out_row, out_col)
        assert jac[q, source] != 0  # the carried pixel really feeds the coefficient
    # the same subband always comes from the same block pixel (LL from the top-left)
    ll = positions[3 * c : 4 * c]  # default order: HH, HL, LH, LL
    assert all((p % (h * w)) // w % 2 == 0 and (p % (h * w)) % w % 2 == 0 for p in ll.reshape(-1))


def test_drop_in_for_squeeze_in_a_multiscale_flow() -> None:
    torch.manual_seed(0)
    flow = ContributionMultiscaleFlow(2)
    shape = flow.add_transform(T.HaarSqueezeTransform(), (4, 2, 2))
    assert shape == (2, 2, 2)
    flow.add_transform(T.CompositeTransform([T.HaarSqueezeTransform()]), (8, 1, 1))
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    z, logabsdet = flow(x)
    assert z.shape == (3, 16) and torch.equal(logabsdet, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(flow.inverse(z)[0], x, rtol=0, atol=1e-12)
    assert isinstance(T.HaarSqueezeTransform(), T.SqueezeTransform)


def test_clear_errors() -> None:
    transform = T.HaarSqueezeTransform()
    with pytest.raises(ValueError, match="expected even H and W; got 3x4"):
        transform(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="expected even H and W; got 4x5"):
        transform.forward_with_diag(torch.randn(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"expected a \(B, C, H, W\) input; got shape \(2, 4\)"):
        transform(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"expected a \(B, 4C, H, W\) input"):
        transform.inverse(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="expected factor 2; got 3"):
        T.HaarSqueezeTransform(factor=3)
    with pytest.raises(ValueError, match="expected order as a permutation"):
        T.HaarSqueezeTransform(order=("LL", "LL", "HL", "HH"))
