"""Fixtures shared by the test modules (the brute-force references are in brute_force.py).

- ``float64``: torch's default dtype is float64 for the test. A module of float64 brute-force
  checks says ``pytestmark = pytest.mark.usefixtures("float64")``.
- ``maps``: the contribution maps of an untrained tiny RealNVP NMS flow on 64 digits, once per
  module (a module may override it with maps of its own, as test_granularity.py does).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lcma_ext.contributions import ContributionMaps, estimate_contributions
from lcma_ext.data import LogitPreprocessing, load_dataset
from lcma_ext.models import build_flow, make_level_factory
from lcma_ext.pipeline import build_nms_transform

DIGITS_SHAPE = (1, 8, 8)


@pytest.fixture
def float64() -> Iterator[None]:
    """Run the test with ``torch.float64`` as the default dtype; restore the previous one."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def maps() -> ContributionMaps:
    """Contributions of an untrained NMS flow on 64 digits (enough for the split logic)."""
    factory = make_level_factory("realnvp", "tiny")
    torch.manual_seed(0)
    nms = build_flow(build_nms_transform(factory, DIGITS_SHAPE, 3), DIGITS_SHAPE)
    data = load_dataset("digits", limit=64)
    y, _ = LogitPreprocessing(data.levels)(data.train, generator=torch.Generator().manual_seed(7))
    nms.eval()
    return estimate_contributions(nms._transform, y, factory, DIGITS_SHAPE, progress=False)
