"""results.md / results.json: the table, bpd-kind notes, smoke-run and diverged labels, baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lcma_ext.experiments.report import (
    bound_notes,
    diagnostics_markdown,
    results_markdown,
    uniform_bpd,
    write_results,
)
from lcma_ext.experiments.stats import aggregate


def _run(seed: int, bpd: float, reason: str = "") -> dict[str, Any]:
    return {
        "seed": seed,
        "test_bpd": bpd,
        "diverged": bool(reason),
        "diverged_reason": reason,
        "train_time_s": 1.0,
        "parameters": 10,
        "epochs_done": 1,
    }


def _results(
    arms: dict[str, dict[str, Any]],
    quick: bool = False,
    nms: dict[str, Any] | None = None,
    **config,
) -> dict[str, Any]:
    return {
        "config": {
            "command": "run",
            "model": "m",
            "size": "s",
            "dataset": "d",
            "seeds": [0, 1],
            "epochs": 3,
            "nms_epochs": 3,
            "levels": 3,
            "batch_size": 64,
            "lr": 1e-3,
            "quick": quick,
            "num_train": 512,
            **config,
        },
        "arms": arms,
        "reference_arm": "channel",
        "outlier_gap": 0.5,
        "nms": nms,
        "wall_time_s": 1.0,
        "device": "cpu",
        "versions": {
            "cpu": "x",
            "platform": "p",
            "torch_threads": "2",
            "torch": "t",
            "nflows": "n",
        },
    }


def test_uniform_baseline_is_log2_of_the_levels() -> None:
    assert uniform_bpd(17) == pytest.approx(4.0875, abs=1e-4)
    assert uniform_bpd(256) == 8.0


def test_table_rows_and_flags() -> None:
    runs = {
        "channel": [_run(0, 2.0), _run(1, 2.1)],
        "lcma": [_run(0, 1.9), _run(1, float("nan"), "non-finite loss at epoch 2, step 3")],
        "high": [_run(0, 4.08), _run(1, 4.09)],
    }
    text = results_markdown(_results(aggregate(runs, "channel", [0, 1], 0.5), levels_of_data=17))
    assert "| arm | bpd kind | bpd mean ± std | median | Δ mean vs channel |" in text
    row = next(line for line in text.splitlines() if line.startswith("| lcma |"))
    assert "seed 1 (diverged)" in row and "| 1/1 |" not in row
    high = next(line for line in text.splitlines() if line.startswith("| high |"))
    assert high.endswith("| at the uniform baseline |")
    assert "Uniform baseline: 4.0875 bpd" in text and "Smoke run" not in text


def test_quick_run_is_marked_a_smoke_run() -> None:
    runs = {"channel": [_run(0, 4.09), _run(1, 4.09)], "lcma": [_run(0, 4.08), _run(1, 4.08)]}
    arms = aggregate(runs, "channel", [0, 1], 0.5)
    text = results_markdown(_results(arms, quick=True, levels_of_data=17))
    assert "**Smoke run** (`--quick`: 3 epochs, 2 seeds, 512 training images)" in text
    assert "not a result" in text and text.count("at the uniform baseline") == 2


def test_diverged_nms_is_said_everywhere() -> None:
    nms = {"test_bpd": float("nan"), "diverged": True, "diverged_reason": "non-finite loss at "
           "epoch 1, step 2"}  # fmt: skip
    runs = {"channel": [_run(0, 2.0)], "lcma": [_run(0, 2.1)]}
    arms = aggregate(runs, "channel", [0], 0.5)
    arms["lcma"]["built_on_diverged_nms"] = True
    text = results_markdown(_results(arms, nms=nms, seeds=[0]))
    assert "NMS pre-trained 3 epochs (diverged: non-finite loss at epoch 1, step 2)" in text
    assert "nan bpd — diverged (non-finite loss" in text
    assert "**The NMS pre-training diverged**" in text
    lcma = next(line for line in text.splitlines() if line.startswith("| lcma |"))
    channel = next(line for line in text.splitlines() if line.startswith("| channel |"))
    assert "built on a diverged NMS" in lcma and channel.endswith("| none |")


def test_diagnostics_table_has_the_consistency_columns() -> None:
    entry = {
        "blocks": 16,
        "ties": 0,
        "near_ties": 1,
        "differs_from_channel": 0.5,
        "differs_from_checkerboard": 0.25,
        "differs_from_group_modal": 0.0,
        "agrees_with_channel_granularity": 0.75,
        "kept_position_entropy": 1.5,
    }
    lines = diagnostics_markdown([entry])
    assert "| = channel granularity | pattern entropy |" in lines[2]
    assert lines[4] == "| 0 | 16 | 0 | 1 | 0.500 | 0.250 | 0.000 | 0.750 | 1.500 |"
    assert diagnostics_markdown([]) == []


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("exact", None),
        ("roulette estimate", "unbiased estimate"),
        ("truncated series", "a biased estimate"),
        ("IWAE-128", "upper bound on bits/dim"),
    ],
)
def test_bound_notes_explain_each_bpd_kind(kind: str, expected: str | None) -> None:
    arms = {"channel": {"bpd_kind": kind, "bpd_mc_se_per_seed": [0.01]}}
    text = " ".join(bound_notes(arms))
    if expected is None:
        assert text == ""
    else:
        assert expected in text
        assert ("Monte Carlo standard error" in text) == kind.startswith("IWAE")


def test_write_results_writes_both_files(tmp_path: Path) -> None:
    runs = {"channel": [_run(0, 2.0)]}
    results = _results(aggregate(runs, "channel", [0], 0.5), seeds=[0])
    results["arms"]["channel"]["bpd_std"] = math.nan
    write_results(tmp_path, results)
    assert json.loads((tmp_path / "results.json").read_text())["reference_arm"] == "channel"
    assert (tmp_path / "results.md").read_text() == results_markdown(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


def test_update_readme_renders_the_current_report(tmp_path: Path) -> None:
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "update_readme.py"
    spec = importlib.util.spec_from_file_location("update_readme", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runs = {"channel": [_run(0, 2.0)]}
    results = _results(aggregate(runs, "channel", [0], 0.5), seeds=[0], levels_of_data=17)
    results["contribution_diagnostics"] = [
        {
            "blocks": 16,
            "ties": 0,
            "near_ties": 0,
            "differs_from_channel": 1.0,
            "differs_from_checkerboard": 1.0,
            "differs_from_group_modal": 0.5,
            "agrees_with_channel_granularity": 0.25,
            "kept_position_entropy": 1.0,
        }
    ]
    write_results(tmp_path, results)
    (tmp_path / "results.md").write_text("# stale report without the new columns\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:start -->\nold\n<!-- table:end -->\nrest\n")
    assert module.main([str(tmp_path), "--readme", str(readme), "--marker", "table"]) == 0
    text = readme.read_text()
    assert "### lcma-ext run: m (s) on d" in text and "| = channel granularity |" in text
    assert "old" not in text and "stale" not in text and text.endswith("<!-- table:end -->\nrest\n")


def _update_readme() -> ModuleType:
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "update_readme.py"
    spec = importlib.util.spec_from_file_location("update_readme", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_has_the_interval_and_verdict_against_the_best_static_split() -> None:
    runs = {
        "lcma": [_run(0, 1.90), _run(1, 1.91), _run(2, 1.89)],
        "channel": [_run(0, 2.00), _run(1, 2.02), _run(2, 2.01)],
        "checkerboard": [_run(0, 1.95), _run(1, 1.99), _run(2, 1.97)],
    }
    priors = dict.fromkeys(runs, "standard")
    arms = aggregate(runs, "channel", [0, 1, 2], 0.5, priors)
    text = results_markdown(_results(arms, seeds=[0, 1, 2]))
    assert "| wins | Δ vs best static (95 % CI) | verdict | params |" in text
    lcma = next(line for line in text.splitlines() if line.startswith("| lcma |"))
    comparison = arms["lcma"]["vs_best_static"]
    low, high = comparison["ci95"]
    assert comparison["reference"] == "checkerboard" and high < 0
    assert f"[{low:+.4f}, {high:+.4f}] vs checkerboard | better |" in lcma
    checkerboard = next(line for line in text.splitlines() if line.startswith("| checkerboard |"))
    assert "| — | — |" in checkerboard  # itself the best static split
    assert "| lcma | checkerboard (best static) | 3 |" in text  # the comparisons table
    assert "| lcma | channel (reference) | 3 |" in text
    assert "the arm is better" not in text  # no "better" without an interval


def test_an_earlier_results_json_gets_its_comparisons_computed() -> None:
    runs = {"lcma": [_run(0, 1.9), _run(1, 1.8)], "channel": [_run(0, 2.0), _run(1, 2.1)]}
    arms = aggregate(runs, "channel", [0, 1], 0.5)
    old = {
        name: {k: v for k, v in entry.items() if not k.startswith("vs_")}
        for name, entry in arms.items()
    }
    text = results_markdown(_results(old))
    assert text == results_markdown(_results(arms))


def test_update_readme_fills_the_verdicts_block_and_keeps_the_others(tmp_path: Path) -> None:
    module = _update_readme()
    runs = {
        "lcma": [_run(0, 1.90), _run(1, 1.91), _run(2, 1.89)],
        "channel": [_run(0, 2.00), _run(1, 2.02), _run(2, 2.01)],
        "lcma+cond": [_run(0, 1.80), _run(1, 1.85), _run(2, 1.75)],
        "channel+cond": [_run(0, 1.81), _run(1, 1.82), _run(2, 1.79)],
    }
    priors = {"lcma": "standard", "channel": "standard"}
    priors.update({"lcma+cond": "conditional", "channel+cond": "conditional"})
    arms = aggregate(runs, "channel", [0, 1, 2], 0.5, priors)
    run = tmp_path / "run"
    write_results(run, _results(arms, seeds=[0, 1, 2]))
    readme = tmp_path / "README.md"
    other = "<!-- results:start -->\nA\n<!-- results:end -->\n<!-- granularity:start -->\nB\n"
    readme.write_text(f"{other}<!-- granularity:end -->\n<!-- verdicts:start -->\nold\n"
                      "<!-- verdicts:end -->\nrest\n")  # fmt: skip
    assert module.main(["--verdicts", str(run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(other) and "old" not in text and text.endswith("end -->\nrest\n")
    assert "**d, m (s), 3 epochs, 3 seeds**" in text
    lcma = next(line for line in text.splitlines() if line.startswith("| lcma |"))
    assert "| standard | channel |" in lcma and "| **better** |" in lcma
    cond = next(line for line in text.splitlines() if line.startswith("| lcma+cond |"))
    assert "| conditional | channel+cond |" in cond and "| **no evidence** |" in cond
    assert not any(line.startswith("| channel") for line in text.splitlines())  # yardsticks
    assert module.main(["--verdicts", str(tmp_path / "missing"), "--readme", str(readme)]) == 2


def test_the_readme_has_each_generated_block_once() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for marker in ("results", "granularity", "verdicts"):
        assert readme.count(f"<!-- {marker}:start -->") == 1, marker
        assert readme.count(f"<!-- {marker}:end -->") == 1, marker
