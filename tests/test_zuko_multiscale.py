"""The zuko multi-scale flow: exact change of variables against brute force, every split kind.

``log p(x | c)`` of :class:`lcma_ext.zuko.MultiscaleFlow` is compared in float64 with the
autograd Jacobian of the whole data-to-noise map (``flow(c).transform``) plus the standard normal
base density, at 1e-9, for every split kind (vector data: the five site-level kinds; images:
those and the granular kinds), with and without a context, with Glow's conditional prior.
zuko's own flow and transform tests (tests/test_flows.py::test_flows and
tests/test_transforms.py::test_multivariate_transforms of zuko 1.6) are ported onto the
subclasses. Skipped when zuko is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from zuko.lazy import LazyTransform

zuko = pytest.importorskip("zuko")

from zuko.flows import GeneralCouplingTransform, MaskedAutoregressiveTransform  # noqa: E402

from lcma_ext import ContributionMultiscaleFlow  # noqa: E402
from lcma_ext import transforms as T  # noqa: E402
from lcma_ext.splits import GRANULAR_SPLIT_NAMES, SPLIT_NAMES  # noqa: E402
from lcma_ext.zuko import (  # noqa: E402
    MultiscaleFlow,
    MultiscaleTransform,
    NflowsBijection,
    ZukoLevel,
    build_multiscale_flow,
    build_nms_flow,
    call_and_ladj_with_diag,
    image_level_factory,
)

from brute_force import jacobian, slogdet  # noqa: E402

SPLINE = {"univariate": zuko.transforms.MonotonicRQSTransform, "shapes": [(8,), (8,), (7,)]}


def _vector_level(context: int) -> Callable[[int, tuple[int, ...]], Any]:
    """Three kinds of zuko levels: NSF (autoregressive splines), spline couplings, MAF."""

    def level(index: int, shape: tuple[int, ...]) -> Any:
        features = shape[0]
        if index == 0:
            return zuko.flows.NSF(features, context, transforms=2, hidden_features=(8,)).transform
        if index == 1:
            return [
                GeneralCouplingTransform(features, context, hidden_features=(8,), **SPLINE),
                zuko.lazy.UnconditionalTransform(
                    zuko.transforms.PermutationTransform,
                    torch.arange(features).flip(0),
                    buffer=True,
                ),
            ]
        return MaskedAutoregressiveTransform(features, context, hidden_features=(8,))

    return level


def _maps(shapes: list[tuple[int, ...]], seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _perturb(flow: torch.nn.Module, scale: float = 0.05) -> None:
    """Initialize ActNorm on data, then move every parameter (zero-initialized priors too)."""
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    flow.eval()


def _vector_flow(split: str, context: int, prior: str) -> MultiscaleFlow:
    torch.manual_seed(0)
    maps = _maps([(8,), (4,)]) if split in ("lcma", "high") else None
    flow = build_multiscale_flow(_vector_level(context), (8,), 3, split, maps, prior=prior)
    flow = flow.double()
    _perturb(flow)
    return flow


def _image_flow(split: str, context: int) -> MultiscaleFlow:
    torch.manual_seed(0)
    level = image_level_factory(context=context, hidden=4, steps=1)
    maps = _maps([(4, 4, 4)]) if split not in ("channel", "checkerboard", "random") else None
    flow = build_multiscale_flow(
        level, (1, 8, 8), 2, split, maps, prior="conditional", region_size=2
    ).double()
    with torch.no_grad():  # ActNorm's data-dependent initialization, as in nflows
        c = torch.randn(8, context, dtype=torch.float64) if context else None
        flow(c).log_prob(torch.randn(8, 1, 8, 8, dtype=torch.float64))
    _perturb(flow)
    return flow


def _brute_force_log_prob(flow: MultiscaleFlow, x: torch.Tensor, c: torch.Tensor | None) -> float:
    """``log N(f(x); 0, I) + log|det df/dx|`` for one example, ``f = flow(c).transform``."""
    transform = flow(c).transform
    jac = jacobian(lambda batch: transform(batch), x)
    sign, logabsdet = slogdet(jac)
    assert sign != 0
    with torch.no_grad():
        z = transform(x)
    return float(torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()) + logabsdet


def _context(context: int, batch: int) -> torch.Tensor | None:
    return torch.randn(batch, context, dtype=torch.float64) if context else None


def _row(c: torch.Tensor | None, b: int) -> torch.Tensor | None:
    return None if c is None else c[b]


@pytest.mark.parametrize("prior", ["standard", "conditional"])
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("split", SPLIT_NAMES)
def test_vector_log_prob_matches_brute_force(split: str, context: int, prior: str) -> None:
    flow = _vector_flow(split, context, prior)
    x, c = torch.randn(2, 8, dtype=torch.float64), _context(context, 2)
    with torch.no_grad():
        log_prob = flow(c).log_prob(x)
    assert log_prob.shape == (2,)
    for b in range(2):
        expected = _brute_force_log_prob(flow, x[b], _row(c, b))
        np.testing.assert_allclose(float(log_prob[b]), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("context", [0, 2])
@pytest.mark.parametrize("split", SPLIT_NAMES + GRANULAR_SPLIT_NAMES)
def test_image_log_prob_matches_brute_force(split: str, context: int) -> None:
    flow = _image_flow(split, context)
    x, c = torch.randn(2, 1, 8, 8, dtype=torch.float64), _context(context, 2)
    with torch.no_grad():
        log_prob = flow(c).log_prob(x)
        single = flow(_row(c, 1)).log_prob(x[1])  # unbatched: zuko broadcasts
    np.testing.assert_allclose(float(single), float(log_prob[1]), rtol=0, atol=1e-12)
    expected = _brute_force_log_prob(flow, x[0], _row(c, 0))
    np.testing.assert_allclose(float(log_prob[0]), expected, rtol=0, atol=1e-9)


def test_granular_splits_differ_from_site_and_channel_splits() -> None:
    """On this 4x4 grid of local blocks, region_size 2 is neither site- nor channel-level."""
    indices = {}
    for split in ("lcma", "lcma-region", "lcma-channel"):
        indices[split] = _image_flow(split, 0).splits[0].index
    assert not torch.equal(indices["lcma"], indices["lcma-region"])
    assert not torch.equal(indices["lcma-region"], indices["lcma-channel"])


@pytest.mark.parametrize("kind", ["vector", "image"])
def test_sampling_inverts_exactly(kind: str) -> None:
    if kind == "vector":
        flow, shape, c = _vector_flow("lcma", 3, "conditional"), (8,), _context(3, 4)
    else:
        flow, shape, c = _image_flow("lcma-region", 2), (1, 8, 8), _context(2, 4)
    transform = flow(c).transform
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        z, ladj = transform.call_and_ladj(x)
        recovered, inverse_ladj = transform.inv.call_and_ladj(z)
        torch.testing.assert_close(recovered, x, rtol=0, atol=1e-9)
        torch.testing.assert_close(inverse_ladj, -ladj, rtol=0, atol=1e-9)
        samples = flow(c).sample((3,))
        assert samples.shape == (3, 4, *shape)
        torch.testing.assert_close(transform.inv(transform(samples)), samples, rtol=0, atol=1e-9)
    samples, log_prob = flow(c).rsample_and_log_prob((2,))
    torch.testing.assert_close(flow(c).log_prob(samples), log_prob, rtol=0, atol=1e-9)


def test_batch_shapes_broadcast_like_zuko() -> None:
    flow = _vector_flow("random", 3, "standard")
    x, c = torch.randn(5, 4, 8, dtype=torch.float64), _context(3, 4)
    with torch.no_grad():
        log_prob = flow(c).log_prob(x)
        for n in range(5):
            torch.testing.assert_close(flow(c).log_prob(x[n]), log_prob[n], rtol=0, atol=1e-12)
    assert log_prob.shape == (5, 4)


def test_per_dimension_map_of_the_whole_flow_sums_to_the_log_det() -> None:
    flow = _vector_flow("lcma", 3, "conditional")
    x, c = torch.randn(4, 8, dtype=torch.float64), _context(3, 4)
    with torch.no_grad():
        z, ladj, diag = call_and_ladj_with_diag(flow(c).transform, x)
        expected_z, expected_ladj = flow(c).transform.call_and_ladj(x)
        core = flow.transform.transform.forward_with_diag(x, c)
    assert torch.equal(z, expected_z) and torch.equal(diag, core[2])
    # the core's forward_with_diag adds a prior's log-det to the total apart from its level's,
    # forward adds their sum: equal up to the order of two float additions
    torch.testing.assert_close(ladj, expected_ladj, rtol=0, atol=1e-12)
    torch.testing.assert_close(diag.sum(-1), ladj, rtol=0, atol=1e-12)


def test_the_flow_is_the_core_multiscale_flow_of_the_zuko_modules() -> None:
    flow = _vector_flow("checkerboard", 0, "conditional")
    core = flow.transform.transform
    assert isinstance(core, ContributionMultiscaleFlow)
    assert all(isinstance(level, ZukoLevel) for level in flow.levels)
    assert len(flow.splits) == 2 and all(p is not None for p in flow.priors)
    trained = {id(p) for p in flow.parameters()}
    assert {id(p) for p in core.parameters()} <= trained


def test_state_dict_round_trip_and_split_kind_mismatch() -> None:
    flow = _vector_flow("lcma", 0, "standard")
    clone = _vector_flow("lcma", 0, "standard")
    with torch.no_grad():
        for parameter in clone.parameters():
            parameter.add_(1.0)
    clone.load_state_dict(flow.state_dict())
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(clone().log_prob(x), flow().log_prob(x))
    other = _vector_flow("random", 0, "standard")
    with pytest.raises(ValueError, match="expected the state of a RandomSplit"):
        other.load_state_dict(flow.state_dict())


def test_clear_errors() -> None:
    flow = _vector_flow("channel", 3, "standard")
    with pytest.raises(ValueError, match="expected inputs of event shape"):
        flow(_context(3, 2)).log_prob(torch.randn(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="broadcastable"):
        flow(_context(3, 3)).log_prob(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="MultiscaleTransform"):
        MultiscaleFlow(zuko.flows.MAF(3).transform)
    nflows_flow = ContributionMultiscaleFlow.from_levels([T.ActNorm(4), T.ActNorm(2)], (4,))
    with pytest.raises(TypeError, match="ZukoLevel"):
        MultiscaleTransform(nflows_flow, (4,))
    with pytest.raises(TypeError, match="inverse"):
        call_and_ladj_with_diag(flow(None).transform.inv, torch.randn(2, 8))


# --- zuko's own tests, ported onto the subclasses ------------------------------------------------


def _zuko_style_flows() -> dict[str, zuko.lazy.Flow]:
    """``F(3, 5)`` as zuko's test_flows builds its flows: 3 features, 5 context features."""

    def level(index: int, shape: tuple[int, ...]) -> LazyTransform:
        return zuko.flows.MAF(shape[0], 5, transforms=2).transform

    return {
        "multiscale": build_multiscale_flow(level, (3,), 2, "checkerboard", prior="conditional"),
        "multiscale_lcma": build_multiscale_flow(level, (3,), 2, "lcma", [torch.randn(3)]),
        "nms": build_nms_flow(level, (3,), 2),
    }


