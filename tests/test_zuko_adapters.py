"""Brute-force checks of the zuko adapters (lcma_ext.zuko), fed by one registry.

Every entry is a zuko lazy transform whose torch transform ``f(x | c)`` (data to noise, as
zuko) is compared in float64 against ``torch.autograd.functional.jacobian`` and
``torch.linalg.slogdet`` (``tests/brute_force.py``): the per-dimension map sums to ``log|det J|``
per example, and for elementwise and triangular maps equals ``log|J_ii|`` (columns ordered by
``carry``) at 1e-10; rotations and LU linear maps are checked against numpy's SVD of the
Jacobian and the pivots of its leading minors. ``LEVELS`` holds :class:`lcma_ext.zuko.ZukoLevel`
entries, checked like the nflows registry of ``tests/test_transforms.py``.

:func:`test_every_zuko_transform_has_an_entry_or_raises` walks ``zuko.transforms`` (and the torch
transforms it re-exports that lcma-ext supports): every supported class has an entry here, and
every other one raises a ``TypeError`` naming its class. ``test_transforms.py``'s completeness
test reads :func:`registered_classes`. The module is skipped when zuko is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch

zuko = pytest.importorskip("zuko")

import zuko.transforms as zt  # noqa: E402
from torch.distributions import transforms as td  # noqa: E402
from zuko.flows import (  # noqa: E402
    ElementWiseTransform,
    GeneralCouplingTransform,
    MaskedAutoregressiveTransform,
)
from zuko.flows.spline import CircularRQSTransform  # noqa: E402
from zuko.lazy import LazyComposedTransform, LazyInverse, UnconditionalTransform  # noqa: E402

from lcma_ext.models import make_level_factory  # noqa: E402
from lcma_ext.zuko import (  # noqa: E402
    NflowsTransform,
    ZukoLevel,
    build_multiscale_flow,
    call_and_ladj_with_diag,
    carry,
    image_level_factory,
    require_supported,
)
from lcma_ext.zuko.adapters import SUPPORTED  # noqa: E402

from brute_force import jacobian, log_abs_diagonal, slogdet, svd_attribution  # noqa: E402

BATCH = 2
SPLINE = {"univariate": zt.MonotonicRQSTransform, "shapes": [(8,), (8,), (7,)]}


def _unconditional(cls: type, *args: object, **kwargs: object) -> Callable[[], object]:
    return lambda: UnconditionalTransform(cls, *args, buffer=True, **kwargs)


@dataclass
class Case:
    """One registry entry.

    Attributes:
        build: A fresh zuko lazy transform (random parameters).
        shape: Event shape of the inputs.
        context: Number of context features (0: unconditional).
        kind: ``"diagonal"``: the map equals ``log|J_ii|`` once the Jacobian's columns follow
            ``carry`` (elementwise, triangular and rearranging maps); ``"sum"``: only the sum is
            canonical (compositions of triangular maps, 1x1 convolutions); ``"svd-energy"``,
            ``"svd-index"``, ``"lu"``: the attribution of a linear map.
        low, high: Inputs uniform in ``(low, high)`` (domains of cos, sin, circular maps);
            ``None``: ``2 * randn``.
        bad_input: An event shape the adapter must reject with a ``ValueError`` (``None``: the
            transform accepts any feature count).
    """

    build: Callable[[], object]
    shape: tuple[int, ...] = (5,)
    context: int = 0
    kind: str = "diagonal"
    low: float | None = None
    high: float | None = None
    bad_input: tuple[int, ...] | None = None


def _elementwise(cls: type, *shapes: tuple[int, ...], **kwargs: object) -> Callable[[], object]:
    """``UnconditionalTransform(cls, *random tensors of the given shapes)``, built fresh."""
    return lambda: UnconditionalTransform(
        cls, *(torch.randn(*s) for s in shapes), buffer=True, **kwargs
    )


def _cubic(x: torch.Tensor) -> torch.Tensor:
    return x**3 + x


def _one_plus_square(x: torch.Tensor) -> torch.Tensor:
    return 1 + x**2


def _image_level(context: int) -> Callable[[], NflowsTransform]:
    if context:
        factory = image_level_factory(context=context, hidden=4, steps=1)
    else:
        factory = make_level_factory("glow", "tiny", hidden=4, steps=1)
    return lambda: NflowsTransform(factory(0, (1, 4, 4)), (1, 4, 4))


def _multiscale(context: int) -> NflowsTransform:
    def level(index: int, shape: tuple[int, ...]) -> object:
        return zuko.flows.MAF(shape[0], context, transforms=2, hidden_features=(8,)).transform

    maps = [torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)]
    flow = build_multiscale_flow(level, (6,), 2, "lcma", maps, prior="conditional")
    return flow.transform


REGISTRY: dict[str, Case] = {
    # elementwise bijections (zuko's own and the torch ones zuko re-exports)
    "identity": Case(_elementwise(zt.IdentityTransform)),
    "cos": Case(_elementwise(zt.CosTransform), low=0.1, high=3.0),
    "sin": Case(_elementwise(zt.SinTransform), low=-1.4, high=1.4),
    "softclip": Case(_elementwise(zt.SoftclipTransform, bound=2.0)),
    "circular_shift": Case(_elementwise(zt.CircularShiftTransform), low=0.05, high=0.95),
    "signed_power": Case(_elementwise(zt.SignedPowerTransform, (5,)), low=0.2, high=2.0),
    "additive": Case(_elementwise(zt.AdditiveTransform, (5,))),
    "monotonic_affine": Case(_elementwise(zt.MonotonicAffineTransform, (5,), (5,))),
    "monotonic_rqs": Case(_elementwise(zt.MonotonicRQSTransform, (5, 8), (5, 8), (5, 7))),
    "monotonic": Case(lambda: UnconditionalTransform(zt.MonotonicTransform, _cubic)),
    "bernstein": Case(_elementwise(zt.BernsteinTransform, (5, 16))),
    "bounded_bernstein": Case(_elementwise(zt.BoundedBernsteinTransform, (5, 16))),
    "gaussianization": Case(_elementwise(zt.GaussianizationTransform, (5, 4), (5, 4))),
    # Gauss-Legendre quadrature is exact for this polynomial, so f' == g to rounding
    "unconstrained_monotonic": Case(
        lambda: UnconditionalTransform(zt.UnconstrainedMonotonicTransform, _one_plus_square, 4)
    ),
    "sos_polynomial": Case(_elementwise(zt.SOSPolynomialTransform, (5, 3, 4))),
    "torch_exp": Case(_elementwise(td.ExpTransform)),
    "torch_sigmoid": Case(_elementwise(td.SigmoidTransform)),
    "torch_tanh": Case(_elementwise(td.TanhTransform)),
    "torch_softplus": Case(_elementwise(td.SoftplusTransform)),
    "torch_affine": Case(_elementwise(td.AffineTransform, (5,), (5,))),
    # DependentTransform of a univariate map (zuko's ElementWiseTransform)
    "dependent_affine": Case(lambda: ElementWiseTransform(5)),
    "dependent_spline_context": Case(lambda: ElementWiseTransform(5, 3, **SPLINE), context=3),
    "dependent_circular_spline": Case(
        lambda: ElementWiseTransform(5, univariate=CircularRQSTransform, shapes=[(8,), (8,), (7,)]),
        low=-math.pi,
        high=math.pi,
    ),
    # MAF's autoregressive transforms
    "autoregressive_affine": Case(lambda: MaskedAutoregressiveTransform(5, hidden_features=(8,))),
    "autoregressive_affine_context": Case(
        lambda: MaskedAutoregressiveTransform(5, 3, hidden_features=(8,)), context=3
    ),
    "autoregressive_spline_context": Case(
        lambda: MaskedAutoregressiveTransform(5, 3, hidden_features=(8,), **SPLINE), context=3
    ),
    "autoregressive_two_passes_order": Case(
        lambda: MaskedAutoregressiveTransform(
            5, passes=2, order=torch.tensor([3, 0, 4, 1, 2]), hidden_features=(8,)
        )
    ),
    "autoregressive_adjacency": Case(
        lambda: MaskedAutoregressiveTransform(
            5, adjacency=torch.eye(5, dtype=torch.bool) | torch.tril(torch.ones(5, 5), -2).bool()
        )
    ),
    # couplings (NICE / RealNVP and spline couplings)
    "coupling_affine": Case(
        lambda: GeneralCouplingTransform(5, hidden_features=(8,)), bad_input=(4,)
    ),
    "coupling_spline_context": Case(
        lambda: GeneralCouplingTransform(
            5, 3, mask=torch.tensor([1, 1, 0, 0, 1]), hidden_features=(8,), **SPLINE
        ),
        context=3,
        bad_input=(6,),
    ),
    # permutations and compositions
    "permutation": Case(
        _unconditional(zt.PermutationTransform, torch.tensor([2, 4, 0, 1, 3])), bad_input=(4,)
    ),
    "composed_elementwise": Case(
        lambda: LazyComposedTransform(
            _elementwise(zt.SoftclipTransform, bound=3.0)(), ElementWiseTransform(5)
        )
    ),
    "composed_maf_context": Case(
        lambda: zuko.flows.MAF(5, 3, transforms=2, hidden_features=(8,)).transform,
        context=3,
        kind="sum",
    ),
    "composed_coupling_permutation": Case(
        lambda: LazyComposedTransform(
            GeneralCouplingTransform(5, hidden_features=(8,)),
            _unconditional(zt.PermutationTransform, torch.tensor([4, 3, 2, 1, 0]))(),
            GeneralCouplingTransform(5, hidden_features=(8,)),
        ),
        kind="sum",
    ),
    # linear maps: an attribution of log|det W|
    **{
        f"rotation_{mode}": Case(_elementwise(zt.RotationTransform, (5, 5)), kind=mode)
        for mode in ("svd-energy", "svd-index")
    },
    **{
        f"lu_linear_{mode}": Case(_elementwise(zt.LULinearTransform, (5, 5)), kind=mode)
        for mode in ("svd-energy", "svd-index", "lu")
    },
    # inverses (zuko's LazyInverse): IAF, inverse couplings and permutations
    "inverse_autoregressive_context": Case(
        lambda: LazyInverse(MaskedAutoregressiveTransform(5, 3, hidden_features=(8,))), context=3
    ),
    "inverse_coupling_spline": Case(
        lambda: LazyInverse(GeneralCouplingTransform(5, hidden_features=(8,), **SPLINE))
    ),
    "inverse_permutation": Case(
        lambda: LazyInverse(
            _unconditional(zt.PermutationTransform, torch.tensor([1, 2, 3, 4, 0]))()
        ),
        bad_input=(6,),
    ),
    "inverse_elementwise": Case(
        lambda: LazyInverse(_elementwise(zt.MonotonicRQSTransform, (5, 8), (5, 8), (5, 7))())
    ),
    # lcma-ext transforms inside zuko: an image level, a conditional one, a multi-scale flow
    "nflows_image_level": Case(_image_level(0), shape=(1, 4, 4), kind="sum", bad_input=(1, 4, 2)),
    "nflows_image_level_context": Case(
        _image_level(2), shape=(1, 4, 4), context=2, kind="sum", bad_input=(2, 4, 4)
    ),
    "multiscale_conditional_prior": Case(
        partial(_multiscale, 0), shape=(6,), kind="sum", bad_input=(5,)
    ),
    "multiscale_conditional_prior_context": Case(
        partial(_multiscale, 2), shape=(6,), context=2, kind="sum", bad_input=(5,)
    ),
}
NAMES = sorted(REGISTRY)

#: zuko and torch transform classes without a per-dimension adapter, and an instance of each.
UNSUPPORTED: dict[str, Callable[[], td.Transform]] = {
    "zuko.transforms.FreeFormJacobianTransform": lambda: zt.FreeFormJacobianTransform(
        lambda t, x: torch.tanh(x), 0.0, 1.0
    ),
}


def _inputs(case: Case, batch: int = BATCH) -> torch.Tensor:
    if case.low is None:
        return 2 * torch.randn(batch, *case.shape, dtype=torch.float64)
    uniform = torch.rand(batch, *case.shape, dtype=torch.float64)
    return case.low + (case.high - case.low) * uniform


def _make(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    """A lazy transform with non-trivial parameters (ActNorm initialized, eval mode), inputs and
    contexts (``None`` when unconditional)."""
    case = REGISTRY[name]
    torch.manual_seed(seed)
    lazy = case.build().double()
    context = torch.randn(BATCH, case.context, dtype=torch.float64) if case.context else None
    with torch.no_grad():
        lazy.train()
        lazy(context)(_inputs(case))  # ActNorm's data-dependent initialization, as in nflows
        lazy.eval()
        for parameter in lazy.parameters():  # zero-initialized nets and priors become active
            parameter.add_(0.1 * torch.randn_like(parameter))
    return lazy, _inputs(case), context


def _row(context: torch.Tensor | None, b: int) -> torch.Tensor | None:
    return None if context is None else context[b : b + 1]


def _jacobian(
    lazy: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None, b: int
) -> torch.Tensor:
    """Jacobian ``(D_out, D_in)`` of ``f(. | c_b)`` at example ``b``, by autograd."""
    transform = lazy(_row(context, b))
    return jacobian(lambda batch: transform(batch), x[b], vectorize=True)


def _per_example(ladj: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.as_tensor(ladj).reshape(batch, -1).sum(1)


def _positions(transform: td.Transform, shape: tuple[int, ...]) -> torch.Tensor:
    index = torch.arange(math.prod(shape)).view(1, *shape)
    return carry(transform, index).reshape(-1)


# --- the registry checks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_ladj_identical_to_call_and_ladj(name: str) -> None:
    lazy, x, context = _make(name)
    transform = lazy(context)
    with torch.no_grad():
        y, ladj, diag = call_and_ladj_with_diag(transform, x)
        expected_y, expected_ladj = transform.call_and_ladj(x)
    assert torch.equal(y, expected_y)
    if name.startswith("multiscale_conditional_prior"):
        # the core's forward_with_diag adds a prior's log-det to the total apart from its
        # level's, forward adds their sum: equal up to the order of two float additions
        torch.testing.assert_close(ladj, expected_ladj, rtol=0, atol=1e-12)
    else:
        assert torch.equal(torch.as_tensor(ladj), torch.as_tensor(expected_ladj))
    assert diag.shape == y.shape and diag.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_diag_sums_to_brute_force_slogdet(name: str) -> None:
    lazy, x, context = _make(name)
    with torch.no_grad():
        _, ladj, diag = call_and_ladj_with_diag(lazy(context), x)
    for b in range(BATCH):
        sign, expected = slogdet(_jacobian(lazy, x, context, b))
        assert sign != 0
        np.testing.assert_allclose(float(diag[b].sum()), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        _per_example(ladj, BATCH).numpy(), diag.flatten(1).sum(1).numpy(), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].kind == "diagonal"])
def test_diag_equals_log_abs_jacobian_diagonal(name: str) -> None:
    """Elementwise, triangular and rearranging maps: ``log|J_ii|`` with the Jacobian's columns
    ordered by ``carry`` (output ``q`` against the input dimension carried to ``q``)."""
    lazy, x, context = _make(name)
    with torch.no_grad():
        _, _, diag = call_and_ladj_with_diag(lazy(context), x)
    perm = _positions(lazy(context), REGISTRY[name].shape)
    for b in range(BATCH):
        jac = _jacobian(lazy, x, context, b)[:, perm]
        assert _triangular_in_some_order(jac), "J is not triangular in any order"
        torch.testing.assert_close(
            diag[b].reshape(-1), log_abs_diagonal(jac), rtol=1e-10, atol=1e-10
        )


def _triangular_in_some_order(jac: torch.Tensor) -> bool:
    """Whether one ordering of the dimensions makes ``jac`` lower triangular (its dependency
    graph is acyclic), so that ``log|det jac| = sum log|jac_ii|``."""
    depends = (jac != 0) & ~torch.eye(len(jac), dtype=torch.bool)
    remaining = list(range(len(jac)))
    while remaining:
        free = [i for i in remaining if not depends[i, remaining].any()]
        if not free:
            return False
        remaining = [i for i in remaining if i not in free]
    return True


def _leading_minor_pivots(matrix: np.ndarray) -> np.ndarray:
    """|l_ii| of ``matrix = L U`` with a unit-diagonal ``U`` (no pivoting), from leading minors."""
    minors = [1.0] + [np.linalg.det(matrix[: i + 1, : i + 1]) for i in range(len(matrix))]
    return np.abs(np.array(minors[1:]) / np.array(minors[:-1]))


@pytest.mark.parametrize(
    "name", [n for n in NAMES if REGISTRY[n].kind in ("svd-energy", "svd-index", "lu")]
)
def test_linear_attribution_matches_numpy_reference(name: str) -> None:
    lazy, x, _ = _make(name)
    kind = REGISTRY[name].kind
    with torch.no_grad():
        _, _, diag = call_and_ladj_with_diag(lazy(), x, attribution=kind)
    weight = _jacobian(lazy, x, None, 0).numpy()  # y = W x, so J = W
    if kind == "lu":
        expected = np.log(_leading_minor_pivots(weight))
    else:
        expected = svd_attribution(weight, kind)
    for b in range(BATCH):
        np.testing.assert_allclose(diag[b].numpy(), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_carried_diag_plus_own_share(name: str) -> None:
    lazy, x, context = _make(name)
    transform = lazy(context)
    incoming = torch.randn_like(x)
    with torch.no_grad():
        _, _, diag_out = call_and_ladj_with_diag(transform, x, incoming)
        _, _, own = call_and_ladj_with_diag(transform, x)
    torch.testing.assert_close(diag_out, carry(transform, incoming) + own, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_carry_moves_an_index_tensor_bijectively(name: str) -> None:
    lazy, x, context = _make(name)
    shape = REGISTRY[name].shape
    perm = _positions(lazy(context), shape)
    assert perm.dtype == torch.long
    assert sorted(perm.tolist()) == list(range(math.prod(shape)))
    if name in ("permutation", "inverse_permutation"):  # pure rearrangements: carry is the map
        transform = lazy(context)
        assert torch.equal(carry(transform, x), transform(x))


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].bad_input])
def test_bad_shape_raises_clear_value_error(name: str) -> None:
    lazy, _, context = _make(name)
    bad = torch.randn(BATCH, *REGISTRY[name].bad_input, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected"):
        call_and_ladj_with_diag(lazy(context), bad)


@pytest.mark.parametrize("name", NAMES)
def test_diag_of_wrong_shape_raises(name: str) -> None:
    lazy, x, context = _make(name)
    with pytest.raises(ValueError, match="expected diag shaped like inputs"):
        call_and_ladj_with_diag(lazy(context), x, torch.zeros(BATCH + 1, *x.shape[1:]))


# --- transforms without an adapter ---------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        *UNSUPPORTED.values(),
        lambda: td.ComposeTransform([td.ExpTransform()]),
        lambda: td.AbsTransform(),
        lambda: UnconditionalTransform(zt.RotationTransform, torch.randn(3, 3))().inv,
    ],
    ids=["ffjord", "torch_compose", "torch_abs", "inverse_rotation"],
)
def test_transform_without_adapter_raises_type_error_naming_its_class(
    build: Callable[[], td.Transform],
) -> None:
    transform = build()
    with pytest.raises(TypeError, match=type(transform).__qualname__):
        call_and_ladj_with_diag(transform, torch.randn(2, 3))
    with pytest.raises(TypeError, match=type(transform).__qualname__):
        carry(transform, torch.arange(3).view(1, 3))


def test_unsupported_class_is_named_by_require_supported() -> None:
    with pytest.raises(TypeError, match=r"zuko\.transforms\.FreeFormJacobianTransform"):
        require_supported(UNSUPPORTED["zuko.transforms.FreeFormJacobianTransform"]())


def test_autoregressive_meta_that_is_not_elementwise_raises() -> None:
    transform = zt.AutoregressiveTransform(lambda x: zt.RotationTransform(torch.eye(3)), 3)
    with pytest.raises(TypeError, match="RotationTransform"):
        call_and_ladj_with_diag(transform, torch.randn(2, 3))


def test_torch_affine_over_an_event_is_refused() -> None:
    transform = td.AffineTransform(torch.zeros(3), torch.ones(3), event_dim=1)
    with pytest.raises(ValueError, match="event_dim=0"):
        call_and_ladj_with_diag(transform, torch.randn(2, 3))


# --- ZukoLevel: zuko lazy transforms as a diag-aware nflows level --------------------------------


def _maf(features: int, context: int) -> object:
    return zuko.flows.MAF(features, context, transforms=2, hidden_features=(8,)).transform


#: name -> (build, event shape, context features)
LEVELS: dict[str, tuple[Callable[[], ZukoLevel], tuple[int, ...], int]] = {
    "maf_context": (lambda: ZukoLevel(_maf(5, 3), (5,)), (5,), 3),
    "coupling_permutation_spline": (
        lambda: ZukoLevel(
            [
                GeneralCouplingTransform(5, hidden_features=(8,), **SPLINE),
                _unconditional(zt.PermutationTransform, torch.tensor([4, 3, 2, 1, 0]))(),
                GeneralCouplingTransform(5, hidden_features=(8,), **SPLINE),
            ],
            (5,),
        ),
        (5,),
        0,
    ),
    "lu_linear_lu": (
        lambda: ZukoLevel(_elementwise(zt.LULinearTransform, (5, 5))(), (5,), "lu"),
        (5,),
        0,
    ),
    "image_level_context": (
        lambda: ZukoLevel(
            image_level_factory(context=2, hidden=4, steps=1)(0, (1, 4, 4)), (1, 4, 4)
        ),
        (1, 4, 4),
        2,
    ),
}
LEVEL_NAMES = sorted(LEVELS)


def _make_level(
    name: str, seed: int = 0
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor | None]:
    build, shape, features = LEVELS[name]
    torch.manual_seed(seed)
    level = build().double()
    context = torch.randn(BATCH, features, dtype=torch.float64) if features else None
    x = torch.randn(BATCH, *shape, dtype=torch.float64)
    with torch.no_grad():
        level.train()
        level(x, context)
        level.eval()
        for parameter in level.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return level, torch.randn(BATCH, *shape, dtype=torch.float64), context


@pytest.mark.parametrize("name", LEVEL_NAMES)
def test_zuko_level_protocol_against_brute_force(name: str) -> None:
    level, x, context = _make_level(name)
    incoming = torch.randn_like(x)
    with torch.no_grad():
        outputs, logabsdet, diag = level.forward_with_diag(x, context)
        expected_outputs, expected_logabsdet = level(x, context)
        _, _, carried = level.forward_with_diag(x, context, incoming)
    assert torch.equal(outputs, expected_outputs) and torch.equal(logabsdet, expected_logabsdet)
    torch.testing.assert_close(carried, level.carry(incoming) + diag, rtol=0, atol=1e-12)
    torch.testing.assert_close(diag.flatten(1).sum(1), logabsdet, rtol=0, atol=1e-12)
    for b in range(BATCH):
        row = _row(context, b)
        sign, expected = slogdet(jacobian(lambda batch, row=row: level(batch, row)[0], x[b]))
        assert sign != 0
        np.testing.assert_allclose(float(logabsdet[b]), expected, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        recovered, inverse_logabsdet = level.inverse(outputs, context)
    torch.testing.assert_close(recovered, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-9, atol=1e-9)
    assert tuple(outputs.shape[1:]) == level.output_shape


@pytest.mark.parametrize("name", LEVEL_NAMES)
def test_zuko_level_state_dict_and_shape_errors(name: str) -> None:
    level, x, context = _make_level(name, seed=0)
    clone, _, _ = _make_level(name, seed=1)
    clone.load_state_dict(level.state_dict())
    with torch.no_grad():
        for a, b in zip(level.forward_with_diag(x, context), clone.forward_with_diag(x, context)):
            assert torch.equal(a, b)
    bad = torch.randn(BATCH, *x.shape[1:-1], x.shape[-1] + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected inputs"):
        level.forward_with_diag(bad, context)
    with pytest.raises(ValueError, match="expected diag shaped like inputs"):
        level.forward_with_diag(x, context, torch.zeros(BATCH + 1, *x.shape[1:]))


def test_zuko_level_bound_context_is_used_when_none_is_passed() -> None:
    level, x, context = _make_level("maf_context")
    bound = level.bind(context)
    with torch.no_grad():
        expected = level.forward_with_diag(x, context)
        for a, b in zip(bound.forward_with_diag(x), expected):
            assert torch.equal(a, b)
    assert bound.transform is level.transform  # the same zuko modules


def test_zuko_level_refuses_a_zuko_flow_and_names_other_objects() -> None:
    with pytest.raises(TypeError, match=r"flow\.transform"):
        ZukoLevel(zuko.flows.MAF(3), (3,))
    with pytest.raises(TypeError, match="Linear"):
        ZukoLevel(torch.nn.Linear(3, 3), (3,))


#: Every flow class of zuko 1.6 but CNF, whose continuous-time transform has no diagonal.
ZUKO_FLOWS = ("NICE", "RealNVP", "MAF", "NSF", "NCSF", "SOSPF", "BPF", "NAF", "UNAF", "GF")


@pytest.mark.parametrize("name", ZUKO_FLOWS)
def test_zuko_flows_as_levels_match_brute_force(name: str) -> None:
    """``zuko.flows.<name>(4, 3).transform`` as one level: its map sums to ``slogdet``."""
    torch.manual_seed(0)
    level = ZukoLevel(getattr(zuko.flows, name)(4, 3).transform, (4,)).double()
    x = 2 * torch.rand(BATCH, 4, dtype=torch.float64) - 1  # inside every domain (NCSF: circle)
    context = torch.randn(BATCH, 3, dtype=torch.float64)
    with torch.no_grad():
        _, logabsdet, diag = level.forward_with_diag(x, context)
    torch.testing.assert_close(diag.sum(1), logabsdet, rtol=0, atol=1e-12)
    for b in range(BATCH):
        row = context[b : b + 1]
        sign, expected = slogdet(jacobian(lambda batch, row=row: level(batch, row)[0], x[b]))
        assert sign != 0
        np.testing.assert_allclose(float(logabsdet[b]), expected, rtol=1e-10, atol=1e-10)


def test_zuko_cnf_is_refused_by_name() -> None:
    level = ZukoLevel(zuko.flows.CNF(4, 3).transform, (4,))
    with pytest.raises(TypeError, match="FreeFormJacobianTransform"):
        level.forward_with_diag(torch.randn(2, 4), torch.randn(2, 3))


# --- completeness ----------------------------------------------------------------------------


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_classes() -> set[str]:
    """Qualified names of the classes the registries build (torch transforms and levels)."""
    names = set()
    for name in NAMES:
        case = REGISTRY[name]
        context = torch.randn(1, case.context) if case.context else None
        names.add(_qualified(type(case.build()(context))))
    names |= {_qualified(type(build())) for build, _, _ in LEVELS.values()}
    return names


def test_every_zuko_transform_has_an_entry_or_raises() -> None:
    """Every class of ``zuko.transforms`` (and the torch elementwise maps supported) is either
    built by a registry entry or listed as unsupported, and then refused by name."""
    import lcma_ext.zuko.levels

    registered = registered_classes()
    classes = {getattr(zt, name) for name in zt.__all__}
    classes |= {cls for cls in SUPPORTED if cls.__module__.startswith("torch")}
    classes.add(lcma_ext.zuko.levels.NflowsBijection)
    missing = []
    for cls in sorted(classes, key=_qualified):
        name = _qualified(cls)
        if name in UNSUPPORTED:
            assert not issubclass(cls, SUPPORTED), name
            with pytest.raises(TypeError, match=cls.__qualname__):
                require_supported(UNSUPPORTED[name]())
        elif name not in registered:
            missing.append(name)
    assert not missing, "supported transforms without a registry entry:\n" + "\n".join(missing)
    stale = set(UNSUPPORTED) - {_qualified(cls) for cls in classes}
    assert not stale, f"unsupported entries that are no longer zuko classes: {sorted(stale)}"
