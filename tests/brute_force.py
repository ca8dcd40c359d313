"""Brute-force references shared by the tests: autograd Jacobians, slogdet, matrix logarithms.

Nothing here calls the code under test except through the map that is differentiated: the
references are ``torch.autograd.functional.jacobian``, ``torch.linalg.slogdet``, numpy's SVD and
scipy's ``logm``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


def jacobian(
    batch_map: Callable[[torch.Tensor], torch.Tensor],
    x_single: torch.Tensor,
    vectorize: bool = False,
):
    """Jacobian ``(D_out, D_in)`` at one example of a batched map, by autograd.

    ``batch_map`` takes a batch ``(1, *x_single.shape)`` and returns the output batch.
    ``vectorize`` batches the ``D_out`` backward passes (``torch.vmap``): same values, faster.
    """

    def flat(vector: torch.Tensor) -> torch.Tensor:
        return batch_map(vector.view(1, *x_single.shape)).reshape(-1)

    return torch.autograd.functional.jacobian(flat, x_single.reshape(-1), vectorize=vectorize)


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
