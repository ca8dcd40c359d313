"""The command line with Glow's conditional prior: both priors in one --quick run, then
``sample``, ``interpolate`` and ``evaluate`` on its folder, and their one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lcma_ext.cli import main

ARMS = "channel,checkerboard,lcma,channel+cond,checkerboard+cond,lcma+cond"


@pytest.fixture(scope="module")
def both_priors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("both")
    assert main(["run", "--quick", "--no-progress", "--arms", ARMS, "--out", str(out)]) == 0
    return out


def test_one_quick_run_compares_both_priors(both_priors: Path) -> None:
    out = both_priors
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ARMS.split(",") and results["reference_arm"] == "channel"
    assert "prior" not in results["config"]  # the +cond arms need no other configuration
    arms = results["arms"]
    for arm in ("channel", "checkerboard", "lcma"):
        standard, conditional = arms[arm], arms[f"{arm}+cond"]
        assert (standard["prior"], conditional["prior"]) == ("standard", "conditional")
        assert all(math.isfinite(b) for b in conditional["bpd_per_seed"]), arm
        assert conditional["bpd_per_seed"] != standard["bpd_per_seed"]  # the prior was trained
        assert conditional["parameters"] > standard["parameters"]  # its zero-initialised net
        assert len(conditional["paired_diff_vs_channel"]) == 2
        for seed in (0, 1):
            assert (out / "checkpoints" / f"{arm}+cond_seed{seed}.pt").is_file()
            assert (out / "runs" / f"{arm}+cond_seed{seed}.json").is_file()
        for temperature in ("1.0", "0.7"):
            assert (out / f"samples_{arm}+cond_T{temperature}.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| lcma+cond | exact |" in table and "| channel+cond | exact |" in table
    assert "`channel+cond`, `checkerboard+cond`, `lcma+cond`" in table


def test_sample_command(both_priors: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sample", str(both_priors), "--arm", "lcma+cond", "--seed", "1"]
    assert main([*argv, "--temperature", "0.7", "--num", "16"]) == 0
    path = both_priors / "samples_lcma+cond_seed1_T0.7.png"
    assert capsys.readouterr().out.strip() == str(path) and path.stat().st_size > 0


def test_interpolate_command(
    both_priors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lcma.png"
    argv = ["interpolate", str(both_priors), "--arm", "lcma", "--steps", "8", "--pairs", "4"]
    assert main([*argv, "--mode", "spherical", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.stat().st_size > 0


def test_evaluate_command(
    both_priors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(both_priors), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| arm | seed | bpd kind | recorded bpd | rescored bpd | Δ |" in printed
    rows = json.loads((tmp_path / "evaluation.json").read_text())["rows"]
    assert len(rows) == 1 + 6 * 2  # the NMS and every arm and seed
    for row in rows:
        assert row["rescored_bpd"] == row["recorded_bpd"], (row["arm"], row["seed"])
    assert (tmp_path / "evaluation.md").read_text().strip() in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample", "{run}", "--arm", "random"], "got 'random' seed 0"),
        (["sample", "{run}", "--arm", "lcma", "--seed", "4"], "got 'lcma' seed 4"),
        (["sample", "{missing}", "--arm", "lcma"], "(no such folder)"),
        (
            ["interpolate", "{run}", "--arm", "lcma", "--pairs", "300"],
            "expected --pairs <= 180 (half the 360 test images)",
        ),
        (["evaluate", "{missing}"], "(no such folder)"),
    ],
)
def test_errors_on_a_run_folder_are_one_line(
    both_priors: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    paths = {"run": str(both_priors), "missing": str(tmp_path / "missing")}
    argv = [item.format(**paths) for item in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith(f"lcma-ext {argv[0]}: error:")


def test_argparse_checks_the_new_options(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["sample", "x", "--arm", "lcma", "--temperature", "-1"], "expected a number >= 0"),
        (["interpolate", "x", "--arm", "lcma", "--steps", "1"], "expected an integer >= 2"),
        (["run", "--prior", "glow"], "invalid choice: 'glow'"),
        (["sample", "x"], "the following arguments are required: --arm"),
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err
