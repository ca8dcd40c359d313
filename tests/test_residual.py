"""i-ResNet and Residual Flow blocks: exact mode, estimators, gradients, inverse, contributions.

Everything in float64 with small D. Stochastic checks average many draws and use a tolerance of
4 standard errors computed from the draws themselves.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow

from lcma_ext import transforms as T
from lcma_ext.nets import (
    SpectralNormLinear,
    frozen_lipschitz,
    lipschitz_bound,
    spectral_layers,
    update_lipschitz,
)
from lcma_ext.transforms import residual as R

from brute_force import jacobian, level_logdets, logm_diagonal, slogdet

BLOCKS = [T.InvertibleResNetBlock, T.ResidualFlowBlock]
SHAPES = [(3,), (2, 2, 2)]
SE_FACTOR = 4.0


def _block(
    cls: type[R._ResidualBlock],
    shape: tuple[int, ...],
    seed: int = 0,
    coeff: float = 0.8,
    scale: float = 3.0,
    **kwargs,
) -> R._ResidualBlock:
    """A block whose layers sit at their spectral-norm target (non-trivial Jacobians)."""
    torch.manual_seed(seed)
    arg = shape[0] if len(shape) == 1 else shape
    extra = {"num_layers": 2} if len(shape) == 1 else {}
    block = cls(arg, hidden_channels=6, coeff=coeff, activation="elu", **extra, **kwargs)
    block = block.double()
    with torch.no_grad():
        for layer in spectral_layers(block):
            layer.weight.mul_(scale)
    update_lipschitz(block)
    return block


def _linear_block(cls: type[R._ResidualBlock] = T.ResidualFlowBlock, **kwargs) -> R._ResidualBlock:
    """A block with a linear ``g(x) = W x``: symmetric W with eigenvalues 0.7, -0.6, 0.5.

    Its large, constant Jacobian makes the estimator tests sensitive (a wrong roulette weight or
    Neumann coefficient moves the mean by many standard errors). ``geom_p=0.3`` keeps the
    roulette variance finite (``(1 - p) > rho(W)^2``).
    """
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    weight = q @ torch.diag(torch.tensor([0.7, -0.6, 0.5], dtype=torch.float64)) @ q.T
    net = SpectralNormLinear(3, 3).double()
    with torch.no_grad():
        net.weight.copy_(weight)
        net.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    if cls is T.ResidualFlowBlock:
        kwargs = {"geom_p": 0.3, "n_exact_terms": 1, **kwargs}
    return cls(3, net=net, **kwargs)


def _stochastic_block(kind: str, **kwargs) -> R._ResidualBlock:
    if kind == "linear":
        return _linear_block(**kwargs)
    return _block(T.ResidualFlowBlock, (3,), n_exact_terms=1, **kwargs)


def _inputs(shape: tuple[int, ...], batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(batch, *shape, generator=generator, dtype=torch.float64)


def _jacobian_g(block: R._ResidualBlock, example: torch.Tensor) -> torch.Tensor:
    """Brute-force Jacobian of g at one example, ``(D, D)``."""
    with frozen_lipschitz(block):
        return jacobian(block.net, example)


def _exact_reference(block: R._ResidualBlock, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per example: brute-force ``slogdet(I + J_g)`` and scipy's ``diag(logm(I + J_g))``."""
    logdets, diagonals = [], []
    for example in x:
        matrix = torch.eye(example.numel(), dtype=x.dtype) + _jacobian_g(block, example)
        sign, logdet = slogdet(matrix)
        assert sign > 0
        logdets.append(logdet)
        diagonals.append(logm_diagonal(matrix))
    return np.array(logdets), np.stack(diagonals).reshape(x.shape)


