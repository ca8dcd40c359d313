"""Copy the tables of ``lcma-ext sweep`` folders into docs/science.md (never type those figures).

The block between ``<!-- sweep:start -->`` and ``<!-- sweep:end -->`` in docs/science.md is
replaced by one section per sweep folder, in the order given: its ``sweep.md`` as the current
``lcma_ext.experiments.sweep.sweep_markdown`` renders it from the cells' ``results.json`` (via
``load_sweep``; the stored ``sweep.md`` is not read), and its plot, copied to
``docs/images/sweep-<folder name>.png``. ``--marker NAME`` replaces the ``<!-- NAME:start -->``
block instead (the GPU figures have their own block, ``gpu``).

Usage::

    lcma-ext sweep --dataset digits --out runs/sweep-digits-realnvp
    lcma-ext sweep --dataset patches --out runs/sweep-patches-realnvp
    python benchmarks/update_science.py runs/sweep-digits-realnvp runs/sweep-patches-realnvp
    python benchmarks/update_science.py runs/gpu-patches-realnvp runs/gpu-patches-glow --marker gpu
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

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
        target = images / f"sweep-{sweep_dir.resolve().name}.png"
        shutil.copyfile(plot, target)
        relative = Path(os.path.relpath(target, doc.parent)).as_posix()
        lines += ["", f"![paired difference vs parameters: {sweep_dir.name}]({relative})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", type=Path, nargs="+", help="--out folders of lcma-ext sweep")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "science.md")
    parser.add_argument("--images", type=Path, default=None, help="(default: <doc>/../images)")
    parser.add_argument("--marker", default="sweep", help="block to replace (default: sweep)")
    args = parser.parse_args(argv)
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
