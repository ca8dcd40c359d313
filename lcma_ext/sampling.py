"""Sampling from trained flows: samples at a temperature (noise scaled by it).

Example:
    >>> from lcma_ext.data import LogitPreprocessing
    >>> from lcma_ext.models import build_flow, make_level_factory
    >>> from lcma_ext.pipeline import build_multiscale_transform
    >>> factory = make_level_factory("realnvp", "tiny")
    >>> flow = build_flow(build_multiscale_transform(factory, (1, 8, 8), 3), (1, 8, 8))
    >>> sample_images(flow, LogitPreprocessing(17), 4, temperature=0.7, seed=0).shape
    torch.Size([4, 1, 8, 8])
"""

from __future__ import annotations

import torch
from nflows.flows import Flow
from torch import Tensor

from lcma_ext.data.preprocess import LogitPreprocessing

__all__ = ["sample_images"]


@torch.no_grad()
def sample_images(
    flow: Flow, preprocessing: LogitPreprocessing, num: int, temperature: float, seed: int
) -> Tensor:
    """``num`` samples in ``[0, 1]`` drawn at ``temperature`` (the noise scaled by it).

    The noise comes from its own ``torch.Generator`` seeded with ``seed``, so sampling leaves
    torch's global random state alone. A learned prior with ``sample_at_temperature`` (the
    Flow-VAE prior) draws its own tempered noise.

    Returns:
        ``(num, C, H, W)`` on the CPU.
    """
    flow.eval()
    parameter = next(flow.parameters())
    shape = flow._distribution._shape
    generator = torch.Generator().manual_seed(seed)
    if hasattr(flow._distribution, "sample_at_temperature"):  # a learned prior (Flow-VAE)
        noise = flow._distribution.sample_at_temperature(num, temperature, generator=generator)
    else:
        noise = temperature * torch.randn((num, *shape), generator=generator, dtype=parameter.dtype)
    samples, _ = flow._transform.inverse(noise.to(parameter.device))
    return preprocessing.to_unit(samples).cpu()
