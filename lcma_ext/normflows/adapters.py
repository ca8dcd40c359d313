"""normflows flows with the per-dimension log-det protocol.

normflows runs its flows from noise to data in ``forward``; its ``inverse`` is the data-to-noise
direction. lcma-ext's protocol is always data to noise, so on these classes
``forward_with_diag(z, diag=None)`` runs normflows' ``inverse`` and returns its outputs and
log-det unchanged, plus the per-dimension map. ``carry`` applies the data-to-noise
rearrangement.

Each class subclasses the normflows class of the same name with the same constructor. The
functions :func:`data_to_noise_with_diag` and :func:`carry_data_to_noise` also accept plain
normflows instances of these classes (for example the ones a normflows ``GlowBlock`` builds
inside itself), so existing normflows models work without rebuilding.

References:
    V. Stimper et al. normflows: A PyTorch Package for Normalizing Flows. JOSS 2023.
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import normflows as nf
import torch
from torch import Tensor, nn

from lcma_ext.transforms.base import check_diag
from lcma_ext.transforms.lu import check_attribution, svd_attribution

__all__ = [
    "ActNorm",
    "AffineCouplingBlock",
    "GlowBlock",
    "Invertible1x1Conv",
    "Permute",
    "Squeeze",
    "carry_data_to_noise",
    "data_to_noise_with_diag",
    "per_sample_log_det",
    "require_supported",
]

DEFAULT_ATTRIBUTION = "svd-energy"


def _sum_except_batch(tensor: Tensor) -> Tensor:
    return torch.sum(tensor, dim=list(range(1, tensor.dim())))


def per_sample_log_det(log_det: Tensor | float, z: Tensor) -> Tensor:
    """normflows returns a scalar log-det for some flows; the protocol wants shape ``(B,)``."""
    log_det = torch.as_tensor(log_det, dtype=z.dtype, device=z.device)
    return log_det.expand(z.shape[0]) if log_det.dim() == 0 else log_det


def _actnorm(flow: nf.flows.ActNorm, z: Tensor, diag: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if z.dim() != flow.s.dim() or any(
        size not in (1, got) for size, got in zip(flow.s.shape[1:], z.shape[1:])
    ):
        raise ValueError(
            f"ActNorm: expected inputs broadcastable with shape {tuple(flow.s.shape[1:])}; "
            f"got {tuple(z.shape[1:])}"
        )
    if z.shape[0] == 0:  # no data to initialise from: nothing to compute either
        return z.clone(), z.new_zeros(0), diag - flow.s
    outputs, log_det = flow.inverse(z)  # runs the data-dependent init first, as normflows does
    return outputs, per_sample_log_det(log_det, z), diag - flow.s


def _invertible_1x1_attribution(flow: nf.flows.Invertible1x1Conv, attribution: str) -> Tensor:
    """Per-output-channel shares of ``log|det W|`` for the data-to-noise map ``z -> W z``."""
    if attribution == "lu":
        if not flow.use_lu:
            raise ValueError(
                "attribution='lu' expected an Invertible1x1Conv built with use_lu=True; "
                "got use_lu=False"
            )
        # W = P L U with unit-diagonal L: row i of L U carries log|S_i|; P sends row i to row j.
        return flow.P @ flow.log_S
    weight = flow._assemble_W() if flow.use_lu else flow.W
    return svd_attribution(weight, attribution)


def _invertible_1x1(
    flow: nf.flows.Invertible1x1Conv, z: Tensor, diag: Tensor, attribution: str
) -> tuple[Tensor, Tensor, Tensor]:
    if z.dim() != 4 or z.shape[1] != flow.num_channels:
        raise ValueError(
            f"Invertible1x1Conv: expected (B, {flow.num_channels}, H, W); got {tuple(z.shape)}"
        )
    outputs, log_det = flow.inverse(z)
    log_det = per_sample_log_det(log_det, z)
    shares = _invertible_1x1_attribution(flow, attribution).to(diag.dtype)
    return outputs, log_det, diag + shares.view(1, -1, 1, 1)


def _coupling_elementwise(
    coupling: nf.flows.AffineCoupling, z1: Tensor, z2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """normflows ``AffineCoupling.inverse`` on ``[z1, z2]``, plus the elementwise log-det."""
    try:
        param = coupling.param_map(z1)
    except RuntimeError as error:  # the param_map alone knows the channel count it accepts
        raise ValueError(
            f"AffineCouplingBlock: expected a conditioning half its param_map accepts; got "
            f"shape {tuple(z1.shape)} ({error})"
        ) from error
    expected = 2 * z2.shape[1] if coupling.scale else z2.shape[1]
    if param.shape[1] != expected or param.shape[2:] != z2.shape[2:]:
        raise ValueError(
            f"AffineCouplingBlock: expected param_map output of shape (B, {expected}, "
            f"{', '.join(map(str, z2.shape[2:]))}); got {tuple(param.shape)}"
        )
    if not coupling.scale:
        z2 = z2 - param
        zeros = torch.zeros_like(z2)
        return z2, _sum_except_batch(zeros), zeros
    shift = param[:, 0::2, ...]
    scale_ = param[:, 1::2, ...]
    dims = list(range(1, shift.dim()))
    if coupling.scale_map == "exp":
        z2 = (z2 - shift) * torch.exp(-scale_)
        return z2, -torch.sum(scale_, dim=dims), -scale_
    if coupling.scale_map == "sigmoid":
        scale = torch.sigmoid(scale_ + 2)
        z2 = (z2 - shift) * scale
        log_scale = torch.log(scale)
        return z2, torch.sum(log_scale, dim=dims), log_scale
    if coupling.scale_map == "sigmoid_inv":
        scale = torch.sigmoid(scale_ + 2)
        z2 = (z2 - shift) / scale
        log_scale = torch.log(scale)
        return z2, -torch.sum(log_scale, dim=dims), -log_scale
    raise ValueError(
        f"expected scale_map in ('exp', 'sigmoid', 'sigmoid_inv'); got {coupling.scale_map!r}"
    )


def _affine_coupling_block(
    block: nf.flows.AffineCouplingBlock, z: Tensor, diag: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    split, coupling, merge = block.flows  # Split, AffineCoupling, Merge (noise -> data order)
    (z1, z2), _ = merge.inverse(z)
    (d1, d2), _ = merge.inverse(diag)
    if d2.shape != z2.shape:
        raise ValueError(f"expected the coupled half of shape {tuple(z2.shape)}; got {d2.shape}")
    z2, log_det, own = _coupling_elementwise(coupling, z1, z2)
    outputs, _ = split.inverse([z1, z2])
    diag_out, _ = split.inverse([d1, d2 + own])
    log_det_tot = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    return outputs, log_det_tot + log_det, diag_out


def _rearrangement(flow: nf.flows.Flow, z: Tensor, diag: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    outputs, log_det = flow.inverse(z)
    return outputs, per_sample_log_det(log_det, z), carry_data_to_noise(flow, diag)


def _check_squeeze(z: Tensor) -> None:
    if z.dim() != 4 or z.shape[2] % 2 or z.shape[3] % 2:
        raise ValueError(f"Squeeze: expected (B, C, H, W) with even H and W; got {tuple(z.shape)}")


def _check_permute(flow: nf.flows.Permute, z: Tensor) -> None:
    if z.dim() < 2 or z.shape[1] != flow.num_channels:
        raise ValueError(
            f"Permute: expected {flow.num_channels} channels in dim 1; got {tuple(z.shape)}"
        )


_SUPPORTED = (
    nf.flows.ActNorm,
    nf.flows.Invertible1x1Conv,
    nf.flows.AffineCouplingBlock,
    nf.flows.GlowBlock,
    nf.flows.Squeeze,
    nf.flows.Permute,
)


def _has_protocol(flow: object) -> bool:
    """Whether ``flow`` brings its own ``forward_with_diag`` and ``carry`` (data to noise)."""
    return callable(getattr(flow, "forward_with_diag", None)) and callable(
        getattr(flow, "carry", None)
    )


def _unsupported(flow: object, where: str = "") -> TypeError:
    cls = type(flow)
    place = f" in {where}" if where else ""
    return TypeError(
        "expected a normflows ActNorm, Invertible1x1Conv, AffineCouplingBlock, GlowBlock, "
        f"Squeeze or Permute, or a flow with forward_with_diag and carry{place}; got "
        f"{cls.__module__}.{cls.__qualname__}, which has no per-dimension adapter. Use a "
        "supported flow, or subclass it and add forward_with_diag(z, context, diag) and "
        "carry(tensor, context) in the data-to-noise direction (as "
        "lcma_ext.normflows.ResidualFlowBlock does)"
    )


def require_supported(flow: object, where: str = "") -> nf.flows.Flow:
    """Return ``flow`` if :func:`data_to_noise_with_diag` supports it, else raise ``TypeError``.

    Supported: the normflows classes of this module (plain or lcma-ext subclasses) and any
    ``normflows.flows.Flow`` with its own ``forward_with_diag`` and ``carry``.

    Raises:
        TypeError: naming the class and what to do, for any other object.
    """
    if isinstance(flow, nf.flows.Flow) and (isinstance(flow, _SUPPORTED) or _has_protocol(flow)):
        return flow
    raise _unsupported(flow, where)


def carry_data_to_noise(flow: nf.flows.Flow, tensor: Tensor) -> Tensor:
    """Apply a normflows flow's data-to-noise rearrangement to ``tensor`` (any dtype).

    Flows with their own ``carry`` (e.g. the residual wrappers) use it.

    Raises:
        TypeError: for a flow without a per-dimension adapter (the message names its class).
    """
    if isinstance(flow, nf.flows.Squeeze):
        _check_squeeze(tensor)
        return nf.flows.Squeeze.inverse(flow, tensor)[0]
    if isinstance(flow, nf.flows.Permute):
        _check_permute(flow, tensor)
        return nf.flows.Permute.inverse(flow, tensor)[0]
    if isinstance(flow, nf.flows.GlowBlock | nf.flows.AffineCouplingBlock | nf.flows.ActNorm):
        return tensor
    if isinstance(flow, nf.flows.Invertible1x1Conv):
        return tensor
    if _has_protocol(flow):  # e.g. lcma_ext's residual wrappers
        return flow.carry(tensor)
    raise _unsupported(flow)


def data_to_noise_with_diag(
    flow: nf.flows.Flow | Sequence[nf.flows.Flow],
    z: Tensor,
    diag: Tensor | None = None,
    attribution: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """normflows' ``inverse`` (data to noise) with the per-dimension log-det.

    Args:
        flow: A supported normflows flow, or a list (or ``nn.ModuleList``) of them in normflows
            order (noise to data), which is then run in reverse, as normflows' ``inverse`` does.
        z: Data-side tensor.
        diag: Running per-dimension contribution shaped like ``z``, or ``None`` for zeros.
        attribution: For ``Invertible1x1Conv``: ``"svd-energy"``, ``"svd-index"`` or ``"lu"``.
            ``None`` uses the flow's own ``attribution`` attribute if it has one, else
            ``"svd-energy"``.

    Returns:
        ``(outputs, log_det, diag_out)``, with ``outputs, log_det == flow.inverse(z)``.
    """
    diag = check_diag(z, diag)
    if isinstance(flow, Sequence | nn.ModuleList):
        log_det_tot = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for member in reversed(list(flow)):
            z, log_det, diag = data_to_noise_with_diag(member, z, diag, attribution)
            log_det_tot = log_det_tot + log_det
        return z, log_det_tot, diag
    attribution = check_attribution(
        attribution or getattr(flow, "attribution", None) or DEFAULT_ATTRIBUTION
    )
    if isinstance(flow, nf.flows.GlowBlock):
        log_det_tot = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for member in reversed(flow.flows):
            z, log_det, diag = data_to_noise_with_diag(member, z, diag, attribution)
            log_det_tot += log_det
        return z, log_det_tot, diag
    if isinstance(flow, nf.flows.AffineCouplingBlock):
        return _affine_coupling_block(flow, z, diag)
    if isinstance(flow, nf.flows.ActNorm):
        return _actnorm(flow, z, diag)
    if isinstance(flow, nf.flows.Invertible1x1Conv):
        return _invertible_1x1(flow, z, diag, attribution)
    if isinstance(flow, nf.flows.Squeeze):
        _check_squeeze(z)
        return _rearrangement(flow, z, diag)
    if isinstance(flow, nf.flows.Permute):
        _check_permute(flow, z)
        return _rearrangement(flow, z, diag)
    if callable(getattr(flow, "forward_with_diag", None)):  # e.g. lcma_ext's residual wrappers
        return flow.forward_with_diag(z, None, diag)
    raise _unsupported(flow)


class _NormflowsDiagMixin:
    """Protocol methods for normflows subclasses (data to noise = normflows ``inverse``)."""

    def forward_with_diag(
        self, inputs: Tensor, context: Tensor | None = None, diag: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Data to noise (normflows ``inverse``) with the per-dimension log-det.

        ``context`` is accepted for protocol compatibility and must be ``None``.
        """
        if context is not None:
            raise ValueError("expected context=None for a normflows flow; got a tensor")
        return data_to_noise_with_diag(self, inputs, diag)

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        """Apply the data-to-noise rearrangement to ``tensor``."""
        return carry_data_to_noise(self, tensor)