def _all_sign_vectors(dim: int) -> torch.Tensor:
    """All ``2^dim`` Rademacher vectors ``(2^dim, dim)``: their mean ``v v^T`` is exactly I."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=dim)), dtype=torch.float64)


def _within_standard_errors(
    draws: np.ndarray, expected: np.ndarray, atol: float = 0.0
) -> np.ndarray:
    """Assert the mean of ``draws`` (first axis) equals ``expected`` within 4 standard errors."""
    mean = draws.mean(0)
    se = draws.std(0, ddof=1) / math.sqrt(draws.shape[0])
    error = np.abs(mean - expected)
    assert np.all(error <= SE_FACTOR * se + atol), (
        f"max |mean - exact| / SE = {np.max(error / np.maximum(se, 1e-300)):.2f}"
    )
    return se


def _replicated_draws(
    block: R._ResidualBlock, x: torch.Tensor, calls: int, replicas: int, with_diag: bool = False
) -> np.ndarray:
    """Per call, the mean over ``replicas`` copies of each example (independent probes)."""
    batch = x.shape[0]
    big = x.repeat_interleave(replicas, 0)
    draws = []
    with torch.no_grad(), frozen_lipschitz(block):
        for _ in range(calls):
            if with_diag:
                _, _, diag = block.forward_with_diag(big)
                value = diag.view(batch, replicas, *x.shape[1:]).mean(1)
            else:
                _, logdet = block(big)
                value = logdet.view(batch, replicas).mean(1)
            draws.append(value.numpy())
    return np.stack(draws)


# --- exact mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_mode_equals_autograd_slogdet_and_logm_diagonal(
    cls: type[R._ResidualBlock], shape: tuple[int, ...]
) -> None:
    block = _block(cls, shape, exact=True)
    x = _inputs(shape)
    outputs, logdet, diag = block.forward_with_diag(x)
    expected_logdet, expected_diag = _exact_reference(block, x)
    assert abs(expected_logdet).min() > 1e-2  # a non-trivial Jacobian
    np.testing.assert_allclose(logdet.detach().numpy(), expected_logdet, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(diag.detach().numpy(), expected_diag, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(diag.flatten(1).sum(1), logdet, rtol=0, atol=1e-10)
    with frozen_lipschitz(block):
        torch.testing.assert_close(outputs, x + block.net(x))


# --- truncated series ---------------------------------------------------------------------------


def test_truncated_series_converges_to_exact_value() -> None:
    """With all 2^D Rademacher sign vectors, the probe average is exactly the truncated series."""
    block = _block(T.InvertibleResNetBlock, (3,), coeff=0.9)
    x = _inputs((3,), batch=1)
    lipschitz = lipschitz_bound(block.net)
    signs = [s.view(1, 3) for s in _all_sign_vectors(3)]
    expected_logdet, expected_diag = _exact_reference(block, x)
    errors = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        with torch.enable_grad():
            x_in = x.clone().requires_grad_(True)
            with frozen_lipschitz(block):
                g = block.net(x_in)
            diag, _ = R._series(R._autograd_vjp(g, x_in, False), x_in, signs, (1.0,) * n, False)
        error = abs(float(diag.sum()) - expected_logdet[0])
        bound = 3 * lipschitz ** (n + 1) / ((n + 1) * (1 - lipschitz))
        assert error <= bound + 1e-12
        errors.append(error)
    assert errors[-1] < 1e-8 < errors[0]
    np.testing.assert_allclose(diag.numpy(), expected_diag, atol=1e-8)


def test_iresnet_uses_n_terms_in_training_and_eval_n_terms_in_eval() -> None:
    block = _block(T.InvertibleResNetBlock, (3,), n_terms=3, eval_n_terms=7)
    assert block._plan().coefficients == (1.0,) * 3
    block.eval()
    assert block._plan().coefficients == (1.0,) * 7
    with R.low_variance_estimation(block, n_terms=11, n_probes=4):
        plan = block._plan()
        assert plan.coefficients == (1.0,) * 11 and plan.n_probes == 4
    assert block.low_variance is None


# --- Russian roulette ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(
    ("dist", "mode"), [("geometric", "train"), ("poisson", "train"), ("geometric", "eval")]
)
def test_roulette_mean_equals_exact_logdet(kind: str, dist: str, mode: str) -> None:
    block = _stochastic_block(kind, dist=dist)
    block.train(mode == "train")
    x = _inputs((3,))
    expected, _ = _exact_reference(block, x)
    draws = _replicated_draws(block, x, calls=400, replicas=16)
    _within_standard_errors(draws, expected)


def test_roulette_coefficients_are_inverse_survival_probabilities() -> None:
    block = T.ResidualFlowBlock(3, n_exact_terms=2, geom_p=0.25)
    assert block.roulette_coefficients(2, 3) == pytest.approx(
        (1, 1, 1 / 0.75, 1 / 0.75**2, 1 / 0.75**3)
    )
    poisson = T.ResidualFlowBlock(3, n_exact_terms=0, dist="poisson", poisson_lambda=2.0)
    survival = 1 - math.exp(-2.0) * (1 + 2.0)  # P(N >= 2)
    assert poisson.roulette_coefficients(0, 2) == pytest.approx(
        (1 / (1 - math.exp(-2.0)), 1 / survival)
    )


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("low_variance", [False, True])
def test_diag_mean_equals_exact_matrix_log_diagonal(kind: str, low_variance: bool) -> None:
    block = _stochastic_block(kind)
    x = _inputs((3,))
    _, expected = _exact_reference(block, x)
    if low_variance:  # fixed 40 terms, 4 probes: bias <= 3 * 0.7^41 / 41 / 0.3, far below the SE
        with R.low_variance_estimation(block, n_terms=40, n_probes=4):
            draws = _replicated_draws(block, x, calls=100, replicas=8, with_diag=True)
    else:
        draws = _replicated_draws(block, x, calls=300, replicas=16, with_diag=True)
    _within_standard_errors(draws, expected)


def test_low_variance_mode_has_lower_variance_than_training_roulette() -> None:
    block = _block(T.ResidualFlowBlock, (3,), n_exact_terms=1)
    x = _inputs((3,), batch=1)
    roulette = _replicated_draws(block, x, calls=60, replicas=1)
    with R.low_variance_estimation(block, n_terms=20, n_probes=8):
        fixed = _replicated_draws(block, x, calls=60, replicas=1)
    assert fixed.std() < roulette.std()


# --- gradients ----------------------------------------------------------------------------------


def _gradients(block: R._ResidualBlock, x: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    x = x.clone().requires_grad_(True)
    params = [p for p in block.parameters() if p.requires_grad]
    _, logdet = block(x)
    grads = torch.autograd.grad((weights * logdet).sum(), [x, *params], allow_unused=True)
    return np.concatenate(
        [
            (g if g is not None else torch.zeros_like(t)).reshape(-1).numpy()
            for g, t in zip(grads, [x, *params])
        ]
    )


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_neumann_gradient_matches_exact_gradient_in_expectation(
    kind: str, memory_efficient: bool
) -> None:
    block = _stochastic_block(kind, memory_efficient=memory_efficient)
    x = _inputs((3,))
    replicas = 64
    big = x.repeat_interleave(replicas, 0)
    weights = torch.full((big.shape[0],), 1.0 / replicas, dtype=torch.float64)
    with frozen_lipschitz(block):
        block.exact = True
        expected = _gradients(block, big, weights)
        block.exact = False
        draws = np.stack([_gradients(block, big, weights) for _ in range(200)])
    # Coordinates that the log-det does not depend on (the last bias) have exactly zero SE.
    _within_standard_errors(draws, expected, atol=1e-12)


def test_memory_efficient_backward_matches_plain_for_per_sample_weights() -> None:
    block = _block(T.ResidualFlowBlock, (2, 2, 2))
    x = _inputs((2, 2, 2), batch=4)
    weights = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64)
    mix = torch.randn_like(x)

    def grads(
        memory_efficient: bool, sample_weights: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        block.memory_efficient = memory_efficient
        torch.manual_seed(5)
        x_in = x.clone().requires_grad_(True)
        with frozen_lipschitz(block):
            z, logdet = block(x_in)
        loss = (sample_weights * logdet).sum() + (mix * z).sum()
        params = [x_in, *block.parameters()]
        return list(torch.autograd.grad(loss, params)), logdet.detach()

    plain, logdet_plain = grads(False, weights)
    efficient, logdet_efficient = grads(True, weights)
    torch.testing.assert_close(logdet_efficient, logdet_plain, rtol=0, atol=1e-13)
    for a, b in zip(efficient, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Scaling every sample by the first sample's weight (the reference's bug) gives other grads.
    buggy, _ = grads(False, weights[:1].expand_as(weights))
    assert any(not torch.allclose(a, b) for a, b in zip(buggy, plain))


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_neumann_gradient_equals_series_gradient_with_exhaustive_probes(
    memory_efficient: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: with all 2^D Rademacher probes (``mean v v^T = I`` exactly) and fixed
    coefficients, the Neumann surrogate's gradient is exactly the gradient of the series.

    Both equal ``sum_k (-1)^(k+1) c_k tr(J^(k-1) dJ)``, so any wrong Neumann coefficient or
    sign (even a 10 % error in one term) breaks the equality by far more than rounding.
    """
    block = _block(T.ResidualFlowBlock, (3,), coeff=0.9)
    x = _inputs((3,), batch=3)
    signs = _all_sign_vectors(3)
    plan = R._Plan((1.0, 1.0, 1.3, 2.1, 0.6), len(signs), "rademacher")
    monkeypatch.setattr(block, "_plan", lambda: plan)
    monkeypatch.setattr(
        R, "_draw_probes", lambda inputs, n, probe: [s.expand_as(inputs) for s in signs]
    )
    weights = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)

    def grads(neumann: bool) -> list[torch.Tensor]:
        block.neumann_grad, block.memory_efficient = neumann, memory_efficient
        x_in = x.clone().requires_grad_(True)
        with frozen_lipschitz(block):
            _, logdet = block(x_in)
        params = [x_in, *(p for p in block.parameters() if p.requires_grad)]
        found = torch.autograd.grad((weights * logdet).sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(found, params)]

    series = grads(neumann=False)
    neumann = grads(neumann=True)
    assert any(float(g.abs().max()) > 1e-3 for g in series)
    for a, b in zip(neumann, series):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("dist", "ours_exact"), [("geometric", 3), ("poisson", 2)])
