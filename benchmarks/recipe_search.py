"""Choose the training recipe's defaults by measurement: seed spread and mean per candidate.

Every candidate recipe trains the same arms, seeds, data and budget through the experiments API
(:func:`lcma_ext.experiments.run_comparison`), one run folder per candidate under ``--out``
(``<out>/<candidate>``, resumable like any run folder). By default: the ``channel`` arm of a tiny
RealNVP on the embedded ``patches``, 10 epochs, 5 seeds (the issue's setting); ``--arms`` adds
other split arms.

**Selection rule** (printed with the table). The selection arms are the *static* splits that ran
(:data:`lcma_ext.experiments.registry.STATIC_ARMS`: ``channel`` alone by default); data-driven arms
(``lcma``, ``high`` ...) may be trained for information but never enter the choice, so the
recipe is never tuned on LCMA's result. A candidate *qualifies* when, on every selection arm,
its seed standard deviation is at most ``--spread-factor`` (0.5: halved) times the ``legacy``
recipe's and its mean bits/dim is not above the legacy mean. Among the qualifying candidates
the one with the smallest mean (over the selection arms) seed std is chosen, ties broken by the
lower mean bits/dim. When none qualifies, a fallback: the lowest mean bits/dim among the
candidates whose mean seed std is at most :data:`FALLBACK_SPREAD` times the legacy one (stds of
five seeds vary by about +-35 %) and whose mean is not above the legacy mean; the report says
that the fallback chose. ``legacy`` is always run as the baseline.

The choice is printed, not applied: the coordinator writes it into
``lcma_ext.training.RECIPES["default"]``.

Usage::

    python benchmarks/recipe_search.py --out runs/recipe-search           # the full search
    python benchmarks/recipe_search.py --out /tmp/rs --quick              # a smoke run
    python benchmarks/recipe_search.py --out runs/rs --candidate \\
        "w50-ema995:warmup_steps=50,lr_schedule=cosine,grad_clip=20,ema_decay=0.995"
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

from lcma_ext.experiments import ExperimentConfig, run_comparison
from lcma_ext.experiments.registry import STATIC_ARMS
from lcma_ext.experiments.stats import finite_values
from lcma_ext.experiments.store import write_json, write_text
from lcma_ext.training import DEFAULT_RECIPE, RECIPES, Recipe

#: The candidates searched by default (``legacy`` is always added as the baseline).
CANDIDATES: dict[str, Recipe] = {
    "default": RECIPES[DEFAULT_RECIPE],
    "warmup-cosine": Recipe(warmup_steps=100, lr_schedule="cosine", grad_clip=100.0),
    "ema": Recipe(grad_clip=100.0, ema_decay=0.99),
    "cosine-ema": Recipe(lr_schedule="cosine", grad_clip=100.0, ema_decay=0.99),
    "default-clip5": dataclasses.replace(RECIPES[DEFAULT_RECIPE], grad_clip=5.0),
    "default-ema995": dataclasses.replace(RECIPES[DEFAULT_RECIPE], ema_decay=0.995),
    "default-warmup200": dataclasses.replace(RECIPES[DEFAULT_RECIPE], warmup_steps=200),
}
#: The fallback rule's bound on a candidate's mean seed std, as a multiple of the legacy one.
FALLBACK_SPREAD = 1.5
#: ``--quick``: a smoke run of the script, not a result.
QUICK: dict[str, Any] = {"epochs": 1, "seeds": 2, "limit": 128}


def parse_candidate(text: str) -> tuple[str, Recipe]:
    """``"name:lr=3e-3,warmup_steps=100,lr_schedule=cosine,grad_clip=20,ema_decay=0.99"``
    (fields not given: the legacy recipe's) or the name of a default candidate / named recipe."""
    name, _, fields = text.partition(":")
    if not fields:
        if name in CANDIDATES:
            return name, CANDIDATES[name]
        if name in RECIPES:
            return name, RECIPES[name]
        raise ValueError(
            f"expected a candidate NAME:field=value,... or one of "
            f"{', '.join([*CANDIDATES, *RECIPES])}; got {text!r}"
        )
    types = {
        "lr": float,
        "warmup_steps": int,
        "lr_schedule": str,
        "grad_clip": float,
        "ema_decay": float,
    }
    values: dict[str, Any] = {}
    for item in fields.split(","):
        key, _, value = item.partition("=")
        if key not in types:
            raise ValueError(f"expected fields among {', '.join(types)}; got {key!r} in {text!r}")
        values[key] = types[key](value)
    return name, dataclasses.replace(RECIPES["legacy"], **values)


def run_candidate(name: str, recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) one candidate's run folder; returns its results."""
    data_driven = any(arm not in STATIC_ARMS for arm in args.arms)
    quick = QUICK if args.quick else {}
    config = ExperimentConfig(
        dataset=args.dataset,
        model=args.model,
        size=args.size,
        epochs=quick.get("epochs", args.epochs),
        # the NMS only chooses the data-driven arms' splits: a one-epoch NMS otherwise
        nms_epochs=quick.get("epochs", args.epochs) if data_driven else 1,
        seeds=quick.get("seeds", args.seeds),
        limit=quick.get("limit", args.limit),
        arms=tuple(args.arms),
        out=args.out / name,
        device=args.device,
        progress=args.progress,
        recipe="legacy",
        **recipe.to_dict(),
    )
    return run_comparison(config)


def summarize(results: dict[str, dict[str, Any]], arms: list[str]) -> list[dict[str, Any]]:
    """Per candidate and arm: mean, std and number of finite seeds."""
    rows = []
    for name, result in results.items():
        for arm in arms:
            values = finite_values(result["arms"][arm]["bpd_per_seed"])
            rows.append(
                {
                    "candidate": name,
                    "arm": arm,
                    "n": len(values),
                    "mean": statistics.fmean(values) if values else None,
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                }
            )
    return rows


def select(rows: list[dict[str, Any]], selection: list[str], factor: float) -> dict[str, Any]:
    """Apply the selection rule (module docstring) on the ``selection`` arms only."""
    by = {(r["candidate"], r["arm"]): r for r in rows}
    legacy = {arm: by[("legacy", arm)] for arm in selection}
    verdicts = {}
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [by[(name, arm)] for arm in selection]
        known = all(r["std"] is not None and legacy[r["arm"]]["std"] is not None for r in mine)
        qualifies = (
            name != "legacy"
            and known
            and all(
                r["std"] <= factor * legacy[r["arm"]]["std"]
                and r["mean"] <= legacy[r["arm"]]["mean"]
                for r in mine
            )
        )
        verdicts[name] = {
            "qualifies": qualifies,
            "mean_std": statistics.fmean(r["std"] for r in mine) if known else None,
            "mean_bpd": statistics.fmean(r["mean"] for r in mine) if known else None,
        }
    qualifying = [(v["mean_std"], v["mean_bpd"], n) for n, v in verdicts.items() if v["qualifies"]]
    if qualifying:
        return {"candidates": verdicts, "chosen": min(qualifying)[2], "rule": "halved"}
    # Fallback: no candidate halves the spread. The lowest mean among the candidates whose
    # spread is not clearly above the legacy one (five-seed stds vary by about +-35 %).
    legacy_std = statistics.fmean(r["std"] for r in legacy.values() if r["std"] is not None)
    fallback = [
        (v["mean_bpd"], n)
        for n, v in verdicts.items()
        if n != "legacy"
        and v["mean_std"] is not None
        and v["mean_std"] <= FALLBACK_SPREAD * legacy_std
        and v["mean_bpd"] <= verdicts["legacy"]["mean_bpd"]
    ]
    chosen = min(fallback)[1] if fallback else None
    return {"candidates": verdicts, "chosen": chosen, "rule": "fallback" if chosen else None}


def report(
    rows: list[dict[str, Any]],
    choice: dict[str, Any],
    recipes: dict[str, Recipe],
    selection: list[str],
    args: argparse.Namespace,
) -> str:
    def number(value: float | None) -> str:
        return "—" if value is None else f"{value:.4f}"

    setting = QUICK if args.quick else {"epochs": args.epochs, "seeds": args.seeds}
    lines = [
        f"# Recipe search: {args.model} ({args.size}) on {args.dataset}, "
        f"{setting['epochs']} epochs, {setting['seeds']} seeds"
        + (" (--quick smoke run: not a result)" if args.quick else ""),
        "",
        "| candidate | lr | warm-up | schedule | clip | EMA | arm | n | bpd mean ± std "
        "| std / legacy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    legacy = {r["arm"]: r for r in rows if r["candidate"] == "legacy"}
    for row in rows:
        recipe = recipes[row["candidate"]]
        base = legacy[row["arm"]]["std"]
        ratio = "—" if row["std"] is None or not base else f"{row['std'] / base:.2f}"
        lines.append(
            f"| {row['candidate']} | {recipe.lr:g} | {recipe.warmup_steps} | {recipe.lr_schedule} "
            f"| {recipe.grad_clip:g} | {recipe.ema_decay:g} | {row['arm']} | {row['n']} "
            f"| {number(row['mean'])} ± {number(row['std'])} | {ratio} |"
        )
    lines += [
        "",
        f"Selection rule (on {', '.join(selection)} only, never a data-driven arm such as "
        f"lcma): a candidate qualifies when on every selection arm its seed std is at most "
        f"{args.spread_factor:g} x the legacy recipe's and its mean bits/dim is not above the "
        "legacy mean; the qualifying candidate with the smallest mean seed std wins (ties: the "
        "lower mean bits/dim). When none qualifies (fallback): the candidate with the lowest "
        f"mean bits/dim among those whose mean seed std is at most {FALLBACK_SPREAD:g} x the "
        "legacy one and whose mean is not above the legacy mean.",
        "",
        "Qualifying: "
        + (", ".join(n for n, v in choice["candidates"].items() if v["qualifies"]) or "none")
        + f". Chosen: {choice['chosen'] or 'none (keep searching)'}"
        + (" (fallback rule: no candidate halved the spread)" * (choice["rule"] == "fallback"))
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the run folders")
    parser.add_argument(
        "--candidate",
        action="append",
        default=None,
        help="NAME or NAME:lr=..,warmup_steps=..,lr_schedule=..,grad_clip=..,ema_decay=.. "
        f"(repeatable; default: {', '.join(CANDIDATES)})",
    )
    parser.add_argument("--arms", default="channel", help="comma-separated (default: channel)")
    parser.add_argument("--dataset", default="patches")
    parser.add_argument("--model", default="realnvp")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--spread-factor", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    selection = [a for a in args.arms if a in STATIC_ARMS]
    if not selection:
        print(
            f"recipe_search: expected at least one static arm ({', '.join(STATIC_ARMS)}) in "
            f"--arms; got {','.join(args.arms)}",
            file=sys.stderr,
        )
        return 2
    try:
        candidates = dict(parse_candidate(c) for c in args.candidate or CANDIDATES)
    except ValueError as error:
        print(f"recipe_search: {error}", file=sys.stderr)
        return 2
    recipes = {"legacy": RECIPES["legacy"], **candidates}
    results = {}
    for name, recipe in recipes.items():
        print(f"recipe_search: {name}: {recipe}", flush=True)
        results[name] = run_candidate(name, recipe, args)
    rows = summarize(results, args.arms)
    choice = select(rows, selection, args.spread_factor)
    text = report(rows, choice, recipes, selection, args)
    write_json(
        args.out / "recipe_search.json",
        {
            "recipes": {name: recipe.to_dict() for name, recipe in recipes.items()},
            "selection_arms": selection,
            "rows": rows,
            **choice,
        },
    )
    write_text(args.out / "recipe_search.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
