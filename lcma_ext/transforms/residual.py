"""Invertible residual blocks (i-ResNet, Residual Flows) with per-dimension log-dets.

Both blocks map data to noise by ``F(x) = x + g(x)`` with a Lipschitz-constrained ``g``
(:mod:`lcma_ext.nets.lipschitz`), so ``log|det J_F| = log det(I + J_g) = tr log(I + J_g)``:

``log det(I + J_g) = sum_{k>=1} (-1)^(k+1) / k * tr(J_g^k)``, estimated with probes ``v``
(``E[v v^T] = I``) as ``sum_k (-1)^(k+1) / k * c_k * v^T J_g^k v``, using vector-Jacobian products
``w_k = v^T J_g^k``.

Per-dimension contribution (LCMA Sec. 3.2.2): the diagonal of ``log(I + J_g)``, estimated with the
**same** probe and coefficients as ``sum_k (-1)^(k+1) / k * c_k * v ⊙ w_k``. Summed over the
dimensions it is the scalar estimate: ``forward_with_diag`` computes the scalar as that sum;
``forward`` accumulates the per-example sums term by term (same draws, equal up to rounding)
and keeps no input-sized buffer across terms.

Estimators:

* :class:`InvertibleResNetBlock`: the series truncated after ``n_terms`` terms (``c_k = 1``;
  biased), gradients by backpropagation through the series (the i-ResNet way).
* :class:`ResidualFlowBlock`: the unbiased Russian-roulette estimator. ``N`` is drawn from a
  geometric (``P(N >= m) = (1 - geom_p)^m``) or Poisson distribution once per call (shared by the
  batch), the series runs to ``n = n_exact_terms + N`` terms, and term ``k > n_exact_terms``
  is weighted by ``c_k = 1 / P(N >= k - n_exact_terms)``. Gradients by the Neumann series
  (``neumann_grad=True``): ``d logdet = v^T (sum_{j<n} (-1)^j c_{j+1} J_g^j) dJ_g v``, one
  extra vector-Jacobian product with a graph instead of ``n``. With ``memory_efficient=True``
  the power series runs in the forward pass without a graph and only the single Neumann
  product is differentiated, in the backward pass, weighted by each sample's own incoming
  gradient (correct for per-sample-weighted losses; the reference scales every sample by
  the first sample's gradient).

Modes:

* ``train()``: the estimators above, ``n_probes`` probes. The networks' spectral-norm estimates
  are updated automatically, one ``n_power_iterations`` power step per forward (see
  :mod:`lcma_ext.nets.lipschitz`).
* ``eval()``: a low-variance setting: i-ResNet truncates after ``eval_n_terms`` (20) terms;
  Residual Flows keep the roulette (still unbiased) but compute the first
  ``eval_n_exact_terms`` (20) terms exactly, so the random tail is weighted by at most
  ``Lip(g)^21 / 21``. No spectral-norm updates.
* :func:`low_variance_estimation` (a context manager): a fixed number of terms, several
  Rademacher probes and no roulette, for LCMA statistics (``estimate_contributions``). Its
  bias is at most ``D * Lip^(n+1) / ((n + 1)(1 - Lip))`` in the total, and its variance falls
  as ``1 / n_probes``.
* ``exact=True``: the full Jacobian (``D`` vector-Jacobian products), ``slogdet(I + J_g)`` and
  the exact diagonal of the matrix logarithm (eigendecomposition). For small ``D``: tests and
  analysis.

Contributions are never taken from the Neumann or memory-efficient surrogates (whose values
are not log-dets): ``forward_with_diag`` always reports the series (or exact) values; in the
Neumann modes its ``diag`` carries no gradient.

The inverse solves ``x = y - g(x)`` by fixed-point iteration (a contraction), stopping when
every element's step satisfies ``|x_{t+1} - x_t| <= atol + rtol * |x_{t+1}|`` (not the
reference's squared-error test, whose real tolerance is about ``sqrt(tol)``). The remaining
error is at most ``Lip / (1 - Lip)`` times the last step (per sample, in the 2-norm). A
non-converged or non-finite iteration raises ``RuntimeError`` (or warns with
``on_nonconvergence="warn"``).

References:
    J. Behrmann, W. Grathwohl, R. T. Q. Chen, D. Duvenaud, J.-H. Jacobsen. Invertible Residual
    Networks. ICML 2019.
    R. T. Q. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows for Invertible
    Generative Modeling. NeurIPS 2019.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2.2.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from nflows.transforms.base import Transform
from torch import Tensor, nn

from lcma_ext.nets.lipschitz import (
    LipschitzConvNet,
    LipschitzMLP,
    frozen_lipschitz,
    updated_then_frozen_lipschitz,
)
from lcma_ext.transforms.base import DiagMixin

__all__ = [
    "DISTRIBUTIONS",
    "PROBES",
    "InvertibleResNetBlock",
    "ResidualFlowBlock",
    "low_variance_estimation",
]

#: Roulette distributions of :class:`ResidualFlowBlock`.
DISTRIBUTIONS = ("geometric", "poisson")
#: Probe distributions of the trace estimators.
PROBES = ("rademacher", "gaussian")
_ON_NONCONVERGENCE = ("raise", "warn")


@dataclass(frozen=True)
class _Plan:
    """One call's estimator: ``coefficients[k - 1] = c_k`` for ``k = 1 .. n``; probes."""

    coefficients: tuple[float, ...]
    n_probes: int
    probe: str


