"""Brute-force checks of every diag-aware nflows subclass, fed by one registry.

Every entry is compared in float64 against ``torch.autograd.functional.jacobian`` and
``torch.linalg.slogdet`` (helpers in ``tests/brute_force.py``); elementwise and triangular
transforms also against ``log|diag J|``, exact-mode residual blocks against the diagonal of
scipy's matrix logarithm, and every other transform (whose per-dimension map is an attribution,
e.g. the 1x1 convolutions and the composites) on the sum invariant. Transforms that draw noise
(the DenseFlow cross-unit coupling) are run with fixed noise and checked on the joint map
``(x, e) -> outputs``.

:func:`test_registry_covers_every_diag_aware_class` walks the whole package and fails for any
diag-aware class without an entry here (or, for normflows flows, in
``tests/test_normflows_adapters.py``; for the optional zuko extra, in
``tests/test_zuko_adapters.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import nflows.transforms.base as nflows_base
import normflows as nf
import numpy as np
import pytest
import torch
from nflows.nn.nets import ConvResidualNet, ResidualNet
from nflows.transforms import AffineCouplingTransform as NflowsAffineCoupling
from nflows.transforms import CompositeTransform as NflowsComposite

import lcma_ext
from lcma_ext import transforms as T
from lcma_ext.models.couplings import (
    CheckerboardAffineCouplingTransform,
    RealNVPAffineCouplingTransform,
)
from lcma_ext.models.denseflow import DenseFlowBlock
from lcma_ext.models.levels import (
    glow_level_factory,
    iresnet_level_factory,
    realnvp_level_factory,
    resflow_level_factory,
)
from lcma_ext.multiscale import ContributionMultiscaleFlow, LevelFactory, build_levels
from lcma_ext.nets import update_lipschitz
from lcma_ext.normflows.multiscale import NormflowsLevel
from lcma_ext.splits import LCMASplit
from lcma_ext.transforms.base import DiagMixin

from brute_force import (
    jacobian,
    joint_jacobian,
    log_abs_diagonal,
    logm_diagonal,
    slogdet,
    svd_attribution,
)

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
            dimensions (of the joint input ``(x, e)`` for noise-drawing transforms) under which
            the Jacobian is lower triangular (None otherwise).
        rearrangement: True if the map only moves dimensions (Jacobian is a permutation).
        bad_input: Event shape the transform must reject with a ValueError.
        zero_contribution: The transform adds nothing to any dimension (``diag_out`` is the
            carried ``diag``, log-det 0), like a rearrangement, though its Jacobian may mix
            dimensions (Haar squeeze).
        logm_diagonal: The promised per-dimension map is ``diag(log J)`` (exact residual blocks).
        noise_diag_offset: For a triangular noise-drawing transform, ``(x, noises) -> offset``
            shaped like the outputs such that ``diag_out + offset == log|diag J_joint|`` (the
            protocol's diag also carries ``-log p*(e)`` on the noise dimensions).
        columns_by_carry: Before the triangular check, reorder the Jacobian's columns by
            ``carry_positions`` (output ``q`` against the input dimension carried to ``q``): for
            maps that move dimensions and act elementwise on them (multi-scale flows).
    """

    build: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]
    triangular_order: Callable[[], list[int]] | None = None
    rearrangement: bool = False
    bad_input: tuple[int, ...] | None = None
    zero_contribution: bool = False
    logm_diagonal: bool = False
    noise_diag_offset: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor] | None = None
    columns_by_carry: bool = False