def test_roulette_is_the_normflows_estimator(dist: str, ours_exact: int) -> None:
    """normflows' (and the reference code's) ``n_exact_terms=2``, term for term.

    Their geometric draw starts at 1, so it always adds at least one term: it is our
    estimator with ``n_exact_terms=3``. Their Poisson draw starts at 0, like ours.
    """
    from normflows.flows import residual as nf_residual

    p, lam = 0.3, 2.0
    block = T.ResidualFlowBlock(3, dist=dist, geom_p=p, poisson_lambda=lam)
    for draw in range(1, 7) if dist == "geometric" else range(0, 7):
        terms = 2 + draw  # normflows: n_power_series = draw + n_exact_terms
        if dist == "geometric":
            theirs = [1 / nf_residual.geometric_1mcdf(p, k, 2) for k in range(1, terms + 1)]
        else:
            theirs = [1 / nf_residual.poisson_1mcdf(lam, k, 2) for k in range(1, terms + 1)]
        ours = block.roulette_coefficients(ours_exact, terms - ours_exact)
        assert ours == pytest.approx(theirs, rel=1e-12)


def test_iresnet_backpropagates_through_the_truncated_series() -> None:
    block = _block(T.InvertibleResNetBlock, (3,), n_terms=4)
    x = _inputs((3,))
    torch.manual_seed(3)
    with frozen_lipschitz(block):
        _, logdet = block(x)
    grads = torch.autograd.grad(logdet.sum(), list(block.net.parameters()), allow_unused=True)
    # Reproduce the estimate by hand with the same probes and differentiate that.
    torch.manual_seed(3)
    x_in = x.clone().requires_grad_(True)
    with frozen_lipschitz(block):
        g = block.net(x_in)
    probes = R._draw_probes(x_in, 1, "rademacher")
    diag, _ = R._series(R._autograd_vjp(g, x_in, True), x_in, probes, (1.0,) * 4, False)
    expected = torch.autograd.grad(diag.sum(), list(block.net.parameters()), allow_unused=True)
    for a, b in zip(grads, expected):
        if b is None:
            assert a is None or torch.all(a == 0)
        else:
            torch.testing.assert_close(a, b)


