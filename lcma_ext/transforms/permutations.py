"""Permutations with per-dimension log-dets (pure rearrangements, contribution 0)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from nflows.transforms import permutations as nflows_permutations
from torch import Tensor

from lcma_ext.transforms.base import DiagMixin

__all__ = ["Permutation", "RandomPermutation", "ReversePermutation"]


class _PermutationDiagMixin(DiagMixin):
    # set by the nflows Permutation this mixin is combined with
    _dim: int
    _permutation: Tensor
    forward: Callable[..., tuple[Tensor, Tensor]]

    def carry(self, tensor: Tensor, context: Tensor | None = None) -> Tensor:
        if self._dim >= tensor.dim() or tensor.shape[self._dim] != len(self._permutation):
            raise ValueError(
                f"{type(self).__name__}: expected size {len(self._permutation)} in dim "
                f"{self._dim}; got shape {tuple(tensor.shape)}"
            )
        return torch.index_select(tensor, self._dim, self._permutation)

    def _forward_with_diag(
        self, inputs: Tensor, context: Tensor | None, diag: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        diag_out = self.carry(diag)
        outputs, logabsdet = self.forward(inputs, context)
        return outputs, logabsdet, diag_out


class Permutation(_PermutationDiagMixin, nflows_permutations.Permutation):
    """nflows ``Permutation`` with ``forward_with_diag`` and ``carry``."""


class RandomPermutation(_PermutationDiagMixin, nflows_permutations.RandomPermutation):
    """nflows ``RandomPermutation`` with ``forward_with_diag`` and ``carry``."""


class ReversePermutation(_PermutationDiagMixin, nflows_permutations.ReversePermutation):
    """nflows ``ReversePermutation`` with ``forward_with_diag`` and ``carry``."""
