"""Copy the tables of ``lcma-ext sweep`` folders into docs/science.md (never type those figures).

The block between ``<!-- sweep:start -->`` and ``<!-- sweep:end -->`` in docs/science.md is
replaced by one section per sweep folder, in the order given: its ``sweep.md`` as the current
``lcma_ext.experiments.sweep.sweep_markdown`` renders it from the cells' ``results.json`` (via
``load_sweep``; the stored ``sweep.md`` is not read), and its plot, copied to
``docs/images/<folder name>.png`` (``sweep-`` put in front when the name lacks it).
``--marker NAME`` replaces the ``<!-- NAME:start -->`` block instead (the GPU figures have
their own block, ``gpu``).

``--recipe BEFORE AFTER [--search DIR]`` fills the ``<!-- recipe:start -->`` block with the
before/after table of two ``lcma-ext run`` folders of the same arms, seeds and data trained with
two training recipes (:func:`recipe_section`), and the candidate table that
``benchmarks/recipe_search.py --out DIR`` wrote (``DIR/recipe_search.md``).

Usage::

    lcma-ext sweep --dataset digits --out runs/sweep-digits-realnvp
    lcma-ext sweep --dataset patches --out runs/sweep-patches-realnvp
    python benchmarks/update_science.py runs/sweep-digits-realnvp runs/sweep-patches-realnvp
    python benchmarks/update_science.py runs/gpu-patches-realnvp runs/gpu-patches-glow --marker gpu
    python benchmarks/update_science.py --recipe runs/patches-legacy runs/patches-default \
        --search runs/recipe-search
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from update_readme import splice

ROOT = Path(__file__).resolve().parent.parent


def section(sweep_dir: Path, images: Path, doc: Path) -> str:
    """The markdown of one sweep folder (title demoted under the page's section) and its plot."""
    from lcma_ext.experiments.sweep import load_sweep, sweep_markdown

    text = sweep_markdown(load_sweep(sweep_dir))
    lines = ["###" + line[1:] if line.startswith("# ") else line for line in text.splitlines()]
    plot = sweep_dir / "sweep.png"
    if plot.is_file():
        images.mkdir(parents=True, exist_ok=True)
        name = sweep_dir.resolve().name
        target = images / f"{name if name.startswith('sweep') else 'sweep-' + name}.png"
        shutil.copyfile(plot, target)
        relative = Path(os.path.relpath(target, doc.parent)).as_posix()
        lines += ["", f"![paired difference vs parameters: {sweep_dir.name}]({relative})"]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def cost_section(run_dirs: list[Path]) -> str:
    """One table of the split-selection cost per data-driven arm of ``lcma-ext run`` folders.

    Read from each folder's ``results.json`` (``cost`` and ``config``): offline
    arms pay the NMS pre-training and the contribution estimation, self-estimated arms their
    in-training estimations; the share is selection / (selection + the arm's training per seed).
    """
    header = [
        "| model | size | data | epochs (arm, NMS) | arm | kind | NMS s | estimation s "
        "| selection s | arm training s/seed | selection share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for run_dir in run_dirs:
        results = json.loads((run_dir / "results.json").read_text())
        config = results["config"]
        for arm, cost in results.get("cost", {}).items():
            share = cost.get("share")
            offline = cost["kind"] == "offline"
            estimation = cost.get("contribution_time_s" if offline else "selection_time_s")
            nms = _seconds(cost.get("nms_train_time_s")) if offline else "—"
            rows.append(
                f"| {config['model']} | {config['size']} | {config['dataset']} "
                f"| {config['epochs']}, {config['nms_epochs']} | {arm} | {cost['kind']} "
                f"| {nms} | {_seconds(estimation)} "
                f"| {_seconds(cost.get('selection_time_s'))} | {_seconds(cost['train_time_s'])} "
                f"| {'n/a' if share is None else f'{100 * share:.1f} %'} |"
            )
    folders = ", ".join(f"`{d.as_posix()}`" for d in run_dirs)
    return "\n".join([f"From {folders}:", "", *header, *rows])


def recipe_section(before: Path, after: Path, search: Path | None = None) -> str:
    """The seed spread and mean of every arm of two run folders that differ in the recipe only.

    Per arm of both folders (``results.json``): mean ± std of the test bits/dim over the seeds,
    the std ratio after / before, the change of the mean, and the verdict of each run against
    its best static split. Raises ``ValueError`` when the folders differ in anything but the
    recipe fields (dataset, model, size, levels, epochs, seeds, batch size).
    """
    from lcma_ext.experiments.config import recipe_flags, recipe_options, stored_recipe
    from lcma_ext.experiments.stats import finite_values

    runs = [json.loads((d / "results.json").read_text()) for d in (before, after)]
    keys = ("dataset", "model", "size", "levels", "epochs", "nms_epochs", "seeds", "batch_size")
    for key in keys:
        values = [r["config"].get(key) for r in runs]
        if values[0] != values[1]:
            raise ValueError(
                f"expected {before} and {after} to differ in the recipe only; got {key} "
                f"{values[0]!r} and {values[1]!r}"
            )
    config = runs[1]["config"]
    recipes = [stored_recipe(r["config"]) for r in runs]
    lines = [
        f"{config['model']} ({config['size']}) on {config['dataset']}, {config['epochs']} epochs, "
        f"seeds {', '.join(map(str, config['seeds']))}; before: `{before.as_posix()}` "
        f"(`{recipe_options(recipes[0])}`), after: `{after.as_posix()}` "
        f"(`{recipe_options(recipes[1])}`: `{' '.join(recipe_flags(recipes[1]))}`).",
        "",
        "| arm | before: bpd mean ± std | after: bpd mean ± std | std after / before "
        "| Δ mean (after − before) | before: vs best static (Δ, 95 % CI, verdict) "
        "| after: vs best static |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, entry in runs[1]["arms"].items():
        old = runs[0]["arms"].get(arm)
        if old is None:
            continue
        stats = []
        for values in (finite_values(old["bpd_per_seed"]), finite_values(entry["bpd_per_seed"])):
            mean = statistics.fmean(values)
            stats.append((mean, statistics.stdev(values) if len(values) > 1 else None))
        (m0, s0), (m1, s1) = stats
        ratio = "—" if not s0 or s1 is None else f"{s1 / s0:.2f}"
        verdicts = [_versus_best_static(e) for e in (old, entry)]
        lines.append(
            f"| {arm} | {m0:.4f} ± {_std(s0)} | {m1:.4f} ± {_std(s1)} | {ratio} "
            f"| {m1 - m0:+.4f} | {verdicts[0]} | {verdicts[1]} |"
        )
    if search is not None:
        table = (search / "recipe_search.md").read_text().splitlines()
        lines += ["", f"Candidates (`benchmarks/recipe_search.py --out {search.as_posix()}`):", ""]
        lines += ["####" + t[1:] if t.startswith("# ") else t for t in table]
    return "\n".join(lines).rstrip() + "\n"


def _versus_best_static(entry: dict[str, Any]) -> str:
    if "vs_best_static" not in entry:
        return "— (results of an earlier version)"
    versus = entry["vs_best_static"]
    if versus is None:
        return "is the best static split"
    ci = versus["ci95"]
    interval = "—" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
    return f"{versus['mean']:+.4f} vs {versus['reference']}, {interval}, **{versus['verdict']}**"


def _std(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweeps",
        type=Path,
        nargs="+",
        help="--out folders of lcma-ext sweep (with --cost: of lcma-ext run)",
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="fill the cost block with the selection cost of lcma-ext run folders",
    )
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="fill the recipe block from two lcma-ext run folders: BEFORE AFTER",
    )
    parser.add_argument(
        "--search", type=Path, default=None, help="with --recipe: a recipe_search.py --out folder"
    )
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "science.md")
    parser.add_argument("--images", type=Path, default=None, help="(default: <doc>/../images)")
    parser.add_argument("--marker", default="sweep", help="block to replace (default: sweep)")
    args = parser.parse_args(argv)
    if args.recipe:
        if len(args.sweeps) != 2:
            parser.error(f"expected two run folders with --recipe; got {len(args.sweeps)}")
        try:
            block = recipe_section(*args.sweeps, args.search)
        except (OSError, ValueError, KeyError) as error:
            print(f"update_science: {error}", file=sys.stderr)
            return 2
        marker = "recipe" if args.marker == "sweep" else args.marker
        args.doc.write_text(splice(args.doc.read_text(), block, marker, name=args.doc.name))
        print(f"updated the {marker} block of {args.doc}")
        return 0
    if args.cost:
        missing = [d for d in args.sweeps if not (d / "results.json").is_file()]
        if missing:
            print(
                f"update_science: expected {missing[0] / 'results.json'} (lcma-ext run); got none",
                file=sys.stderr,
            )
            return 2
        marker = "cost" if args.marker == "sweep" else args.marker
        text = splice(args.doc.read_text(), cost_section(args.sweeps), marker, name=args.doc.name)
        args.doc.write_text(text)
        print(f"updated the {marker} block of {args.doc} from {len(args.sweeps)} run(s)")
        return 0
    images = args.images or args.doc.parent / "images"
    for sweep_dir in args.sweeps:
        if not (sweep_dir / "sweep.json").is_file():
            print(
                f"update_science: expected {sweep_dir / 'sweep.json'} (lcma-ext sweep); got none",
                file=sys.stderr,
            )
            return 2
    block = "\n\n".join(section(sweep_dir, images, args.doc) for sweep_dir in args.sweeps)
    text = splice(args.doc.read_text(), block, args.marker, name=args.doc.name)
    args.doc.write_text(text)
    print(f"updated the {args.marker} block of {args.doc} from {len(args.sweeps)} sweep(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
