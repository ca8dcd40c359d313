"""Brute-force checks of the model builders' levels and RealNVP's couplings (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from nflows.transforms import Transform

from lcma_ext import transforms as T
from lcma_ext.models import (
    MODELS,
    SIZE_NAMES,
    CheckerboardAffineCouplingTransform,
    ConvResNet,
    RealNVPAffineCouplingTransform,
    build_flow,
    count_parameters,
    default_num_levels,
    make_level_factory,
    max_num_levels,
    scale_parameters,
)

from brute_force import jacobian, log_abs_diagonal


def _net(in_channels: int, out_channels: int) -> ConvResNet:
    return ConvResNet(in_channels, out_channels, hidden_channels=6, num_blocks=1)


def _randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every parameter away from its (identity) initialization."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(scale * noise)


def _brute_force(transform: Transform, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: ``slogdet`` of the full Jacobian and the log|diagonal| of the Jacobian."""
    logdets, diagonals = [], []
    for example in x:
        full = jacobian(lambda batch: transform(batch)[0], example)
        logdets.append(torch.linalg.slogdet(full)[1])
        diagonals.append(log_abs_diagonal(full))
    return torch.stack(logdets), torch.stack(diagonals)


def _check_diag_protocol(transform: Transform, x: torch.Tensor) -> torch.Tensor:
    outputs, logabsdet = transform(x)
    diag_in = torch.randn_like(x)
    outputs_d, logabsdet_d, diag_out = transform.forward_with_diag(x, diag=diag_in)
    torch.testing.assert_close(outputs_d, outputs)
    torch.testing.assert_close(logabsdet_d, logabsdet)
    torch.testing.assert_close(
        diag_out.flatten(1).sum(1) - diag_in.flatten(1).sum(1), logabsdet, atol=1e-9, rtol=1e-9
    )
    return logabsdet


@pytest.mark.parametrize("parity", [0, 1])
def test_checkerboard_coupling_matches_brute_force(parity: int) -> None:
    torch.manual_seed(0)
    coupling = CheckerboardAffineCouplingTransform(2, _net, parity=parity).double()
    _randomize(coupling)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    logabsdet = _check_diag_protocol(coupling, x)
    exact, log_diagonal = _brute_force(coupling, x)
    torch.testing.assert_close(logabsdet, exact)
    # Elementwise given the identity half: the contribution is log|dy_i/dx_i| exactly.
    _, _, diag = coupling.forward_with_diag(x)
    torch.testing.assert_close(diag.flatten(1), log_diagonal)
    # The identity half is untouched and contributes 0.
    mask = coupling.mask(4, 4, x).expand_as(x).bool()
    outputs, _ = coupling(x)
    torch.testing.assert_close(outputs[mask], x[mask])
    assert torch.all(diag[mask] == 0)
    assert diag[~mask].abs().min() > 0
    inverse, inverse_logabsdet = coupling.inverse(outputs)
    torch.testing.assert_close(inverse, x)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet)


def test_checkerboard_coupling_rejects_bad_inputs() -> None:
    coupling = CheckerboardAffineCouplingTransform(2, _net)
    with pytest.raises(ValueError, match="expected 2 channels"):
        coupling(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="expected at least 2 pixels"):
        coupling(torch.randn(1, 2, 1, 1))
    with pytest.raises(ValueError, match="expected a 4D input"):
        coupling(torch.randn(1, 2))
    with pytest.raises(ValueError, match="expected parity 0 or 1"):
        CheckerboardAffineCouplingTransform(2, _net, parity=2)


def test_realnvp_channel_coupling_matches_brute_force_and_can_expand() -> None:
    torch.manual_seed(1)
    coupling = RealNVPAffineCouplingTransform(torch.tensor([0, 1, 0, 1]), _net).double()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    # Identity at initialization (zero last layer).
    outputs, logabsdet = coupling(x)
    torch.testing.assert_close(outputs, x)
    assert torch.all(logabsdet == 0)
    _randomize(coupling, seed=3)
    logabsdet = _check_diag_protocol(coupling, x)
    exact, log_diagonal = _brute_force(coupling, x)
    torch.testing.assert_close(logabsdet, exact)
    _, _, diag = coupling.forward_with_diag(x)
    torch.testing.assert_close(diag.flatten(1), log_diagonal)
    # Unlike nflows' sigmoid scale, the RealNVP parametrization can expand (log scale > 0).
    assert diag.max() > 0
    torch.testing.assert_close(coupling.inverse(coupling(x)[0])[0], x)


def _levels(model: str) -> list[tuple[int, tuple[int, ...]]]:
    return [(0, (1, 4, 4)), (1, (2, 2, 2))] if model in ("realnvp", "glow") else [(0, (1, 4, 4))]


