"""Lipschitz-constrained networks for invertible residual blocks.

A residual block ``F(x) = x + g(x)`` is invertible when ``Lip(g) < 1``. These networks bound
``Lip(g)`` by the product of their layers' spectral norms (the activations are 1-Lipschitz):
every linear or convolutional layer divides its weight by ``max(1, sigma / coeff)``, where
``sigma`` is a power-iteration estimate of the layer's operator norm (soft spectral
normalization, as in Residual Flows).

Convolutions are normalized by the **true operator norm** of the convolution on the input's
spatial shape ``(H, W)`` (power iteration with ``conv2d`` and its adjoint ``conv_transpose2d``),
not by the norm of the reshaped kernel. ``1 x 1`` convolutions use the ``C_out x C_in`` matrix,
whose norm is the operator norm for any spatial shape.

Updating the estimates (the documented behaviour):
    **Automatic in ``train()`` mode.** Each forward pass of a layer in training mode first runs
    ``n_power_iterations`` power iterations (no gradient, warm-started from the stored vectors,
    which are buffers and survive ``state_dict``), then normalizes with the new estimate. In
    ``eval()`` mode nothing is updated, so evaluation is deterministic. Use
    :func:`update_lipschitz` for an explicit update to convergence (e.g. after loading weights or
    before measuring), and :func:`frozen_lipschitz` to stop the automatic updates inside a
    block of code (the residual blocks use it in their fixed-point inverse, which must see one
    fixed ``g``).

Measuring: :func:`operator_norm` (exact norm of one normalized layer), :func:`lipschitz_bound`
(product of the layers' exact norms: an upper bound on ``Lip(g)``) and
:func:`empirical_lipschitz` (largest Jacobian spectral norm at given points: a lower bound).

References:
    J. Behrmann, W. Grathwohl, R. T. Q. Chen, D. Duvenaud, J.-H. Jacobsen. Invertible Residual
    Networks. ICML 2019.
    R. T. Q. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows for Invertible
    Generative Modeling. NeurIPS 2019.
    T. Miyato, T. Kataoka, M. Koyama, Y. Yoshida. Spectral Normalization for Generative
    Adversarial Networks. ICLR 2018.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "LipSwish",
    "LipschitzConvNet",
    "LipschitzMLP",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "empirical_lipschitz",
    "frozen_lipschitz",
    "lipschitz_bound",
    "operator_norm",
    "spectral_layers",
    "update_lipschitz",
    "updated_then_frozen_lipschitz",
]

#: Names accepted by the ``activation`` argument of the nets.
ACTIVATIONS = ("elu", "lipswish")

_INIT_ITERATIONS = 100
_INIT_RTOL = 1e-5


def _check_coeff(coeff: float) -> float:
    if not 0.0 < float(coeff) < 1.0:
        raise ValueError(f"expected a Lipschitz coefficient 0 < coeff < 1; got {coeff!r}")
    return float(coeff)


def _check_iterations(n_power_iterations: int) -> int:
    if not isinstance(n_power_iterations, int) or n_power_iterations < 0:
        raise ValueError(f"expected an int n_power_iterations >= 0; got {n_power_iterations!r}")
    return n_power_iterations


class LipSwish(nn.Module):
    """``x * sigmoid(beta x) / 1.1`` with learnable ``beta = softplus(b) > 0``; 1-Lipschitz.

    The derivative of ``x sigmoid(beta x)`` is at most about ``1.0998`` for every ``beta``, so
    dividing by ``1.1`` gives a Lipschitz constant below 1.

    References:
        R. T. Q. Chen et al. Residual Flows for Invertible Generative Modeling, Sec. 4.
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        beta = F.softplus(self.raw_beta)
        # In place on temporaries only (autograd keeps the sigmoid's output, not its input, and
        # the product's inputs, not its output): one activation-sized tensor less per call.
        return (x * torch.sigmoid_(beta * x)).div_(1.1)


def _activation(name: str) -> nn.Module:
    if name == "elu":
        return nn.ELU()
    if name == "lipswish":
        return LipSwish()
    raise ValueError(f"expected activation in {ACTIVATIONS}; got {name!r}")