# --- protocol -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["train", "eval", "low_variance", "exact"])
def test_forward_with_diag_matches_forward_and_sums_exactly(
    cls: type[R._ResidualBlock], shape: tuple[int, ...], mode: str
) -> None:
    block = _block(cls, shape, exact=mode == "exact")
    block.train(mode == "train")
    x = _inputs(shape)
    incoming = torch.randn_like(x)
    with (
        frozen_lipschitz(block),
        R.low_variance_estimation(block, 5, 3)
        if mode == "low_variance"
        else contextlib.nullcontext(),
    ):
        torch.manual_seed(7)
        outputs, logdet = block(x)
        torch.manual_seed(7)
        outputs_d, logdet_d, diag = block.forward_with_diag(x, diag=incoming)
    torch.testing.assert_close(outputs_d, outputs, rtol=0, atol=0)
    torch.testing.assert_close(logdet_d, logdet, rtol=0, atol=1e-13)
    own = diag - incoming
    torch.testing.assert_close(own.flatten(1).sum(1), logdet_d, rtol=0, atol=1e-12)
    assert torch.equal(block.carry(incoming), incoming)


@pytest.mark.parametrize("cls", BLOCKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_of_forward_within_tolerance(
    cls: type[R._ResidualBlock], shape: tuple[int, ...]
) -> None:
    block = _block(cls, shape, exact=True, atol=1e-11, rtol=0.0)
    block.eval()
    x = _inputs(shape, batch=3)
    z, logdet = block(x)
    recovered, inverse_logdet = block.inverse(z)
    lipschitz = lipschitz_bound(block.net)
    # Last elementwise step <= atol, so the error is <= Lip / (1 - Lip) * sqrt(D) * atol.
    bound = lipschitz / (1 - lipschitz) * math.sqrt(x[0].numel()) * 1e-11
    assert (recovered - x).abs().max() <= bound
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-8, atol=1e-8)


