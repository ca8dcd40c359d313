"""The ``lcma-ext`` command line (also ``python -m lcma_ext``): the paper's comparisons.

``lcma-ext run``
    Algorithm 1 of the LCMA paper on one dataset and one flow family: pre-train the NMS flow,
    estimate the per-dimension contributions, train every split arm with the same architecture,
    optimizer, epochs and seeds, score test bits/dim and write the results (Tables 1-3).
``lcma-ext ablate-levels``
    Every high/low choice of which half to factor out at each split point (Table 4).
``lcma-ext contributions``
    Contribution heatmaps of a saved NMS checkpoint.
``lcma-ext sweep``
    ``run`` over a grid of model sizes and epoch budgets, with a table and a plot of the paired
    difference against ``channel`` versus the parameter count (docs/science.md).
``lcma-ext sample`` / ``interpolate`` / ``evaluate``
    On a finished run folder: a titled grid of samples at a temperature, a grid of latent
    interpolations between test images, and every checkpoint rescored on the test set
    (:mod:`lcma_ext.experiments.inspection`).

This module only turns arguments into an :class:`lcma_ext.experiments.ExperimentConfig` (a
:class:`lcma_ext.experiments.SweepConfig` for ``sweep``), calls
the runner (:mod:`lcma_ext.experiments`) and turns its errors into one-line messages and exit
codes: 0 done, 2 a user error (bad option, unusable ``--out``, corrupt state file, diverged NMS),
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lcma_ext.data import DATASETS
from lcma_ext.distributed import lost_peer, world
from lcma_ext.experiments import (
    ExperimentConfig,
    SweepConfig,
    plot_checkpoint_contributions,
    results_markdown,
    run_comparison,
    run_level_ablation,
    run_sweep,
    sweep_markdown,
)
from lcma_ext.experiments.config import (
    DEFAULTS,
    FALLBACK_DEFAULTS,
    PRECISION_CHOICES,
    QUICK,
    recipe_flags,
)
from lcma_ext.experiments.registry import (
    ARMS,
    CONDITIONAL_ARMS,
    LISTED_ARMS,
    PRIOR_SUFFIX,
    VAE_ARMS,
    parse_arms,
)
from lcma_ext.experiments.sweep import SWEEP_ARMS, SWEEP_EPOCHS, SWEEP_SIZES
from lcma_ext.models import MODELS, SIZE_NAMES
from lcma_ext.training import DEFAULT_RECIPE, LEGACY_RECIPE, LR_SCHEDULES, RECIPE_FIELDS, RECIPES
from lcma_ext.transforms import PRIORS

__all__ = ["build_parser", "config_from_args", "main", "sweep_config_from_args"]

EPILOG = "\n\n".join(
    textwrap.fill(" ".join(paragraph.split()), 79)
    for paragraph in (
        f"--quick is a smoke run of about a minute: {QUICK['limit']} images per split, "
        f"{QUICK['seeds']} seeds, {QUICK['epochs']} epochs (NMS {QUICK['nms_epochs']}); "
        "explicit --epochs, --seeds or --limit still win. It checks that everything runs; "
        "results.md marks it as a smoke run, and its figures are not a result.",
        "Resuming: every finished run is stored under --out. Rerun the same command with the "
        "same --out to skip the finished runs and resume an interrupted one from its last "
        "epoch (Ctrl-C is safe). Another configuration needs another --out. A corrupt or "
        "truncated file in --out is named in the error: delete it and rerun the same command "
        "to redo that step.",
    )
)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {value}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number; got {value}")
    return value


def _per_dataset(key: str) -> str:
    values = ", ".join(f"{name} {d[key]}" for name, d in DEFAULTS.items())
    return f"{values}, others {FALLBACK_DEFAULTS[key]}; --quick {QUICK[key]}"


def _sizes(text: str) -> tuple[str, ...]:
    sizes = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sizes or any(s not in SIZE_NAMES for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(SIZE_NAMES)}; got {text!r}"
        )
    return sizes


def _budgets(text: str) -> tuple[int, ...]:
    parse = _int_at_least(1)
    return tuple(parse(item.strip()) for item in text.split(","))


def _add_common(parser: argparse.ArgumentParser, grid: bool = False) -> None:
    """The options of ``run``, ``ablate-levels`` and ``sweep`` (``grid``: no --size, --epochs)."""
    default = ExperimentConfig()
    add = parser.add_argument
    add(
        "--dataset",
        default=default.dataset,
        metavar="NAME",
        help=f"{', '.join(DATASETS)}, or npz:PATH (uint8 arrays train, test [, levels]) "
        "(default: %(default)s)",
    )
    add("--model", choices=tuple(MODELS), default=default.model, help="(default: %(default)s)")
    if not grid:
        add("--size", choices=SIZE_NAMES, default=default.size, help="(default: %(default)s)")
    add(
        "--levels",
        type=_int_at_least(2),
        default=None,
        help="levels = split points + 1 (default: as many squeezes as fit, at most 4)",
    )
    if not grid:
        add(
            "--epochs",
            type=_int_at_least(1),
            default=None,
            help=f"epochs per arm (default: {_per_dataset('epochs')})",
        )
    add(
        "--nms-epochs",
        type=_int_at_least(1),
        default=None,
        help="epochs of the NMS pre-training (default: "
        + ("each cell's epoch budget)" if grid else f"{_per_dataset('nms_epochs')})"),
    )
    add(
        "--seeds",
        type=_int_at_least(1),
        default=None,
        help=f"number of seeds 0..N-1 (default: {_per_dataset('seeds')})",
    )
    add(
        "--batch-size",
        type=_int_at_least(1),
        default=default.batch_size,
        help="(default: %(default)s)",
    )
    _add_recipe(parser)
    add(
        "--device", default=default.device, help="cpu, cuda, cuda:1, mps ... (default: %(default)s)"
    )
    add(
        "--out",
        type=_folder,
        default=None,
        help="run folder (default: runs/<command>-<dataset>-<model>-<size>[-quick])",
    )
    add(
        "--data-root",
        type=Path,
        default=None,
        help="torchvision datasets (mnist, cifar10, ...) (default: none)",
    )
    add(
        "--limit",
        type=_int_at_least(2),
        default=None,
        help=f"max images per split (default: all; --quick {QUICK['limit']})",
    )
    add(
        "--image-size",
        type=_int_at_least(2),
        default=None,
        help="imagefolder: resize to this side (default: none)",
    )
    add(
        "--outlier-gap",
        type=_positive_float,
        default=default.outlier_gap,
        help="flag a run this many bpd above its arm's median (default: %(default)s)",
    )
    add(
        "--allow-diverged-nms",
        action="store_true",
        help="go on after a diverged NMS pre-training, labelling every LCMA arm "
        "(default: stop with an error)",
    )
    add(
        "--prior",
        choices=PRIORS,
        default=default.prior,
        help="prior of the factored halves of every split arm: the standard normal, or Glow's "
        f"learned N(mu(kept), sigma(kept)^2) (a {PRIOR_SUFFIX} arm has it either way) "
        "(default: %(default)s)",
    )
    add(
        "--precision",
        choices=PRECISION_CHOICES,
        default=default.precision,
        help="training precision: torch.autocast with bf16 or fp16 (a gradient scaler); test "
        "bits/dim are scored in fp32 (default: %(default)s)",
    )
    add("--compile", action="store_true", help="train through torch.compile (default: off)")
    add(
        "--workers",
        type=_int_at_least(0),
        default=default.workers,
        help="DataLoader worker processes (default: %(default)s)",
    )
    add(
        "--hflip",
        action="store_true",
        help="random horizontal flips of the training images (default: off)",
    )
    add("--quick", action="store_true", help="a one-minute smoke run (see below; default: off)")
    add(
        "--no-progress",
        action="store_true",
        help="hide the progress bars and status lines; the results are still printed "
        "(default: shown)",
    )


#: Help of the options that override one field of the recipe (another field: a generic line).
_RECIPE_HELP = {
    "lr": "Adam's (peak) learning rate",
    "warmup_steps": "optimizer steps of the linear learning-rate warm-up",
    "lr_schedule": f"{' or '.join(LR_SCHEDULES)} (cosine: to 0 over the run's steps after the "
    "warm-up)",
    "grad_clip": "max global gradient norm, 0 disables; clipped steps are counted in each run's "
    "summary",
    "ema_decay": "decay of the EMA of the weights that is scored and sampled, 0 disables",
}


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    """``--recipe`` and an option per field of it that ``ExperimentConfig`` overrides.

    The options follow :data:`lcma_ext.training.RECIPE_FIELDS` (a recipe field that is an
    ``ExperimentConfig`` field with a default of its own, such as ``lr``, has its own option);
    their values are checked once, by :class:`lcma_ext.training.Recipe`.
    """
    recipes = "; ".join(f"{name}: {' '.join(recipe_flags(r))}" for name, r in RECIPES.items())
    add = parser.add_argument
    add(
        "--recipe",
        choices=tuple(RECIPES),
        default=DEFAULT_RECIPE,
        help=f"training recipe of every arm and the NMS ({recipes}; legacy is the recipe of "
        "versions up to 0.2) (default: %(default)s)",
    )
    legacy = LEGACY_RECIPE.to_dict()
    for item in dataclasses.fields(ExperimentConfig):
        if item.name in RECIPE_FIELDS and item.default is None:
            kind = type(legacy[item.name])
            add(
                f"--{item.name.replace('_', '-')}",
                type=_int_at_least(0) if kind is int else _number if kind is float else str,
                default=None,
                help=_RECIPE_HELP.get(item.name, f"the recipe's {item.name}")
                + " (default: the recipe's)",
            )


def _add_arm_options(parser: argparse.ArgumentParser, arms: tuple[str, ...]) -> None:
    """``--arms`` (default ``arms``), ``--region-size`` and ``--reestimate-every``."""
    parser.add_argument(
        "--arms",
        type=parse_arms,
        default=arms,
        help=f"comma-separated arms (default: {','.join(arms)}); also "
        f"{','.join(a for a in LISTED_ARMS if a not in arms)}"
        f", flow-vae (= {','.join(VAE_ARMS)}); a split arm ending in {PRIOR_SUFFIX} "
        f"({','.join(CONDITIONAL_ARMS[:3])}, ...) has Glow's conditional prior",
    )
    parser.add_argument(
        "--region-size",
        type=_int_at_least(1),
        default=ExperimentConfig.region_size,
        help="tile side of the *-region arms, capped at each split's grid (default: %(default)s)",
    )
    parser.add_argument(
        "--reestimate-every",
        type=_int_at_least(1),
        default=None,
        help="epochs before lcma-self switches to the LCMA split of its own contributions, "
        "and between the switches of lcma-reestimate (default: a third of --epochs, at least 1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``lcma-ext`` argument parser."""
    from lcma_ext import __version__

    parser = argparse.ArgumentParser(
        prog="lcma-ext",
        description="Reproduce the LCMA paper's comparisons of multi-scale splits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lcma-ext {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        metavar="{run,ablate-levels,contributions,sweep,sample,interpolate,evaluate}",
    )
    options: dict[str, Any] = {
        "epilog": EPILOG,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    run = sub.add_parser("run", help="Algorithm 1: NMS, contributions, every split arm", **options)
    _add_common(run)
    _add_arm_options(run, ARMS)
    ablate = sub.add_parser("ablate-levels", help="all 2^L high/low choices (Table 4)", **options)
    _add_common(ablate)
    contributions = sub.add_parser("contributions", help="heatmaps of an NMS checkpoint")
    contributions.add_argument("checkpoint", type=Path, help="nms.pt written by run")
    contributions.add_argument(
        "--out", type=Path, default=None, help="(default: the checkpoint's folder)"
    )
    contributions.add_argument("--data-root", type=Path, default=None, help="(default: none)")
    contributions.add_argument("--device", default="cpu", help="(default: %(default)s)")
    contributions.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sweep = sub.add_parser("sweep", help="run over a grid of sizes and epoch budgets", **options)
    sweep.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help=f"comma-separated model sizes (default: {','.join(SWEEP_SIZES)}; --quick tiny)",
    )
    sweep.add_argument(
        "--epoch-budgets",
        type=_budgets,
        default=None,
        help="comma-separated epochs per arm, one cell each (default: "
        f"{','.join(map(str, SWEEP_EPOCHS))}; --quick 2,3)",
    )
    _add_common(sweep, grid=True)
    _add_arm_options(sweep, SWEEP_ARMS)
    _add_inspection(sub)
    return parser


