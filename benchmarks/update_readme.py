"""Copy the results of an ``lcma-ext run`` into README.md (never edit those figures by hand).

The block between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md is replaced
by the run's report, rendered from its ``results.json`` by the current
``lcma_ext.experiments.report.results_markdown``: the README gets every column the code writes
today (the split diagnostics' consistency columns included), even from a run folder written by
an older version; ``results.md`` is used only when there is no ``results.json``. The run's
contribution heatmap of the first split point is drawn from its ``contributions.pt`` by the
current ``lcma_ext.plotting.plot_contributions`` (copied from ``contributions_level0.png`` when
there is no ``contributions.pt``) into ``docs/images/contributions_level0.png``, which README.md
shows. ``--marker NAME`` replaces the
``<!-- NAME:start -->`` block instead (and copies no image).

``--verdicts RUN [RUN ...]`` fills the ``<!-- verdicts:start -->`` block of "Which split should I
use?" from the runs' ``results.json`` (:func:`verdicts_markdown`): per run its dataset, model,
size, epochs and seeds, and per data-driven arm (every arm that is not a static split) its
paired difference from the best static split of its prior, the 95 % interval and the verdict
(``better``/``worse`` only where the interval excludes 0), never the means alone.

Usage::

    lcma-ext run --out runs/default          # the default comparison
    python benchmarks/update_readme.py runs/default
    python benchmarks/update_readme.py runs/granularity --marker granularity
    python benchmarks/update_readme.py --verdicts runs/default runs/prior-patches
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def splice(readme: str, block: str, marker: str = "results", name: str = "README.md") -> str:
    """Replace the text between the ``<!-- marker:start/end -->`` lines of ``readme``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if readme.count(start) != 1 or readme.count(end) != 1:
        raise ValueError(f"expected one {start} and one {end} marker in {name}; got another count")
    head, rest = readme.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{block.strip()}\n{end}{tail}"


def report(run: Path) -> str:
    """The run's ``results.md`` as the current code writes it (from ``results.json``)."""
    results = run / "results.json"
    if results.is_file():
        from lcma_ext.experiments.report import results_markdown

        return results_markdown(json.loads(results.read_text()))
    return (run / "results.md").read_text()


def heatmap(run: Path, target: Path) -> None:
    """Draw the run's split-0 heatmap with the current code (else copy its PNG) to ``target``."""
    maps = run / "contributions.pt"
    if maps.is_file():
        from lcma_ext.contributions import ContributionMaps
        from lcma_ext.plotting import plot_contributions

        plot_contributions(ContributionMaps.load(maps), target, splits=[0])
    else:
        shutil.copyfile(run / "contributions_level0.png", target)


def _cell(value: float | None, signed: bool = True) -> str:
    from lcma_ext.experiments.stats import finite

    if not finite(value):
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def verdicts_markdown(runs: list[tuple[str, dict]]) -> str:
    """Per run, its data-driven arms against the best static split of their prior.

    Args:
        runs: ``(label, results)`` pairs, ``results`` as ``results.json`` holds them (the
            comparisons are computed for a folder of an earlier version).
    """
    from lcma_ext.experiments.registry import STATIC_ARMS, base_arm
    from lcma_ext.experiments.stats import compared_arms

    lines = [
        "Verdicts of the measured runs: each data-driven arm against the best static split of "
        "its prior (the best mean among "
        + ", ".join(f"`{a}`" for a in STATIC_ARMS)
        + " of the same run), paired over seeds. `better` or `worse` only when the 95 % "
        "Student-t interval of the paired difference excludes 0; otherwise `no evidence`. "
        "Seeds for 1 %: how many seeds an observed 1 % difference would need at this spread.",
        "",
    ]
    for label, results in runs:
        config = results["config"]
        arms = compared_arms(results)
        lines += [
            f"**{config['dataset']}, {config['model']} ({config['size']}), {config['epochs']} "
            f"epochs, {len(config['seeds'])} seeds** ({label}"
            + (", smoke run: not a result" if config.get("quick") else "")
            + ")",
            "",
            "| arm | prior | best static split | Δ bpd (arm − static) | 95 % CI | verdict "
            "| seeds for 1 % |",
            "|---|---|---|---|---|---|---|",
        ]
        data_driven = [name for name in arms if base_arm(name) not in STATIC_ARMS]
        for name in data_driven:
            entry = arms[name]
            comparison = entry.get("vs_best_static")
            prior = entry.get("prior", "standard")
            if comparison is None:
                lines.append(f"| {name} | {prior} | none in this run | — | — | — | — |")
                continue
            interval = comparison["ci95"]
            low, high = interval or (None, None)
            ci = "< 2 seeds" if interval is None else f"[{_cell(low)}, {_cell(high)}]"
            seeds = comparison.get("seeds_for_1pct")
            lines.append(
                f"| {name} | {prior} | {comparison['reference']} | {_cell(comparison['mean'])} "
                f"| {ci} | **{comparison['verdict']}** | {'—' if seeds is None else seeds} |"
            )
        if not data_driven:
            lines.append("| — | — | — | — | — | no data-driven arm in this run | — |")
        lines.append("")
    return "\n".join(lines)


def update_verdicts(runs: list[Path], readme: Path) -> int:
    loaded = []
    for run in runs:
        path = run / "results.json"
        if not path.is_file():
            print(f"update_readme: expected {path} from a finished run; got none", file=sys.stderr)
            return 2
        loaded.append((str(run), json.loads(path.read_text())))
    readme.write_text(splice(readme.read_text(), verdicts_markdown(loaded), "verdicts"))
    print(f"updated the verdicts block of {readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="+", help="--out folder of a finished lcma-ext run")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument(
        "--marker", default="results", help="README block to replace (default: results)"
    )
    parser.add_argument(
        "--verdicts",
        action="store_true",
        help="fill the verdicts block from every RUN's results.json",
    )
    args = parser.parse_args(argv)
    if args.verdicts:
        return update_verdicts(args.run, args.readme)
    if len(args.run) != 1:
        parser.error(f"expected one run folder without --verdicts; got {len(args.run)}")
    args.run = args.run[0]
    results = args.run / "results.json"
    if not results.is_file():
        results = args.run / "results.md"
    image = args.run / "contributions.pt"
    if not image.is_file():
        image = args.run / "contributions_level0.png"
    copy_image = args.marker == "results"
    for path in (results, image) if copy_image else (results,):
        if not path.is_file():
            print(f"update_readme: expected {path} from a finished run; got none", file=sys.stderr)
            return 2
    table = report(args.run)
    # results.md starts with a level-1 title; demote it under the README's section.
    table = "\n".join(
        "###" + line[1:] if line.startswith("# ") else line for line in table.splitlines()
    )
    args.readme.write_text(splice(args.readme.read_text(), table, args.marker))
    if not copy_image:
        print(f"updated the {args.marker} block of {args.readme}")
        return 0
    images = args.readme.parent / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    heatmap(args.run, images / "contributions_level0.png")
    print(f"updated {args.readme} and {images / 'contributions_level0.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
