"""Overhead of ``forward_with_diag`` over ``forward`` for one Glow step.

A Glow step (ActNorm, invertible 1x1 convolution, affine coupling) on a ``C x H x W = 16 x 16 x 16``
batch. Both calls are timed interleaved in one process, after warm-up, and the ratio of the
medians is printed, per attribution of the 1x1 convolution, with and without autograd.

Usage:
    python benchmarks/bench_diag.py [--batch 64] [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from nflows.nn.nets import ConvResidualNet

from lcma_ext import transforms as T


def glow_step(channels: int, hidden: int, attribution: str) -> T.CompositeTransform:
    mask = torch.tensor([1, 0] * (channels // 2))
    return T.CompositeTransform(
        [
            T.ActNorm(channels),
            T.OneByOneConvolution(channels, attribution=attribution),
            T.AffineCouplingTransform(
                mask,
                lambda i, o: ConvResidualNet(i, o, hidden_channels=hidden, num_blocks=1),
            ),
        ]
    )


def time_pair(
    step: T.CompositeTransform, x: torch.Tensor, repeats: int, grad: bool
) -> tuple[float, float]:
    """Median seconds of ``forward`` and ``forward_with_diag``, interleaved."""

    def run(fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> float:
        start = time.perf_counter()
        if grad:
            outputs, logabsdet, *_ = fn(x)
            (outputs.square().mean() - logabsdet.mean()).backward()
        else:
            with torch.no_grad():
                fn(x)
        return time.perf_counter() - start

    plain, with_diag = [], []
    for _ in range(3):
        run(step.forward)
        run(step.forward_with_diag)
    for _ in range(repeats):
        plain.append(run(step.forward))
        with_diag.append(run(step.forward_with_diag))
    return statistics.median(plain), statistics.median(with_diag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device={device}, threads={torch.get_num_threads()}, "
        f"x={tuple(x.shape)}, hidden={args.hidden}"
    )
    print(
        f"{'attribution':<12} {'autograd':<9} {'forward ms':>11} {'with diag ms':>13} {'ratio':>7}"
    )
    for attribution in T.ATTRIBUTIONS:
        step = glow_step(args.channels, args.hidden, attribution).to(device)
        step(x)  # ActNorm data-dependent init
        for grad in (False, True):
            plain, with_diag = time_pair(step, x, args.repeats, grad)
            print(
                f"{attribution:<12} {grad!s:<9} {plain * 1e3:>11.2f} {with_diag * 1e3:>13.2f} "
                f"{with_diag / plain:>7.3f}"
            )


if __name__ == "__main__":
    main()
