"""``lcma-ext sweep``: where does a data-driven split pay off? A grid over model size and epochs.

Every cell of the grid (one ``--size`` and one epoch budget) is an ordinary
:func:`~lcma_ext.experiments.run_comparison` of the same arms and seeds in its own run folder
``<out>/<size>-<epochs>ep``, so a cell resumes like ``lcma-ext run`` and its honesty rules hold:
the same budget, optimizer, seeds and initial weights per seed for every arm. The NMS flow of a
cell is pre-trained for the cell's epoch budget unless ``nms_epochs`` is given.

The sweep folder holds::

    <size>-<epochs>ep/   one run folder per cell (config.json, runs/, results.json, ...)
    sweep.json           the grid, which cells finished, and the rows read from the cells
    sweep.md             the table (:func:`sweep_markdown`)
    sweep.png            paired difference against the reference arm vs parameter count

A rerun skips every cell that ``sweep.json`` lists as finished with the same configuration (and
whose ``results.json`` is there) and resumes the others. The table and the plot are always
regenerated from the cells' ``results.json``, never from memory or by hand
(:func:`load_sweep`; ``benchmarks/update_science.py`` copies them into docs/science.md).

Example (two tiny cells, a smoke run of about a minute on a 2-core CPU)::

    from lcma_ext.experiments import ExperimentConfig, SweepConfig, run_sweep
    from lcma_ext.experiments.sweep import SWEEP_ARMS

    base = ExperimentConfig(quick=True, progress=False, arms=SWEEP_ARMS)
    sweep = run_sweep(SweepConfig(base, out="runs/sweep-smoke"))
    print(sweep["rows"][0]["arm"], sweep["rows"][0]["bpd_mean"])

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Tables 1-3.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcma_ext.experiments.config import ExperimentConfig
from lcma_ext.experiments.cost import selection_share
from lcma_ext.experiments.markdown import number, table
from lcma_ext.experiments.registry import SELF_ARMS
from lcma_ext.experiments.report import comparison_cells, flags_cell
from lcma_ext.experiments.runner import run_comparison
from lcma_ext.experiments.stats import compared_arms, finite, finite_values, standard_error
from lcma_ext.experiments.store import (
    ExperimentError,
    StateFileError,
    atomic_path,
    read_json,
    strict_json,
    write_json,
    write_text,
)
from lcma_ext.models import SIZE_NAMES
from lcma_ext.training import LEGACY_RECIPE, RECIPE_FIELDS

__all__ = [
    "QUICK_SWEEP",
    "SWEEP_ARMS",
    "SWEEP_EPOCHS",
    "SWEEP_SIZES",
    "SweepConfig",
    "cell_rows",
    "load_sweep",
    "plot_sweep",
    "run_sweep",
    "sweep_command",
    "sweep_markdown",
]

#: The arms a sweep trains by default: the static reference, offline LCMA, the self-estimated.
SWEEP_ARMS = ("channel", "lcma", *SELF_ARMS)
#: The default grid.
SWEEP_SIZES = ("tiny", "small", "medium")
SWEEP_EPOCHS = (5, 10, 30)
#: What ``quick`` sets (unless given explicitly): two tiny cells.
QUICK_SWEEP: dict[str, tuple[Any, ...]] = {"sizes": ("tiny",), "epoch_budgets": (2, 3)}
#: Configuration fields that do not change a cell's figures (left out of its identity).
_NOT_IDENTITY = ("out", "progress", "device", "data_root", "workers")


def _names(value: str | Sequence[Any] | None) -> tuple[Any, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(item.strip() if isinstance(item, str) else item for item in items)


@dataclass
class SweepConfig:
    """A sweep: one :class:`ExperimentConfig` for everything but the grid, and the grid.

    Attributes:
        base: Every option of the cells except ``size``, ``epochs`` and ``out`` (which the grid
            sets); its ``arms`` are the arms of every cell. ``nms_epochs=None`` pre-trains each
            cell's NMS flow for the cell's epoch budget.
        sizes: Model sizes (:data:`lcma_ext.models.SIZE_NAMES`, ``"tiny,small"`` accepted);
            ``None``: :data:`SWEEP_SIZES` (``base.quick``: ``("tiny",)``).
        epoch_budgets: Epochs per arm (``"5,10"`` accepted); ``None``: :data:`SWEEP_EPOCHS`
            (``base.quick``: ``(2, 3)``).
        out: The sweep folder; ``None``: ``runs/sweep-<dataset>-<model>[-quick]``.
    """

    base: ExperimentConfig = field(default_factory=lambda: ExperimentConfig(arms=SWEEP_ARMS))
    sizes: tuple[str, ...] | None = None
    epoch_budgets: tuple[int, ...] | None = None
    out: Path | None = None

    def __post_init__(self) -> None:
        self.sizes = _names(self.sizes)
        budgets = _names(self.epoch_budgets)
        if budgets is not None:
            try:
                budgets = tuple(int(b) if isinstance(b, str) else b for b in budgets)
            except ValueError:
                raise ValueError(
                    f"expected epoch_budgets as integers >= 1; got {self.epoch_budgets!r}"
                ) from None
        self.epoch_budgets = budgets
        if self.out is not None:
            self.out = Path(self.out)

    @property
    def size_list(self) -> tuple[str, ...]:
        """The sizes of the grid."""
        default = QUICK_SWEEP["sizes"] if self.base.quick else SWEEP_SIZES
        return self.sizes or default

    @property
    def budget_list(self) -> tuple[int, ...]:
        """The epoch budgets of the grid."""
        default = QUICK_SWEEP["epoch_budgets"] if self.base.quick else SWEEP_EPOCHS
        return self.epoch_budgets or default

    @property
    def out_dir(self) -> Path:
        """The sweep folder."""
        if self.out is not None:
            return self.out
        name = f"sweep-{self.base.dataset}-{self.base.model}"
        return Path("runs") / (name + ("-quick" if self.base.quick else ""))

    def cells(self) -> list[ExperimentConfig]:
        """One :class:`ExperimentConfig` per cell, sizes outer, budgets inner."""
        return [
            self.base.replace(
                command="run",
                size=size,
                epochs=epochs,
                nms_epochs=self.base.nms_epochs or epochs,
                out=self.out_dir / f"{size}-{epochs}ep",
            )
            for size in self.size_list
            for epochs in self.budget_list
        ]

    def validate(self) -> None:
        """Raise ``ValueError`` ("expected ...; got ...") for a bad grid or any bad cell."""
        sizes, budgets = self.size_list, self.budget_list
        if not sizes or any(s not in SIZE_NAMES for s in sizes) or len(set(sizes)) < len(sizes):
            raise ValueError(
                f"expected sizes as distinct names of {', '.join(SIZE_NAMES)}; got "
                f"{','.join(map(str, sizes)) or 'none'!r}"
            )
        bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int) or b < 1]
        if not budgets or bad or len(set(budgets)) < len(budgets):
            raise ValueError(
                f"expected epoch_budgets as distinct integers >= 1; got "
                f"{','.join(map(str, budgets)) or 'none'!r}"
            )
        for cell in self.cells():
            try:
                cell.validate()
            except ValueError as error:
                raise ValueError(f"cell {cell.out_dir.name}: {error}") from None

    def record(self) -> dict[str, Any]:
        """The JSON record of this sweep (``sweep.json``'s ``config``)."""
        return {
            "sizes": list(self.size_list),
            "epoch_budgets": list(self.budget_list),
            "base": _identity(self.base),
            "command": sweep_command(self),
        }


def _identity(config: ExperimentConfig) -> dict[str, Any]:
    """A cell's configuration as plain JSON, without what does not change its figures.

    The training recipe appears resolved: ``lr`` always, the other fields only where they differ
    from the legacy recipe (as in ``config.json``), so the cells of a sweep of an earlier
    version are still finished under ``--recipe legacy``.
    """
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    hidden = (*_NOT_IDENTITY, "recipe", *RECIPE_FIELDS)
    identity = {k: v for k, v in fields.items() if k not in hidden}
    identity["arms"] = list(config.arms)
    legacy = LEGACY_RECIPE.to_dict()
    recipe = config.training_recipe.to_dict()
    # lr always (a configuration field before it joined the recipe), the rest when changed
    identity.update({k: v for k, v in recipe.items() if k == "lr" or v != legacy[k]})
    return json.loads(json.dumps(strict_json(identity), default=str, allow_nan=False))


def sweep_command(config: SweepConfig) -> str:
    """The ``lcma-ext sweep`` command line of ``config`` (options that differ from defaults)."""
    default = ExperimentConfig(arms=SWEEP_ARMS)
    parts = [
        "lcma-ext sweep",
        f"--sizes {','.join(config.size_list)}",
        f"--epoch-budgets {','.join(map(str, config.budget_list))}",
    ]
    for item in dataclasses.fields(ExperimentConfig):
        if item.name in ("command", "size", "epochs", "out", "progress"):
            continue
        value = getattr(config.base, item.name)
        if value == getattr(default, item.name):
            continue
        option = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(option)
        elif isinstance(value, tuple):
            parts.append(f"{option} {','.join(value)}")
        else:
            parts.append(f"{option} {value}")
    parts.append(f"--out {config.out_dir}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# the rows of the table, read from the cells' results.json


def _won(entry: dict[str, Any], reference: str) -> list[int]:
    diffs = entry.get(f"paired_diff_vs_{reference}", [])
    return [s for s, d in zip(entry["seeds"], diffs) if finite(d) and d < 0]


def cell_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per arm of one cell's ``results.json`` (the figures of the sweep table).

    Returns:
        Rows with ``size``, ``epochs``, ``arm``, ``reference``, ``parameters`` (the arm's),
        ``reference_parameters``, ``seeds``, ``bpd_per_seed``, ``bpd_mean``, ``bpd_std``,
        ``bpd_median``, ``paired_diff`` (per seed), ``paired_diff_mean``, ``paired_diff_se``
        (standard error across seeds), ``wins``, ``n``, ``seeds_won``, ``selection_share``
        (:mod:`lcma_ext.experiments.cost`), ``vs_reference`` and ``vs_best_static`` (the
        paired comparisons of :mod:`lcma_ext.experiments.stats`, computed here for a
        ``results.json`` of an earlier version), ``smoke_run`` and ``flags``.
    """
    config, reference = results["config"], results["reference_arm"]
    arms = compared_arms(results)
    uniform = results.get("uniform_bpd")
    rows = []
    for arm, entry in arms.items():
        diffs = entry.get(f"paired_diff_vs_{reference}", []) if arm != reference else []
        rows.append(
            {
                "size": config["size"],
                "epochs": config["epochs"],
                "arm": arm,
                "reference": reference,
                "parameters": entry["parameters"],
                "reference_parameters": arms[reference]["parameters"],
                "seeds": entry["seeds"],
                "bpd_per_seed": entry["bpd_per_seed"],
                "bpd_mean": entry["bpd_mean"],
                "bpd_std": entry["bpd_std"],
                "bpd_median": entry["bpd_median"],
                "paired_diff": diffs,
                "paired_diff_mean": entry.get("paired_diff_mean") if diffs else None,
                "paired_diff_se": standard_error(diffs) if diffs else None,
                "wins": len(_won(entry, reference)) if diffs else None,
                "n": len(finite_values(diffs)),
                "seeds_won": _won(entry, reference) if diffs else [],
                "selection_share": selection_share(results, arm),
                "vs_reference": entry.get("vs_reference"),
                "vs_best_static": entry.get("vs_best_static"),
                "smoke_run": bool(results.get("smoke_run")),
                "flags": flags_cell(entry, uniform),
            }
        )
    return rows


def _read_results(folder: Path) -> dict[str, Any] | None:
    path = folder / "results.json"
    if not path.is_file():
        return None
    results = read_json(path)
    if not isinstance(results, dict) or "arms" not in results:
        raise StateFileError(path, "not the results of lcma-ext run")
    return results


def _read_state(out: Path) -> dict[str, Any]:
    path = out / "sweep.json"
    if not path.is_file():
        return {}
    state = read_json(path)
    if not isinstance(state, dict) or "cells" not in state:
        raise StateFileError(path, "not a sweep.json of lcma-ext sweep")
    return state


def load_sweep(out: str | Path) -> dict[str, Any]:
    """A sweep folder's record with its rows re-read from every finished cell's results.json.

    Raises:
        ExperimentError: if ``out`` holds no ``sweep.json``.
    """
    out = Path(out)
    state = _read_state(out)
    if not state:
        raise ExperimentError(f"expected a sweep folder with sweep.json; got {str(out)!r}")
    rows = []
    for cell in state["cells"]:
        results = _read_results(out / cell["name"]) if cell.get("finished") else None
        if results is not None:
            rows += cell_rows(results)
    return {**state, "rows": rows}


# ----------------------------------------------------------------------------------------------
# the table and the plot


def _diff_cell(row: dict[str, Any]) -> str:
    if row["paired_diff_mean"] is None:
        return "—"
    return f"{number(row['paired_diff_mean'], 4, signed=True)} ± {number(row['paired_diff_se'], 4)}"


def _wins_cell(row: dict[str, Any]) -> str:
    if row["wins"] is None:
        return "—"
    seeds = f" (seed{'s' * (len(row['seeds_won']) != 1)} {', '.join(map(str, row['seeds_won']))})"
    return f"{row['wins']}/{row['n']}" + (seeds if row["seeds_won"] else "")


def _share_cell(row: dict[str, Any]) -> str:
    share = row["selection_share"]
    return "—" if share is None else f"{100 * share:.1f} %"


def sweep_markdown(sweep: dict[str, Any]) -> str:
    """The ``sweep.md`` report of a :func:`load_sweep` / :func:`run_sweep` dictionary."""
    config, rows = sweep["config"], sweep["rows"]
    base = config["base"]
    reference = rows[0]["reference"] if rows else "channel"
    lines = [
        f"# lcma-ext sweep: {base['model']} on {base['dataset']}",
        "",
        f"Command: `{config['command']}`",
        "",
    ]
    if any(row["smoke_run"] for row in rows):
        lines += [
            "**Smoke run** (`--quick`): it checks that the sweep runs end to end; its figures "
            "and wins are not a result.",
            "",
        ]
    lines += [
        "Per cell (model size x epochs per arm): test bits/dim (lower is better) of every arm "
        "over the same seeds, initial weights, batches, optimizer and recipe. Paired Δ = arm − "
        f"{reference} on the same seed, mean ± standard error across seeds (negative: lower "
        f"bits/dim than {reference}); wins = seeds where the arm has the lower bits/dim, named. "
        "Δ vs best static: the paired mean difference against the best static split of the "
        "cell with the arm's prior (best mean of `channel`, `checkerboard`, `random`, `high` "
        "that ran) and its 95 % Student-t interval; verdict `better` or `worse` only when the "
        "interval excludes 0, else `no evidence`. Selection share = "
        "the share of the arm's whole pipeline spent choosing its split: NMS pre-training + "
        "contribution estimation for offline LCMA, the in-training estimations for the "
        "self-estimated arms. Params = the arm's trainable parameters.",
        "",
    ]
    header = [
        "size", "epochs", "params", "arm", "bpd mean ± std", "median",
        f"paired Δ vs {reference} (mean ± SE)", "wins", "Δ vs best static (95 % CI)", "verdict",
        "selection share", "flagged",
    ]  # fmt: skip
    cells = []
    for row in rows:
        static, verdict = comparison_cells(row.get("vs_best_static"))
        cells.append(
            [
                row["size"],
                row["epochs"],
                f"{row['parameters']:,}",
                row["arm"],
                f"{number(row['bpd_mean'])} ± {number(row['bpd_std'])}",
                number(row["bpd_median"]),
                _diff_cell(row),
                _wins_cell(row),
                static,
                verdict,
                _share_cell(row),
                row["flags"],
            ]
        )
    lines += table(header, cells)
    missing = [c["name"] for c in sweep["cells"] if not c.get("finished")]
    if missing:
        lines += ["", f"Not finished yet: {', '.join(missing)} (rerun the command to resume)."]
    return "\n".join([*lines, ""])


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Paired Δ against the reference arm (mean ± SE) vs parameter count, a line per budget.

    One panel per non-reference arm; the x axis is the reference arm's parameter count of each
    cell (log scale). matplotlib is imported here, with the Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows if r["paired_diff_mean"] is not None))
    reference = rows[0]["reference"] if rows else "channel"
    figure, axes = plt.subplots(
        1, max(len(arms), 1), figsize=(4.5 * max(len(arms), 1), 3.8), sharey=True, squeeze=False
    )
    for axis, arm in zip(axes[0], arms):
        arm_rows = [r for r in rows if r["arm"] == arm]
        for epochs in sorted({r["epochs"] for r in arm_rows}):
            points = sorted(
                (r["reference_parameters"], r["paired_diff_mean"], r["paired_diff_se"])
                for r in arm_rows
                if r["epochs"] == epochs and finite(r["paired_diff_mean"])
            )
            if not points:
                continue
            x, y, se = zip(*points)
            errors = [e if finite(e) else 0.0 for e in se]
            axis.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=f"{epochs} epochs")
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_title(f"{arm} − {reference}")
        axis.set_xlabel("parameters")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0][0].set_ylabel("paired Δ bits/dim (mean ± SE)")
    figure.tight_layout()
    figure.savefig(str(path), dpi=100, format="png")
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# running


def _write(out: Path, record: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, Any]:
    write_json(out / "sweep.json", {"config": record, "cells": cells})
    sweep = load_sweep(out)
    write_text(out / "sweep.md", sweep_markdown(sweep))
    if sweep["rows"]:
        with atomic_path(out / "sweep.png") as tmp:
            plot_sweep(sweep["rows"], tmp)
    return sweep


def _prepare(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExperimentError(
            f"expected --out to be a folder this user can write; got {str(out)!r} "
            f"({error.strerror or error})"
        ) from None


def run_sweep(config: SweepConfig) -> dict[str, Any]:
    """``lcma-ext sweep``: run (or resume) every cell, then write the table and the plot.

    Returns:
        The content of ``sweep.json`` plus ``rows`` (:func:`cell_rows` of every finished cell,
        read back from its ``results.json``).

    Raises:
        ValueError: for an invalid grid or cell (before any training).
        lcma_ext.experiments.ExperimentError: as :func:`run_comparison` for a cell.
    """
    config.validate()
    out = config.out_dir
    _prepare(out)
    record = config.record()
    done = {
        c["name"]: c["identity"] for c in _read_state(out).get("cells", []) if c.get("finished")
    }
    cells = [
        {
            "name": c.out_dir.name,
            "size": c.size,
            "epochs": c.epochs,
            "identity": _identity(c),
            "finished": False,
        }
        for c in config.cells()
    ]
    for cell, entry in zip(config.cells(), cells):
        finished = done.get(entry["name"]) == entry["identity"]
        entry["finished"] = True
        if finished and (cell.out_dir / "results.json").is_file():
            continue  # a finished cell of the same configuration: skipped, not even loaded
        if cell.progress:
            print(f"lcma-ext sweep: cell {entry['name']}", flush=True)
        run_comparison(cell)
        _write(out, record, cells)  # a killed sweep keeps every finished cell
    return _write(out, record, cells)