def _event_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(int(s) for s in shape)  # type: ignore[union-attr]
    except TypeError as error:
        raise ValueError(f"expected an int features or a tuple (C, H, W); got {shape!r}") from error
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"expected an int features or a tuple (C, H, W); got {shape!r}")
    return shape


def _check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"expected an int {name} >= {minimum}; got {value!r}")
    return value


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"expected {name} in {choices}; got {value!r}")
    return value


def _sum_except_batch(tensor: Tensor) -> Tensor:
    return tensor.flatten(1).sum(1)


def _draw_probes(inputs: Tensor, n_probes: int, probe: str) -> list[Tensor]:
    if probe == "gaussian":
        return [torch.randn_like(inputs) for _ in range(n_probes)]
    return [
        torch.randint(0, 2, inputs.shape, device=inputs.device).to(inputs.dtype) * 2 - 1
        for _ in range(n_probes)
    ]


VectorJacobian = Callable[[Tensor], Tensor]


def _autograd_vjp(g: Tensor, x: Tensor, create_graph: bool) -> VectorJacobian:
    """``w -> w^T J_g(x)`` by ``torch.autograd.grad`` on the graph of ``g = net(x)``."""

    def vjp(w: Tensor) -> Tensor:
        (product,) = torch.autograd.grad(g, x, w, create_graph=create_graph, retain_graph=True)
        return product

    return vjp


def _functional_vjp(net: nn.Module, x: Tensor) -> tuple[Tensor, VectorJacobian]:
    """``(net(x), w -> w^T J_net(x))`` by ``torch.func.vjp``, which ``torch.compile`` traces.

    The products are differentiable (in ``x`` and the parameters) whenever grad mode is on, as
    with ``create_graph=True``; ``torch.autograd.grad`` and ``requires_grad_`` would break the
    graph instead.
    """
    # torch types vjp's result as if has_aux (a third value) could be set
    g, pullback = torch.func.vjp(net, x)  # type: ignore[misc]
    return g, lambda w: pullback(w)[0]


