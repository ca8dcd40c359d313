"""Side-by-side timings of lcma-ext's multi-scale flow against nflows and normflows.

All timings come from one process, interleaved (A, B, C, A, B, C, ...) after warm-up, and the
ratios of the medians are printed, so the machine's speed cancels out:

1. ``log_prob`` forward + backward and sampling of a 3-level Glow (``C x 8 x 8`` input):
   ``ContributionMultiscaleFlow`` (channel split, and LCMA split) vs nflows'
   ``MultiscaleCompositeTransform`` with the very same level modules (so the ratio is the cost
   of the split objects alone) vs normflows' ``MultiscaleFlow`` of ``GlowBlock`` levels of the
   same widths and depth (different coupling nets: parameter counts are printed).
2. ``forward_with_diag`` vs ``forward`` of ``ContributionMultiscaleFlow`` (with autograd).
3. ``estimate_contributions`` throughput (examples per second) on an NMS Glow.

Usage:
    python benchmarks/compare.py [--batch 64] [--repeats 20] [--threads 2] [--hidden 32]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import normflows as nf
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms.base import MultiscaleCompositeTransform, Transform

from lcma_ext.contributions import estimate_contributions
from lcma_ext.models import count_parameters, make_level_factory
from lcma_ext.multiscale import ContributionMultiscaleFlow, LevelFactory, level_output_shape
from lcma_ext.pipeline import build_levels, build_multiscale_transform, build_nms_transform

SHAPE = (1, 8, 8)
LEVELS = 3


def glow_factory(hidden: int, steps: int) -> LevelFactory:
    # blocks=0: conv3x3 -> relu -> conv3x3 nets, close to normflows' GlowBlock conv net.
    return make_level_factory("glow", "tiny", hidden=hidden, blocks=0, steps=steps)


def nflows_multiscale(
    levels: Sequence[Transform], shape: tuple[int, ...]
) -> MultiscaleCompositeTransform:
    """nflows' own multi-scale composite around the very same level modules."""
    transform = MultiscaleCompositeTransform(len(levels))
    for level in levels:
        output_shape = level_output_shape(level, shape)
        shape = transform.add_transform(level, output_shape)
    return transform


def normflows_glow(
    shape: tuple[int, ...], hidden: int, steps: int, levels: int
) -> nf.MultiscaleFlow:
    """normflows' documented multi-scale Glow with the same levels, widths and depth."""
    channels, height, _ = shape
    q0, flows, merges = [], [], []
    for i in range(levels):
        flows.append(
            [
                nf.flows.GlowBlock(channels * 2 ** (levels + 1 - i), hidden, split_mode="channel")
                for _ in range(steps)
            ]
            + [nf.flows.Squeeze()]
        )
        if i > 0:
            merges.append(nf.flows.Merge())
            side = height // 2 ** (levels - i)
            latent = (channels * 2 ** (levels - i), side, side)
        else:
            side = height // 2**levels
            latent = (channels * 2 ** (levels + 1), side, side)
        q0.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def build_contenders(hidden: int, steps: int, data: torch.Tensor) -> dict[str, dict]:
    """Each contender: ``log_prob(x)``, ``sample(n)``, the module."""
    factory = glow_factory(hidden, steps)
    torch.manual_seed(0)
    levels = build_levels(factory, SHAPE, LEVELS)
    ours = Flow(
        ContributionMultiscaleFlow.from_levels(copy.deepcopy(levels), SHAPE),
        StandardNormal([math.prod(SHAPE)]),
    )
    theirs = Flow(nflows_multiscale(copy.deepcopy(levels), SHAPE), StandardNormal([64]))
    nms = build_nms_transform(factory, SHAPE, LEVELS)
    maps = estimate_contributions(nms, data, levels, SHAPE, progress=False)
    lcma = Flow(
        build_multiscale_transform(
            factory, SHAPE, LEVELS, "lcma", maps, levels=copy.deepcopy(levels)
        ),
        StandardNormal([64]),
    )
    normflows = normflows_glow(SHAPE, hidden, steps, LEVELS)
    for module in (ours, theirs, lcma, normflows):  # ActNorm data-initialization
        module.train()
        with torch.no_grad():
            module.log_prob(data[:64]) if module is not normflows else module.log_prob(
                data[:64], None
            )
    return {
        "lcma_ext ContributionMultiscaleFlow (channel)": {
            "log_prob": ours.log_prob,
            "sample": ours.sample,
            "module": ours,
        },
        "lcma_ext ContributionMultiscaleFlow (lcma)": {
            "log_prob": lcma.log_prob,
            "sample": lcma.sample,
            "module": lcma,
        },
        "nflows MultiscaleCompositeTransform": {
            "log_prob": theirs.log_prob,
            "sample": theirs.sample,
            "module": theirs,
        },
        "normflows MultiscaleFlow (GlowBlock)": {
            "log_prob": lambda x: normflows.log_prob(x, None),
            "sample": lambda n: normflows.sample(n)[0],
            "module": normflows,
        },
    }


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn ``repeats`` times."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fwd_bwd(
    module: torch.nn.Module, log_prob: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        (-log_prob(x).mean()).backward()

    return run


