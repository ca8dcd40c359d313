"""Flow-level helpers: the parts of an nflows ``Flow``, modes, and the per-dimension protocol.

* :func:`flow_parts` is the one place that reads nflows' private ``Flow._transform``,
  ``_distribution`` and ``_embedding_net``.
* :func:`eval_mode` switches a module to eval mode and restores every submodule's own mode.
* :func:`build_flow` wraps a diag-aware transform in a ``Flow`` with a standard normal base.
* :func:`log_prob_with_contributions` is ``log_prob`` with each example's per-dimension map.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch
from nflows.distributions import Distribution, StandardNormal
from nflows.flows import Flow
from nflows.transforms.base import Transform
from torch import Tensor, nn

from lcma_ext.transforms.base import carry_positions, require_diag_aware

__all__ = [
    "FlowParts",
    "build_flow",
    "count_parameters",
    "eval_mode",
    "flow_dtype_device",
    "flow_parts",
    "log_prob_with_contributions",
]


class FlowParts(NamedTuple):
    """The parts of an nflows ``Flow`` (nflows keeps them private)."""

    transform: Transform
    distribution: Distribution
    embedding_net: nn.Module


def flow_parts(flow: Flow) -> FlowParts:
    """``(transform, distribution, embedding_net)`` of an nflows ``Flow``.

    Raises:
        TypeError: for anything but an ``nflows.flows.Flow``.
    """
    if not isinstance(flow, Flow):
        cls = type(flow)
        raise TypeError(f"expected an nflows.flows.Flow; got {cls.__module__}.{cls.__qualname__}")
    return FlowParts(flow._transform, flow._distribution, flow._embedding_net)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(module):`` eval mode inside; afterwards every submodule's own mode.

    Not only the top module's: a flow whose levels are in different modes (a frozen level in
    eval mode inside a training flow) gets each back as it was, also when the body raises.
    """
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes:
            submodule.training = training


def flow_dtype_device(flow: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of ``flow``'s first parameter (default dtype and CPU if it has none)."""
    parameter = next(iter(flow.parameters()), None)
    if parameter is None:
        return torch.get_default_dtype(), torch.device("cpu")
    return parameter.dtype, parameter.device


def build_flow(transform: Transform, shape: Sequence[int]) -> Flow:
    """nflows ``Flow`` of a diag-aware ``transform`` with a standard normal base.

    The base has the transform's output shape (flat ``[D]`` for a multi-scale transform, the last
    level's shape for an NMS transform), found with ``carry_positions`` so no data runs through
    the transform (ActNorm would data-initialize).

    Args:
        transform: Diag-aware transform (data to noise).
        shape: Event shape of the data, e.g. ``(C, H, W)``.

    Raises:
        ValueError: for a transform that does not keep every dimension.
    """
    output_shape = tuple(carry_positions(transform, tuple(int(s) for s in shape)).shape)
    if math.prod(output_shape) != math.prod(int(s) for s in shape):
        raise ValueError(
            f"expected a transform that keeps all {math.prod(shape)} dimensions; "
            f"got output shape {output_shape}"
        )
    return Flow(transform, StandardNormal(list(output_shape)))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


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
    parts = flow_parts(flow)
    transform = require_diag_aware(parts.transform, "the flow's transform")
    if not torch.isfinite(inputs).all():
        count = int((~torch.isfinite(inputs)).sum())
        raise ValueError(f"expected finite inputs; got {count} non-finite values")
    embedded_context = parts.embedding_net(context) if context is not None else None
    noise, logabsdet, diag = transform.forward_with_diag(inputs, context=embedded_context)
    log_prob = parts.distribution.log_prob(noise, context=embedded_context) + logabsdet
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
