"""lcma-ext sweep: a --quick smoke sweep over two tiny cells (files, table = the cells'
results.json, resume skips finished cells), the CLI, validation and docs/science.md's generator."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest
from scipy.stats import t as scipy_t

from lcma_ext.cli import main
from lcma_ext.experiments import ExperimentConfig, ExperimentError, SweepConfig, run_sweep
from lcma_ext.experiments import sweep as sweep_module

ARMS = "channel,lcma,lcma-self"
CELLS = ("tiny-2ep", "tiny-3ep")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _base(**changes) -> ExperimentConfig:
    return ExperimentConfig(
        **{"quick": True, "limit": 64, "progress": False, "arms": ARMS, **changes}
    )


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("sweep")
    return out, run_sweep(SweepConfig(_base(), out=out))


def _table(out: Path) -> list[list[str]]:
    lines = (out / "sweep.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| tiny ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_the_quick_sweep_writes_every_file(swept: tuple[Path, dict[str, Any]]) -> None:
    out, sweep = swept
    for name in ("sweep.json", "sweep.md", "sweep.png"):
        assert (out / name).is_file(), name
    for cell in CELLS:
        for name in ("config.json", "results.json", "results.md"):
            assert (out / cell / name).is_file(), f"{cell}/{name}"
    stored = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in stored["cells"]] == list(CELLS)
    assert all(c["finished"] for c in stored["cells"])
    assert stored["config"]["sizes"] == ["tiny"] and stored["config"]["epoch_budgets"] == [2, 3]
    assert (
        "--quick" in stored["config"]["command"] and "Smoke run" in (out / "sweep.md").read_text()
    )
    assert len(sweep["rows"]) == len(CELLS) * 3


def _expected(results: dict, arm: str) -> dict[str, str]:
    """The table's cells recomputed from one cell's results.json, independently of the sweep."""
    entry, channel = results["arms"][arm], results["arms"]["channel"]
    diffs = [a - b for a, b in zip(entry["bpd_per_seed"], channel["bpd_per_seed"])]
    row = {
        "params": f"{entry['parameters']:,}",
        "bpd": f"{statistics.fmean(entry['bpd_per_seed']):.4f} ± "
        f"{statistics.stdev(entry['bpd_per_seed']):.4f}",
        "median": f"{statistics.median(entry['bpd_per_seed']):.4f}",
    }
    if arm == "channel":  # the reference and the best (only) static split of the cell
        return {**row, "diff": "—", "wins": "—", "static": "—", "verdict": "—"}
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    won = [seed for seed, d in zip(entry["seeds"], diffs) if d < 0]
    named = f" (seed{'s' * (len(won) != 1)} {', '.join(map(str, won))})" if won else ""
    mean = statistics.fmean(diffs)
    half = scipy_t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    verdict = "better" if high < 0 else "worse" if low > 0 else "no evidence"
    return {
        **row,
        "diff": f"{mean:+.4f} ± {se:.4f}",
        "wins": f"{len(won)}/{len(diffs)}{named}",
        "static": f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] vs channel",
        "verdict": verdict,
    }


def test_the_table_figures_are_the_cells_results(swept: tuple[Path, dict[str, Any]]) -> None:
    out, _ = swept
    table = _table(out)
    assert len(table) == len(CELLS) * 3
    for row in table:
        size, epochs, params, arm, bpd, median, diff, wins, static, verdict, share, _ = row
        results = json.loads((out / f"{size}-{epochs}ep" / "results.json").read_text())
        assert results["config"]["epochs"] == int(epochs)
        expected = _expected(results, arm)
        assert (params, bpd, median, diff, wins, static, verdict) == (
            expected["params"],
            expected["bpd"],
            expected["median"],
            expected["diff"],
            expected["wins"],
            expected["static"],
            expected["verdict"],
        ), (epochs, arm)
        cost = results["cost"].get(arm)
        assert share == ("—" if cost is None else f"{100 * cost['share']:.1f} %")


def test_a_rerun_skips_every_finished_cell(
    swept: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, sweep = swept

    def refuse(config: ExperimentConfig) -> NoReturn:
        raise AssertionError(f"cell {config.out.name} was run again")

    before = {p: p.stat().st_mtime_ns for cell in CELLS for p in (out / cell).rglob("*")}
    monkeypatch.setattr(sweep_module, "run_comparison", refuse)
    again = run_sweep(SweepConfig(_base(), out=out))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert again["rows"] == sweep["rows"]


def test_the_cli_resumes_the_same_sweep_and_prints_its_table(
    swept: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = swept
    monkeypatch.setattr(sweep_module, "run_comparison", lambda config: pytest.fail("ran a cell"))
    argv = ["sweep", "--quick", "--limit", "64", "--arms", ARMS, "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "| tiny | 3 |" in capsys.readouterr().out


def test_a_cell_of_another_configuration_is_not_skipped(swept: tuple[Path, dict[str, Any]]) -> None:
    out, _ = swept
    with pytest.raises(ExperimentError, match="different seeds"):
        run_sweep(SweepConfig(_base(seeds=3), out=out))


def test_the_recipe_is_part_of_a_cells_identity_as_in_config_json(
    swept: tuple[Path, dict[str, Any]],
) -> None:
    """The legacy recipe adds nothing (a sweep of an earlier version is still finished under
    --recipe legacy); another recipe is recorded resolved and named in the command."""
    legacy = sweep_module._identity(_base(recipe="legacy"))
    assert not {"recipe", "warmup_steps", "lr_schedule", "grad_clip", "ema_decay"} & set(legacy)
    mine = sweep_module._identity(_base(recipe="legacy", ema_decay=0.5))
    assert mine == {**legacy, "ema_decay": 0.5}
    default = sweep_module._identity(_base())
    recipe = ExperimentConfig().training_recipe
    assert default["lr"] == recipe.lr and default["warmup_steps"] == recipe.warmup_steps
    assert legacy["lr"] == 1e-3  # as sweeps of earlier versions recorded it
    command = sweep_module.sweep_command(SweepConfig(_base(recipe="legacy", ema_decay=0.5)))
    assert "--recipe legacy" in command and "--ema-decay 0.5" in command
    out, _ = swept
    with pytest.raises(ExperimentError, match="reproduces its training recipe"):
        run_sweep(SweepConfig(_base(recipe="legacy"), out=out))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sizes": "tiny,huge"}, "expected sizes as distinct names"),
        ({"sizes": ("tiny", "tiny")}, "expected sizes as distinct names"),
        ({"epoch_budgets": "2,0"}, "expected epoch_budgets as distinct integers >= 1"),
        ({"epoch_budgets": "two"}, "expected epoch_budgets as integers >= 1"),
        ({"epoch_budgets": (1, 2)}, "cell tiny-1ep: expected --reestimate-every below --epochs"),
    ],
)
def test_a_bad_grid_is_refused_before_any_training(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_sweep(SweepConfig(_base(), out=tmp_path / "bad", **changes))
    assert not (tmp_path / "bad").exists()


def _update_science() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(
            "update_science", BENCHMARKS / "update_science.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_update_science_replaces_the_marked_block_from_the_folders(
    swept: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = swept
    doc = tmp_path / "docs" / "science.md"
    doc.parent.mkdir()
    doc.write_text("intro\n<!-- sweep:start -->\nrun X to fill this\n<!-- sweep:end -->\nafter\n")
    assert _update_science().main([str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "run X to fill this" not in text and text.startswith("intro\n") and "after" in text
    assert "### lcma-ext sweep: realnvp on digits" in text
    for row in _table(out):
        assert "| " + " | ".join(row) + " |" in text
    name = out.name if out.name.startswith("sweep") else f"sweep-{out.name}"  # no sweep-sweep-
    image = doc.parent / "images" / f"{name}.png"
    assert image.is_file() and f"(images/{name}.png)" in text
    assert _update_science().main([str(tmp_path / "nothing"), "--doc", str(doc)]) == 2


def test_update_science_cost_block_lists_every_data_driven_arm_of_the_runs(
    swept: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    import json

    out, _ = swept
    cell = next(p for p in sorted(out.iterdir()) if (p / "results.json").is_file())
    doc = tmp_path / "science.md"
    doc.write_text("intro\n<!-- cost:start -->\nrun X\n<!-- cost:end -->\nafter\n")
    assert _update_science().main([str(cell), "--cost", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "run X" not in text and text.startswith("intro\n") and text.endswith("after\n")
    cost = json.loads((cell / "results.json").read_text())["cost"]
    assert {entry["kind"] for entry in cost.values()} == {"offline", "self"}
    rows = [line for line in text.splitlines() if line.startswith("| realnvp ")]
    assert len(rows) == len(cost)
    for row, (arm, entry) in zip(rows, cost.items()):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == arm and cells[5] == entry["kind"]
        assert cells[-1] == f"{100 * entry['share']:.1f} %"
        assert cells[-2] == f"{entry['train_time_s']:.1f}"
        if entry["kind"] == "offline":
            assert cells[6] == f"{entry['nms_train_time_s']:.1f}"
    assert _update_science().main([str(out), "--cost", "--doc", str(doc)]) == 2  # no results.json


def _recipe_run(folder: Path, recipe: dict[str, Any], bpd: dict[str, list[float]]) -> Path:
    """A results.json of the fields update_science --recipe reads (not a trained run)."""
    config = {"dataset": "patches", "model": "realnvp", "size": "tiny", "levels": 4}
    config |= {"epochs": 10, "nms_epochs": 10, "seeds": [0, 1, 2], "batch_size": 64, **recipe}
    best = min(bpd, key=lambda arm: statistics.fmean(bpd[arm]))
    arms: dict[str, Any] = {}
    for arm, values in bpd.items():
        diffs = [a - b for a, b in zip(values, bpd[best], strict=True)]
        # interval and verdict as given (the renderer copies them; stats are tested elsewhere)
        versus = {"reference": best, "mean": statistics.fmean(diffs), "ci95": [0.065, 0.115]}
        versus["verdict"] = "worse"
        arms[arm] = {"bpd_per_seed": values, "vs_best_static": None if arm == best else versus}
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"config": config, "arms": arms}))
    return folder


def test_update_science_recipe_block_compares_two_recipes_per_arm(tmp_path: Path) -> None:
    before = _recipe_run(
        tmp_path / "before",
        {"lr": 1e-3, "grad_clip": 100.0},
        {"channel": [4.7, 4.9, 4.8], "lcma": [4.8, 5.1, 4.9]},
    )
    after = _recipe_run(
        tmp_path / "after",
        {"lr": 1e-2, "grad_clip": 20.0, "warmup_steps": 100, "lr_schedule": "cosine"},
        {"channel": [3.96, 3.92, 3.95], "lcma": [4.05, 4.02, 4.03]},
    )
    doc = tmp_path / "science.md"
    doc.write_text("intro\n<!-- recipe:start -->\nold\n<!-- recipe:end -->\nend\n")
    assert _update_science().main(["--recipe", str(before), str(after), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "`--recipe legacy`" in text
    rows = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines()}
    channel, lcma = rows["| channel"], rows["| lcma"]
    std = statistics.stdev
    assert channel[1] == f"{statistics.fmean([4.7, 4.9, 4.8]):.4f} ± {std([4.7, 4.9, 4.8]):.4f}"
    ratio = std([3.96, 3.92, 3.95]) / std([4.7, 4.9, 4.8])
    assert channel[3] == f"{ratio:.2f}" and "is the best static split" in channel[5]
    diffs = [0.09, 0.10, 0.08]  # lcma − channel after: every seed worse, the interval above 0
    assert lcma[6] == f"{statistics.fmean(diffs):+.4f} vs channel, [+0.0650, +0.1150], **worse** |"
    # folders that differ in more than the recipe are refused with one line
    other = json.loads((after / "results.json").read_text())
    other["config"]["epochs"] = 30
    (after / "results.json").write_text(json.dumps(other))
    assert _update_science().main(["--recipe", str(before), str(after), "--doc", str(doc)]) == 2


def test_docs_science_md_has_one_generated_block_per_marker() -> None:
    """The page update_science.py fills: its blocks exist once, and no figure is typed there."""
    text = (BENCHMARKS.parent / "docs" / "science.md").read_text()
    generated = {
        "sweep": "### lcma-ext sweep",
        "gpu": "### lcma-ext sweep",
        "cost": "| model |",
        "recipe": "| arm | before:",
        "sweep-default": "### lcma-ext sweep",
    }
    for marker, heading in generated.items():
        assert text.count(f"<!-- {marker}:start -->") == text.count(f"<!-- {marker}:end -->") == 1
        block = text.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
        assert "to fill this" in block or heading in block, marker
