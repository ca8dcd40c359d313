"""Lipschitz-constrained nets: spectral normalization, updates, and measured constants."""

from __future__ import annotations

import pytest
import torch

from lcma_ext.nets import (
    LipschitzConvNet,
    LipschitzMLP,
    LipSwish,
    SpectralNormConv2d,
    SpectralNormLinear,
    empirical_lipschitz,
    frozen_lipschitz,
    lipschitz_bound,
    operator_norm,
    spectral_layers,
    update_lipschitz,
)


def _inflate(net: torch.nn.Module, factor: float = 5.0) -> None:
    with torch.no_grad():
        for layer in spectral_layers(net):
            layer.weight.mul_(factor)


def _perturb(net: torch.nn.Module, scale: float = 2.0, seed: int = 3) -> None:
    """Change the weights' singular vectors, so the stored estimates go stale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in spectral_layers(net):
            noise = torch.randn(layer.weight.shape, generator=generator, dtype=layer.weight.dtype)
            layer.weight.add_(scale * noise)


def _nets() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        LipschitzMLP(4, 16, activation="elu").double(),
        LipschitzConvNet((2, 3, 3), 8, activation="lipswish").double(),
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_lipschitz_constant_below_one_after_explicit_update(index: int) -> None:
    net = _nets()[index]
    _perturb(net)
    # Stale estimates underestimate the new norms: some layer exceeds its target.
    assert max(operator_norm(layer) / layer.coeff for layer in spectral_layers(net)) > 1.01
    update_lipschitz(net)
    for layer in spectral_layers(net):
        assert operator_norm(layer) <= layer.coeff * (1 + 1e-6)
    bound = lipschitz_bound(net)
    assert bound < 1
    x = torch.randn(6, *((4,) if index == 0 else (2, 3, 3)), dtype=torch.float64)
    assert empirical_lipschitz(net, x) <= bound * (1 + 1e-9)


@pytest.mark.parametrize("index", [0, 1])
def test_training_mode_forwards_update_automatically_and_eval_does_not(index: int) -> None:
    net = _nets()[index]
    _perturb(net)
    x = torch.randn(2, *((4,) if index == 0 else (2, 3, 3)), dtype=torch.float64)
    net.eval()
    before = [layer.u.clone() for layer in spectral_layers(net)]
    net(x)
    assert all(torch.equal(a, layer.u) for a, layer in zip(before, spectral_layers(net)))
    net.train()
    with frozen_lipschitz(net):
        net(x)
    assert all(torch.equal(a, layer.u) for a, layer in zip(before, spectral_layers(net)))
    for _ in range(30):
        net(x)
    assert lipschitz_bound(net) < 1
    assert any(not torch.equal(a, layer.u) for a, layer in zip(before, spectral_layers(net)))


def test_conv_is_normalized_on_the_true_operator_norm_of_its_spatial_shape() -> None:
    torch.manual_seed(1)
    layer = SpectralNormConv2d(2, 3, 3, spatial_shape=(4, 5)).double()
    _inflate(layer, 4.0)
    update_lipschitz(layer)
    dense = layer.dense_operator()
    assert dense.shape == (3 * 20, 2 * 20)
    exact = torch.linalg.matrix_norm(dense, ord=2)
    torch.testing.assert_close(exact, torch.tensor(layer.coeff, dtype=torch.float64))
    # The reshaped-kernel norm is a different number: normalizing it would not bound the layer.
    kernel_norm = torch.linalg.matrix_norm(layer.normalized_weight().detach().flatten(1), ord=2)
    assert abs(float(kernel_norm) - float(exact.detach())) > 1e-3
    # The dense operator is the layer: conv of an image equals the matrix product.
    image = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    with frozen_lipschitz(layer):
        got = layer(image) - layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(got.reshape(-1), dense @ image.reshape(-1))


def test_large_conv_operator_norm_by_power_iteration_matches_dense() -> None:
    torch.manual_seed(2)
    layer = SpectralNormConv2d(2, 2, 3, spatial_shape=(4, 4)).double()
    dense = float(torch.linalg.matrix_norm(layer.dense_operator().detach(), ord=2))
    assert operator_norm(layer, max_dense=1) == pytest.approx(dense, rel=1e-6)


def test_lipswish_is_one_lipschitz() -> None:
    activation = LipSwish().double()
    x = torch.linspace(-20, 20, 20001, dtype=torch.float64, requires_grad=True)
    for raw_beta in (-3.0, 0.0, 0.5, 3.0, 10.0):
        with torch.no_grad():
            activation.raw_beta.fill_(raw_beta)
        (derivative,) = torch.autograd.grad(activation(x).sum(), x)
        assert derivative.abs().max() < 1.0
    assert derivative.abs().max() > 0.99  # and tight for large beta


def test_state_dict_keeps_the_power_iteration_vectors() -> None:
    torch.manual_seed(0)
    net = LipschitzConvNet((1, 2, 2), 4)
    state = net.state_dict()
    assert any(key.endswith(".u") for key in state) and any(key.endswith(".v") for key in state)
    clone = LipschitzConvNet((1, 2, 2), 4)
    clone.load_state_dict(state)
    clone.eval()
    net.eval()
    x = torch.randn(3, 1, 2, 2)
    torch.testing.assert_close(clone(x), net(x))


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="expected a Lipschitz coefficient"):
        SpectralNormLinear(3, 3, coeff=1.5)
    with pytest.raises(ValueError, match="expected spatial_shape"):
        SpectralNormConv2d(2, 2, 3)
    with pytest.raises(ValueError, match="expected an odd int kernel_size"):
        SpectralNormConv2d(2, 2, 2, spatial_shape=(3, 3))
    conv = LipschitzConvNet((2, 3, 3), 4)
    with pytest.raises(ValueError, match=r"expected inputs \(B, 2, 3, 3\)"):
        conv(torch.randn(1, 2, 4, 4))
    layer = SpectralNormConv2d(2, 2, 3, spatial_shape=(3, 3))
    with pytest.raises(ValueError, match="expected spatial shape"):
        layer(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="expected activation in"):
        LipschitzMLP(3, activation="relu6")
    with pytest.raises(ValueError, match="expected a net with spectrally normalized layers"):
        lipschitz_bound(torch.nn.Linear(2, 2))


def test_updated_then_frozen_takes_each_layers_forward_update_once() -> None:
    """Inside the block: the vectors of one training-mode forward, and no further update."""
    import copy

    from lcma_ext.nets import updated_then_frozen_lipschitz

    torch.manual_seed(0)
    net = LipschitzConvNet((2, 4, 4), 8, (3, 1, 3), "elu", 0.9, 1).double().train()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    reference = copy.deepcopy(net)
    expected = reference(x)  # each layer updates right before its own forward
    before = [b.clone() for b in net.buffers()]
    with updated_then_frozen_lipschitz(net):
        updated = [b.clone() for b in net.buffers()]
        assert torch.equal(net(x), expected)
        assert torch.equal(net(x), expected)  # frozen: a second forward does not update
    assert any(not torch.equal(a, b) for a, b in zip(before, updated))
    for a, b in zip(net.buffers(), reference.buffers()):
        assert torch.equal(a, b)
    assert all(layer.auto_update for layer in spectral_layers(net))
    net.eval()
    with updated_then_frozen_lipschitz(net):
        pass
    for a, b in zip(net.buffers(), reference.buffers()):
        assert torch.equal(a, b)  # eval mode: no update