class _SpectralNormMixin:
    """Shared power iteration and soft normalization for :class:`SpectralNormLinear` / Conv."""

    weight: Tensor
    u: Tensor
    v: Tensor
    coeff: float
    n_power_iterations: int
    auto_update: bool

    def _apply_operator(self, v: Tensor, weight: Tensor | None = None) -> Tensor:
        raise NotImplementedError  # A v, flat -> flat

    def _apply_adjoint(self, u: Tensor, weight: Tensor | None = None) -> Tensor:
        raise NotImplementedError  # A^T u, flat -> flat

    def _init_vectors(self, u_size: int, v_size: int) -> None:
        weight = self.weight
        u = F.normalize(torch.randn(u_size, dtype=weight.dtype, device=weight.device), dim=0)
        v = F.normalize(torch.randn(v_size, dtype=weight.dtype, device=weight.device), dim=0)
        self.register_buffer("u", u)  # type: ignore[attr-defined]
        self.register_buffer("v", v)  # type: ignore[attr-defined]
        self.power_iteration(_INIT_ITERATIONS, rtol=_INIT_RTOL)

    @torch.no_grad()
    def power_iteration(self, n_iterations: int, rtol: float | None = None) -> Tensor:
        """Run up to ``n_iterations`` power iterations on the stored vectors; return ``sigma``.

        Args:
            n_iterations: Maximum number of iterations.
            rtol: Stop early once ``sigma`` changes by less than ``rtol`` (relative).

        Returns:
            The estimate ``u^T A v`` of the raw (unnormalized) weight's operator norm.
        """
        weight = self.weight.detach()
        u, v = self.u, self.v
        sigma = torch.dot(u, self._apply_operator(v, weight))
        for _ in range(n_iterations):
            u_new = F.normalize(self._apply_operator(v, weight), dim=0)
            v_new = F.normalize(self._apply_adjoint(u_new, weight), dim=0)
            u, v = u_new, v_new
            previous, sigma = sigma, torch.dot(u, self._apply_operator(v, weight))
            if rtol is not None and abs(float(sigma - previous)) <= rtol * abs(float(sigma)):
                break
        self.u.copy_(u)
        self.v.copy_(v)
        return sigma

    def sigma(self) -> Tensor:
        """``u^T A v`` with the stored vectors (differentiable in the weight)."""
        u, v = self.u.clone(), self.v.clone()  # clones: later updates must not touch the graph
        return torch.dot(u, self._apply_operator(v, self.weight))

    def normalized_weight(self) -> Tensor:
        """The weight divided by ``max(1, sigma / coeff)`` (soft spectral normalization)."""
        factor = torch.clamp(self.sigma() / self.coeff, min=1.0)
        return self.weight / factor

    def _maybe_update(self) -> None:
        training = self.training  # type: ignore[attr-defined]
        if training and self.auto_update and self.n_power_iterations > 0:
            self.power_iteration(self.n_power_iterations)


