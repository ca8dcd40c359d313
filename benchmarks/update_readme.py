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

Usage::

    lcma-ext run --out runs/default          # the default comparison
    python benchmarks/update_readme.py runs/default
    python benchmarks/update_readme.py runs/granularity --marker granularity
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="--out folder of a finished lcma-ext run")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument(
        "--marker", default="results", help="README block to replace (default: results)"
    )
    args = parser.parse_args(argv)
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
