"""zuko ``log_prob`` and ``sample`` time: the multi-scale zuko flow against the same flow without
splits.

All arms run in one process, interleaved (A, B, C, A, B, C, ...) after a warm-up; the medians
and their ratios to the no-split flow are printed, so the machine's speed mostly cancels out.

Arms, built from one level factory (vector data: zuko's ``NSF`` per level; images: the package's
Glow level with a context, :func:`lcma_ext.zuko.image_level_factory`):

* ``no split``: :func:`lcma_ext.zuko.build_nms_flow`, a plain ``zuko.lazy.Flow`` of the levels,
  every level on every dimension (what a zuko user trains today);
* ``channel``, ``lcma``: :func:`lcma_ext.zuko.build_multiscale_flow` with that split (deeper
  levels see half the dimensions of the level before, so they cost less);
* ``core, no zuko wrapper`` (``lcma``): the same multi-scale flow called through the core's
  ``ContributionMultiscaleFlow`` directly plus the base density, to isolate the cost of the zuko
  wrapper (``flow(c)``, batch flattening, ``NormalizingFlow``).

Timed: ``flow(c).log_prob(x)`` forward + backward, and ``flow(c).sample((n,))`` without
gradient (one context per example; NSF sampling inverts autoregressively).

Usage::

    python benchmarks/bench_zuko.py [--batch 256] [--repeats 20] [--threads 2] [--data image]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import zuko

from lcma_ext.models import count_parameters
from lcma_ext.zuko import build_multiscale_flow, build_nms_flow, image_level_factory

CONTEXT = 4


def vector_level(index: int, shape: tuple[int, ...]) -> object:
    return zuko.flows.NSF(shape[0], CONTEXT, transforms=3, hidden_features=(64, 64)).transform


def arms(
    level: Callable, shape: tuple[int, ...], levels: int, data: torch.Tensor, context: torch.Tensor
) -> dict[str, zuko.lazy.Flow]:
    torch.manual_seed(0)
    nms = build_nms_flow(level, shape, levels)
    maps = [torch.randn(tuple(s)) for s in _split_inputs(level, shape, levels)]
    out = {"no split": nms}
    for split in ("channel", "lcma"):
        torch.manual_seed(0)
        out[split] = build_multiscale_flow(
            level, shape, levels, split, maps if split == "lcma" else None
        )
    for flow in out.values():  # ActNorm's data-dependent initialization
        with torch.no_grad():
            flow(context[:64]).log_prob(data[:64])
    return out


def _split_inputs(level: Callable, shape: tuple[int, ...], levels: int) -> list[tuple[int, ...]]:
    """The input shape of each split point (for random LCMA maps of the right layouts)."""
    flow = build_multiscale_flow(level, shape, levels, "channel")
    return [module.output_shape for module in flow.levels[:-1]]


def core_log_prob(flow: zuko.lazy.Flow) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The multi-scale flow without zuko's wrapper: the core flow plus the base density."""
    core = flow.transform.transform
    normal = torch.distributions.Normal(0.0, 1.0)

    def log_prob(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z, ladj = core(x, c)
        return normal.log_prob(z).sum(-1) + ladj

    return log_prob


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, called in turn ``repeats`` times."""
    for fn in fns.values():
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, medians: dict[str, float], reference: str = "no split") -> None:
    print(f"\n{title}")
    base = medians[reference]
    for name, value in medians.items():
        print(f"  {name:<34} {value * 1e3:9.2f} ms   x{value / base:5.2f}")


def bench(
    name: str, level: Callable, shape: tuple[int, ...], levels: int, args: argparse.Namespace
) -> None:
    torch.manual_seed(0)
    data = torch.randn(args.batch, *shape)
    context = torch.randn(args.batch, CONTEXT)
    flows = arms(level, shape, levels, data, context)
    print(f"\n== {name}: input {shape}, {levels} levels, batch {args.batch}, context {CONTEXT}")
    for arm, flow in flows.items():
        print(f"  parameters {arm:<23} {count_parameters(flow):>9,}")

    def fwd_bwd(
        log_prob: Callable[[], torch.Tensor], module: torch.nn.Module
    ) -> Callable[[], None]:
        def run() -> None:
            module.zero_grad(set_to_none=True)
            (-log_prob().mean()).backward()

        return run

    fns = {
        arm: fwd_bwd(lambda f=flow: f(context).log_prob(data), flow) for arm, flow in flows.items()
    }
    core = core_log_prob(flows["lcma"])
    fns["core, no zuko wrapper (lcma)"] = fwd_bwd(lambda: core(data, context), flows["lcma"])
    report(
        "log_prob forward + backward (median; ratio to no split)", interleaved(fns, args.repeats)
    )

    def sampler(flow: zuko.lazy.Flow) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                flow(context).sample()

        return run

    medians = interleaved({arm: sampler(flow) for arm, flow in flows.items()}, args.repeats)
    report(f"sample, {args.batch} contexts (median; ratio to no split)", medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", choices=("both", "vector", "image"), default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{platform.platform()}, {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, zuko {zuko.__version__}, {torch.get_num_threads()} threads"
    )
    if args.data in ("both", "vector"):
        bench("vector data, NSF(3 transforms, 64x64 hidden)", vector_level, (64,), 3, args)
    if args.data in ("both", "image"):
        image = image_level_factory(context=CONTEXT, hidden=32, steps=2)
        bench("images, Glow level with a context (2 steps, 32 hidden)", image, (1, 16, 16), 3, args)


if __name__ == "__main__":
    main()