class SpectralNormLinear(_SpectralNormMixin, nn.Linear):
    """``nn.Linear`` whose weight is softly normalized to spectral norm ``<= coeff``.

    Args:
        in_features, out_features, bias: As in ``nn.Linear``.
        coeff: Target Lipschitz constant of the layer, ``0 < coeff < 1``.
        n_power_iterations: Power iterations per training-mode forward (automatic update).

    Shapes:
        inputs: ``(B, in_features)``; outputs: ``(B, out_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.97,
        n_power_iterations: int = 1,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.coeff = _check_coeff(coeff)
        self.n_power_iterations = _check_iterations(n_power_iterations)
        self.auto_update = True
        self._init_vectors(out_features, in_features)

    def _apply_operator(self, v: Tensor, weight: Tensor | None = None) -> Tensor:
        return torch.mv(self.weight if weight is None else weight, v)

    def _apply_adjoint(self, u: Tensor, weight: Tensor | None = None) -> Tensor:
        return torch.mv((self.weight if weight is None else weight).t(), u)

    def forward(self, inputs: Tensor) -> Tensor:
        self._maybe_update()
        return F.linear(inputs, self.normalized_weight(), self.bias)

    def dense_operator(self) -> Tensor:
        """The normalized layer as a ``(out_features, in_features)`` matrix (no bias)."""
        return self.normalized_weight()


class SpectralNormConv2d(_SpectralNormMixin, nn.Conv2d):
    """Stride-1 ``nn.Conv2d`` (``padding = kernel_size // 2``) normalized to operator norm
    ``<= coeff`` on the spatial shape ``spatial_shape``.

    For ``k x k`` kernels with ``k > 1`` the power iteration runs on the convolution operator
    itself (``conv2d`` and ``conv_transpose2d`` on ``(C, H, W)`` vectors), so ``sigma`` is the
    true operator norm on that shape; the layer then rejects other spatial shapes.

    Args:
        in_channels, out_channels, kernel_size, bias: As in ``nn.Conv2d`` (odd square kernel).
        spatial_shape: ``(H, W)`` of the inputs; required when ``kernel_size > 1``.
        coeff: Target Lipschitz constant, ``0 < coeff < 1``.
        n_power_iterations: Power iterations per training-mode forward.

    Shapes:
        inputs: ``(B, in_channels, H, W)``; outputs: ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        spatial_shape: Sequence[int] | None = None,
        bias: bool = True,
        coeff: float = 0.97,
        n_power_iterations: int = 1,
    ) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"expected an odd int kernel_size >= 1; got {kernel_size!r}")
        super().__init__(
            in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2, bias=bias
        )
        self.coeff = _check_coeff(coeff)
        self.n_power_iterations = _check_iterations(n_power_iterations)
        self.auto_update = True
        if kernel_size == 1:
            self.spatial_shape: tuple[int, int] | None = None
            self._init_vectors(out_channels, in_channels)
        else:
            if spatial_shape is None or len(spatial_shape) != 2 or min(spatial_shape) < 1:
                raise ValueError(
                    "expected spatial_shape (H, W) for a k x k convolution with k > 1; "
                    f"got {spatial_shape!r}"
                )
            self.spatial_shape = (int(spatial_shape[0]), int(spatial_shape[1]))
            pixels = self.spatial_shape[0] * self.spatial_shape[1]
            self._init_vectors(out_channels * pixels, in_channels * pixels)

    def _apply_operator(self, v: Tensor, weight: Tensor | None = None) -> Tensor:
        weight = self.weight if weight is None else weight
        if self.spatial_shape is None:
            return torch.mv(weight.flatten(1), v)
        image = v.view(1, self.in_channels, *self.spatial_shape)
        return F.conv2d(image, weight, padding=self.padding).reshape(-1)

    def _apply_adjoint(self, u: Tensor, weight: Tensor | None = None) -> Tensor:
        weight = self.weight if weight is None else weight
        if self.spatial_shape is None:
            return torch.mv(weight.flatten(1).t(), u)
        image = u.view(1, self.out_channels, *self.spatial_shape)
        padding = cast(tuple[int, ...], self.padding)  # built from an int, never a string
        return F.conv_transpose2d(image, weight, padding=padding).reshape(-1)

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.dim() != 4 or inputs.shape[1] != self.in_channels:
            raise ValueError(
                f"expected inputs (B, {self.in_channels}, H, W); got {tuple(inputs.shape)}"
            )
        if self.spatial_shape is not None and tuple(inputs.shape[2:]) != self.spatial_shape:
            raise ValueError(
                f"expected spatial shape {self.spatial_shape} (the shape the operator norm is "
                f"normalized on); got {tuple(inputs.shape[2:])}"
            )
        self._maybe_update()
        return self._conv_forward(inputs, self.normalized_weight(), self.bias)

    def dense_operator(self, spatial_shape: Sequence[int] | None = None) -> Tensor:
        """The normalized convolution (no bias) as a dense ``(C_out H W, C_in H W)`` matrix."""
        shape = self.spatial_shape or tuple(spatial_shape or (1, 1))
        weight = self.normalized_weight()
        numel = self.in_channels * shape[0] * shape[1]
        basis = torch.eye(numel, dtype=weight.dtype, device=weight.device)
        images = basis.view(numel, self.in_channels, *shape)
        return F.conv2d(images, weight, padding=self.padding).reshape(numel, -1).t()


