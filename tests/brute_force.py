"""Brute-force references shared by the tests: autograd Jacobians and SVD attributions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def jacobian(batch_map: Callable[[torch.Tensor], torch.Tensor], x_single: torch.Tensor):
    """Jacobian ``(D_out, D_in)`` at one example of a batched map, by autograd.

    ``batch_map`` takes a batch ``(1, *x_single.shape)`` and returns the output batch.
    """

    def flat(vector: torch.Tensor) -> torch.Tensor:
        return batch_map(vector.view(1, *x_single.shape)).reshape(-1)

    return torch.autograd.functional.jacobian(flat, x_single.reshape(-1))


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