def test_nonconvergence_raises_or_warns_when_asked() -> None:
    block = _block(T.ResidualFlowBlock, (3,), atol=1e-15, rtol=0.0, max_iter=2)
    z = _inputs((3,))
    with pytest.raises(RuntimeError, match="expected the fixed-point iteration to converge"):
        block.inverse(z)
    block.on_nonconvergence = "warn"
    with pytest.warns(RuntimeWarning, match="expected the fixed-point iteration to converge"):
        block.inverse(z)


def test_non_contractive_net_raises_instead_of_returning_garbage() -> None:
    net = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        net.weight.copy_(3.0 * torch.eye(3, dtype=torch.float64))
    block = T.ResidualFlowBlock(3, net=net, max_iter=500)
    with pytest.raises(RuntimeError, match="expected"):
        block.inverse(_inputs((3,)))


@pytest.mark.parametrize("cls", BLOCKS)
def test_state_dict_round_trip_and_float32(cls: type[R._ResidualBlock]) -> None:
    block = _block(cls, (2, 2, 2), seed=0, exact=True)
    clone = _block(cls, (2, 2, 2), seed=1, exact=True)
    clone.load_state_dict(block.state_dict())
    x = _inputs((2, 2, 2))
    block.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), block(x), rtol=0, atol=0)
    result = block.float()(x.float())
    assert result[0].dtype == torch.float32 and result[1].shape == (2,)
    block.exact = False
    _, logdet, diag = block.forward_with_diag(x.float())
    assert diag.dtype == torch.float32 and torch.isfinite(logdet).all()