@pytest.mark.parametrize("name", ["multiscale", "multiscale_lcma", "nms"])
def test_zuko_test_flows_assertions(tmp_path: Path, name: str) -> None:
    """zuko 1.6 tests/test_flows.py::test_flows, on our Flow subclasses (float32 as there)."""
    torch.manual_seed(0)
    flow = _zuko_style_flows()[name]
    randn = torch.randn

    # Evaluation of log_prob
    x, c = randn(256, 3), randn(5)
    log_p = flow(c).log_prob(x)
    assert log_p.shape == (256,)
    assert log_p.requires_grad
    flow.zero_grad(set_to_none=True)
    loss = -log_p.mean()
    loss.backward()
    for parameter_name, p in flow.named_parameters():
        assert p.grad is not None, parameter_name

    # eval
    flow.eval()
    with torch.no_grad():
        log_p_eval = flow(c).log_prob(x)
        assert torch.allclose(log_p, log_p_eval)
    flow.train()

    # Sampling
    x = flow(c).sample((32,))
    assert x.shape == (32, 3)

    # Reparameterization trick
    if flow(c).has_rsample:
        x = flow(c).rsample()
        flow.zero_grad(set_to_none=True)
        loss = x.square().sum().sqrt()
        loss.backward()
        for parameter_name, p in flow.named_parameters():
            assert p.grad is not None, parameter_name

    # Invertibility
    x, c = randn(256, 3), randn(256, 5)
    t = flow(c).transform
    z = t.inv(t(x))
    assert torch.allclose(x, z, atol=1e-4)

    # Jacobian
    x, c = randn(3), randn(5)
    t = flow(c).transform
    y = t(x)
    J = torch.autograd.functional.jacobian(t, x)
    J_inv = torch.autograd.functional.jacobian(t.inv, y)
    assert torch.allclose(J, torch.linalg.inv(J_inv), atol=1e-3)
    ladj = torch.linalg.slogdet(J).logabsdet
    assert torch.allclose(t.log_abs_det_jacobian(x, y), ladj, atol=1e-3)

    # Saving
    torch.save(flow, tmp_path / "flow.pth")

    # Loading
    flow_bis = torch.load(tmp_path / "flow.pth", weights_only=False)
    x, c = randn(3), randn(5)
    with torch.random.fork_rng():
        log_p = flow(c).log_prob(x)
    with torch.random.fork_rng():
        log_p_bis = flow_bis(c).log_prob(x)
    assert torch.allclose(log_p, log_p_bis)

    # Printing
    assert repr(flow)


