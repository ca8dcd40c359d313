"""Brute-force references shared by the tests: autograd Jacobians, slogdet, matrix logarithms.

Every brute-force helper of the suite lives here (none in a test module). Nothing here imports
or calls the code under test except through the map that is differentiated: the references are
``torch.autograd`` (``functional.jacobian``, or ``grad`` over a batch of copies),
``torch.linalg.slogdet``, the standard normal written out, numpy's SVD and scipy's ``logm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch


def joint_jacobian(
    batch_map: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    vectorize: bool = False,
) -> torch.Tensor:
    """Jacobian ``(D_out, D_1 + ... + D_k)`` at one example of a batched map of ``k`` inputs.

    ``batch_map(*batches)`` takes one batch ``(1, *inputs[i].shape)`` per input and returns the
    output batch; the columns follow the inputs in order (e.g. the data, then the noise of a
    cross-unit coupling: the Jacobian of the joint map ``(x, e) -> outputs``).
    ``vectorize`` batches the ``D_out`` backward passes (``torch.vmap``): same values, faster.
    """
    sizes = [single.numel() for single in inputs]

    def flat(vector: torch.Tensor) -> torch.Tensor:
        parts = torch.split(vector, sizes)
        batches = [part.view(1, *single.shape) for part, single in zip(parts, inputs)]
        return batch_map(*batches).reshape(-1)

    start = torch.cat([single.reshape(-1) for single in inputs])
    return torch.autograd.functional.jacobian(flat, start, vectorize=vectorize)


def jacobian(
    batch_map: Callable[[torch.Tensor], torch.Tensor],
    x_single: torch.Tensor,
    vectorize: bool = False,
) -> torch.Tensor:
    """Jacobian ``(D_out, D_in)`` at one example of a batched map, by autograd.

    ``batch_map`` takes a batch ``(1, *x_single.shape)`` and returns the output batch.
    ``vectorize`` batches the ``D_out`` backward passes (``torch.vmap``): same values, faster.
    """
    return joint_jacobian(batch_map, [x_single], vectorize=vectorize)


def jacobian_by_copies(
    batch_map: Callable[[torch.Tensor], torch.Tensor], x_single: torch.Tensor
) -> torch.Tensor:
    """Jacobian ``(D, D)`` at one example of a batched map with ``D`` outputs per example, in one
    backward pass: example ``i`` of a batch of ``D`` copies of ``x_single`` gives row ``i``.

    Needs a map that treats the examples of a batch independently (eval mode).
    """
    dimension = x_single.numel()
    copies = x_single.reshape(1, -1).repeat(dimension, 1).requires_grad_(True)
    outputs = batch_map(copies.view(dimension, *x_single.shape)).reshape(dimension, -1)
    if outputs.shape[1] != dimension:
        raise ValueError(
            f"expected {dimension} outputs per example (a square Jacobian); got {outputs.shape[1]}"
        )
    (rows,) = torch.autograd.grad(outputs.diagonal().sum(), copies)
    return rows


def slogdet(jac: torch.Tensor) -> tuple[float, float]:
    """``(sign, log|det|)`` of a square Jacobian, by ``torch.linalg.slogdet``."""
    if jac.dim() != 2 or jac.shape[0] != jac.shape[1]:
        raise ValueError(f"expected a square Jacobian; got shape {tuple(jac.shape)}")
    sign, logabsdet = torch.linalg.slogdet(jac)
    return float(sign), float(logabsdet)


def log_abs_diagonal(jac: torch.Tensor) -> torch.Tensor:
    """``log|J_ii|``: the per-dimension log-det of a (permuted) triangular Jacobian."""
    return torch.log(torch.diagonal(jac).abs())


def logm_diagonal(jac: torch.Tensor) -> np.ndarray:
    """Diagonal of scipy's principal matrix logarithm of ``J`` (real part; ``J`` has no
    eigenvalue on the closed negative real axis). Sums to ``log det J`` for such ``J``."""
    import scipy.linalg

    log = scipy.linalg.logm(jac.detach().numpy())
    return np.real(np.diag(log))


def level_logdets(
    levels: Sequence[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]],
    x: torch.Tensor,
) -> np.ndarray:
    """Per example and level, ``log|det J|`` of each level of a chain, by autograd + slogdet.

    Level ``l`` receives level ``l - 1``'s full output (a non-multi-scale chain). Only each
    level's outputs are differentiated; the log-dets the levels return are not used.

    Returns:
        ``(B, len(levels))`` float64 array.
    """
    out = np.zeros((x.shape[0], len(levels)))
    for b in range(x.shape[0]):
        hidden = x[b]
        for index, level in enumerate(levels):
            jac = jacobian(lambda batch, level=level: level(batch)[0], hidden, vectorize=True)
            sign, logabsdet = slogdet(jac)
            if sign == 0:
                raise AssertionError(f"level {index} is singular at example {b}")
            out[b, index] = logabsdet
            with torch.no_grad():
                hidden = level(hidden.unsqueeze(0))[0][0]
    return out


def svd_attribution(weight: np.ndarray, mode: str) -> np.ndarray:
    """Per-output-dimension split of ``log|det W|`` from numpy's SVD ``W = U S V^T``.

    ``"svd-index"``: ``log s_i``; ``"svd-energy"``: ``sum_j U_ij^2 log s_j``.
    """
    u, s, _ = np.linalg.svd(weight)
    if mode == "svd-index":
        return np.log(s)
    if mode == "svd-energy":
        return (u**2) @ np.log(s)
    raise ValueError(f"expected mode 'svd-index' or 'svd-energy'; got {mode!r}")


def standard_normal_log_prob(
    latent_map: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    jacobian_fn: Callable[
        [Callable[[torch.Tensor], torch.Tensor], torch.Tensor], torch.Tensor
    ] = jacobian,
) -> torch.Tensor:
    """Per example, ``log N(z(x); 0, I) + log|det dz/dx|`` by the change of variables.

    ``latent_map`` takes a batch and returns every latent of it (any shape, ``D`` per example):
    the whole data-to-noise map. Its Jacobian at each example (``jacobian_fn``: :func:`jacobian`
    or :func:`jacobian_by_copies`) gives ``log|det|`` by :func:`slogdet`; the standard normal is
    written out.

    Returns:
        ``(B,)`` tensor.
    """
    values = []
    for index, row in enumerate(x):
        sign, logabsdet = slogdet(jacobian_fn(latent_map, row))
        if sign == 0:
            raise AssertionError(f"the data-to-noise map is singular at example {index}")
        with torch.no_grad():
            z = latent_map(row.unsqueeze(0)).reshape(-1)
        values.append(-0.5 * (z**2).sum() - 0.5 * z.numel() * math.log(2 * math.pi) + logabsdet)
    return torch.stack(values)


def transform_log_prob(
    transform: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor
) -> torch.Tensor:
    """:func:`standard_normal_log_prob` of a transform ``batch -> (outputs, logabsdet)`` (nflows'
    convention) whose outputs are every latent: its Jacobian by :func:`jacobian_by_copies`, its
    own ``logabsdet`` unused."""
    return standard_normal_log_prob(lambda batch: transform(batch)[0], x, jacobian_by_copies)