def _coupling_order(mask: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
    """Identity channels first, then transformed ones: coupling Jacobians are then triangular."""
    per_channel = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    channels = [c for c in range(len(mask)) if mask[c] <= 0] + [
        c for c in range(len(mask)) if mask[c] > 0
    ]
    return [c * per_channel + k for c in channels for k in range(per_channel)]


def _checkerboard_order(shape: tuple[int, int, int], parity: int) -> Callable[[], list[int]]:
    """Identity pixels ``(i + j) % 2 == parity`` (all channels) first, then the others."""
    c, h, w = shape
    flat = [(ch * h + i) * w + j for ch in range(c) for i in range(h) for j in range(w)]
    keep = [
        (ch * h + i) * w + j
        for ch in range(c)
        for i in range(h)
        for j in range(w)
        if (i + j) % 2 == parity
    ]
    return lambda: keep + [k for k in flat if k not in keep]


def _natural(shape: tuple[int, ...]) -> Callable[[], list[int]]:
    return lambda: list(range(int(np.prod(shape))))


def _rq(
    mask: torch.Tensor, net: Callable[[int, int], torch.nn.Module], shape: tuple[int, ...], **kwargs
) -> T.PiecewiseRationalQuadraticCouplingTransform:
    return T.PiecewiseRationalQuadraticCouplingTransform(
        mask, net, num_bins=4, tails="linear", tail_bound=3.0, **kwargs
    )


#: Residual blocks: contractive enough for a fast fixed-point inverse, tight inverse tolerance
#: (the registry's round trip checks 1e-9).
_RESIDUAL = {"coeff": 0.8, "atol": 1e-13, "rtol": 0.0, "max_iter": 1000}


def _residual(
    cls: type[T.InvertibleResNetBlock | T.ResidualFlowBlock], shape: tuple[int, ...]
) -> T.InvertibleResNetBlock | T.ResidualFlowBlock:
    arg = shape[0] if len(shape) == 1 else shape
    extra = {"num_layers": 2} if len(shape) == 1 else {}
    return cls(arg, hidden_channels=6, exact=True, activation="elu", **extra, **_RESIDUAL)


def _glow_level(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
    c = 4 * shape[0]
    mask = torch.zeros(c, dtype=torch.long)
    mask[c // 2 :] = 1
    return T.CompositeTransform(
        [
            T.SqueezeTransform(),
            T.ActNorm(c),
            T.OneByOneConvolution(c, identity_init=False),
            T.AffineCouplingTransform(mask, _conv),
        ]
    )


def _elementwise_level(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
    return T.CompositeTransform([T.SqueezeTransform(), T.ActNorm(4 * shape[0])])


def _multiscale(
    split: str, prior: str = "standard", level: LevelFactory = _glow_level
) -> ContributionMultiscaleFlow:
    levels = build_levels(level, (1, 4, 4), 2)
    splits = [None]
    if split == "lcma":
        generator = torch.Generator().manual_seed(3)
        splits = [LCMASplit(torch.randn(4, 2, 2, generator=generator, dtype=torch.float64))]
    return ContributionMultiscaleFlow.from_levels(levels, (1, 4, 4), splits, prior=prior)


def _normflows_level() -> NormflowsLevel:
    """A normflows level (normflows order, so the squeeze runs first, data to noise)."""
    actnorm = nf.flows.ActNorm((4, 1, 1))
    with torch.no_grad():
        actnorm.s.normal_(0.0, 0.3)
        actnorm.t.normal_()
        actnorm.data_dep_init_done.fill_(1.0)
    return NormflowsLevel([nf.flows.Invertible1x1Conv(4), actnorm, nf.flows.Squeeze()])


def _last_level_first(factored: int, last: int) -> Callable[[], list[int]]:
    """Output order of a two-level multi-scale flow with the last level's outputs first: its
    factored half depends on the kept half (conditional prior), not the other way round."""
    return lambda: list(range(factored, factored + last)) + list(range(factored))


def _noise_offset(x: torch.Tensor, noises: list[torch.Tensor]) -> torch.Tensor:
    """Standalone cross-unit coupling: ``+log N(e; 0, 1)`` on the appended noise channels."""
    (noise,) = noises
    log_density = torch.distributions.Normal(0.0, 1.0).log_prob(noise)
    return torch.cat([torch.zeros_like(x), log_density], dim=1)


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
    "rq_cdf": Case(
        lambda: T.PiecewiseRationalQuadraticCDF(
            shape=[4], num_bins=4, tails="linear", tail_bound=3.0
        ),
        (4,),
        _natural((4,)),
        bad_input=(5,),
    ),
    "realnvp_coupling_vector": Case(
        lambda: RealNVPAffineCouplingTransform(_vector_mask(), _mlp),
        (5,),
        lambda: _coupling_order(_vector_mask(), (5,)),
        bad_input=(4,),
    ),
    "realnvp_coupling_image": Case(
        lambda: RealNVPAffineCouplingTransform(_channel_mask(), _conv),
        (4, 3, 3),
        lambda: _coupling_order(_channel_mask(), (4, 3, 3)),
        bad_input=(3, 3, 3),
    ),
    **{
        f"checkerboard_coupling_parity{parity}": Case(
            lambda parity=parity: CheckerboardAffineCouplingTransform(2, _conv, parity=parity),
            (2, 3, 3),
            _checkerboard_order((2, 3, 3), parity),
            bad_input=(3, 3, 3),
        )
        for parity in (0, 1)
    },
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
    "haar_squeeze": Case(
        lambda: T.HaarSqueezeTransform(), (2, 2, 4), zero_contribution=True, bad_input=(2, 3, 4)
    ),
    "haar_squeeze_ll_first": Case(
        lambda: T.HaarSqueezeTransform(order=("LL", "HH", "LH", "HL")),
        (1, 4, 2),
        zero_contribution=True,
        bad_input=(1, 4, 3),
    ),
    "permutation": Case(
        lambda: T.Permutation(torch.tensor([2, 0, 3, 1])),
        (4,),
        rearrangement=True,
        bad_input=(5,),
    ),
    "reverse_permutation": Case(
        lambda: T.ReversePermutation(5), (5,), rearrangement=True, bad_input=(4,)
    ),
    "random_permutation_channels": Case(
        lambda: T.RandomPermutation(3), (3, 2, 2), rearrangement=True, bad_input=(4, 2, 2)
    ),
    # Exact mode (``exact=True``). Image-shaped blocks are here inside the level entries; their
    # matrix-log diagonal on images is checked in test_residual.py.
    **{
        f"{name}_exact": Case(
            lambda cls=cls: _residual(cls, (3,)), (3,), logm_diagonal=True, bad_input=(4,)
        )
        for name, cls in (
            ("iresnet", T.InvertibleResNetBlock),
            ("resflow", T.ResidualFlowBlock),
        )
    },
    "cross_unit_image": Case(
        lambda: T.CrossUnitCoupling(2, 3, hidden=8),
        (2, 2, 2),
        _natural((5, 2, 2)),  # joint input (z, e): z passes unchanged, e scaled elementwise
        bad_input=(3, 2, 2),
        noise_diag_offset=_noise_offset,
    ),
    "cross_unit_vector": Case(
        lambda: T.CrossUnitCoupling(3, 2, vector=True, hidden=8),
        (3,),
        _natural((5,)),
        bad_input=(4,),
        noise_diag_offset=_noise_offset,
    ),
    # Three units: the second coupling's conditioner also sees the first unit's output.
    "denseflow_block_haar": Case(
        lambda: DenseFlowBlock((1, 4, 4), units=3, steps=1, growth=1, hidden=8, squeeze="haar"),
        (1, 4, 4),
        bad_input=(1, 3, 4),
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
    # The level factories of the four model families (each a CompositeTransform).
    "level_realnvp": Case(
        lambda: realnvp_level_factory("tiny", hidden=8)(0, (1, 4, 4)),
        (1, 4, 4),
        bad_input=(2, 4, 4),
    ),
    "level_glow_haar": Case(
        lambda: glow_level_factory("tiny", hidden=8, steps=2, squeeze="haar")(0, (1, 4, 4)),
        (1, 4, 4),
        bad_input=(1, 4, 5),
    ),
    "level_iresnet_exact_haar": Case(
        lambda: iresnet_level_factory(
            "tiny", hidden=8, steps=1, squeeze="haar", exact=True, **_RESIDUAL
        )(0, (1, 4, 4)),
        (1, 4, 4),
        bad_input=(2, 4, 4),
    ),
    "level_resflow_exact": Case(
        lambda: resflow_level_factory("tiny", hidden=8, steps=1, exact=True, **_RESIDUAL)(
            0, (1, 4, 4)
        ),
        (1, 4, 4),
        bad_input=(1, 3, 4),
    ),
    # one normflows level as a diag-aware nflows transform (the normflows pipeline's adapter)
    "normflows_level": Case(_normflows_level, (1, 4, 4), bad_input=(1, 3, 4)),
    "multiscale_channel_split": Case(
        lambda: _multiscale("channel"), (1, 4, 4), bad_input=(1, 3, 4)
    ),
    "multiscale_lcma_split": Case(lambda: _multiscale("lcma"), (1, 4, 4), bad_input=(2, 4, 4)),
    # Glow's conditional prior of the factored half (ConditionalGaussianPrior, zero-initialised:
    # _make's perturbation gives it non-trivial mu and sigma).
    "multiscale_conditional_prior": Case(
        lambda: _multiscale("lcma", "conditional"), (1, 4, 4), bad_input=(1, 4, 5)
    ),
    # Elementwise levels (squeeze, ActNorm): the per-dimension map is the Jacobian's diagonal
    # once its columns follow carry_positions, prior's -log sigma included.
    "multiscale_conditional_prior_elementwise": Case(
        lambda: _multiscale("lcma", "conditional", _elementwise_level),
        (1, 4, 4),
        _last_level_first(8, 8),
        bad_input=(2, 4, 4),
        columns_by_carry=True,
    ),
}

NAMES = sorted(REGISTRY)


def _params(names: Sequence[str], *marks_for: tuple[str, pytest.MarkDecorator]) -> list[Any]:
    """``names`` as pytest params, with ``marks`` attached to the named entries."""
    marks = dict(marks_for)
    return [pytest.param(n, marks=marks[n]) if n in marks else n for n in names]


# --- fixed noise for the transforms that draw it (cross-unit coupling) ------------------------


def _couplings(transform: torch.nn.Module) -> list[T.CrossUnitCoupling]:
    return [m for m in transform.modules() if isinstance(m, T.CrossUnitCoupling)]


@contextmanager
def _fixed_noise(transform: torch.nn.Module, noises: list[torch.Tensor]) -> Iterator[None]:
    """Every cross-unit coupling inside ``transform`` (``modules()`` order) uses the given ``e``.

    Each coupling draws once per call; the patch replaces only the draw of ``e ~ N(0, I)``.
    """
    couplings = _couplings(transform)
    assert len(noises) == len(couplings)
    for coupling, noise in zip(couplings, noises):
        coupling._draw = lambda inputs, given, noise=noise: noise.to(inputs.dtype)
    try:
        yield
    finally:
        for coupling in couplings:
            del coupling._draw


def _noise_shapes(transform: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    couplings = _couplings(transform)
    shapes: dict[int, tuple[int, ...]] = {}
    for coupling in couplings:

        def record(
            inputs: torch.Tensor,
            given: torch.Tensor | None,
            coupling: T.CrossUnitCoupling = coupling,
        ) -> torch.Tensor:
            shapes[id(coupling)] = coupling.noise_shape(inputs)
            return inputs.new_zeros(coupling.noise_shape(inputs))

        coupling._draw = record
    try:
        with torch.no_grad():
            transform(x)
    finally:
        for coupling in couplings:
            del coupling._draw
    return [shapes[id(c)] for c in couplings]


def _make(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    """A transform with non-trivial parameters, initialized (ActNorm) and in eval mode, inputs,
    and the fixed noise ``e`` of each cross-unit coupling inside it (empty for bijections)."""
    case = REGISTRY[name]
    torch.manual_seed(seed)
    transform = case.build().to(dtype)
    with torch.no_grad():
        for parameter in transform.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    x = torch.randn(BATCH, *case.shape, dtype=dtype)
    transform.train()
    transform(x)  # ActNorm data-dependent initialization happens here, as in nflows
    update_lipschitz(transform)  # residual blocks: spectral norms of the perturbed weights
    transform.eval()
    with torch.no_grad():  # move ActNorm away from the exact data statistics
        for module in transform.modules():
            if isinstance(module, T.ActNorm):
                module.log_scale.add_(0.2 * torch.randn_like(module.log_scale))
    x = torch.randn(BATCH, *case.shape, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 100)
    noises = [
        torch.randn(shape, generator=generator, dtype=dtype)
        for shape in _noise_shapes(transform, x)
    ]
    return transform, x, noises


def _example(noises: list[torch.Tensor], b: int) -> list[torch.Tensor]:
    return [noise[b] for noise in noises]


def _with_noise(transform: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The joint map ``(x, e_1, e_2, ...) -> outputs``: the transform with each cross-unit
    coupling's noise given (no noise for bijections), for ``brute_force.joint_jacobian``."""

    def joint(x: torch.Tensor, *noises: torch.Tensor) -> torch.Tensor:
        with _fixed_noise(transform, list(noises)):
            return transform(x)[0]

    return joint


def _log_noise_density(noises: list[torch.Tensor], b: int) -> float:
    normal = torch.distributions.Normal(0.0, 1.0)
    return float(sum(normal.log_prob(n[b]).sum() for n in noises))


# --- the registry checks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_logabsdet_matches_brute_force_slogdet(name: str) -> None:
    """``log|det J|`` by autograd + slogdet; for noise-drawing transforms, of the joint map
    ``(x, e) -> outputs``, which equals the returned term plus ``log p*(e)`` (Eq. 8-9)."""
    transform, x, noises = _make(name)
    with torch.no_grad(), _fixed_noise(transform, noises):
        _, logabsdet, _ = transform.forward_with_diag(x)
    for b in range(BATCH):
        sign, expected = slogdet(
            joint_jacobian(_with_noise(transform), [x[b], *_example(noises, b)])
        )
        assert sign != 0
        got = float(logabsdet[b]) + _log_noise_density(noises, b)
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_logabsdet_identical_to_parent_forward(name: str) -> None:
    transform, x, noises = _make(name)
    with torch.no_grad(), _fixed_noise(transform, noises):
        outputs, logabsdet, diag = transform.forward_with_diag(x)
        expected_outputs, expected_logabsdet = transform(x)
    assert torch.equal(outputs, expected_outputs)
    assert torch.equal(logabsdet, expected_logabsdet)
    assert diag.shape == outputs.shape


@pytest.mark.parametrize("name", NAMES)
def test_sum_invariant_with_carried_diag(name: str) -> None:
    transform, x, noises = _make(name)
    incoming = torch.randn_like(x)
    with torch.no_grad(), _fixed_noise(transform, noises):
        _, logabsdet, diag_out = transform.forward_with_diag(x, diag=incoming)
        _, _, own = transform.forward_with_diag(x)
    torch.testing.assert_close(
        diag_out.flatten(1).sum(1) - incoming.flatten(1).sum(1), logabsdet, rtol=0, atol=1e-12
    )
    # The carried part is the incoming map moved as the data, plus this transform's own share.
    carried = transform.carry(incoming).reshape(diag_out.shape)
    torch.testing.assert_close(diag_out, carried + own, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].triangular_order])
def test_triangular_jacobian_diagonal_equals_diag(name: str) -> None:
    case = REGISTRY[name]
    transform, x, noises = _make(name)
    order = case.triangular_order()
    with torch.no_grad(), _fixed_noise(transform, noises):
        _, _, diag = transform.forward_with_diag(x)
    if case.noise_diag_offset is not None:
        diag = diag + case.noise_diag_offset(x, noises)
    for b in range(BATCH):
        jac = joint_jacobian(_with_noise(transform), [x[b], *_example(noises, b)])
        if case.columns_by_carry:
            perm = T.carry_positions(transform, x.shape[1:]).reshape(-1)
            assert sorted(perm.tolist()) == list(range(jac.shape[1]))
            jac = jac[:, perm]
        assert sorted(order) == list(range(jac.shape[0]))
        reordered = jac[order][:, order]
        upper = torch.triu(reordered, diagonal=1)
        assert upper.abs().max() == 0, "Jacobian is not triangular in the stated order"
        torch.testing.assert_close(
            diag[b].reshape(-1), log_abs_diagonal(jac), rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].logm_diagonal])
def test_exact_residual_diag_equals_matrix_log_diagonal(name: str) -> None:
    """Residual blocks (exact mode): ``diag(log J)`` by scipy's ``logm`` of the brute-force
    Jacobian, not ``log|diag J|`` (``J = I + J_g`` is dense)."""
    transform, x, _ = _make(name)
    with torch.no_grad():
        _, logabsdet, diag = transform.forward_with_diag(x)
    for b in range(BATCH):
        jac = jacobian(lambda batch: transform(batch)[0], x[b])
        off_diagonal = jac - torch.diag(torch.diagonal(jac))
        assert off_diagonal.abs().max() > 1e-2  # dense: the two diagonals differ
        expected = logm_diagonal(jac)
        assert np.abs(expected - log_abs_diagonal(jac).numpy()).max() > 1e-4
        np.testing.assert_allclose(diag[b].reshape(-1).numpy(), expected, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(expected.sum(), float(logabsdet[b]), rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "name", [n for n in NAMES if REGISTRY[n].rearrangement or REGISTRY[n].zero_contribution]
)
def test_volume_preserving_rearrangements_add_nothing(name: str) -> None:
    transform, x, _ = _make(name)
    incoming = torch.randn_like(x)
    _, logabsdet, diag_out = transform.forward_with_diag(x, diag=incoming)
    assert torch.equal(diag_out, transform.carry(incoming))
    assert torch.equal(logabsdet, torch.zeros_like(logabsdet))
    sign, brute = slogdet(jacobian(lambda batch: transform(batch)[0], x[0]))
    assert sign != 0 and abs(brute) < 1e-12
    index = torch.arange(x[0].numel()).view(1, *x.shape[1:])
    assert transform.carry(index).dtype == torch.long
    perm = T.carry_positions(transform, x.shape[1:]).reshape(-1)
    assert sorted(perm.tolist()) == list(range(x[0].numel()))  # a bijection of positions


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].rearrangement])
def test_rearrangements_carry_like_forward(name: str) -> None:
    transform, x, _ = _make(name)
    outputs, _ = transform(x)
    assert torch.equal(transform.carry(x), outputs)
    jac = jacobian(lambda batch: transform(batch)[0], x[0])
    perm = T.carry_positions(transform, x.shape[1:]).reshape(-1)
    torch.testing.assert_close(jac, torch.eye(jac.shape[1], dtype=jac.dtype)[perm])


@pytest.mark.parametrize("name", NAMES)
def test_inverse_of_forward_is_identity(name: str) -> None:
    """Round trip. Noise-drawing transforms: the inverse drops the noise, so only the data is
    recovered (their inverse log-det is that of the bijective part, see test_cross_unit.py)."""
    transform, x, noises = _make(name)
    with torch.no_grad(), _fixed_noise(transform, noises):
        outputs, logabsdet, _ = transform.forward_with_diag(x)
        recovered, inverse_logabsdet = transform.inverse(outputs)
    torch.testing.assert_close(recovered, x, rtol=1e-9, atol=1e-9)
    if not noises:
        torch.testing.assert_close(inverse_logabsdet, -logabsdet, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name: str) -> None:
    transform, x, noises = _make(name, seed=0)
    clone, _, _ = _make(name, seed=1)
    clone.load_state_dict(transform.state_dict())
    with torch.no_grad():
        with _fixed_noise(transform, noises):
            expected = transform.forward_with_diag(x)
        with _fixed_noise(clone, noises):
            got = clone.forward_with_diag(x)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_float32_agrees_with_float64(name: str) -> None:
    transform, x, noises = _make(name)
    with torch.no_grad(), _fixed_noise(transform, noises):
        reference = transform.forward_with_diag(x)
        transform32 = transform.float()
        result = transform32.forward_with_diag(x.float())
    for ref, got in zip(reference, result):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


_RQ_CDF_SHAPE_DEFECT = pytest.mark.xfail(
    strict=True,
    raises=IndexError,
    reason="library defect: PiecewiseRationalQuadraticCDF does not check the input shape "
    "(IndexError from the spline's masked indexing instead of a ValueError)",
)


@pytest.mark.parametrize("name", _params(NAMES, ("rq_cdf", _RQ_CDF_SHAPE_DEFECT)))
def test_bad_shape_raises_clear_value_error(name: str) -> None:
    transform, _, _ = _make(name)
    bad = torch.randn(BATCH, *REGISTRY[name].bad_input, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected"):
        transform.forward_with_diag(bad)


@pytest.mark.parametrize("name", NAMES)
def test_diag_of_wrong_shape_raises(name: str) -> None:
    transform, x, _ = _make(name)
    with pytest.raises(ValueError, match="expected diag shaped like inputs"):
        transform.forward_with_diag(x, diag=torch.zeros(BATCH + 1, *x.shape[1:]))


# --- completeness: every diag-aware class of the package has a registry entry -----------------

#: Classes that speak the protocol but are not instantiable transforms, with the reason.
ABSTRACT_OR_MIXIN = {
    "lcma_ext.transforms.base.DiagTransform": "typing Protocol (structural type)",
    "lcma_ext.transforms.base.DiagMixin": "mixin; _forward_with_diag is abstract",
    "lcma_ext.transforms.coupling._CouplingDiagMixin": "mixin of the three coupling classes",
    "lcma_ext.transforms.permutations._PermutationDiagMixin": "mixin of the permutation classes",
    "lcma_ext.transforms.residual._ResidualBlock": "abstract base; its estimator plans raise "
    "NotImplementedError (both concrete blocks are registered)",
    "lcma_ext.normflows.adapters._NormflowsDiagMixin": "mixin of the normflows adapters",
    "lcma_ext.normflows.residual._ResidualWrapper": "private base of the two normflows "
    "residual wrappers",
}

#: Components that are neither nflows transforms nor normflows flows (their protocol method has
#: another signature), covered inside registry entries: class name -> entry name.
COVERED_INSIDE = {
    "lcma_ext.transforms.factor_prior.ConditionalGaussianPrior": "multiscale_conditional_prior",
    # the split-point step (also against brute force on its own in tests/test_split_point.py)
    "lcma_ext.multiscale.SplitPoint": "multiscale_conditional_prior",
}

#: zuko is an optional extra: without it, lcma_ext.zuko is not walked (and cannot be imported).
HAS_ZUKO = importlib.util.find_spec("zuko") is not None

#: normflows flows (not nflows transforms) covered by brute force outside the normflows
#: adapters' registry: class name -> (test module, test function).
NORMFLOWS_COVERED_ELSEWHERE = {
    "lcma_ext.normflows.residual.InvertibleResNetBlock": (
        "test_residual",
        "test_normflows_wrapper_matches_brute_force",
    ),
    "lcma_ext.normflows.residual.ResidualFlowBlock": (
        "test_residual",
        "test_normflows_wrapper_matches_brute_force",
    ),
}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _all_subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def _diag_aware_classes() -> dict[str, type]:
    """Every class defined in ``lcma_ext`` with a ``forward_with_diag`` (or a DiagMixin).

    Imports every module of the package (an import error fails the test: nothing is skipped),
    then collects module attributes and every subclass of nflows' ``Transform``, normflows'
    ``Flow`` and ``DiagMixin`` defined in the package (classes not exposed as attributes too).
    zuko-side classes (``call_and_ladj_with_diag``) count too; ``lcma_ext.zuko`` is skipped only
    when zuko is not installed.
    """

    def optional(name: str) -> bool:
        return not HAS_ZUKO and (name == "lcma_ext.zuko" or name.startswith("lcma_ext.zuko."))

    def fail(name: str) -> None:
        if not optional(name):
            raise AssertionError(f"could not import {name} while walking lcma_ext")

    modules = [lcma_ext]
    for info in pkgutil.walk_packages(lcma_ext.__path__, "lcma_ext.", onerror=fail):
        if not optional(info.name):
            modules.append(importlib.import_module(info.name))
    candidates: set[type] = set()
    for module in modules:
        candidates.update(c for _, c in inspect.getmembers(module, inspect.isclass))
    for base in (nflows_base.Transform, nf.flows.Flow, DiagMixin):
        candidates.update(_all_subclasses(base))
    found = {}
    for cls in candidates:
        if not cls.__module__.startswith("lcma_ext"):
            continue
        if (
            callable(getattr(cls, "forward_with_diag", None))
            or callable(getattr(cls, "call_and_ladj_with_diag", None))  # zuko's side
            or issubclass(cls, DiagMixin)
        ):
            found[_qualified(cls)] = cls
    return found


def test_registry_covers_every_diag_aware_class() -> None:
    import test_normflows_adapters

    found = _diag_aware_classes()
    registered = {_qualified(type(case.build())) for case in REGISTRY.values()}
    normflows_registered = {
        _qualified(type(build())) for build, _, _ in test_normflows_adapters.REGISTRY.values()
    }
    for name, (module_name, function) in NORMFLOWS_COVERED_ELSEWHERE.items():
        assert callable(getattr(importlib.import_module(module_name), function, None)), name

    stale = set(ABSTRACT_OR_MIXIN) - set(found)
    assert not stale, f"exclusions that are no longer diag-aware classes: {sorted(stale)}"
    missing = []
    zuko_registered = set()
    if HAS_ZUKO:
        import test_zuko_adapters

        zuko_registered = test_zuko_adapters.registered_classes()
    for name, cls in sorted(found.items()):
        if name in ABSTRACT_OR_MIXIN:
            continue
        if name.startswith("lcma_ext.zuko."):
            if name not in zuko_registered:
                missing.append(f"{name} (add it to a registry of tests/test_zuko_adapters.py)")
        elif issubclass(cls, nflows_base.Transform):
            if name not in registered:
                missing.append(f"{name} (add an entry to REGISTRY in tests/test_transforms.py)")
        elif issubclass(cls, nf.flows.Flow):
            if name not in normflows_registered and name not in NORMFLOWS_COVERED_ELSEWHERE:
                missing.append(f"{name} (add it to tests/test_normflows_adapters.py REGISTRY)")
        elif name in COVERED_INSIDE:
            entry = REGISTRY[COVERED_INSIDE[name]].build()
            assert any(isinstance(m, cls) for m in entry.modules()), (name, COVERED_INSIDE[name])
        else:
            missing.append(f"{name} (neither an nflows Transform nor a normflows Flow)")
    assert not missing, "diag-aware classes without a brute-force registry entry:\n" + "\n".join(
        missing
    )
    # The walk itself found the classes it must (guards against a walk that finds nothing).
    for cls in (
        T.ActNorm,
        T.HaarSqueezeTransform,
        T.CrossUnitCoupling,
        T.ResidualFlowBlock,
        CheckerboardAffineCouplingTransform,
        ContributionMultiscaleFlow,
        DenseFlowBlock,
    ):
        assert _qualified(cls) in found
    if HAS_ZUKO:
        for name in ("lcma_ext.zuko.levels.ZukoLevel", "lcma_ext.zuko.levels.NflowsBijection"):
            assert name in found
    assert registered <= set(found), "registry entries must be diag-aware lcma_ext classes"


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
def test_lu_linear_attribution_matches_numpy_reference(mode: str) -> None:
    transform, x, _ = _make(f"lu_linear_{mode}")
    weight = jacobian(lambda batch: transform(batch)[0], x[0]).numpy()  # y = W x + b, so J = W
    with torch.no_grad():
        _, logabsdet, diag = transform.forward_with_diag(x)
    expected = _reference_attribution(weight, weight, mode)
    np.testing.assert_allclose(diag[0].numpy(), expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(diag.sum(1).numpy(), logabsdet.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", T.ATTRIBUTIONS)
def test_one_by_one_attribution_matches_numpy_reference(mode: str) -> None:
    transform, x, _ = _make(f"one_by_one_{mode}")
    height, width = x.shape[2:]
    jac = jacobian(lambda batch: transform(batch)[0], x[0]).numpy()
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


def test_svd_energy_is_well_defined_at_identity_init() -> None:
    transform = T.OneByOneConvolution(4, identity_init=True).double()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    _, logabsdet, diag = transform.forward_with_diag(x)
    assert torch.isfinite(diag).all()
    torch.testing.assert_close(diag.flatten(1).sum(1), logabsdet, rtol=0, atol=1e-12)


def test_unknown_attribution_raises() -> None:
    with pytest.raises(ValueError, match="expected attribution in"):
        T.LULinear(3, attribution="eigen")


def test_svd_attribution_keeps_no_gradient_and_lu_does() -> None:
    transform = T.LULinear(3, identity_init=False, attribution="lu")
    _, _, diag = transform.forward_with_diag(torch.randn(2, 3))
    assert diag.requires_grad
    transform.attribution = "svd-energy"
    shares = transform.logabsdet_attribution()
    assert not shares.requires_grad


# --- Composite ------------------------------------------------------------------------------


def test_composite_names_the_component_that_is_not_diag_aware() -> None:
    composite = T.CompositeTransform([T.ActNorm(5), NflowsAffineCoupling(_vector_mask(), _mlp)])
    with pytest.raises(TypeError, match=r"component 1.*AffineCouplingTransform"):
        composite.forward_with_diag(torch.randn(2, 5))


def test_composite_is_a_drop_in_for_nflows_composite() -> None:
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


def test_carry_positions_tracks_squeeze_and_permutation() -> None:
    composite = T.CompositeTransform([T.SqueezeTransform(), T.ReversePermutation(4)])
    positions = T.carry_positions(composite, (1, 2, 2))
    # Squeeze puts pixel (dy, dx) into channel 2 dy + dx; reversing the channels flips that.
    assert positions.reshape(-1).tolist() == [3, 2, 1, 0]