def test_zuko_test_multivariate_transforms_assertions() -> None:
    """zuko 1.6 tests/test_transforms.py::test_multivariate_transforms, on NflowsBijection (the
    multi-scale transform and an image level)."""
    torch.manual_seed(0)
    multiscale = _zuko_style_flows()["multiscale"]
    image = image_level_factory(context=0, hidden=4, steps=1)(0, (1, 4, 4))
    image(torch.randn(8, 1, 4, 4))  # ActNorm's initialization
    cases = [
        (multiscale(torch.randn(5)).transform, (3,)),
        (NflowsBijection(image, (1, 4, 4), (4, 2, 2)), (1, 4, 4)),
    ]
    for t, shape in cases:
        size = math.prod(shape)
        # Shapes
        x = torch.randn(256, *shape)
        y = t(x)
        assert y.shape[0] == 256 and y[0].numel() == size, t
        assert t.forward_shape(x.shape) == y.shape and t.inverse_shape(y.shape) == x.shape
        # Inverse
        z = t.inv(y)
        assert torch.allclose(x, z, atol=1e-4), t
        # Jacobian
        x = torch.randn(*shape)
        y = t(x)
        J = torch.autograd.functional.jacobian(t, x).reshape(size, size)
        ladj = torch.linalg.slogdet(J).logabsdet
        assert torch.allclose(t.log_abs_det_jacobian(x, y), ladj, atol=1e-4), t
        # Compound call
        y_comp, ladj_comp = t.call_and_ladj(x)
        assert torch.allclose(y_comp, y, atol=1e-4), t
        assert torch.allclose(ladj_comp, ladj, atol=1e-4), t
        # Inverse Jacobian
        z = t.inv(y)
        J = torch.autograd.functional.jacobian(t.inv, y).reshape(size, size)
        ladj = torch.linalg.slogdet(J).logabsdet
        assert torch.allclose(t.inv.log_abs_det_jacobian(y, z), ladj, atol=1e-4), t
        # Compound call
        z_comp, ladj_comp = t.inv.call_and_ladj(y)
        assert torch.allclose(z_comp, z, atol=1e-4), t
        assert torch.allclose(ladj_comp, ladj, atol=1e-4), t