def _series(
    vjp: VectorJacobian,
    x: Tensor,
    probes: list[Tensor],
    coefficients: Sequence[float],
    neumann: bool,
    per_dimension: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    """Series estimate of ``log(I + J_g)`` (averaged over probes) and Neumann vectors.

    Args:
        vjp: ``w -> w^T J_g(x)`` (:func:`_autograd_vjp` or :func:`_functional_vjp`).

    Returns:
        ``(estimate, neumann_vectors)``: ``estimate`` is the diagonal, shaped like ``x``, when
        ``per_dimension``, else its per-example sum ``(B,)`` accumulated term by term (no
        buffer of the input's size is kept across terms); for each probe, when ``neumann``,
        ``sum_{j<n} (-1)^j c_{j+1} v^T J_g^j`` (else an empty list).
    """
    estimate = torch.zeros_like(x) if per_dimension else x.new_zeros(x.shape[0])
    vectors = []
    for v in probes:
        w = v
        vector = torch.zeros_like(x) if neumann else None
        for k, c_k in enumerate(coefficients, start=1):
            if vector is not None:
                vector = vector + ((-1) ** (k + 1) * c_k) * w
            w = vjp(w)
            term = w * v if per_dimension else _sum_except_batch(w * v)
            estimate = estimate + ((-1) ** (k + 1) * c_k / k) * term
        if vector is not None:
            vectors.append(vector)
    return estimate / len(probes), vectors


def _batch_jacobian(g: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    """``(B, D, D)`` Jacobians of a per-example map, by ``D`` vector-Jacobian products."""
    batch, numel = x.shape[0], x[0].numel()
    rows = []
    flat_g = g.reshape(batch, numel)
    for index in range(numel):
        (row,) = torch.autograd.grad(
            flat_g[:, index].sum(), x, create_graph=create_graph, retain_graph=True
        )
        rows.append(row.reshape(batch, numel))
    return torch.stack(rows, dim=1)


def _exact_log_diagonal(matrix: Tensor) -> Tensor:
    """Diagonal of the principal matrix logarithm of a batch of real matrices, ``(B, D)``.

    By eigendecomposition ``M = V diag(l) V^-1``: ``log(M)_ii = sum_j V_ij log(l_j) (V^-1)_ji``.
    """
    eigenvalues, vectors = torch.linalg.eig(matrix)
    inverse = torch.linalg.inv(vectors)
    diagonal = torch.einsum("bij,bj,bji->bi", vectors, torch.log(eigenvalues), inverse)
    return diagonal.real


class _MemoryEfficientNeumann(torch.autograd.Function):
    """``(g, logdet)`` whose logdet gradient is the Neumann surrogate, differentiated in backward.

    Forward: ``g = net(x)`` (its graph kept) and the power series without a graph. Backward:
    one weighted vector-Jacobian product ``sum_b w_b n_b^T J_g(x_b) v_b`` with the incoming
    per-sample weights ``w_b``, differentiated with respect to ``x`` and the parameters.
    """

    @staticmethod
    def forward(
        ctx: Any, block: _ResidualBlock, x: Tensor, plan: _Plan, *params: Tensor
    ) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(True)
            g = block.net(x_leaf)
            probes = _draw_probes(x_leaf, plan.n_probes, plan.probe)
            logdet, vectors = _series(
                _autograd_vjp(g, x_leaf, create_graph=False),
                x_leaf,
                probes,
                plan.coefficients,
                True,
                per_dimension=False,
            )
        ctx.g, ctx.x_leaf, ctx.params = g, x_leaf, params
        ctx.probes, ctx.vectors = probes, vectors
        return g.detach(), logdet.detach()

    @staticmethod
    def backward(ctx: Any, grad_g: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:
        g, x_leaf, params = ctx.g, ctx.x_leaf, ctx.params
        weights = grad_logdet.view(-1, *([1] * (x_leaf.dim() - 1))) / len(ctx.probes)
        with torch.enable_grad():
            surrogate = (g * grad_g).sum()
            for v, vector in zip(ctx.probes, ctx.vectors):
                (vjp,) = torch.autograd.grad(g, x_leaf, vector * weights, create_graph=True)
                surrogate = surrogate + (vjp * v).sum()
            grads = torch.autograd.grad(surrogate, (x_leaf, *params), allow_unused=True)
        ctx.g = ctx.x_leaf = ctx.params = ctx.probes = ctx.vectors = None
        return (None, grads[0], None, *grads[1:])


@torch.compiler.disable  # type: ignore[untyped-decorator]  # torch leaves it unannotated
def _autograd_logdet_eagerly(
    block: _ResidualBlock, x: Tensor, want_diag: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``block._autograd_logdet`` run eagerly from inside a compiled model."""
    return block._autograd_logdet(x, want_diag)


class _ResidualBlock(DiagMixin, Transform):
    """Shared machinery of the two blocks; see the module docstring."""

    _activation = "lipswish"
    _random_plan = False  # True: the plan draws its number of terms on every call

    def __init__(
        self,
        shape: int | Sequence[int],
        hidden_channels: int = 32,
        *,
        net: nn.Module | None = None,
        num_layers: int = 3,
        kernel_sizes: Sequence[int] = (3, 1, 3),
        activation: str | None = None,
        coeff: float = 0.97,
        n_power_iterations: int = 1,
        exact: bool = False,
        n_probes: int = 1,
        probe: str = "rademacher",
        eval_n_probes: int = 1,
        atol: float = 1e-6,
        rtol: float = 1e-6,
        max_iter: int = 200,
        on_nonconvergence: str = "raise",
    ) -> None:
        super().__init__()
        self.event_shape = _event_shape(shape)
        _check_positive_int(hidden_channels, "hidden_channels")
        activation = activation or self._activation
        if net is None:
            if len(self.event_shape) == 1:
                net = LipschitzMLP(
                    self.event_shape[0],
                    hidden_channels,
                    num_layers,
                    activation,
                    coeff,
                    n_power_iterations,
                )
            else:
                net = LipschitzConvNet(
                    self.event_shape,
                    hidden_channels,
                    kernel_sizes,
                    activation,
                    coeff,
                    n_power_iterations,
                )
        self.net = net
        self.exact = bool(exact)
        self.n_probes = _check_positive_int(n_probes, "n_probes")
        self.probe = _check_choice(probe, PROBES, "probe")
        self.eval_n_probes = _check_positive_int(eval_n_probes, "eval_n_probes")
        if not (atol >= 0 and rtol >= 0 and atol + rtol > 0):
            raise ValueError(
                f"expected atol >= 0 and rtol >= 0, not both 0; got atol={atol}, rtol={rtol}"
            )
        self.atol, self.rtol = float(atol), float(rtol)
        self.max_iter = _check_positive_int(max_iter, "max_iter")
        self.on_nonconvergence = _check_choice(
            on_nonconvergence, _ON_NONCONVERGENCE, "on_nonconvergence"
        )
        self.low_variance: tuple[int, int] | None = None  # (n_terms, n_probes) when set

    # --- estimator plans ------------------------------------------------------------------------

    def _train_plan(self) -> _Plan:
        raise NotImplementedError

    def _eval_plan(self) -> _Plan:
        raise NotImplementedError

    def _plan(self) -> _Plan:
        if self.low_variance is not None:
            n_terms, n_probes = self.low_variance
            return _Plan((1.0,) * n_terms, n_probes, "rademacher")
        return self._train_plan() if self.training else self._eval_plan()

    def _uses_neumann(self) -> bool:
        return False

    def _uses_memory_efficient(self) -> bool:
        return False

    # --- forward ----------------------------------------------------------------------------------

    def _check_inputs(self, inputs: Tensor, context: Tensor | None) -> None:
        if context is not None:
            raise ValueError(f"{type(self).__name__}: expected context=None; got a tensor")
        if inputs.dim() != len(self.event_shape) + 1 or tuple(inputs.shape[1:]) != self.event_shape:
            shape = ", ".join(map(str, self.event_shape))
            raise ValueError(
                f"{type(self).__name__}: expected inputs of shape (B, {shape}); "
                f"got {tuple(inputs.shape)}"
            )

    def _differentiable(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.net.parameters())
        )

    def _neumann(self, differentiable: bool) -> bool:
        return differentiable and self._uses_neumann() and self.low_variance is None

    def _logdet(self, x: Tensor, want_diag: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(g(x), logdet, diag or None)`` for the current mode.

        ``want_diag`` never goes through the memory-efficient function: same probes and
        coefficients (same random draws), series values, plain Neumann gradient.

        Under ``torch.compile`` a fixed series (i-ResNet; a Residual Flow with
        ``low_variance`` set) without the Neumann gradient is traced whole through
        ``torch.func.vjp``. The rest runs eagerly inside the compiled model: the roulette draws
        the number of terms on every call (a loop length the compiler would recompile for), and
        the Neumann gradient and the exact Jacobian differentiate ``torch.autograd.grad``
        products again in the backward pass, which compiled graphs do not support.
        """
        if not torch.compiler.is_compiling():
            return self._autograd_logdet(x, want_diag)
        fixed_plan = self.low_variance is not None or not self._random_plan
        if self.exact or not fixed_plan or self._neumann(self._differentiable(x)):
            return _autograd_logdet_eagerly(self, x, want_diag)
        return self._functional_logdet(x, want_diag)

    def _functional_logdet(
        self, x: Tensor, want_diag: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The series of :meth:`_autograd_logdet` through ``torch.func.vjp`` (no Neumann)."""
        plan = self._plan()
        with updated_then_frozen_lipschitz(self.net):  # the transformed call must not mutate
            g, vjp = _functional_vjp(self.net, x)
        probes = _draw_probes(x, plan.n_probes, plan.probe)
        estimate, _ = _series(vjp, x, probes, plan.coefficients, False, want_diag)
        logdet = _sum_except_batch(estimate) if want_diag else estimate
        return g, logdet, estimate if want_diag else None

    def _autograd_logdet(self, x: Tensor, want_diag: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`_logdet` by ``torch.autograd.grad`` (eager)."""
        differentiable = self._differentiable(x)
        if self.exact:
            return self._exact(x, want_diag, differentiable)
        plan = self._plan()
        neumann = self._neumann(differentiable)
        if neumann and self._uses_memory_efficient() and not want_diag:
            params = [p for p in self.net.parameters() if p.requires_grad]
            # torch leaves Function.apply unannotated
            g, logdet = _MemoryEfficientNeumann.apply(self, x, plan, *params)  # type: ignore[no-untyped-call]
            return g, logdet, None
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            g = self.net(x_in)
            probes = _draw_probes(x_in, plan.n_probes, plan.probe)
            create_graph = differentiable and not neumann
            estimate, vectors = _series(
                _autograd_vjp(g, x_in, create_graph),
                x_in,
                probes,
                plan.coefficients,
                neumann,
                want_diag,
            )
            diag = estimate if want_diag else None
            logdet = _sum_except_batch(estimate) if want_diag else estimate
            if neumann:
                diag = diag.detach() if diag is not None else None
                surrogate = x.new_zeros(x.shape[0])
                for v, vector in zip(probes, vectors):
                    (vjp,) = torch.autograd.grad(g, x_in, vector, create_graph=True)
                    surrogate = surrogate + _sum_except_batch(vjp * v)
                surrogate = surrogate / len(probes)
                logdet = logdet.detach() + (surrogate - surrogate.detach())
        if not differentiable:
            g, logdet = g.detach(), logdet.detach()
            diag = diag.detach() if diag is not None else None
        return g, logdet, diag

    def _exact(
        self, x: Tensor, want_diag: bool, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_(True)
            g = self.net(x_in)
            jacobian = _batch_jacobian(g, x_in, create_graph=differentiable)
            matrix = jacobian + torch.eye(jacobian.shape[-1], dtype=x.dtype, device=x.device)
            logdet = torch.linalg.slogdet(matrix).logabsdet
            diag = _exact_log_diagonal(matrix).view_as(x) if want_diag else None
        if not differentiable:
            g, logdet = g.detach(), logdet.detach()
            diag = diag.detach() if diag is not None else None
        return g, logdet, diag

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to noise: ``(x + g(x), log|det J|)``; ``logabsdet`` has shape ``(B,)``."""
        self._check_inputs(inputs, context)
        g, logdet, _ = self._logdet(inputs, want_diag=False)
        return inputs + g, logdet

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        self._check_inputs(inputs, context)
        g, logdet, own = self._logdet(inputs, want_diag=True)
        return inputs + g, logdet, diag + cast(Tensor, own)  # want_diag: never None

    # --- inverse ----------------------------------------------------------------------------------

    def _fixed_point(self, y: Tensor) -> Tensor:
        name = type(self).__name__
        with torch.no_grad(), frozen_lipschitz(self.net):
            x = y - self.net(y)
            step = None
            for _ in range(self.max_iter):
                x_new = y - self.net(x)
                if not torch.isfinite(x_new).all():
                    raise RuntimeError(
                        f"{name}.inverse: expected a finite fixed-point iteration; got NaN or "
                        "inf (is Lip(g) < 1?)"
                    )
                step = (x_new - x).abs()
                x = x_new
                if bool((step <= self.atol + self.rtol * x.abs()).all()):
                    return x
        message = (
            f"{name}.inverse: expected the fixed-point iteration to converge within "
            f"max_iter={self.max_iter} iterations (atol={self.atol}, rtol={self.rtol}); got a "
            f"last max |step| of {float(step.max()) if step is not None else float('nan'):.3g}. "
            "Raise max_iter, loosen atol/rtol, or pass on_nonconvergence='warn'."
        )
        if self.on_nonconvergence == "warn":
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return x
        raise RuntimeError(message)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise to data by fixed-point iteration; ``logabsdet = -log|det J_F(x)|``.

        The iteration is not differentiated (the result is detached from ``inputs``); the
        log-det is estimated at the solution with the current mode's estimator.
        """
        self._check_inputs(inputs, context)
        x = self._fixed_point(inputs)
        with frozen_lipschitz(self.net):
            _, logdet, _ = self._logdet(x, want_diag=False)
        return x, -logdet


class InvertibleResNetBlock(_ResidualBlock):
    """i-ResNet block ``F(x) = x + g(x)`` (data to noise), ``g`` with ELU activations.

    Log-det: the power series truncated after ``n_terms`` terms (``eval_n_terms`` in eval
    mode) with ``n_probes`` Hutchinson probes; gradients by backpropagation through it.

    Args:
        shape: ``features`` (int: vector data, Lipschitz MLP) or ``(C, H, W)`` (images,
            Lipschitz conv net with kernels 3-1-3).
        hidden_channels: Hidden width of ``g``.
        net: A custom ``g`` (must be ``Lip < 1`` and per-example); replaces the default net.
        num_layers: Linear layers of the MLP.
        kernel_sizes: Kernels of the conv net.
        activation: ``"elu"`` (default) or ``"lipswish"``.
        coeff: Spectral-norm target per layer (``Lip(g) <= coeff ** layers``).
        n_power_iterations: Power iterations per training-mode forward of each layer.
        exact: Full Jacobian + ``slogdet`` and the exact matrix-log diagonal (small ``D``).
        n_terms: Series terms in training mode.
        eval_n_terms: Series terms in eval mode.
        n_probes, probe: Probes per call in training mode, ``"rademacher"`` or ``"gaussian"``.
        eval_n_probes: Probes per call in eval mode.
        atol, rtol, max_iter: Fixed-point inverse tolerance (elementwise) and iteration cap.
        on_nonconvergence: ``"raise"`` (default) or ``"warn"``.

    Shapes:
        inputs: ``(B, *shape)``; outputs: same; logabsdet: ``(B,)``.

    References:
        J. Behrmann et al. Invertible Residual Networks. ICML 2019.
    """

    _activation = "elu"

    def __init__(
        self,
        shape: int | Sequence[int],
        hidden_channels: int = 32,
        *,
        n_terms: int = 5,
        eval_n_terms: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(shape, hidden_channels, **kwargs)
        self.n_terms = _check_positive_int(n_terms, "n_terms")
        self.eval_n_terms = _check_positive_int(eval_n_terms, "eval_n_terms")

    def _train_plan(self) -> _Plan:
        return _Plan((1.0,) * self.n_terms, self.n_probes, self.probe)

    def _eval_plan(self) -> _Plan:
        return _Plan((1.0,) * self.eval_n_terms, self.eval_n_probes, self.probe)


def _survival(dist: str, parameter: float) -> Callable[[int], float]:
    """``m -> P(N >= m)`` of the roulette distribution."""
    if dist == "geometric":
        return lambda m: (1.0 - parameter) ** max(m, 0)
    lam = torch.tensor(parameter, dtype=torch.float64)
    return lambda m: 1.0 if m <= 0 else float(torch.special.gammainc(torch.tensor(float(m)), lam))


class ResidualFlowBlock(_ResidualBlock):
    """Residual Flow block ``F(x) = x + g(x)`` (data to noise), ``g`` with LipSwish activations.

    Log-det: the unbiased Russian-roulette power series (see the module docstring); gradients
    by the Neumann series, optionally memory-efficient.

    Args:
        shape: ``features`` (int) or ``(C, H, W)``; see :class:`InvertibleResNetBlock`.
        hidden_channels, net, num_layers, kernel_sizes, coeff, n_power_iterations, exact,
            n_probes, probe, eval_n_probes, atol, rtol, max_iter, on_nonconvergence:
            As in :class:`InvertibleResNetBlock`; ``activation`` defaults to ``"lipswish"``.
        n_exact_terms: Terms always computed in training mode (2).
        eval_n_exact_terms: Terms always computed in eval mode (20).
        dist: ``"geometric"`` (default) or ``"poisson"``: distribution of the extra terms ``N``.
        geom_p: Success probability of the geometric, ``P(N >= m) = (1 - geom_p)^m``.
        poisson_lambda: Mean of the Poisson.
        neumann_grad: Gradients by the Neumann series (else backpropagation through the series).
        memory_efficient: With ``neumann_grad``, run the series without a graph in the forward
            pass and differentiate only the weighted Neumann product in the backward pass.

    Shapes:
        inputs: ``(B, *shape)``; outputs: same; logabsdet: ``(B,)``.

    References:
        R. T. Q. Chen et al. Residual Flows for Invertible Generative Modeling. NeurIPS 2019.
    """

    _activation = "lipswish"
    _random_plan = True

    def __init__(
        self,
        shape: int | Sequence[int],
        hidden_channels: int = 32,
        *,
        n_exact_terms: int = 2,
        eval_n_exact_terms: int = 20,
        dist: str = "geometric",
        geom_p: float = 0.5,
        poisson_lambda: float = 2.0,
        neumann_grad: bool = True,
        memory_efficient: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(shape, hidden_channels, **kwargs)
        self.n_exact_terms = _check_positive_int(n_exact_terms, "n_exact_terms", 0)
        self.eval_n_exact_terms = _check_positive_int(eval_n_exact_terms, "eval_n_exact_terms", 0)
        self.dist = _check_choice(dist, DISTRIBUTIONS, "dist")
        if not 0.0 < geom_p < 1.0:
            raise ValueError(f"expected 0 < geom_p < 1; got {geom_p!r}")
        if not poisson_lambda > 0.0:
            raise ValueError(f"expected poisson_lambda > 0; got {poisson_lambda!r}")
        self.geom_p, self.poisson_lambda = float(geom_p), float(poisson_lambda)
        self.neumann_grad = bool(neumann_grad)
        self.memory_efficient = bool(memory_efficient)

    def _draw_extra_terms(self) -> int:
        if self.dist == "geometric":
            return int(torch.empty((), dtype=torch.float64).geometric_(self.geom_p)) - 1
        return int(torch.poisson(torch.tensor(self.poisson_lambda, dtype=torch.float64)))

    def roulette_coefficients(self, n_exact_terms: int, extra_terms: int) -> tuple[float, ...]:
        """``c_k`` for ``k = 1 .. n_exact_terms + extra_terms``: ``1 / P(N >= k - n_exact)``."""
        parameter = self.geom_p if self.dist == "geometric" else self.poisson_lambda
        survival = _survival(self.dist, parameter)
        total = n_exact_terms + extra_terms
        return tuple(1.0 / survival(k - n_exact_terms) for k in range(1, total + 1))

    def _roulette_plan(self, n_exact_terms: int, n_probes: int) -> _Plan:
        coefficients = self.roulette_coefficients(n_exact_terms, self._draw_extra_terms())
        return _Plan(coefficients, n_probes, self.probe)

    def _train_plan(self) -> _Plan:
        return self._roulette_plan(self.n_exact_terms, self.n_probes)

    def _eval_plan(self) -> _Plan:
        return self._roulette_plan(self.eval_n_exact_terms, self.eval_n_probes)

    def _uses_neumann(self) -> bool:
        return self.neumann_grad

    def _uses_memory_efficient(self) -> bool:
        return self.memory_efficient


_BLOCKS = (InvertibleResNetBlock, ResidualFlowBlock)


@contextmanager
def low_variance_estimation(
    module: nn.Module, n_terms: int = 20, n_probes: int = 8
) -> Iterator[None]:
    """Within the block, every residual block in ``module`` uses a fixed, low-variance estimator.

    A fixed number of series terms (``c_k = 1``, no roulette) and ``n_probes`` Rademacher
    probes, for ``forward`` and ``forward_with_diag`` alike, in any mode. Meant for LCMA
    statistics::

        with low_variance_estimation(nms_flow, n_terms=20, n_probes=8):
            maps = estimate_contributions(nms_flow, data, factory)

    The truncation bias of the log-det is at most ``sum_{k>n} Lip^k / k * D``; its variance
    falls as ``1 / n_probes``. Blocks with ``exact=True`` stay exact.
    """
    _check_positive_int(n_terms, "n_terms")
    _check_positive_int(n_probes, "n_probes")
    blocks = [m for m in module.modules() if isinstance(m, _BLOCKS)]
    previous = [block.low_variance for block in blocks]
    for block in blocks:
        block.low_variance = (n_terms, n_probes)
    try:
        yield
    finally:
        for block, setting in zip(blocks, previous):
            block.low_variance = setting
