"""Per-dimension log-dets of the torch transforms zuko flows are built from.

A zuko lazy transform (``zuko.lazy.LazyTransform``) returns, for a context ``c``, a
``torch.distributions.Transform`` ``f(x | c)`` in the data-to-noise direction, and zuko calls
``f.call_and_ladj(x)``. :func:`call_and_ladj_with_diag` runs the same computation and also
returns the per-dimension map of lcma-ext's protocol (see :mod:`lcma_ext.transforms.base`):

``call_and_ladj_with_diag(f, x, diag=None) -> (y, ladj, diag_out)``
    ``y`` and ``ladj`` are what ``f.call_and_ladj(x)`` returns (same formula, same order of
    operations). ``diag`` is the running per-dimension contribution shaped like ``x`` (``None``:
    zeros); ``diag_out`` is shaped like ``y``: ``diag`` rearranged as ``f`` rearranges positions,
    plus ``f``'s own per-dimension ``log|det|``. Summed over the event dimensions, ``diag_out -
    diag`` equals ``ladj`` summed over its event dimensions.

``carry(f, tensor) -> tensor``
    Only ``f``'s rearrangement of positions (permutations), for a tensor of any dtype.

What each transform contributes per dimension:

* Elementwise bijections (zuko's ``Identity``, ``Cos``, ``Sin``, ``Softclip``,
  ``CircularShift``, ``SignedPower``, ``Additive``, ``MonotonicAffine``, ``MonotonicRQS`` and
  ``Monotonic`` transforms, e.g. ``Bernstein``, ``Gaussianization``, ``SOSPolynomial``; torch's
  ``Exp``, ``Sigmoid``, ``Tanh``, ``Softplus`` and ``Affine`` with ``event_dim=0``):
  ``log|f'(x_i)|``, the transform's own elementwise ``ladj``.
* ``DependentTransform``: its base's (the sum over the reinterpreted dimensions is the ladj).
* ``AutoregressiveTransform`` (MAF, NSF, NAF, ...): ``log|df_i/dx_i|`` with the parameters
  computed from ``x_<i``, the exact diagonal of the triangular Jacobian.
* ``CouplingTransform`` (NICE, RealNVP, coupling NSF): the same on the transformed half, 0 on
  the constant half.
* ``PermutationTransform``: 0; the running map is permuted like the data.
* ``RotationTransform``, ``LULinearTransform``: a share of ``log|det W|`` chosen by
  ``attribution`` (as :mod:`lcma_ext.transforms.lu`; ``"lu"``: ``log|l_ii|`` of ``W = L U``).
* ``ComposedTransform``: chains its parts.
* The inverse (``f.inv``) of a permutation, or of an elementwise, autoregressive or coupling
  transform ``g`` (e.g. IAF): ``-log|dg_i/dx_i|`` at the output, the inverse's diagonal.
* ``NflowsBijection`` (lcma-ext levels and multi-scale flows inside zuko): their own
  ``forward_with_diag``.

Everything else (``FreeFormJacobianTransform`` of CNF, torch's ``ComposeTransform``, ...) raises a
``TypeError`` that names its class. A transform object of another library may join by defining
``call_and_ladj_with_diag(x, diag)`` and ``carry(tensor)``, as :class:`NflowsBijection` does.

References:
    F. Rozet et al. Zuko: Normalizing flows in PyTorch. 2022.
    G. Papamakarios, T. Pavlakou, I. Murray. Masked Autoregressive Flow for Density Estimation.
    NeurIPS 2017.
    C. Durkan et al. Neural Spline Flows. NeurIPS 2019.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # the first module lcma_ext.zuko imports: a clear error without the optional extra
    import zuko.transforms as zt
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "lcma_ext.zuko expected the optional dependency zuko; got an ImportError importing it "
        f'({error}). Install it with: pip install "lcma-ext[zuko]"'
    ) from error
from torch import Tensor
from torch.distributions import transforms as td
from torch.distributions.utils import _sum_rightmost

from lcma_ext.transforms.lu import check_attribution, svd_attribution

__all__ = [
    "DEFAULT_ATTRIBUTION",
    "ELEMENTWISE",
    "SUPPORTED",
    "call_and_ladj_with_diag",
    "carry",
    "require_supported",
]

#: How a rotation or an LU linear map shares ``log|det W|`` among dimensions by default.
DEFAULT_ATTRIBUTION = "svd-energy"

#: Elementwise bijections (``event_dim == 0``): their ``ladj`` is the per-dimension map.
#: ``zt.MonotonicTransform`` covers its subclasses (Bernstein, Gaussianization, SOS, ...).
ELEMENTWISE: tuple[type[td.Transform], ...] = (
    zt.IdentityTransform,
    zt.CosTransform,
    zt.SinTransform,
    zt.SoftclipTransform,
    zt.CircularShiftTransform,
    zt.SignedPowerTransform,
    zt.AdditiveTransform,
    zt.MonotonicAffineTransform,
    zt.MonotonicRQSTransform,
    zt.MonotonicTransform,
    td.ExpTransform,
    td.SigmoidTransform,
    td.TanhTransform,
    td.SoftplusTransform,
    td.AffineTransform,
)

#: Linear maps whose ``log|det W|`` is shared among dimensions by an attribution.
_LINEAR: tuple[type[td.Transform], ...] = (zt.RotationTransform, zt.LULinearTransform)

#: Every transform class with an adapter here (subclasses included), besides objects that bring
#: their own ``call_and_ladj_with_diag`` and ``carry``.
SUPPORTED: tuple[type[td.Transform], ...] = (
    *ELEMENTWISE,
    zt.DependentTransform,
    zt.ComposedTransform,
    zt.AutoregressiveTransform,
    zt.CouplingTransform,
    zt.PermutationTransform,
    *_LINEAR,
    td._InverseTransform,
)

DiagResult = tuple[Tensor, Tensor, Tensor]


def _name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _has_protocol(transform: object) -> bool:
    """Whether ``transform`` brings its own ``call_and_ladj_with_diag`` and ``carry``."""
    return callable(getattr(transform, "call_and_ladj_with_diag", None)) and callable(
        getattr(transform, "carry", None)
    )


def _unsupported(transform: object, where: str = "") -> TypeError:
    place = f" in {where}" if where else ""
    return TypeError(
        "expected a zuko transform with a per-dimension adapter (elementwise and monotonic "
        "transforms, DependentTransform, AutoregressiveTransform, CouplingTransform, "
        "PermutationTransform, RotationTransform, LULinearTransform, ComposedTransform, the "
        "inverse of a permutation or of a triangular one) or an object with "
        f"call_and_ladj_with_diag and carry{place}; got {_name(transform)}, which has no "
        "per-dimension adapter"
    )


def _is_elementwise(transform: object) -> bool:
    """Whether ``transform`` acts on each dimension alone (its Jacobian is diagonal)."""
    if isinstance(transform, ELEMENTWISE):
        return True
    if isinstance(transform, zt.DependentTransform):
        return _is_elementwise(transform.base)
    if isinstance(transform, zt.ComposedTransform):
        return all(_is_elementwise(part) for part in transform.transforms)
    if isinstance(transform, td._InverseTransform):
        return _is_elementwise(transform.inv)
    return False


def _is_triangular_in_place(transform: object) -> bool:
    """Whether ``transform`` keeps positions and has a triangular Jacobian (in some order)."""
    if isinstance(transform, zt.AutoregressiveTransform | zt.CouplingTransform):
        return True
    if isinstance(transform, zt.DependentTransform):
        return _is_triangular_in_place(transform.base)
    return _is_elementwise(transform)


def require_supported(transform: object, where: str = "") -> td.Transform:
    """Return ``transform`` if :func:`call_and_ladj_with_diag` supports its class.

    Only the class is checked here; an inverse of an unsupported map, or a triangular transform
    whose inner map is not elementwise, is refused when it is called.

    Raises:
        TypeError: naming the class, for any other object.
    """
    if _has_protocol(transform) or isinstance(transform, SUPPORTED):
        return transform  # type: ignore[return-value]
    raise _unsupported(transform, where)


def _check_event(transform: td.Transform, x: Tensor) -> None:
    need = transform.domain.event_dim
    if x.dim() < need:
        raise ValueError(
            f"{type(transform).__name__}: expected inputs with at least {need} event dimension(s); "
            f"got shape {tuple(x.shape)}"
        )


def _elementwise(transform: td.Transform, x: Tensor, diag: Tensor) -> DiagResult:
    if transform.domain.event_dim != 0 or transform.codomain.event_dim != 0:
        raise ValueError(
            f"{type(transform).__name__}: expected an elementwise transform (event_dim=0) for a "
            f"per-dimension log-det; got event_dim={transform.domain.event_dim}"
        )
    y, ladj = transform.call_and_ladj(x)  # type: ignore[attr-defined]  # zuko adds it to torch's Transform
    own = torch.broadcast_to(torch.as_tensor(ladj, dtype=y.dtype, device=y.device), y.shape)
    return y, ladj, diag + own


def _inner_elementwise(inner: object, owner: td.Transform) -> td.Transform:
    """The per-call map of an autoregressive or coupling transform; must be elementwise."""
    if not _is_elementwise(inner):
        raise TypeError(
            f"{type(owner).__name__}: expected its meta to return an elementwise transform (its "
            f"Jacobian diagonal is then exact); got {_name(inner)}"
        )
    return inner  # type: ignore[return-value]


def _coupling(transform: zt.CouplingTransform, x: Tensor, diag: Tensor, attr: str) -> DiagResult:
    size = transform.idx_a.numel() + transform.idx_b.numel()
    if x.dim() < 1 or x.shape[-1] != size:
        raise ValueError(
            f"CouplingTransform: expected {size} features in the last dimension; got shape "
            f"{tuple(x.shape)}"
        )
    x_a, x_b = transform.split(x)
    diag_a, diag_b = transform.split(diag)
    inner = _inner_elementwise(transform.meta(x_a), transform)
    y_b, ladj, diag_b = call_and_ladj_with_diag(inner, x_b, diag_b, attr)
    return transform.merge(x_a, y_b, x.shape), ladj, transform.merge(diag_a, diag_b, diag.shape)


def _permutation_order(transform: zt.PermutationTransform, x: Tensor) -> Tensor:
    order = transform.order
    if order.dim() != 1:
        raise ValueError(
            f"PermutationTransform: expected a 1D order; got shape {tuple(order.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != order.numel():
        raise ValueError(
            f"PermutationTransform: expected {order.numel()} features in the last dimension; got "
            f"shape {tuple(x.shape)}"
        )
    return order


def _linear_weight(transform: td.Transform) -> Tensor:
    if isinstance(transform, zt.RotationTransform):
        weight = transform.R
    else:
        weight = transform.L @ transform.U  # type: ignore[attr-defined]  # zuko's LULinearTransform
    if weight.dim() != 2:
        raise ValueError(
            f"{type(transform).__name__}: expected one (D, D) matrix for an attribution; got a "
            f"batch of matrices of shape {tuple(weight.shape)}"
        )
    return weight


def _linear_shares(transform: td.Transform, attribution: str) -> Tensor:
    """Per-output-dimension shares of ``log|det W|`` (they sum to it)."""
    attribution = check_attribution(attribution)
    weight = _linear_weight(transform)
    if attribution == "lu":
        if not isinstance(transform, zt.LULinearTransform):
            raise ValueError(
                "attribution 'lu' expected an LULinearTransform (W = L U, unit-diagonal U); got "
                f"{type(transform).__name__}"
            )
        # row i of L U carries log|l_ii| (U has a unit diagonal)
        return torch.diagonal(transform.L).abs().log()
    return svd_attribution(weight, attribution)


def _linear(transform: td.Transform, x: Tensor, diag: Tensor, attribution: str) -> DiagResult:
    size = _linear_weight(transform).shape[-1]
    if x.dim() < 1 or x.shape[-1] != size:
        raise ValueError(
            f"{type(transform).__name__}: expected {size} features in the last dimension; got "
            f"shape {tuple(x.shape)}"
        )
    y, ladj = transform.call_and_ladj(x)  # type: ignore[attr-defined]  # zuko adds it to torch's Transform
    return y, ladj, diag + _linear_shares(transform, attribution).to(diag.dtype)


def _inverse(transform: td.Transform, x: Tensor, diag: Tensor, attr: str) -> DiagResult:
    forward = transform.inv
    if isinstance(forward, zt.PermutationTransform):
        order = _permutation_order(forward, x)
        y, ladj = transform.call_and_ladj(x)  # type: ignore[attr-defined]  # zuko adds it to torch's Transform
        return y, ladj, diag[..., torch.argsort(order)]
    if not _is_triangular_in_place(forward):
        raise _unsupported(transform, f"the inverse of {_name(forward)}")
    y, ladj = transform.call_and_ladj(x)  # type: ignore[attr-defined]  # zuko adds it to torch's Transform
    # inverse of a triangular map g at x: diagonal 1 / g'_ii(y), so -(g's own map at y)
    _, _, own = call_and_ladj_with_diag(forward, y, torch.zeros_like(y), attr)
    return y, ladj, diag - own


def call_and_ladj_with_diag(
    transform: td.Transform,
    x: Tensor,
    diag: Tensor | None = None,
    attribution: str = DEFAULT_ATTRIBUTION,
) -> DiagResult:
    """``transform.call_and_ladj(x)`` with the per-dimension log-det (data to noise).

    Args:
        transform: A torch transform of a zuko flow (see the module docstring for the
            supported classes), e.g. ``lazy(c)`` of a zuko lazy transform.
        x: Inputs, ``(*batch, *event)``.
        diag: Running per-dimension contribution shaped like ``x``, or ``None`` for zeros.
        attribution: How rotations and LU linear maps share ``log|det W|``: ``"svd-energy"``
            (default), ``"svd-index"`` or ``"lu"`` (LU linear maps only).

    Returns:
        ``(y, ladj, diag_out)``: ``y, ladj == transform.call_and_ladj(x)``; ``diag_out`` shaped
        like ``y``.

    Raises:
        TypeError: for a transform without an adapter (the message names its class).
        ValueError: for inputs of the wrong shape or a ``diag`` not shaped like ``x``.

    Shapes:
        x, diag: ``(*batch, *event)``; y, diag_out: the transform's output shape.
    """
    if diag is None:
        diag = torch.zeros_like(x)
    elif diag.shape != x.shape:
        raise ValueError(
            f"expected diag shaped like inputs {tuple(x.shape)}; got {tuple(diag.shape)}"
        )
    if _has_protocol(transform):
        return transform.call_and_ladj_with_diag(x, diag)  # type: ignore[attr-defined]
    require_supported(transform)
    _check_event(transform, x)
    if isinstance(transform, ELEMENTWISE):
        return _elementwise(transform, x, diag)
    if isinstance(transform, zt.DependentTransform):
        y, ladj, diag = call_and_ladj_with_diag(transform.base, x, diag, attribution)
        return y, _sum_rightmost(ladj, transform.reinterpreted), diag
    if isinstance(transform, zt.ComposedTransform):
        event_dim = transform.domain_dim
        total: Any = 0
        for part in transform.transforms:
            x, ladj, diag = call_and_ladj_with_diag(part, x, diag, attribution)
            total = total + _sum_rightmost(ladj, event_dim - part.domain.event_dim)
            event_dim += part.codomain.event_dim - part.domain.event_dim
        return x, total, diag
    if isinstance(transform, zt.AutoregressiveTransform):
        inner = _inner_elementwise(transform.meta(x), transform)
        return call_and_ladj_with_diag(inner, x, diag, attribution)
    if isinstance(transform, zt.CouplingTransform):
        return _coupling(transform, x, diag, attribution)
    if isinstance(transform, zt.PermutationTransform):
        order = _permutation_order(transform, x)
        y, ladj = transform.call_and_ladj(x)
        return y, ladj, diag[..., order]
    if isinstance(transform, _LINEAR):
        return _linear(transform, x, diag, attribution)
    return _inverse(transform, x, diag, attribution)


def carry(transform: td.Transform, tensor: Tensor) -> Tensor:
    """Apply ``transform``'s rearrangement of positions to ``tensor`` (any dtype).

    Elementwise, autoregressive, coupling and linear maps keep every dimension in place
    (identity); permutations (and their inverses) permute the last dimension; compositions chain.

    Raises:
        TypeError: for a transform without an adapter (the message names its class).
    """
    if _has_protocol(transform):
        return transform.carry(tensor)  # type: ignore[attr-defined]
    require_supported(transform)
    if isinstance(transform, zt.ComposedTransform):
        for part in transform.transforms:
            tensor = carry(part, tensor)
        return tensor
    if isinstance(transform, zt.DependentTransform):
        return carry(transform.base, tensor)
    if isinstance(transform, zt.PermutationTransform):
        return tensor[..., _permutation_order(transform, tensor)]
    if isinstance(transform, td._InverseTransform):
        forward = transform.inv
        if isinstance(forward, zt.PermutationTransform):
            return tensor[..., torch.argsort(_permutation_order(forward, tensor))]
        if not _is_triangular_in_place(forward):
            raise _unsupported(transform, f"the inverse of {_name(forward)}")
    return tensor