@pytest.mark.parametrize("model", ["realnvp", "glow"])
def test_level_matches_brute_force(model: str) -> None:
    torch.manual_seed(2)
    factory = make_level_factory(model, "tiny", hidden=6)
    for level_index, shape in _levels(model):
        level = factory(level_index, shape).double()
        x = torch.randn(3, *shape, dtype=torch.float64)
        level(x)  # ActNorm data-initialization (training mode), then move all parameters.
        _randomize(level, seed=level_index)
        logabsdet = _check_diag_protocol(level, x)
        exact, _ = _brute_force(level, x)
        torch.testing.assert_close(logabsdet, exact)
        outputs, _ = level(x)
        c, h, w = shape
        assert outputs.shape == (3, 4 * c, h // 2, w // 2)
        assert tuple(T.carry_positions(level, shape).shape) == (4 * c, h // 2, w // 2)
        torch.testing.assert_close(level.inverse(outputs)[0], x)


@pytest.mark.parametrize("model", ["iresnet", "resflow"])
@pytest.mark.parametrize("squeeze", ["pixel", "haar"])
def test_residual_level_passes_block_arguments_and_matches_brute_force(
    model: str, squeeze: str
) -> None:
    torch.manual_seed(2)
    factory = make_level_factory(
        model, "tiny", hidden=6, squeeze=squeeze, exact=True, coeff=0.8, max_iter=300
    )
    level = factory(0, (1, 4, 4)).double()
    blocks = [
        t
        for t in level._transforms
        if isinstance(t, (T.ResidualFlowBlock, T.InvertibleResNetBlock))
    ]
    assert len(blocks) == 2
    assert all(b.exact and b.max_iter == 300 and b.net.net[1].coeff == 0.8 for b in blocks)
    squeeze_class = T.HaarSqueezeTransform if squeeze == "haar" else T.SqueezeTransform
    assert type(level._transforms[0]) is squeeze_class
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    level(x)  # ActNorm data-initialization (training mode)
    _randomize(level, seed=1, scale=0.1)
    level.eval()  # no spectral-norm updates between the calls below
    logabsdet = _check_diag_protocol(level, x)
    exact, _ = _brute_force(level, x)
    torch.testing.assert_close(logabsdet, exact, rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_exact'"):
        make_level_factory(model, "tiny", n_exact=3)(0, (1, 4, 4))
    with pytest.raises(ValueError, match="expected the hidden width as hidden="):
        make_level_factory(model, "tiny", hidden_channels=8)


def test_level_families_have_their_layers() -> None:
    realnvp = make_level_factory("realnvp", "tiny", steps=2)(0, (1, 4, 4))
    kinds = [type(t).__name__ for t in realnvp._transforms]
    assert (
        kinds
        == ["SqueezeTransform"]
        + ["CheckerboardAffineCouplingTransform"] * 2
        + ["RealNVPAffineCouplingTransform"] * 2
    )
    # On a 1x1 grid the checkerboard is empty, so only channel couplings remain.
    last = make_level_factory("realnvp", "tiny", steps=2)(2, (4, 2, 2))
    assert "CheckerboardAffineCouplingTransform" not in [type(t).__name__ for t in last._transforms]
    glow = make_level_factory("glow", "tiny", steps=1)(0, (3, 4, 4))
    assert [type(t).__name__ for t in glow._transforms] == [
        "SqueezeTransform",
        "ActNorm",
        "OneByOneConvolution",
        "AffineCouplingTransform",
    ]


def test_flow_log_prob_is_change_of_variables_float32() -> None:
    torch.manual_seed(3)
    factory = make_level_factory("realnvp", "tiny")
    level = factory(0, (1, 4, 4))
    _randomize(level, seed=4, scale=0.1)
    flow = build_flow(level, (1, 4, 4))
    x = torch.randn(5, 1, 4, 4)
    z, logabsdet = level(x)
    expected = -0.5 * z.flatten(1).square().sum(1) - 8 * math.log(2 * math.pi) + logabsdet
    torch.testing.assert_close(flow.log_prob(x), expected)
    assert flow.sample(2).shape == (2, 1, 4, 4)


def test_registry_sizes_and_errors() -> None:
    assert set(MODELS) == {"realnvp", "glow", "iresnet", "resflow"}
    small = count_parameters(make_level_factory("realnvp", "tiny")(0, (1, 8, 8)))
    paper = count_parameters(make_level_factory("realnvp", "paper")(0, (1, 8, 8)))
    assert paper > 10 * small
    assert SIZE_NAMES[0] == "tiny"
    with pytest.raises(ValueError, match="expected model in"):
        make_level_factory("maf")
    with pytest.raises(ValueError, match="expected size in"):
        make_level_factory("glow", "huge")
    with pytest.raises(ValueError, match="expected a positive hidden"):
        make_level_factory("glow", "tiny", hidden=0)
    factory = make_level_factory("realnvp")
    with pytest.raises(ValueError, match="expected positive C and even H, W"):
        factory(0, (1, 5, 4))
    with pytest.raises(ValueError, match=r"expected an image shape \(C, H, W\)"):
        factory(0, (16,))


def test_num_levels_and_scale_parameters() -> None:
    assert max_num_levels((1, 8, 8)) == 3
    assert default_num_levels((1, 8, 8)) == 3
    assert default_num_levels((3, 16, 16)) == 4
    assert default_num_levels((3, 28, 28)) == 2
    with pytest.raises(ValueError, match="allows 2 squeezes"):
        default_num_levels((1, 6, 6))
    level = make_level_factory("realnvp", "tiny")(0, (1, 8, 8))
    names = {id(p) for p in scale_parameters(level)}
    assert names and len(names) < len(list(level.parameters()))