@pytest.mark.parametrize("cls", BLOCKS)
def test_default_constructors_and_bad_inputs(cls: type[R._ResidualBlock]) -> None:
    vector, image = cls(4), cls((2, 4, 4), hidden_channels=16)
    assert vector(torch.randn(3, 4))[1].shape == (3,)
    assert image(torch.randn(3, 2, 4, 4))[0].shape == (3, 2, 4, 4)
    with pytest.raises(ValueError, match=r"expected inputs of shape \(B, 4\)"):
        vector(torch.randn(3, 5))
    with pytest.raises(ValueError, match="expected diag shaped like inputs"):
        vector.forward_with_diag(torch.randn(3, 4), diag=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="expected context=None"):
        vector(torch.randn(3, 4), context=torch.randn(3, 1))
    with pytest.raises(ValueError, match="expected an int features or a tuple"):
        cls((2, 4))
    with pytest.raises(ValueError, match="expected a Lipschitz coefficient"):
        cls(4, coeff=1.0)
    with pytest.raises(ValueError, match="expected on_nonconvergence in"):
        cls(4, on_nonconvergence="ignore")
    with pytest.raises(ValueError, match="expected probe in"):
        cls(4, probe="uniform")


def test_residual_flow_rejects_bad_roulette_settings() -> None:
    with pytest.raises(ValueError, match="expected dist in"):
        T.ResidualFlowBlock(3, dist="binomial")
    with pytest.raises(ValueError, match="expected 0 < geom_p < 1"):
        T.ResidualFlowBlock(3, geom_p=1.0)


# --- composites, contributions, multi-scale use (issue part 6) --------------------------------


def test_composite_with_actnorm_matches_brute_force() -> None:
    torch.manual_seed(0)
    block = _block(T.ResidualFlowBlock, (2, 2, 2), exact=True)
    composite = T.CompositeTransform([T.ActNorm(2), block, T.SqueezeTransform()]).double()
    x = _inputs((2, 2, 2), batch=3)
    composite(x)  # ActNorm data initialization
    composite.eval()
    outputs, logdet, diag = composite.forward_with_diag(x)
    for b in range(3):
        jac = jacobian(lambda batch: composite(batch)[0], x[b])
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(diag.flatten(1).sum(1), logdet, rtol=0, atol=1e-10)
    assert outputs.shape == (3, 8, 1, 1)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    from lcma_ext.data import load_digits_dataset
    from lcma_ext.data.preprocess import LogitPreprocessing

    dataset = load_digits_dataset()
    preprocessing = LogitPreprocessing(dataset.levels)
    y, _ = preprocessing(dataset.train[:96], generator=torch.Generator().manual_seed(0))
    return y.float()


@pytest.mark.parametrize("model", ["resflow", "iresnet"])
def test_multiscale_residual_flow_trains_on_digits(model: str, digits: torch.Tensor) -> None:
    from lcma_ext.models import make_level_factory
    from lcma_ext.pipeline import build_multiscale_transform

    torch.manual_seed(0)
    factory = make_level_factory(model, "tiny", hidden=8, steps=1)
    transform = build_multiscale_transform(factory, (1, 8, 8), num_levels=2, split="channel")
    flow = Flow(transform, StandardNormal([64]))
    optimizer = torch.optim.Adam(flow.parameters(), lr=5e-3)
    losses = []
    for step in range(12):
        batch = digits[(step % 3) * 32 : (step % 3 + 1) * 32]
        loss = -flow.log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    flow.eval()
    with torch.no_grad():
        log_prob = flow.log_prob(digits[:16])
    assert log_prob.shape == (16,) and torch.isfinite(log_prob).all()


def test_estimate_contributions_on_residual_nms_flow(digits: torch.Tensor) -> None:
    from lcma_ext import estimate_contributions
    from lcma_ext.models import make_level_factory
    from lcma_ext.pipeline import build_multiscale_transform, build_nms_transform

    torch.manual_seed(0)
    factory = make_level_factory("resflow", "tiny", hidden=8, steps=1)
    nms = build_nms_transform(factory, (1, 8, 8), num_levels=2)
    nms(digits[:32])  # ActNorm data initialization
    with R.low_variance_estimation(nms, n_terms=10, n_probes=4):
        maps = estimate_contributions(nms, digits[:64], factory, progress=False)
    assert len(maps.data_maps) == 1
    assert maps.data_maps[0].shape == (1, 8, 8) and torch.isfinite(maps.data_maps[0]).all()
    # The stochastic (low-variance) maps feed a multi-scale flow; their sums are checked against
    # brute-force log-dets in exact mode below.
    transform = build_multiscale_transform(
        factory, (1, 8, 8), num_levels=2, split="lcma", contributions=maps
    )
    with torch.no_grad():
        z, logdet = transform(digits[:8])
    assert z.shape == (8, 64) and torch.isfinite(logdet).all()