def _check_shape_int(value: int, name: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive int {name}; got {value!r}")
    return value


class LipschitzMLP(nn.Module):
    """MLP ``[act] -> Linear -> act -> ... -> Linear`` with ``Lip <= coeff ** num_layers``.

    Args:
        features: Input and output size.
        hidden_features: Width of the hidden layers.
        num_layers: Number of linear layers (at least 2).
        activation: ``"elu"`` (i-ResNet) or ``"lipswish"`` (Residual Flows).
        coeff: Lipschitz target of every linear layer.
        n_power_iterations: Power iterations per training-mode forward of every layer.
        preactivation: Apply the activation to the input first (as both papers do).

    Shapes:
        inputs: ``(B, features)``; outputs: ``(B, features)``.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int = 32,
        num_layers: int = 3,
        activation: str = "lipswish",
        coeff: float = 0.97,
        n_power_iterations: int = 1,
        preactivation: bool = True,
    ) -> None:
        super().__init__()
        _check_shape_int(features, "features")
        _check_shape_int(hidden_features, "hidden_features")
        if not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(f"expected an int num_layers >= 2; got {num_layers!r}")
        sizes = [features] + [hidden_features] * (num_layers - 1) + [features]
        layers: list[nn.Module] = [_activation(activation)] if preactivation else []
        for index, (size_in, size_out) in enumerate(itertools.pairwise(sizes)):
            if index > 0:
                layers.append(_activation(activation))
            layers.append(SpectralNormLinear(size_in, size_out, True, coeff, n_power_iterations))
        self.net = nn.Sequential(*layers)
        self.features = features

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.dim() != 2 or inputs.shape[1] != self.features:
            raise ValueError(f"expected inputs (B, {self.features}); got {tuple(inputs.shape)}")
        return self.net(inputs)


class LipschitzConvNet(nn.Module):
    """Conv net ``[act] -> conv k1 -> act -> conv k2 -> act -> conv k3`` (3-1-3 by default).

    Every convolution is normalized on the true operator norm for ``input_shape``'s ``(H, W)``.

    Args:
        input_shape: ``(C, H, W)`` of the inputs (and outputs).
        hidden_channels: Channels of the hidden layers.
        kernel_sizes: Odd kernel sizes, one per convolution (default ``(3, 1, 3)``).
        activation: ``"elu"`` (i-ResNet) or ``"lipswish"`` (Residual Flows).
        coeff: Lipschitz target of every convolution.
        n_power_iterations: Power iterations per training-mode forward of every convolution.
        preactivation: Apply the activation to the input first.

    Shapes:
        inputs: ``(B, C, H, W)``; outputs: ``(B, C, H, W)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        hidden_channels: int = 32,
        kernel_sizes: Sequence[int] = (3, 1, 3),
        activation: str = "lipswish",
        coeff: float = 0.97,
        n_power_iterations: int = 1,
        preactivation: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3 or min(int(s) for s in input_shape) < 1:
            raise ValueError(f"expected input_shape (C, H, W); got {tuple(input_shape)}")
        _check_shape_int(hidden_channels, "hidden_channels")
        if len(kernel_sizes) < 2:
            raise ValueError(f"expected at least 2 kernel sizes; got {tuple(kernel_sizes)}")
        channels, height, width = (int(s) for s in input_shape)
        sizes = [channels] + [hidden_channels] * (len(kernel_sizes) - 1) + [channels]
        layers: list[nn.Module] = [_activation(activation)] if preactivation else []
        for index, kernel in enumerate(kernel_sizes):
            if index > 0:
                layers.append(_activation(activation))
            layers.append(
                SpectralNormConv2d(
                    sizes[index],
                    sizes[index + 1],
                    int(kernel),
                    (height, width),
                    coeff=coeff,
                    n_power_iterations=n_power_iterations,
                )
            )
        self.net = nn.Sequential(*layers)
        self.input_shape = (channels, height, width)

    def forward(self, inputs: Tensor) -> Tensor:
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected inputs (B, {', '.join(map(str, self.input_shape))}); "
                f"got {tuple(inputs.shape)}"
            )
        return self.net(inputs)


