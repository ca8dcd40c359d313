"""What the training recipe costs: a train step with and without EMA and clipping, one process.

Arms (the same flow, data, batches and noise; :func:`lcma_ext.training.train_flow` itself, one
epoch per timing, no test evaluation, so ``TrainResult.train_time_s`` is the epoch's steps):

- ``plain``: Adam at a constant learning rate, no clipping, no EMA;
- ``legacy``: the legacy recipe (the gradient norm clipped at 100, as versions up to 0.2);
- ``recipe``: the default recipe (warm-up, cosine schedule, clipping with its count, EMA update
  after every step).

Each repetition trains a fresh flow of every arm, in alternating order, and the script prints
the median step time of each arm and the median of the per-repetition ratios to ``plain``
(the issue's target: the recipe under 3 % of a step).

Usage::

    python benchmarks/bench_recipe.py                      # RealNVP and Glow tiny on digits
    python benchmarks/bench_recipe.py --models glow --reps 20 --threads 1
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lcma_ext.data import LogitPreprocessing, load_dataset
from lcma_ext.models import build_flow, count_parameters, make_level_factory
from lcma_ext.pipeline import build_multiscale_transform
from lcma_ext.training import DEFAULT_RECIPE, RECIPES, Recipe, TrainConfig, train_flow

ARMS: dict[str, Recipe] = {
    "plain": Recipe(warmup_steps=0, lr_schedule="constant", grad_clip=0.0, ema_decay=0.0),
    "legacy": RECIPES["legacy"],
    "recipe": RECIPES[DEFAULT_RECIPE],
}


def flow_of(model: str, size: str, shape: tuple[int, ...], levels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    factory = make_level_factory(model, size)
    return build_flow(build_multiscale_transform(factory, shape, levels, "channel"), shape)


def step_time(model: str, size: str, recipe: Recipe, data, pre, levels: int) -> float:
    """Seconds per step of one epoch of a fresh flow under ``recipe``."""
    flow = flow_of(model, size, tuple(data.shape), levels)
    config = TrainConfig.from_recipe(recipe, epochs=1, progress=False)
    result = train_flow(flow, data.train, pre, config)
    return result.train_time_s / result.steps


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
    print(
        f"\n{model} {args.size} on {args.dataset} {tuple(data.shape)}: "
        f"{count_parameters(flow):,} params, batch 64, {args.reps} epochs of "
        f"{data.train.shape[0]} images per arm (median step time)"
    )
    for name in names:
        median = statistics.median(times[name])
        paired = statistics.median(t / p for t, p in zip(times[name], times["plain"]))
        print(
            f"  {name:>7}: {median * 1e3:7.2f} ms/step  / plain {median / plain:6.3f}  "
            f"(median of paired ratios {paired:6.3f})"
        )
    overhead = statistics.median(t / p for t, p in zip(times["recipe"], times["plain"])) - 1
    print(f"  recipe overhead over plain: {100 * overhead:+.1f} % of a step (target < 3 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["realnvp", "glow"])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
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
