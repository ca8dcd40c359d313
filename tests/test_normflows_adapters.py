"""Brute-force checks of the normflows adapters (data to noise = normflows ``inverse``)."""

from __future__ import annotations

from collections.abc import Callable

import normflows as nf
import numpy as np
import pytest
import torch

from lcma_ext import normflows as lnf

from brute_force import jacobian, svd_attribution

BATCH = 2


def _coupling_net(split_mode: str, channels: int = 4) -> nf.nets.ConvNet2d:
    in_channels = channels if "checkerboard" in split_mode else channels // 2
    out_channels = 2 * channels if "checkerboard" in split_mode else channels
    return nf.nets.ConvNet2d([in_channels, 8, out_channels], [3, 3], init_zeros=False)


REGISTRY: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...], tuple[int, ...]]] = {
    # name: (build, shape, bad shape)
    **{
        f"coupling_{mode}_{scale_map}": (
            lambda mode=mode, scale_map=scale_map: lnf.AffineCouplingBlock(
                _coupling_net(mode), scale_map=scale_map, split_mode=mode
            ),
            (4, 2, 2),
            (2, 2, 2),
        )
        for mode in ("channel", "checkerboard")
        for scale_map in ("exp", "sigmoid", "sigmoid_inv")
    },
    **{
        f"glow_{attribution}": (
            lambda attribution=attribution: lnf.GlowBlock(
                4, 8, init_zeros=False, use_lu=True, attribution=attribution
            ),
            (4, 2, 2),
            (3, 2, 2),
        )
        for attribution in ("svd-energy", "svd-index", "lu")
    },
    "actnorm": (lambda: lnf.ActNorm((3, 1, 1)), (3, 2, 2), (4, 2, 2)),
    "invertible_1x1_dense": (lambda: lnf.Invertible1x1Conv(3), (3, 2, 2), (4, 2, 2)),
    "invertible_1x1_lu": (
        lambda: lnf.Invertible1x1Conv(3, use_lu=True, attribution="lu"),
        (3, 2, 2),
        (2, 2, 2),
    ),
    "squeeze": (lambda: lnf.Squeeze(), (2, 2, 4), (2, 3, 4)),
    "permute_shuffle": (lambda: lnf.Permute(3), (3, 2, 2), (4, 2, 2)),
    "permute_swap": (lambda: lnf.Permute(4, mode="swap"), (4, 2, 2), (3, 2, 2)),
}
NAMES = sorted(REGISTRY)