def spectral_layers(module: nn.Module) -> list[SpectralNormLinear | SpectralNormConv2d]:
    """Every spectrally normalized layer inside ``module`` (in ``modules()`` order)."""
    return [m for m in module.modules() if isinstance(m, SpectralNormLinear | SpectralNormConv2d)]


@torch.no_grad()
def update_lipschitz(
    module: nn.Module, n_iterations: int = 2000, rtol: float | None = 1e-12
) -> list[float]:
    """Explicitly update every layer's spectral-norm estimate (any mode).

    Args:
        module: A network (or a whole flow) containing spectrally normalized layers.
        n_iterations: Maximum power iterations per layer.
        rtol: Stop a layer early once its ``sigma`` changes by less than ``rtol``.

    Returns:
        The raw ``sigma`` estimate of each layer, in :func:`spectral_layers` order.
    """
    return [float(layer.power_iteration(n_iterations, rtol)) for layer in spectral_layers(module)]


@contextmanager
def frozen_lipschitz(module: nn.Module) -> Iterator[None]:
    """Within the block, training-mode forwards do not update the spectral-norm estimates."""
    layers = spectral_layers(module)
    previous = [layer.auto_update for layer in layers]
    for layer in layers:
        layer.auto_update = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, previous):
            layer.auto_update = flag


@contextmanager
def updated_then_frozen_lipschitz(module: nn.Module) -> Iterator[None]:
    """Every layer takes its training-mode update now, then the block runs frozen.

    The update is the one each layer's forward would take (none in eval mode, with
    ``auto_update=False`` or ``n_power_iterations=0``). A layer's update reads only its own
    weight and vectors, so taking them all first gives the values of updating right before
    each forward. For code that must not mutate the vectors inside it, such as a function
    transformed by ``torch.func.vjp``.
    """
    for layer in spectral_layers(module):
        layer._maybe_update()
    with frozen_lipschitz(module):
        yield


@torch.no_grad()
def operator_norm(
    layer: SpectralNormLinear | SpectralNormConv2d, max_dense: int = 4096, n_iterations: int = 2000
) -> float:
    """Exact operator norm (largest singular value) of a normalized layer, without its bias.

    Dense SVD when the operator has at most ``max_dense`` columns, else a fresh power iteration
    (``n_iterations`` at most, relative tolerance ``1e-9``) on the normalized operator.
    """
    if isinstance(layer, SpectralNormConv2d) and layer.spatial_shape is not None:
        numel = layer.in_channels * math.prod(layer.spatial_shape)
        if numel > max_dense:
            weight = layer.normalized_weight()
            v = F.normalize(torch.randn_like(layer.v), dim=0)
            sigma = 0.0
            for _ in range(n_iterations):
                u = F.normalize(layer._apply_operator(v, weight), dim=0)
                v = F.normalize(layer._apply_adjoint(u, weight), dim=0)
                new = float(torch.linalg.vector_norm(layer._apply_operator(v, weight)))
                if abs(new - sigma) <= 1e-9 * new:
                    return new
                sigma = new
            return sigma
    return float(torch.linalg.matrix_norm(layer.dense_operator(), ord=2))


def lipschitz_bound(net: nn.Module) -> float:
    """Upper bound on ``Lip(net)``: the product of its layers' exact operator norms.

    Valid for the nets of this module (1-Lipschitz activations between the layers).
    """
    layers = spectral_layers(net)
    if not layers:
        raise ValueError("expected a net with spectrally normalized layers; got none")
    return math.prod(operator_norm(layer) for layer in layers)


def empirical_lipschitz(net: nn.Module, inputs: Tensor) -> float:
    """Largest spectral norm of ``net``'s Jacobian over the examples in ``inputs`` (lower bound).

    Shapes:
        inputs: ``(B, *event_shape)``; the net must be per-example (no batch coupling).
    """
    with frozen_lipschitz(net):
        norms = []
        for example in inputs:

            def flat(x: Tensor, shape: torch.Size = example.shape) -> Tensor:
                return net(x.view(1, *shape)).reshape(-1)

            jacobian = torch.autograd.functional.jacobian(flat, example.reshape(-1))
            norms.append(float(torch.linalg.matrix_norm(jacobian, ord=2)))
    return max(norms)