def _add_run_folder(parser: argparse.ArgumentParser, png: bool) -> None:
    """``RUN_DIR`` and the options every command on a finished run folder takes."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="--out folder of a run")
    if png:
        parser.add_argument("--arm", required=True, help="an arm of that run, e.g. lcma")
        parser.add_argument(
            "--seed", type=_int_at_least(0), default=0, help="its seed (default: %(default)s)"
        )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the PNG (default: in RUN_DIR)" if png else "folder of the table (default: RUN_DIR)",
    )
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")


def _add_inspection(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``sample``, ``interpolate`` and ``evaluate`` on a finished run folder."""
    sample = sub.add_parser("sample", help="a titled grid of samples of a trained arm")
    _add_run_folder(sample, png=True)
    sample.add_argument(
        "--temperature", type=_non_negative_float, default=1.0, help="(default: %(default)s)"
    )
    sample.add_argument("--num", type=_int_at_least(1), default=64, help="(default: %(default)s)")
    sample.add_argument(
        "--noise-seed", type=_int_at_least(0), default=0, help="(default: %(default)s)"
    )
    interpolate = sub.add_parser("interpolate", help="latent interpolations of test images")
    _add_run_folder(interpolate, png=True)
    interpolate.add_argument(
        "--steps", type=_int_at_least(2), default=8, help="images per pair (default: %(default)s)"
    )
    interpolate.add_argument(
        "--pairs",
        type=_int_at_least(1),
        default=4,
        help="pairs of test images (default: %(default)s)",
    )
    interpolate.add_argument(
        "--mode",
        choices=("linear", "spherical"),
        default="spherical",
        help="(default: %(default)s)",
    )
    interpolate.add_argument("--data-root", type=Path, default=None, help="(default: none)")
    evaluate = sub.add_parser("evaluate", help="rescore every checkpoint on the test set")
    _add_run_folder(evaluate, png=False)
    evaluate.add_argument("--data-root", type=Path, default=None, help="(default: none)")


