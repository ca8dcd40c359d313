"""What the training recipe costs: a train step with and without EMA and clipping, one process.

Two measurements per model, every arm in one process:

1. **Per step** (the figure to read): on one batch, the plain step of
   :func:`lcma_ext.training.train_flow` (log-density, backward, Adam) is timed, then the work the
   recipe adds to it, with the same calls ``train_flow`` makes: the global gradient norm
   (``get_total_norm``), the gradients scaled when it exceeds the limit
   (``clip_grads_with_norm_``) and counted, the ``LambdaLR`` step and the EMA update
   (:class:`ParameterEMA`).
   Interleaved, step after step; the median of the per-step ratios extra / step is the
   recipe's overhead (the issue's target: under 3 %).
2. **Per epoch** (a cross-check, noisy on a shared machine): ``train_flow`` itself, one epoch of
   a fresh flow per timing, no test evaluation (``TrainResult.train_time_s`` counts the steps),
   with the recipes ``plain`` (constant rate, no clipping, no EMA), ``legacy`` (clipping at 100,
   as versions up to 0.2) and ``default``, in alternating order; medians and the median of the
   per-repetition ratios to ``plain``.

Usage::

    python benchmarks/bench_recipe.py                      # RealNVP and Glow tiny on digits
    python benchmarks/bench_recipe.py --models glow --steps 400 --reps 20 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lcma_ext.data import ImageDataset, LogitPreprocessing, load_dataset
from lcma_ext.models import build_flow, count_parameters, make_level_factory
from lcma_ext.pipeline import build_multiscale_transform
from lcma_ext.training import (
    DEFAULT_RECIPE,
    RECIPES,
    ParameterEMA,
    Recipe,
    TrainConfig,
    _clips,
    _LogDensity,
    _scheduler,
    train_flow,
)

ARMS: dict[str, Recipe] = {
    "plain": Recipe(warmup_steps=0, lr_schedule="constant", grad_clip=0.0, ema_decay=0.0),
    "legacy": RECIPES["legacy"],
    "default": RECIPES[DEFAULT_RECIPE],
}


def flow_of(model: str, size: str, shape: tuple[int, ...], levels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    factory = make_level_factory(model, size)
    return build_flow(build_multiscale_transform(factory, shape, levels, "channel"), shape)


def step_time(
    model: str, size: str, recipe: Recipe, data: ImageDataset, pre: LogitPreprocessing, levels: int
) -> float:
    """Seconds per step of one epoch of a fresh flow under ``recipe``."""
    flow = flow_of(model, size, tuple(data.shape), levels)
    config = TrainConfig.from_recipe(recipe, epochs=1, progress=False)
    result = train_flow(flow, data.train, pre, config)
    return result.train_time_s / result.steps


def per_step(
    model: str, args: argparse.Namespace, data: ImageDataset, pre: LogitPreprocessing
) -> None:
    """Median step time and median per-step ratio of the recipe's extra work to the step."""
    recipe = RECIPES[DEFAULT_RECIPE]
    flow = flow_of(model, args.size, tuple(data.shape), args.levels).train()
    generator = torch.Generator().manual_seed(0)
    y, logit_logdet = pre(data.train[:64], generator=generator)
    with torch.no_grad():
        flow.log_prob(y)  # ActNorm's data-dependent initialisation
    parameters = list(flow.parameters())
    density = _LogDensity(flow)
    optimizer = torch.optim.Adam(parameters, lr=1e-4)
    scheduler = _scheduler(optimizer, recipe, 10 * args.steps)
    ema = ParameterEMA(flow, recipe.ema_decay)
    clipped = 0
    steps, extras = [], []
    for index in range(args.steps + 5):
        start = time.perf_counter()
        loss = pre.bits_per_dim(density(y), logit_logdet, y[0].numel()).mean()  # as trained
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        middle = time.perf_counter()
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if bool(torch.isfinite(norm)) and _clips(norm, recipe.grad_clip):
            torch.nn.utils.clip_grads_with_norm_(parameters, recipe.grad_clip, norm)
            clipped += 1
        clipping = time.perf_counter()
        scheduler.step()
        ema.update()
        end = time.perf_counter()
        # what the legacy recipe does instead (scales the gradients by 1 below the limit)
        torch.nn.utils.clip_grad_norm_(parameters, RECIPES["legacy"].grad_clip)
        legacy = time.perf_counter()
        if index >= 5:  # warm-up steps left out
            steps.append(middle - start)
            extras.append((clipping - middle, end - clipping, legacy - end))
    step = statistics.median(steps)
    parts = [statistics.median(e[k] / s for e, s in zip(extras, steps)) for k in (0, 1, 2)]
    total = statistics.median((e[0] + e[1]) / s for e, s in zip(extras, steps))
    print(
        f"  per step ({args.steps} steps, batch 64): step {step * 1e3:.2f} ms; the default "
        f"recipe's extra work {100 * total:.2f} % of a step (target < 3 %): gradient norm + "
        f"clipping {100 * parts[0]:.2f} % (clipped {clipped} of {args.steps + 5} steps), "
        f"LambdaLR + EMA {100 * parts[1]:.2f} %; the legacy recipe's clip_grad_norm_ "
        f"{100 * parts[2]:.2f} %"
    )


def compare(model: str, args: argparse.Namespace) -> None:
    data = load_dataset(args.dataset, limit=args.limit)
    pre = LogitPreprocessing(data.levels)
    names = list(ARMS)
    step_time(model, args.size, ARMS["plain"], data, pre, args.levels)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(step_time(model, args.size, ARMS[name], data, pre, args.levels))
    flow = flow_of(model, args.size, tuple(data.shape), args.levels)
    plain = statistics.median(times["plain"])
    print(f"\n{model} {args.size} on {args.dataset} {tuple(data.shape)}: "
          f"{count_parameters(flow):,} params")  # fmt: skip
    per_step(model, args, data, pre)
    print(
        f"  per epoch ({args.reps} epochs of {data.train.shape[0]} images per arm, median step "
        "time of train_flow):"
    )
    for name in names:
        median = statistics.median(times[name])
        paired = statistics.median(t / p for t, p in zip(times[name], times["plain"]))
        print(
            f"    {name:>7}: {median * 1e3:7.2f} ms/step  / plain {median / plain:6.3f}  "
            f"(median of paired ratios {paired:6.3f})"
        )
    overhead = statistics.median(t / p for t, p in zip(times["default"], times["plain"])) - 1
    print(f"    default recipe over plain: {100 * overhead:+.1f} % (noisy under load)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["realnvp", "glow"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10, help="epochs per arm (per epoch)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps (per step)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = RECIPES[DEFAULT_RECIPE]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; default recipe: "
        f"warm-up {recipe.warmup_steps}, {recipe.lr_schedule}, clip {recipe.grad_clip:g}, "
        f"EMA {recipe.ema_decay:g}"
    )
    for model in args.models:
        compare(model, args)


if __name__ == "__main__":
    main()
