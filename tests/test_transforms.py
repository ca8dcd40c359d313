"""Brute-force checks of every diag-aware nflows subclass, fed by one registry.

Every entry is compared in float64 against ``torch.autograd.functional.jacobian`` and
``torch.linalg.slogdet``; elementwise and triangular transforms also against ``log|diag J|``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from nflows.nn.nets import ConvResidualNet, ResidualNet
from nflows.transforms import AffineCouplingTransform as NflowsAffineCoupling
from nflows.transforms import CompositeTransform as NflowsComposite

from lcma_ext import transforms as T

from brute_force import jacobian, svd_attribution

BATCH = 3


def _mlp(in_features: int, out_features: int) -> ResidualNet:
    return ResidualNet(in_features, out_features, hidden_features=8, num_blocks=1)


def _conv(in_channels: int, out_channels: int) -> ConvResidualNet:
    return ConvResidualNet(in_channels, out_channels, hidden_channels=8, num_blocks=1)


def _vector_mask() -> torch.Tensor:
    return torch.tensor([1, 0, 1, 0, 1])


def _channel_mask() -> torch.Tensor:
    return torch.tensor([1, 0, 0, 1])


@dataclass
class Case:
    """One registry entry.

    Attributes:
        build: Constructor of a fresh transform (random parameters).
        shape: Event shape of the inputs.
        triangular_order: For elementwise/triangular maps, an ordering of the flattened input
            dimensions under which the Jacobian is lower triangular (None otherwise).
        rearrangement: True if the map only moves dimensions (Jacobian is a permutation).
        bad_input: Event shape the transform must reject with a ValueError.
    """

    build: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]
    triangular_order: Callable[[], list[int]] | None = None
    rearrangement: bool = False
    bad_input: tuple[int, ...] | None = None


def _coupling_order(mask: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
    """Identity channels first, then transformed ones: coupling Jacobians are then triangular."""
    per_channel = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    channels = [c for c in range(len(mask)) if mask[c] <= 0] + [
        c for c in range(len(mask)) if mask[c] > 0
    ]
    return [c * per_channel + k for c in channels for k in range(per_channel)]


def _natural(shape: tuple[int, ...]) -> Callable[[], list[int]]:
    return lambda: list(range(int(np.prod(shape))))


def _rq(mask, net, shape, **kwargs):
    return T.PiecewiseRationalQuadraticCouplingTransform(
        mask, net, num_bins=4, tails="linear", tail_bound=3.0, **kwargs
    )


REGISTRY: dict[str, Case] = {
    "affine_coupling_vector": Case(
        lambda: T.AffineCouplingTransform(_vector_mask(), _mlp),
        (5,),
        lambda: _coupling_order(_vector_mask(), (5,)),
        bad_input=(4,),
    ),
    "affine_coupling_image": Case(
        lambda: T.AffineCouplingTransform(_channel_mask(), _conv),
        (4, 3, 3),
        lambda: _coupling_order(_channel_mask(), (4, 3, 3)),
        bad_input=(3, 3, 3),
    ),
    "additive_coupling": Case(
        lambda: T.AdditiveCouplingTransform(_vector_mask(), _mlp),
        (5,),
        lambda: _coupling_order(_vector_mask(), (5,)),
        bad_input=(6,),
    ),
    "rq_coupling_vector": Case(
        lambda: _rq(_vector_mask(), _mlp, (5,)),
        (5,),
        lambda: _coupling_order(_vector_mask(), (5,)),
        bad_input=(4,),
    ),
    "rq_coupling_unconditional": Case(
        lambda: _rq(_vector_mask(), _mlp, (5,), apply_unconditional_transform=True),
        (5,),
        lambda: _coupling_order(_vector_mask(), (5,)),
        bad_input=(4,),
    ),
    "rq_coupling_image": Case(
        lambda: _rq(_channel_mask(), _conv, (4, 2, 2)),
        (4, 2, 2),
        lambda: _coupling_order(_channel_mask(), (4, 2, 2)),
        bad_input=(2, 2, 2),
    ),
    "masked_affine_autoregressive": Case(
        lambda: T.MaskedAffineAutoregressiveTransform(features=4, hidden_features=8),
        (4,),
        _natural((4,)),
        bad_input=(5,),
    ),
    "actnorm_vector": Case(lambda: T.ActNorm(4), (4,), _natural((4,)), bad_input=(3,)),
    "actnorm_image": Case(
        lambda: T.ActNorm(3), (3, 2, 2), _natural((3, 2, 2)), bad_input=(2, 2, 2)
    ),
    **{
        f"lu_linear_{mode}": Case(
            lambda mode=mode: T.LULinear(4, identity_init=False, attribution=mode),
            (4,),
            bad_input=(3,),
        )
        for mode in T.ATTRIBUTIONS
    },
    **{
        f"one_by_one_{mode}": Case(
            lambda mode=mode: T.OneByOneConvolution(3, identity_init=False, attribution=mode),
            (3, 2, 2),
            bad_input=(4, 2, 2),
        )
        for mode in T.ATTRIBUTIONS
    },
    "squeeze": Case(
        lambda: T.SqueezeTransform(), (2, 4, 2), rearrangement=True, bad_input=(2, 3, 2)
    ),
    "reverse_permutation": Case(
        lambda: T.ReversePermutation(5), (5,), rearrangement=True, bad_input=(4,)
    ),
    "random_permutation_channels": Case(
        lambda: T.RandomPermutation(3), (3, 2, 2), rearrangement=True, bad_input=(4, 2, 2)
    ),
    "glow_step_composite": Case(
        lambda: T.CompositeTransform(
            [
                T.ActNorm(4),
                T.OneByOneConvolution(4, identity_init=False),
                T.AffineCouplingTransform(_channel_mask(), _conv),
                T.SqueezeTransform(),
            ]
        ),
        (4, 2, 2),
        bad_input=(3, 2, 2),
    ),
}

NAMES = sorted(REGISTRY)


def _make(name: str, seed: int = 0, dtype=torch.float64) -> tuple[torch.nn.Module, torch.Tensor]:
    """A transform with non-trivial parameters, initialized (ActNorm) and in eval mode."""
    case = REGISTRY[name]
    torch.manual_seed(seed)
    transform = case.build().to(dtype)
    with torch.no_grad():
        for parameter in transform.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x = torch.randn(BATCH, *case.shape, dtype=dtype)
    transform.train()
    transform(x)  # ActNorm data-dependent initialization happens here, as in nflows
    transform.eval()
    with torch.no_grad():  # move ActNorm away from the exact data statistics
        for module in transform.modules():
            if isinstance(module, T.ActNorm):
                module.log_scale.add_(0.2 * torch.randn_like(module.log_scale))
    return transform, torch.randn(BATCH, *case.shape, dtype=dtype)


def _jacobian(transform, x_single: torch.Tensor) -> torch.Tensor:
    """Jacobian of the flattened forward map at one example, shape (D_out, D_in)."""
    return jacobian(lambda batch: transform(batch)[0], x_single)


@pytest.mark.parametrize("name", NAMES)
def test_logabsdet_matches_brute_force_slogdet(name):
    transform, x = _make(name)
    with torch.no_grad():
        _, logabsdet, _ = transform.forward_with_diag(x)
    for b in range(BATCH):
        sign, expected = torch.linalg.slogdet(_jacobian(transform, x[b]))
        assert sign != 0
        torch.testing.assert_close(logabsdet[b], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_logabsdet_identical_to_parent_forward(name):
    transform, x = _make(name)
    with torch.no_grad():
        outputs, logabsdet, diag = transform.forward_with_diag(x)
        expected_outputs, expected_logabsdet = transform(x)
    assert torch.equal(outputs, expected_outputs)
    assert torch.equal(logabsdet, expected_logabsdet)
    assert diag.shape == outputs.shape


@pytest.mark.parametrize("name", NAMES)
def test_sum_invariant_with_carried_diag(name):
    transform, x = _make(name)
    incoming = torch.randn_like(x)
    with torch.no_grad():
        _, logabsdet, diag_out = transform.forward_with_diag(x, diag=incoming)
    torch.testing.assert_close(
        diag_out.flatten(1).sum(1) - incoming.flatten(1).sum(1), logabsdet, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].triangular_order])
def test_triangular_jacobian_diagonal_equals_diag(name):
    transform, x = _make(name)
    order = REGISTRY[name].triangular_order()
    with torch.no_grad():
        _, _, diag = transform.forward_with_diag(x)
    for b in range(BATCH):
        jac = _jacobian(transform, x[b])
        reordered = jac[order][:, order]
        upper = torch.triu(reordered, diagonal=1)
        assert upper.abs().max() == 0, "Jacobian is not triangular in the stated order"
        torch.testing.assert_close(
            diag[b].reshape(-1), torch.log(torch.diagonal(jac).abs()), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].rearrangement])
def test_rearrangements_carry_like_forward_and_add_nothing(name):
    transform, x = _make(name)
    incoming = torch.randn_like(x)
    outputs, logabsdet, diag_out = transform.forward_with_diag(x, diag=incoming)
    assert torch.equal(transform.carry(x), outputs)
    assert torch.equal(diag_out, transform.carry(incoming))
    assert torch.equal(logabsdet, torch.zeros_like(logabsdet))
    index = torch.arange(x[0].numel()).view(1, *x.shape[1:])
    assert transform.carry(index).dtype == torch.long
    jac = _jacobian(transform, x[0])
    perm = T.carry_positions(transform, x.shape[1:]).reshape(-1)
    torch.testing.assert_close(jac, torch.eye(jac.shape[1], dtype=jac.dtype)[perm])


@pytest.mark.parametrize("name", NAMES)
def test_inverse_of_forward_is_identity(name):
    transform, x = _make(name)
    with torch.no_grad():
        outputs, logabsdet, _ = transform.forward_with_diag(x)
        recovered, inverse_logabsdet = transform.inverse(outputs)
    torch.testing.assert_close(recovered, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    transform, x = _make(name, seed=0)
    clone, _ = _make(name, seed=1)
    clone.load_state_dict(transform.state_dict())
    with torch.no_grad():
        expected = transform.forward_with_diag(x)
        got = clone.forward_with_diag(x)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_float32_agrees_with_float64(name):
    transform, x = _make(name)
    with torch.no_grad():
        reference = transform.forward_with_diag(x)
        transform32 = transform.float()
        result = transform32.forward_with_diag(x.float())
    for ref, got in zip(reference, result):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bad_shape_raises_clear_value_error(name):
    transform, _ = _make(name)
    bad = torch.randn(BATCH, *REGISTRY[name].bad_input, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected"):
        transform.forward_with_diag(bad)


@pytest.mark.parametrize("name", NAMES)
def test_diag_of_wrong_shape_raises(name):
    transform, x = _make(name)
    with pytest.raises(ValueError, match="expected diag shaped like inputs"):
        transform.forward_with_diag(x, diag=torch.zeros(BATCH + 1, *x.shape[1:]))


# --- Invertible linear maps: the three attributions against an independent reference ------------


def _leading_minor_pivots(matrix: np.ndarray) -> np.ndarray:
    """|u_ii| of the unpivoted LU factorization (unit-diagonal L), from leading minors."""
    minors = [1.0] + [np.linalg.det(matrix[: i + 1, : i + 1]) for i in range(len(matrix))]
    return np.abs(np.array(minors[1:]) / np.array(minors[:-1]))


def _reference_attribution(weight: np.ndarray, lu_part: np.ndarray, mode: str) -> np.ndarray:
    if mode == "lu":
        return np.log(_leading_minor_pivots(lu_part))
    return svd_attribution(weight, mode)


@pytest.mark.parametrize("mode", T.ATTRIBUTIONS)
def test_lu_linear_attribution_matches_numpy_reference(mode):
    transform, x = _make(f"lu_linear_{mode}")
    weight = _jacobian(transform, x[0]).numpy()  # y = W x + b, so J = W
    with torch.no_grad():
        _, logabsdet, diag = transform.forward_with_diag(x)
    expected = _reference_attribution(weight, weight, mode)
    np.testing.assert_allclose(diag[0].numpy(), expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(diag.sum(1).numpy(), logabsdet.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", T.ATTRIBUTIONS)
def test_one_by_one_attribution_matches_numpy_reference(mode):
    transform, x = _make(f"one_by_one_{mode}")
    height, width = x.shape[2:]
    jac = _jacobian(transform, x[0]).numpy()
    pixels = height * width
    weight = jac[::pixels, ::pixels]  # the (C, C) block acting on pixel (0, 0)
    perm = transform.permutation._permutation.numpy()
    lu_part = weight[:, perm]  # W_total = (L U) P, and (P x)_k = x[perm[k]]
    expected = _reference_attribution(weight, lu_part, mode)
    with torch.no_grad():
        _, logabsdet, diag = transform.forward_with_diag(x)
    per_channel = diag[0].numpy()
    assert np.allclose(per_channel, per_channel[:, :1, :1])  # constant over space
    np.testing.assert_allclose(per_channel[:, 0, 0], expected, rtol=1e-9, atol=1e-10)
    total = pixels * np.linalg.slogdet(weight)[1]
    np.testing.assert_allclose(diag.flatten(1).sum(1).numpy(), total, rtol=0, atol=1e-10)
    np.testing.assert_allclose(logabsdet.numpy(), total, rtol=0, atol=1e-10)


def test_svd_energy_is_well_defined_at_identity_init():
    transform = T.OneByOneConvolution(4, identity_init=True).double()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    _, logabsdet, diag = transform.forward_with_diag(x)
    assert torch.isfinite(diag).all()
    torch.testing.assert_close(diag.flatten(1).sum(1), logabsdet, rtol=0, atol=1e-12)


def test_unknown_attribution_raises():
    with pytest.raises(ValueError, match="expected attribution in"):
        T.LULinear(3, attribution="eigen")


def test_svd_attribution_keeps_no_gradient_and_lu_does():
    transform = T.LULinear(3, identity_init=False, attribution="lu")
    _, _, diag = transform.forward_with_diag(torch.randn(2, 3))
    assert diag.requires_grad
    transform.attribution = "svd-energy"
    shares = transform.logabsdet_attribution()
    assert not shares.requires_grad


# --- Composite ------------------------------------------------------------------------------


def test_composite_names_the_component_that_is_not_diag_aware():
    composite = T.CompositeTransform([T.ActNorm(5), NflowsAffineCoupling(_vector_mask(), _mlp)])
    with pytest.raises(TypeError, match=r"component 1.*AffineCouplingTransform"):
        composite.forward_with_diag(torch.randn(2, 5))


def test_composite_is_a_drop_in_for_nflows_composite():
    torch.manual_seed(0)
    parts = [T.ActNorm(5), T.AffineCouplingTransform(_vector_mask(), _mlp), T.ReversePermutation(5)]
    ours = T.CompositeTransform(parts)
    theirs = NflowsComposite(parts)
    x = torch.randn(4, 5)
    ours.eval()
    theirs.eval()
    ours(x)
    with torch.no_grad():
        expected = theirs(x)
        got = ours.forward_with_diag(x)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_carry_positions_tracks_squeeze_and_permutation():
    composite = T.CompositeTransform([T.SqueezeTransform(), T.ReversePermutation(4)])
    positions = T.carry_positions(composite, (1, 2, 2))
    # Squeeze puts pixel (dy, dx) into channel 2 dy + dx; reversing the channels flips that.
    assert positions.reshape(-1).tolist() == [3, 2, 1, 0]
