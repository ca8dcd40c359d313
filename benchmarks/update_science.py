"""Copy the tables of ``lcma-ext sweep`` folders into docs/science.md (never type those figures).

The block between ``<!-- sweep:start -->`` and ``<!-- sweep:end -->`` in docs/science.md is
replaced by one section per sweep folder, in the order given: its ``sweep.md`` as the current
``lcma_ext.experiments.sweep.sweep_markdown`` renders it from the cells' ``results.json`` (via
``load_sweep``; the stored ``sweep.md`` is not read), and its plot, copied to
``docs/images/<folder name>.png`` (``sweep-`` put in front when the name lacks it).
``--marker NAME`` replaces the ``<!-- NAME:start -->`` block instead (the GPU figures have
their own block, ``gpu``).

Usage::

    lcma-ext sweep --dataset digits --out runs/sweep-digits-realnvp
    lcma-ext sweep --dataset patches --out runs/sweep-patches-realnvp
    python benchmarks/update_science.py runs/sweep-digits-realnvp runs/sweep-patches-realnvp
    python benchmarks/update_science.py runs/gpu-patches-realnvp runs/gpu-patches-glow --marker gpu
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "science.md")
    parser.add_argument("--images", type=Path, default=None, help="(default: <doc>/../images)")
    parser.add_argument("--marker", default="sweep", help="block to replace (default: sweep)")
    args = parser.parse_args(argv)
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
