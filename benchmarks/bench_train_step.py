"""Train-step throughput (images/s): the package's multi-scale Glow and RealNVP against nflows.

Arms, all in one process, timed interleaved after a warm-up (medians compared):

- ``ours fp32``: ``build_multiscale_transform(make_level_factory(model, size), ...)`` with the
  channel split, the step :func:`lcma_ext.training.train_flow` takes (log-density, backward,
  Adam);
- ``ours compile``: the same log-density through ``torch.compile`` (compile time reported apart);
- ``ours bf16`` (CUDA only): ``torch.autocast`` as ``--precision bf16``;
- ``nflows`` (Glow only): plain nflows classes (``MultiscaleCompositeTransform``, ``ActNorm``,
  ``OneByOneConvolution``, ``AffineCouplingTransform``, ``SqueezeTransform``) of the same size,
  with the same conditioner nets and input.

``--peak-memory`` instead reports the peak memory of one paper-size Glow train step at batch 64
on 3x32x32: the process's peak resident set growth on the CPU (``ru_maxrss``), and
``torch.cuda.max_memory_allocated`` on a GPU.

Usage::

    python benchmarks/bench_train_step.py --sizes small medium --reps 20
    python benchmarks/bench_train_step.py --peak-memory
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from nflows import transforms as nflows_transforms
from nflows.distributions import StandardNormal
from nflows.flows import Flow

from lcma_ext.models import build_flow, count_parameters, make_level_factory
from lcma_ext.models.levels import SIZES
from lcma_ext.models.nets import ConvResNet
from lcma_ext.pipeline import build_multiscale_transform
from lcma_ext.training import _LogDensity


def ours(model: str, size: str, shape: tuple[int, ...], levels: int) -> Flow:
    torch.manual_seed(0)
    factory = make_level_factory(model, size)
    return build_flow(build_multiscale_transform(factory, shape, levels, "channel"), shape)


def nflows_glow(size: str, shape: tuple[int, ...], levels: int) -> Flow:
    """Glow from nflows' own classes, the layer sequence of ``make_level_factory("glow", size)``."""
    torch.manual_seed(0)
    config = SIZES["glow"][size]
    transform = nflows_transforms.MultiscaleCompositeTransform(levels)
    current = tuple(shape)
    for index in range(levels):
        channels = current[0] * 4
        layers = [nflows_transforms.SqueezeTransform()]
        for k in range(config["steps"]):
            mask = torch.ones(channels)
            mask[: channels // 2] = -1
            if k % 2:
                mask = -mask
            layers += [
                nflows_transforms.ActNorm(channels),
                nflows_transforms.OneByOneConvolution(channels),
                nflows_transforms.AffineCouplingTransform(
                    mask, lambda i, o: ConvResNet(i, o, config["hidden"], config["blocks"])
                ),
            ]
        level = nflows_transforms.CompositeTransform(layers)
        squeezed = (channels, current[1] // 2, current[2] // 2)
        current = transform.add_transform(level, squeezed)
        if index == levels - 1:
            break
    return Flow(transform, StandardNormal([torch.Size(shape).numel()]))


class Step:
    """One train step of a flow: log-density (optionally compiled or autocast), backward, Adam."""

    def __init__(self, flow: Flow, compile: bool = False, dtype: torch.dtype | None = None) -> None:
        self.flow = flow
        density = _LogDensity(flow, dtype)
        self.density = torch.compile(density) if compile else density
        self.optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4)

    def __call__(self, x: torch.Tensor) -> float:
        sync(x.device)
        start = time.perf_counter()
        loss = -self.density(x).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        sync(x.device)
        return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(model: str, size: str, args: argparse.Namespace, device: torch.device) -> None:
    shape = tuple(args.shape)
    x = 0.1 * torch.randn(args.batch, *shape, device=device)
    flows = {"ours fp32": ours(model, size, shape, args.levels)}
    if not args.no_compile:
        flows["ours compile"] = ours(model, size, shape, args.levels)
    if device.type == "cuda":
        flows["ours bf16"] = ours(model, size, shape, args.levels)
    if model == "glow":
        flows["nflows"] = nflows_glow(size, shape, args.levels)
    steps = {}
    for name, flow in flows.items():
        flow.to(device).train()
        with torch.no_grad():
            flow.log_prob(x)  # ActNorm's data-dependent initialisation, outside compile
        steps[name] = Step(
            flow, compile=name == "ours compile", dtype=torch.bfloat16 if "bf16" in name else None
        )
    warm = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(x)
        warm[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(steps[name](x))
    reference = statistics.median(times["ours fp32"])
    print(
        f"\n{model} {size}: {count_parameters(flows['ours fp32']):,} params, input "
        f"{shape}, batch {args.batch}, {args.levels} levels, {args.reps} steps (median)"
    )
    for name in names:
        median = statistics.median(times[name])
        line = (
            f"  {name:>13}: {median * 1e3:8.1f} ms/step  {args.batch / median:8.1f} images/s  "
            f"step time / ours fp32 {median / reference:5.3f}  (warm-up {warm[name]:.1f} s)"
        )
        if name == "nflows":
            line += f"  params {count_parameters(flows[name]):,}"
        print(line)
    if "nflows" in times:
        ratio = reference / statistics.median(times["nflows"])
        print(f"  ours fp32 / nflows step time: {ratio:.3f} (target <= 1.03)")
    if "ours compile" in times:
        speedup = reference / statistics.median(times["ours compile"])
        print(f"  compile speed-up over fp32: {speedup:.2f}x (target >= 1.3x on this CPU)")


def peak_memory(device: torch.device) -> None:
    shape = (3, 32, 32)
    flow = ours("glow", "paper", shape, 3).to(device)
    x = 0.1 * torch.randn(64, *shape, device=device)
    with torch.no_grad():
        flow.log_prob(x[:8])
    step = Step(flow)
    step(x[:2])  # allocate Adam state outside the measured step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = step(x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"paper-size Glow ({count_parameters(flow):,} params), 3x32x32, batch 64, one train step "
        f"{seconds:.1f} s: peak RSS growth {(after - before) / 2**20:.2f} GiB (process peak "
        f"{after / 2**20:.2f} GiB)"
    )
    if device.type == "cuda":
        print(
            f"  torch.cuda.max_memory_allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f}"
            " GiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["glow", "realnvp"])
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"])
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 16, 16))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled arm")
    parser.add_argument("--peak-memory", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    if args.peak_memory:
        peak_memory(device)
        return
    for model in args.models:
        for size in args.sizes:
            compare(model, size, args, device)


if __name__ == "__main__":
    main()