def _inspect(args: argparse.Namespace) -> str:
    """Run ``sample``, ``interpolate`` or ``evaluate``; returns what to print."""
    from lcma_ext.experiments import inspection

    if args.command == "evaluate":
        rows = inspection.evaluate_run(
            args.run_dir, data_root=args.data_root, device=args.device, out=args.out
        )
        return inspection.evaluation_markdown(rows, args.run_dir)
    common = {"out": args.out, "device": args.device}
    if args.command == "sample":
        path = inspection.sample_run(
            args.run_dir, args.arm, args.seed, temperature=args.temperature, num=args.num,
            noise_seed=args.noise_seed, **common,
        )  # fmt: skip
    else:
        path = inspection.interpolate_run(
            args.run_dir, args.arm, args.seed, steps=args.steps, pairs=args.pairs,
            mode=args.mode, data_root=args.data_root, **common,
        )  # fmt: skip
    return str(path)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of parsed ``run`` / ``ablate-levels`` arguments.

    Every field is the option of the same name (``--no-progress`` gives ``progress``); a field
    without an option in this command (``--arms`` for ``ablate-levels``, ``--size`` and
    ``--epochs`` for ``sweep``) keeps its default.
    """
    values = {**vars(args), "progress": not args.no_progress}
    fields = dataclasses.fields(ExperimentConfig)
    return ExperimentConfig(**{f.name: values[f.name] for f in fields if f.name in values})


def sweep_config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The :class:`SweepConfig` of parsed ``sweep`` arguments (``--out``: the sweep folder)."""
    base = config_from_args(argparse.Namespace(**{**vars(args), "command": "run", "out": None}))
    return SweepConfig(base, sizes=args.sizes, epoch_budgets=args.epoch_budgets, out=args.out)