@contextlib.contextmanager
def _outputs_only(module: torch.nn.Module) -> Iterator[None]:
    """Residual blocks compute only a 1-term, 1-probe log-det estimate (their outputs
    ``x + g(x)`` do not depend on the estimator): cheap to differentiate for a brute-force
    Jacobian, which then never sees the blocks' own exact log-det."""
    blocks = [m for m in module.modules() if isinstance(m, R._BLOCKS)]
    exact = [block.exact for block in blocks]
    for block in blocks:
        block.exact = False
    try:
        with R.low_variance_estimation(module, n_terms=1, n_probes=1):
            yield
    finally:
        for block, flag in zip(blocks, exact):
            block.exact = flag


@pytest.mark.parametrize("model", ["resflow", "iresnet"])
def test_exact_residual_contribution_maps_sum_to_brute_force_cumulative_logdets(
    model: str, digits: torch.Tensor
) -> None:
    """After NMS level ``l`` the data map sums to the example mean of ``sum_{k<=l} log|det J_k|``.

    Exact mode is deterministic, so the reference is the brute-force log-det of every level
    (autograd Jacobian of its outputs + slogdet per example, float64), accumulated over levels
    0..l.
    """
    from lcma_ext import estimate_contributions
    from lcma_ext.models import make_level_factory
    from lcma_ext.pipeline import build_nms_transform

    torch.manual_seed(0)
    factory = make_level_factory(model, "tiny", hidden=4, steps=1, exact=True)
    nms = build_nms_transform(factory, (1, 8, 8), num_levels=3).double()
    with torch.no_grad():  # layers at their spectral-norm target: non-trivial residual Jacobians
        for layer in spectral_layers(nms):
            layer.weight.mul_(3.0)
    update_lipschitz(nms, n_iterations=1)  # a scaled weight keeps its singular vectors
    data = digits[:6].double()
    with torch.no_grad():
        nms(digits[32:48].double())  # ActNorm data initialization (resflow levels)
    maps = estimate_contributions(nms, data, factory, progress=False, batch_size=4)
    assert nms.training  # the mode is restored
    assert maps.num_examples == 6 and len(maps.data_maps) == 2
    nms.eval()  # as estimate_contributions ran it: no spectral-norm updates
    with _outputs_only(nms):
        per_level = level_logdets(list(nms._transforms)[:2], data)  # (N, 2)
    cumulative = per_level.cumsum(1).mean(0)
    for index, data_map in enumerate(maps.data_maps):
        assert data_map.dtype == torch.float64 and data_map.shape == (1, 8, 8)
        np.testing.assert_allclose(float(data_map.sum()), cumulative[index], rtol=0, atol=1e-10)
    # Non-trivial: every level changes the volume, by different amounts per example (iresnet
    # levels are squeeze + residual block only, so there it is the blocks' log-det).
    assert np.abs(per_level).min() > 1e-3
    assert per_level.std(0).min() > 1e-3


