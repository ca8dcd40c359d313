"""Every split arm of a multi-scale zuko flow on scikit-learn's digits as 64-dimensional vectors.

Algorithm 1 with zuko, under the package's honesty rules: every arm has the same architecture
(one zuko ``MAF`` per level, or ``NSF`` with ``--flow nsf``, from one level factory), the same
initial level weights per seed, the same optimizer, epochs, batches, dequantization noise and
test noise; the arms differ only in the split at each split point. The NMS flow is pre-trained
once (seed 0) for the same number of epochs, and its contributions choose the ``lcma`` and
``high`` splits. Test bits/dim (every term of the dequantization and logit pre-processing
included) are compared by paired differences against ``channel`` on the same seed: mean,
standard error and a 95 % Student-t interval; the verdict is "no evidence" unless the interval
excludes 0. Non-finite runs are flagged, never dropped.

Digits are 8x8 images; here each is a 64-dimensional vector (zuko's setting: no convolutions),
so the granular splits, which need image sites, do not apply.

Usage::

    python benchmarks/compare_zuko.py                      # 5 seeds x 30 epochs, a few minutes
    python benchmarks/compare_zuko.py --flow nsf --epochs 40   # zuko's NSF (about 10x slower)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import zuko
from scipy import stats as scipy_stats
from torch import Tensor

from lcma_ext.data import LogitPreprocessing, load_digits_dataset
from lcma_ext.experiments.stats import standard_error, summary_stats
from lcma_ext.models import count_parameters
from lcma_ext.zuko import build_multiscale_flow, build_nms_flow, estimate_contributions

ARMS = ("channel", "checkerboard", "random", "lcma", "high")
REFERENCE = "channel"
SHAPE = (64,)


def level_factory(args: argparse.Namespace) -> Callable[[int, tuple[int, ...]], object]:
    flow_class = {"maf": zuko.flows.MAF, "nsf": zuko.flows.NSF}[args.flow]

    def level(index: int, shape: tuple[int, ...]) -> object:
        hidden = (args.hidden, args.hidden)
        return flow_class(shape[0], transforms=args.transforms, hidden_features=hidden).transform

    return level


def level_shapes(levels: int) -> list[tuple[int, ...]]:
    return [(SHAPE[0] // 2**index,) for index in range(levels)]


def train(
    flow: torch.nn.Module,
    pre: LogitPreprocessing,
    x: Tensor,
    args: argparse.Namespace,
    seed: int,
    epochs: int,
) -> bool:
    """Adam on fresh dequantization noise each epoch; batches and noise depend on the seed only.

    Returns:
        Whether every loss was finite (a non-finite run is flagged, not dropped).
    """
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    flow.train()
    finite = True
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(1000 * seed + epoch)
        order = torch.randperm(x.shape[0], generator=generator)
        y, _ = pre(x, generator=generator)
        for start in range(0, x.shape[0], args.batch):
            index = order[start : start + args.batch]
            loss = -flow().log_prob(y[index]).mean()
            if not torch.isfinite(loss):
                finite = False
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    flow.eval()
    return finite


@torch.no_grad()
def test_bpd(flow: torch.nn.Module, pre: LogitPreprocessing, y: Tensor, ladj: Tensor) -> float:
    bpd = pre.bits_per_dim(flow().log_prob(y), ladj, SHAPE[0])
    return float(bpd.mean())


def paired_table(results: dict[str, list[float]], seeds: list[int]) -> list[str]:
    base = results[REFERENCE]
    lines = [
        f"| arm | test bpd mean ± std | paired Δ vs {REFERENCE} per seed | Δ mean ± se | "
        "95 % interval | wins | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, values in results.items():
        summary = summary_stats(values)
        row = f"| {arm} | {summary['mean']:.4f} ± {summary['std']:.4f} |"
        if arm == REFERENCE:
            lines.append(row + " — | — | — | — | reference |")
            continue
        diffs = [v - b for v, b in zip(values, base)]
        finite = [d for d in diffs if math.isfinite(d)]
        mean, se = statistics.fmean(finite), standard_error(finite)
        half = scipy_stats.t.ppf(0.975, len(finite) - 1) * se if len(finite) > 1 else math.nan
        low, high = mean - half, mean + half
        if high < 0:
            verdict = f"{arm} better"
        elif low > 0:
            verdict = f"{arm} worse"
        else:
            verdict = "no evidence"
        per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
        wins = sum(d < 0 for d in finite)
        lines.append(
            f"{row} {per_seed} | {mean:+.4f} ± {se:.4f} | [{low:+.4f}, {high:+.4f}] | "
            f"{wins}/{len(seeds)} | {verdict} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per arm")
    parser.add_argument("--nms-epochs", type=int, default=None, help="default: --epochs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--flow", choices=("maf", "nsf"), default="maf", help="zuko flow per level")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--transforms", type=int, default=2, help="transforms per level")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: small ops, no contention)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nms_epochs = args.nms_epochs or args.epochs
    start = time.perf_counter()

    digits = load_digits_dataset()
    x_train, x_test = digits.train.flatten(1), digits.test.flatten(1)
    pre = LogitPreprocessing(digits.levels)
    y_test, ladj_test = pre(x_test, torch.Generator().manual_seed(12345))
    level = level_factory(args)
    print(
        f"digits as {SHAPE[0]}-dim vectors: {x_train.shape[0]} train, {x_test.shape[0]} test; "
        f"zuko {zuko.__version__}; {args.levels} levels of {args.flow.upper()}({args.transforms} "
        "transforms, "
        f"{args.hidden}x{args.hidden}); Adam lr {args.lr}, batch {args.batch}, {args.epochs} "
        f"epochs per arm, NMS {nms_epochs} epochs; seeds 0..{args.seeds - 1}; "
        f"{torch.get_num_threads()} threads"
    )

    torch.manual_seed(0)
    nms = build_nms_flow(level, SHAPE, args.levels)
    nms_finite = train(nms, pre, x_train, args, 0, nms_epochs)
    nms_bpd = test_bpd(nms, pre, y_test, ladj_test)
    y_fixed, _ = pre(x_train, torch.Generator().manual_seed(0))
    maps = estimate_contributions(nms, y_fixed, level, progress=False)
    print(
        f"NMS (seed 0): test bpd {nms_bpd:.4f}{'' if nms_finite else ' (flagged)'}, "
        f"{count_parameters(nms):,} parameters; {time.perf_counter() - start:.0f} s"
    )

    seeds = list(range(args.seeds))
    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        for arm in ARMS:
            torch.manual_seed(seed)  # the same initial level weights for every arm of a seed
            levels = [level(index, shape) for index, shape in enumerate(level_shapes(args.levels))]
            flow = build_multiscale_flow(
                None,
                SHAPE,
                args.levels,
                arm,
                maps if arm in ("lcma", "high") else None,
                seed=seed,
                levels=levels,
            )
            finite = train(flow, pre, x_train, args, seed, args.epochs)
            bpd = test_bpd(flow, pre, y_test, ladj_test) if finite else math.nan
            results[arm].append(bpd)
            flag = "" if finite else " (flagged: non-finite loss)"
            print(
                f"  seed {seed} {arm:<12} test bpd {bpd:.4f}{flag}  "
                f"({count_parameters(flow):,} parameters, {time.perf_counter() - start:.0f} s)"
            )
    print()
    print("\n".join(paired_table(results, seeds)))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