def _make(name: str, seed: int = 0) -> tuple[nf.flows.Flow, torch.Tensor]:
    build, shape, _ = REGISTRY[name]
    torch.manual_seed(seed)
    flow = build().double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    x = torch.randn(BATCH, *shape, dtype=torch.float64)
    flow.inverse(x)  # ActNorm's data-dependent init runs on the first data-to-noise call
    with torch.no_grad():
        for module in flow.modules():
            if isinstance(module, nf.flows.ActNorm):
                module.s.add_(0.2 * torch.randn_like(module.s))
    return flow, torch.randn(BATCH, *shape, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_brute_force(name: str) -> None:
    flow, x = _make(name)
    with torch.no_grad():
        outputs, log_det, _ = flow.forward_with_diag(x)
        expected_outputs, expected_log_det = flow.inverse(x)
    assert torch.equal(outputs, expected_outputs)
    expected_log_det = torch.as_tensor(expected_log_det, dtype=log_det.dtype).expand(BATCH)
    torch.testing.assert_close(log_det, expected_log_det)  # values equal; dtype follows x
    for b in range(BATCH):
        sign, reference = torch.linalg.slogdet(jacobian(lambda batch: flow.inverse(batch)[0], x[b]))
        assert sign != 0
        torch.testing.assert_close(log_det[b], reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_sum_invariant(name: str) -> None:
    flow, x = _make(name)
    incoming = torch.randn_like(x)
    with torch.no_grad():
        _, log_det, diag = flow.forward_with_diag(x, diag=incoming)
    torch.testing.assert_close(
        diag.flatten(1).sum(1) - incoming.flatten(1).sum(1), log_det, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith(("coupling", "actnorm"))])
def test_elementwise_diag_equals_log_abs_jacobian_diagonal(name: str) -> None:
    flow, x = _make(name)
    with torch.no_grad():
        _, _, diag = flow.forward_with_diag(x)
    for b in range(BATCH):
        jac = jacobian(lambda batch: flow.inverse(batch)[0], x[b])
        torch.testing.assert_close(diag[b].reshape(-1), torch.log(torch.diagonal(jac).abs()))


@pytest.mark.parametrize("name", ["squeeze", "permute_shuffle", "permute_swap"])
def test_rearrangements_carry_like_data_to_noise(name: str) -> None:
    flow, x = _make(name)
    assert torch.equal(flow.carry(x), flow.inverse(x)[0])
    index = torch.arange(x[0].numel()).view(1, *x.shape[1:])
    carried = flow.carry(index)[0].reshape(-1)
    jac = jacobian(lambda batch: flow.inverse(batch)[0], x[0])
    torch.testing.assert_close(jac, torch.eye(len(carried), dtype=jac.dtype)[carried])


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_and_state_dict(name: str) -> None:
    flow, x = _make(name)
    with torch.no_grad():
        z, _, _ = flow.forward_with_diag(x)
        recovered, _ = flow.forward(z)
    torch.testing.assert_close(recovered, x, rtol=1e-9, atol=1e-9)
    clone, _ = _make(name, seed=1)
    clone.load_state_dict(flow.state_dict())
    with torch.no_grad():
        assert torch.equal(clone.forward_with_diag(x)[2], flow.forward_with_diag(x)[2])


@pytest.mark.parametrize("name", NAMES)
def test_bad_shape_raises(name: str) -> None:
    flow, _ = _make(name)
    bad = torch.randn(BATCH, *REGISTRY[name][2], dtype=torch.float64)
    with pytest.raises(ValueError, match="expected"):
        flow.forward_with_diag(bad)


def test_float32_works() -> None:
    flow, x = _make("glow_svd-energy")
    with torch.no_grad():
        reference = flow.forward_with_diag(x)
        got = flow.float().forward_with_diag(x.float())
    for ref, value in zip(reference, got):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attribution", ["svd-energy", "svd-index", "lu"])
def test_glow_block_1x1_attribution_matches_numpy_reference(attribution: str) -> None:
    flow, x = _make(f"glow_{attribution}")
    conv = flow.flows[1]
    weight = conv._assemble_W().detach().numpy()
    if attribution == "lu":  # W = P L U: output channel j = row i of L U with P[j, i] = 1.
        expected = conv.P.numpy() @ conv.log_S.detach().numpy()
    else:
        expected = svd_attribution(weight, attribution)
    with torch.no_grad():
        _, _, diag = lnf.data_to_noise_with_diag(conv, x, attribution=attribution)
    np.testing.assert_allclose(diag[0, :, 0, 0].numpy(), expected, rtol=1e-9, atol=1e-10)


def test_plain_normflows_instances_and_lists_are_accepted() -> None:
    torch.manual_seed(0)
    flows = [nf.flows.GlowBlock(4, 8, init_zeros=False), nf.flows.Squeeze()]  # noise -> data
    x = torch.randn(2, 1, 4, 4)
    for flow in flows:
        flow.double()
    x = x.double()
    with torch.no_grad():
        z, log_det, diag = lnf.data_to_noise_with_diag(flows, x)
        expected = flows[1].inverse(x)[0]
        expected, expected_log_det = flows[0].inverse(expected)
    assert torch.equal(z, expected)
    torch.testing.assert_close(log_det, expected_log_det)
    torch.testing.assert_close(diag.flatten(1).sum(1), log_det, rtol=0, atol=1e-12)


def test_lu_attribution_needs_lu_parametrization() -> None:
    with pytest.raises(ValueError, match="expected use_lu=True"):
        lnf.Invertible1x1Conv(3, use_lu=False, attribution="lu")


def test_unsupported_flow_names_its_class() -> None:
    with pytest.raises(TypeError, match="Planar"):
        lnf.data_to_noise_with_diag(nf.flows.Planar((3,)), torch.randn(2, 3))


def test_residual_wrappers_carry_their_own_rearrangement_and_lists_may_be_module_lists() -> None:
    torch.manual_seed(0)
    block = lnf.ResidualFlowBlock((4, 2, 2), 8, exact=True).double().eval()  # fixed weights
    index = torch.arange(16).view(1, 4, 2, 2)
    assert torch.equal(lnf.carry_data_to_noise(block, index), index)
    flows = torch.nn.ModuleList([block, lnf.Squeeze()])  # normflows order: squeeze runs first
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        z, log_det, diag = lnf.data_to_noise_with_diag(flows, x)
        expected, expected_log_det = block.inverse(flows[1].inverse(x)[0])
    assert torch.equal(z, expected)
    torch.testing.assert_close(log_det, expected_log_det, rtol=0, atol=1e-12)
    torch.testing.assert_close(diag.flatten(1).sum(1), log_det, rtol=0, atol=1e-12)


def test_require_supported_names_the_class_and_what_to_do() -> None:
    for flow in (lnf.Squeeze(), nf.flows.GlowBlock(4, 8), lnf.ResidualFlowBlock((4, 2, 2), 8)):
        assert lnf.require_supported(flow) is flow
    message = r"level entry 3; got normflows\.flows\.planar\.Planar.*subclass it and add"
    with pytest.raises(TypeError, match=message):
        lnf.require_supported(nf.flows.Planar((3,)), "level entry 3")
    with pytest.raises(TypeError, match="Planar"):
        lnf.carry_data_to_noise(nf.flows.Planar((3,)), torch.zeros(1, 3))