# --- normflows wrapper --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["InvertibleResNetBlock", "ResidualFlowBlock"])
@pytest.mark.parametrize("shape", SHAPES)
def test_normflows_wrapper_matches_brute_force(name: str, shape: tuple[int, ...]) -> None:
    """Data to noise (normflows' ``inverse``): log-det by autograd + slogdet, per-dimension map
    by scipy's ``diag(logm(J))``, in exact mode; normflows' ``forward`` inverts it."""
    from lcma_ext import normflows as lnf

    torch.manual_seed(0)
    arg = shape[0] if len(shape) == 1 else shape
    extra = {"num_layers": 2} if len(shape) == 1 else {}
    flow = getattr(lnf, name)(
        arg,
        hidden_channels=6,
        exact=True,
        coeff=0.8,
        activation="elu",
        atol=1e-12,
        rtol=0.0,
        **extra,
    ).double()
    with torch.no_grad():
        for layer in spectral_layers(flow):
            layer.weight.mul_(3.0)
    update_lipschitz(flow)
    flow.eval()
    x = _inputs(shape, batch=3)
    incoming = torch.randn_like(x)
    z, logdet, diag = (t.detach() for t in flow.forward_with_diag(x, diag=incoming))
    z_nf, logdet_nf = flow.inverse(x)
    assert torch.equal(z, z_nf.detach()) and torch.equal(logdet, logdet_nf.detach())
    for b in range(3):
        jac = jacobian(lambda batch: flow.inverse(batch)[0], x[b])
        sign, expected = slogdet(jac)
        assert sign > 0 and abs(expected) > 1e-2
        np.testing.assert_allclose(float(logdet[b]), expected, rtol=0, atol=1e-10)
        np.testing.assert_allclose(
            (diag - incoming)[b].reshape(-1).numpy(), logm_diagonal(jac), rtol=0, atol=1e-10
        )
    assert torch.equal(flow.carry(incoming), incoming)
    recovered, logdet_back = flow(z)
    torch.testing.assert_close(recovered, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet_back.detach(), -logdet, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["InvertibleResNetBlock", "ResidualFlowBlock"])
def test_normflows_wrapper_log_prob_and_sampling(name: str) -> None:
    import normflows as nf

    from lcma_ext import normflows as lnf

    torch.manual_seed(0)
    flows = [getattr(lnf, name)((2, 2, 2), hidden_channels=6, exact=True) for _ in range(2)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian((2, 2, 2)), flows).double()
    model.eval()
    x = _inputs((2, 2, 2), batch=3)
    log_prob = model.log_prob(x)
    # Brute force: standard normal at z plus the summed data-to-noise log-dets.
    z, expected = x, torch.zeros(3, dtype=torch.float64)
    for flow in reversed(flows):  # normflows' data-to-noise order
        z, log_det = flow.block(z)
        expected = expected + log_det
    expected = expected + model.q0.log_prob(z)
    torch.testing.assert_close(log_prob, expected)
    _, _, diag = flows[0].forward_with_diag(x)
    torch.testing.assert_close(diag.flatten(1).sum(1), flows[0].inverse(x)[1])
    with torch.no_grad():
        samples, log_q = model.sample(4)
    torch.testing.assert_close(model.log_prob(samples), log_q, rtol=1e-6, atol=1e-6)


def test_bpd_kind_labels_residual_estimates() -> None:
    from nflows.transforms import CompositeTransform

    from lcma_ext.distributions import bpd_kind

    def flow(*blocks) -> Flow:
        return Flow(CompositeTransform(list(blocks)), StandardNormal([3]))

    resflow, iresnet = T.ResidualFlowBlock(3), T.InvertibleResNetBlock(3)
    assert bpd_kind(flow(T.ResidualFlowBlock(3, exact=True))) == "exact"
    assert bpd_kind(flow(resflow)) == "roulette estimate"
    assert bpd_kind(flow(resflow, iresnet)) == "truncated series"


def test_normflows_wrappers_inside_data_to_noise_with_diag() -> None:
    from lcma_ext import normflows as lnf

    torch.manual_seed(0)
    flows = [
        lnf.ActNorm((2, 2, 2)),
        lnf.ResidualFlowBlock((2, 2, 2), hidden_channels=6, exact=True),
        lnf.InvertibleResNetBlock((2, 2, 2), hidden_channels=6, exact=True),
    ]
    x = _inputs((2, 2, 2), batch=3)
    for flow in flows:
        flow.double().eval()  # eval: no spectral-norm update between the two passes
    lnf.data_to_noise_with_diag(flows, x)  # data-initializes ActNorm
    z, log_det, diag = lnf.data_to_noise_with_diag(flows, x)
    expected_z, expected = x, torch.zeros(3, dtype=torch.float64)
    for flow in reversed(flows):
        expected_z, step = flow.inverse(expected_z)
        expected = expected + step
    torch.testing.assert_close(z, expected_z)
    torch.testing.assert_close(log_det, expected)
    torch.testing.assert_close(diag.flatten(1).sum(1), log_det)