def sampler(sample: Callable[[int], object], n: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            sample(n)

    return run


def report(title: str, medians: dict[str, float], reference: str, unit: str = "ms") -> None:
    print(f"\n{title}")
    base = medians[reference]
    for name, value in medians.items():
        print(f"  {name:<48} {value * 1e3:9.2f} {unit}   x{value / base:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{platform.platform()}, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; Glow {LEVELS} levels x "
        f"{args.steps} steps, hidden {args.hidden}, input {SHAPE}, batch {args.batch}"
    )
    torch.manual_seed(0)
    data = torch.randn(512, *SHAPE)
    x = data[: args.batch]
    contenders = build_contenders(args.hidden, args.steps, data)
    print("parameters:")
    for name, contender in contenders.items():
        print(f"  {name:<48} {count_parameters(contender['module']):>9,}")
    reference = "nflows MultiscaleCompositeTransform"
    medians = interleaved(
        {n: fwd_bwd(c["module"], c["log_prob"], x) for n, c in contenders.items()}, args.repeats
    )
    report("log_prob forward + backward (median per batch; ratio to nflows)", medians, reference)
    medians = interleaved(
        {n: sampler(c["sample"], args.batch) for n, c in contenders.items()}, args.repeats
    )
    report("sample (median per batch; ratio to nflows)", medians, reference)

    flow = contenders["lcma_ext ContributionMultiscaleFlow (lcma)"]["module"]
    transform = flow._transform

    def plain() -> None:
        transform.zero_grad(set_to_none=True)
        outputs, logabsdet = transform(x)
        (outputs.square().mean() - logabsdet.mean()).backward()

    def with_diag() -> None:
        transform.zero_grad(set_to_none=True)
        outputs, logabsdet, _ = transform.forward_with_diag(x)
        (outputs.square().mean() - logabsdet.mean()).backward()

    medians = interleaved({"forward": plain, "forward_with_diag": with_diag}, args.repeats)
    report(
        "ContributionMultiscaleFlow forward vs forward_with_diag (+ backward)", medians, "forward"
    )

    factory = glow_factory(args.hidden, args.steps)
    nms = build_nms_transform(factory, SHAPE, LEVELS)
    levels = build_levels(factory, SHAPE, LEVELS)
    big = torch.randn(2048, *SHAPE)
    with torch.no_grad():
        nms(big[:256])  # ActNorm initialization
    start = time.perf_counter()
    estimate_contributions(nms, big, levels, SHAPE, batch_size=256, progress=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        start = time.perf_counter()
        for chunk in big.split(256):
            nms(chunk)
        plain_seconds = time.perf_counter() - start
    print(
        f"\nestimate_contributions: {big.shape[0] / seconds:,.0f} examples/s "
        f"(NMS Glow forward alone: {big.shape[0] / plain_seconds:,.0f} examples/s, "
        f"ratio x{seconds / plain_seconds:.2f})"
    )


if __name__ == "__main__":
    main()
