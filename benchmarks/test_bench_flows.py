"""pytest-benchmark microbenchmarks (not collected by the normal test run; ``tests/`` is the
test path). Run with::

    pytest benchmarks/test_bench_flows.py --benchmark-only --benchmark-group-by=group

For ratios from one interleaved run, use ``python benchmarks/compare.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from compare import LEVELS, SHAPE, build_contenders, glow_factory
from pytest_benchmark.fixture import BenchmarkFixture

from lcma_ext.contributions import estimate_contributions
from lcma_ext.pipeline import build_levels, build_nms_transform

HIDDEN, STEPS, BATCH = 32, 4, 64


@pytest.fixture(scope="module")
def contenders() -> tuple[dict[str, dict[str, Any]], torch.Tensor]:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = torch.randn(512, *SHAPE)
    return build_contenders(HIDDEN, STEPS, data), data[:BATCH]


NAMES = [
    "lcma_ext ContributionMultiscaleFlow (channel)",
    "lcma_ext ContributionMultiscaleFlow (lcma)",
    "nflows MultiscaleCompositeTransform",
    "normflows MultiscaleFlow (GlowBlock)",
]


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_forward_backward(
    benchmark: BenchmarkFixture,
    contenders: tuple[dict[str, dict[str, Any]], torch.Tensor],
    name: str,
) -> None:
    benchmark.group = "log_prob fwd+bwd"
    flows, x = contenders
    contender = flows[name]

    def run() -> None:
        contender["module"].zero_grad(set_to_none=True)
        (-contender["log_prob"](x).mean()).backward()

    benchmark(run)


@pytest.mark.parametrize("name", NAMES)
def test_sample(
    benchmark: BenchmarkFixture,
    contenders: tuple[dict[str, dict[str, Any]], torch.Tensor],
    name: str,
) -> None:
    benchmark.group = "sample"
    flows, _ = contenders

    def run() -> torch.Tensor:
        with torch.no_grad():
            return flows[name]["sample"](BATCH)

    benchmark(run)


@pytest.mark.parametrize("method", ["forward", "forward_with_diag"])
def test_forward_with_diag_overhead(
    benchmark: BenchmarkFixture,
    contenders: tuple[dict[str, dict[str, Any]], torch.Tensor],
    method: str,
) -> None:
    benchmark.group = "forward_with_diag overhead"
    flows, x = contenders
    transform = flows["lcma_ext ContributionMultiscaleFlow (lcma)"]["module"]._transform
    call = getattr(transform, method)

    def run() -> None:
        transform.zero_grad(set_to_none=True)
        outputs, logabsdet = call(x)[:2]
        (outputs.square().mean() - logabsdet.mean()).backward()

    benchmark(run)


def test_estimate_contributions_throughput(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "estimate_contributions (2048 examples)"
    torch.manual_seed(0)
    factory = glow_factory(HIDDEN, STEPS)
    nms = build_nms_transform(factory, SHAPE, LEVELS)
    levels = build_levels(factory, SHAPE, LEVELS)
    data = torch.randn(2048, *SHAPE)
    with torch.no_grad():
        nms(data[:256])
    benchmark(lambda: estimate_contributions(nms, data, levels, SHAPE, progress=False))
