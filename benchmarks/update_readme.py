"""Copy the results of an ``lcma-ext run`` into README.md (never edit those figures by hand).

The table between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md is replaced
by the run's ``results.md``, and the run's contribution heatmap of the first split point is
copied to ``docs/images/contributions_level0.png``, which README.md shows.

Usage::

    lcma-ext run --out runs/default          # the default comparison
    python benchmarks/update_readme.py runs/default
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
ROOT = Path(__file__).resolve().parent.parent


def splice(readme: str, block: str) -> str:
    """Replace the text between the markers of ``readme`` with ``block``."""
    if readme.count(START) != 1 or readme.count(END) != 1:
        raise ValueError(
            f"expected one {START} and one {END} marker in README.md; got another count"
        )
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block.strip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="--out folder of a finished lcma-ext run")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    results = args.run / "results.md"
    heatmap = args.run / "contributions_level0.png"
    for path in (results, heatmap):
        if not path.is_file():
            print(f"update_readme: expected {path} from a finished run; got none", file=sys.stderr)
            return 2
    table = results.read_text()
    # results.md starts with a level-1 title; demote it under the README's section.
    table = "\n".join(
        "###" + line[1:] if line.startswith("# ") else line for line in table.splitlines()
    )
    args.readme.write_text(splice(args.readme.read_text(), table))
    images = args.readme.parent / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(heatmap, images / "contributions_level0.png")
    print(f"updated {args.readme} and {images / 'contributions_level0.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
