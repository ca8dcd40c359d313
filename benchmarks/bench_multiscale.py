"""log_prob forward + backward time: ContributionMultiscaleFlow (LCMASplit) vs nflows' multi-scale.

Both arms share the very same level modules (a Glow-like architecture: a squeeze, then steps of
ActNorm, 1x1 convolution and affine coupling with a convolutional residual net); they differ only
in the composite and the split. Timings are interleaved (the order alternates every repetition)
after a warm-up, and medians are compared. A ChannelSplit arm of ContributionMultiscaleFlow is
shown too.

Usage::

    python benchmarks/bench_multiscale.py                  # 3x16x16, batch 64, 3 levels
    python benchmarks/bench_multiscale.py --shape 1 16 16 --reps 50 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.nn.nets import ConvResidualNet
from nflows.transforms import MultiscaleCompositeTransform

from lcma_ext import ContributionMultiscaleFlow, LCMASplit
from lcma_ext import transforms as T
from lcma_ext.multiscale import build_levels, level_output_shape
from lcma_ext.splits import ChannelSplit


def glow_factory(steps: int, hidden: int) -> Callable[[int, tuple[int, ...]], T.CompositeTransform]:
    def factory(index: int, shape: tuple[int, ...]) -> T.CompositeTransform:
        channels = 4 * shape[0]
        layers = [T.SqueezeTransform()]
        for step in range(steps):
            mask = torch.tensor([1 if (i + step) % 2 else -1 for i in range(channels)])
            layers += [
                T.ActNorm(channels),
                T.OneByOneConvolution(channels),
                T.AffineCouplingTransform(
                    mask,
                    lambda i, o: ConvResidualNet(i, o, hidden_channels=hidden, num_blocks=1),
                ),
            ]
        return T.CompositeTransform(layers)

    return factory


def build_arms(
    shape: tuple[int, ...], num_levels: int, steps: int, hidden: int, device: torch.device
) -> dict[str, Flow]:
    torch.manual_seed(0)
    levels = build_levels(glow_factory(steps, hidden), shape, num_levels)
    generator = torch.Generator().manual_seed(0)
    arms = {
        "nflows": MultiscaleCompositeTransform(num_levels),
        "lcma": ContributionMultiscaleFlow(num_levels),
        "channel": ContributionMultiscaleFlow(num_levels),
    }
    current = {name: tuple(shape) for name in arms}
    for index, level in enumerate(levels):
        out = level_output_shape(level, current["nflows"])
        last = index == num_levels - 1
        current["nflows"] = arms["nflows"].add_transform(level, out)
        lcma = None if last else LCMASplit(torch.randn(out, generator=generator))
        current["lcma"] = arms["lcma"].add_transform(level, out, lcma)
        current["channel"] = arms["channel"].add_transform(
            level, out, None if last else ChannelSplit()
        )
    dimension = torch.Size(shape).numel()
    return {
        name: Flow(transform, StandardNormal([dimension])).to(device)
        for name, transform in arms.items()
    }


def time_step(flow: Flow, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = -flow.log_prob(x).mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    flow.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 16, 16))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="Glow steps per level")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    arms = build_arms(tuple(args.shape), args.levels, args.steps, args.hidden, device)
    x = torch.randn(args.batch, *args.shape, device=device)
    with torch.no_grad():  # ActNorm data-dependent initialization, shared by all arms
        arms["nflows"].log_prob(x)
    names = list(arms)
    for _ in range(args.warmup):
        for name in names:
            time_step(arms[name], x, device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(time_step(arms[name], x, device))

    print(
        f"log_prob forward+backward, shape {tuple(args.shape)}, batch {args.batch}, "
        f"{args.levels} levels x {args.steps} Glow steps, hidden {args.hidden}, "
        f"device {device}, torch threads {torch.get_num_threads()}, {args.reps} interleaved reps"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    labels = {
        "nflows": "nflows MultiscaleCompositeTransform",
        "lcma": "ContributionMultiscaleFlow + LCMASplit",
        "channel": "ContributionMultiscaleFlow + ChannelSplit",
    }
    for name in names:
        print(f"  {labels[name]:<44s} median {1e3 * medians[name]:8.2f} ms")
    paired = [a / b for a, b in zip(times["lcma"], times["nflows"])]
    print(f"ratio LCMASplit / nflows (medians): {medians['lcma'] / medians['nflows']:.4f}")
    print(f"ratio LCMASplit / nflows (median of paired ratios): {statistics.median(paired):.4f}")
    print(f"ratio ChannelSplit / nflows (medians): {medians['channel'] / medians['nflows']:.4f}")


if __name__ == "__main__":
    main()