class ActNorm(_NormflowsDiagMixin, nf.flows.ActNorm):
    """normflows ``ActNorm`` with the protocol: contribution ``-s`` per dimension.

    Shapes:
        inputs: ``(B, *shape)`` with the constructor's ``shape``, e.g. ``(C, 1, 1)`` for images.
    """


class Invertible1x1Conv(_NormflowsDiagMixin, nf.flows.Invertible1x1Conv):
    """normflows ``Invertible1x1Conv`` with the protocol.

    Args:
        num_channels, use_lu: As in normflows.
        attribution: ``"svd-energy"`` (default), ``"svd-index"`` or ``"lu"`` (needs
            ``use_lu=True``); see :mod:`lcma_ext.transforms.lu`.
    """

    def __init__(
        self, num_channels: int, use_lu: bool = False, attribution: str = DEFAULT_ATTRIBUTION
    ) -> None:
        super().__init__(num_channels, use_lu=use_lu)
        if attribution == "lu" and not use_lu:
            raise ValueError("attribution='lu' expected use_lu=True; got use_lu=False")
        self.attribution = check_attribution(attribution)


class AffineCouplingBlock(_NormflowsDiagMixin, nf.flows.AffineCouplingBlock):
    """normflows ``AffineCouplingBlock`` with the protocol.

    Contribution: the elementwise log-scale of the data-to-noise map on the coupled half,
    0 on the conditioning half.
    """


class GlowBlock(_NormflowsDiagMixin, nf.flows.GlowBlock):
    """normflows ``GlowBlock`` (coupling, 1x1 conv, ActNorm) with the protocol.

    Args:
        *args, **kwargs: As in normflows.
        attribution: How its 1x1 convolution shares ``log|det W|`` among channels.
    """

    def __init__(self, *args: Any, attribution: str = DEFAULT_ATTRIBUTION, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attribution = check_attribution(attribution)


class Squeeze(_NormflowsDiagMixin, nf.flows.Squeeze):
    """normflows ``Squeeze``; data to noise maps ``(C, H, W)`` to ``(4C, H/2, W/2)``."""


class Permute(_NormflowsDiagMixin, nf.flows.Permute):
    """normflows ``Permute`` (``"shuffle"`` or ``"swap"``) with ``carry``."""
