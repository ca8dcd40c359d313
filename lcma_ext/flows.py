"""Flow-level helpers for the per-dimension protocol."""

from __future__ import annotations

from typing import Literal

import torch
from nflows.flows import Flow
from torch import Tensor, nn

from lcma_ext.transforms.base import carry_positions, require_diag_aware

__all__ = ["flow_dtype_device", "log_prob_with_contributions"]


def flow_dtype_device(flow: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of ``flow``'s first parameter (default dtype and CPU if it has none)."""
    parameter = next(iter(flow.parameters()), None)
    if parameter is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return parameter.dtype, parameter.device


def log_prob_with_contributions(
    flow: Flow,
    inputs: Tensor,
    context: Tensor | None = None,
    layout: Literal["output", "input"] = "output",
) -> tuple[Tensor, Tensor]:
    """``log_prob`` of an nflows ``Flow`` and each example's per-dimension contribution map.

    The flow's transform must be diag-aware (built from :mod:`lcma_ext.transforms`).

    Args:
        flow: An ``nflows.flows.Flow``.
        inputs: Data, shape ``(B, *event_shape)``.
        context: Optional context, as for ``flow.log_prob``.
        layout: ``"output"`` returns the map in the layout of the transform's output (after
            squeezes and permutations); ``"input"`` maps each output dimension back to the input
            position it was carried from, so the map is shaped like ``inputs``.

    Returns:
        ``(log_prob, contributions)``: ``log_prob`` of shape ``(B,)`` equals
        ``flow.log_prob(inputs, context)``; ``contributions`` sum per example to the transform's
        log|det J|.

    Raises:
        TypeError: if the transform is not diag-aware.
        ValueError: for an unknown ``layout`` or non-finite ``inputs``.
    """
    if layout not in ("output", "input"):
        raise ValueError(f"expected layout 'output' or 'input'; got {layout!r}")
    transform = require_diag_aware(flow._transform, "the flow's transform")
    if not torch.isfinite(inputs).all():
        count = int((~torch.isfinite(inputs)).sum())
        raise ValueError(f"expected finite inputs; got {count} non-finite values")
    embedded_context = flow._embedding_net(context) if context is not None else None
    noise, logabsdet, diag = transform.forward_with_diag(inputs, context=embedded_context)
    log_prob = flow._distribution.log_prob(noise, context=embedded_context) + logabsdet
    if layout == "input":
        if diag.shape[1:].numel() != inputs.shape[1:].numel():
            raise ValueError(
                "layout='input' needs a transform that keeps every dimension; expected "
                f"{inputs.shape[1:].numel()} output dimensions; got {diag.shape[1:].numel()}"
            )
        positions = carry_positions(transform, inputs.shape[1:], device=inputs.device)
        flat = torch.zeros_like(inputs).flatten(1)
        index = positions.reshape(1, -1).expand(inputs.shape[0], -1)
        diag = flat.scatter(1, index, diag.reshape(inputs.shape[0], -1)).view_as(inputs)
    return log_prob, diag