def _folder(text: str) -> Path:
    """``--out``: a folder name (an empty one would write the run into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a folder name; got {text!r}")
    return Path(text)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lcma-ext``; returns the exit status (2 on a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "contributions":
            paths = plot_checkpoint_contributions(
                args.checkpoint,
                out=args.out,
                data_root=args.data_root,
                device=args.device,
                progress=not args.no_progress,
            )
            print("\n".join(str(p) for p in paths))
            return 0
        if args.command in ("sample", "interpolate", "evaluate"):
            print(_inspect(args))
            return 0
        if args.command == "sweep":
            sweep = run_sweep(sweep_config_from_args(args))
            if world().is_main:
                print(sweep_markdown(sweep))
            return 0
        config = config_from_args(args)
        runner = run_comparison if args.command == "run" else run_level_ablation
        results = runner(config)
        if world().is_main:
            print(results_markdown(results))
    except (ValueError, ImportError, OSError) as error:
        print(f"lcma-ext {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcma-ext: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except RuntimeError as error:
        if not (world().distributed and lost_peer(error)):
            raise
        print(
            f"lcma-ext {args.command}: error: rank {world().rank}: another process of this "
            f"torchrun job stopped ({_one_line(error)[:100]}...); rerun the same torchrun "
            "command to resume",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
