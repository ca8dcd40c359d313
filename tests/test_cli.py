"""The ``lcma-ext`` command line: the --quick smoke run end to end, resume, messages and errors.

The layers below have their own tests (tests/test_experiments_*.py); only these CLI tests import
``lcma_ext.cli``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcma_ext.cli import main
from lcma_ext.experiments import ARMS, ExperimentConfig, run_comparison

QUICK = ["run", "--quick", "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quick")
    assert main([*QUICK, "--out", str(out)]) == 0
    return out


def test_quick_run_writes_every_output(quick_run: Path) -> None:
    out = quick_run
    for name in ("results.json", "results.md", "learning_curves.png", "config.json"):
        assert (out / name).is_file(), name
    for level in range(2):  # digits: 3 levels, 2 split points
        assert (out / f"contributions_level{level}.png").stat().st_size > 0
    for arm in ARMS:
        for temperature in ("1.0", "0.7"):
            assert (out / f"samples_{arm}_T{temperature}.png").stat().st_size > 0
        for seed in (0, 1):
            assert (out / "checkpoints" / f"{arm}_seed{seed}.pt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == set(ARMS)
    assert results["reference_arm"] == "channel"
    assert results["config"]["seeds"] == [0, 1]
    for arm, entry in results["arms"].items():
        assert len(entry["bpd_per_seed"]) == 2
        assert all(math.isfinite(b) for b in entry["bpd_per_seed"]), arm
        assert entry["bpd_mean"] == pytest.approx(sum(entry["bpd_per_seed"]) / 2)
        assert math.isfinite(entry["bpd_std"]) and math.isfinite(entry["bpd_median"])
        assert entry["parameters"] > 0 and len(entry["train_time_s"]) == 2
        assert entry["diverged"] == [False, False]
        assert len(entry["paired_diff_vs_channel"]) == 2
    # Same architecture for every arm: only the split differs.
    assert len({e["parameters"] for e in results["arms"].values()}) == 1
    assert results["arms"]["channel"]["paired_diff_vs_channel"] == [0.0, 0.0]
    assert {"torch", "nflows", "normflows", "lcma_ext"} <= set(results["versions"])
    assert math.isfinite(results["nms"]["test_bpd"])
    table = (out / "results.md").read_text()
    assert "**Smoke run**" in table and "Uniform baseline: 4.0875 bpd" in table
    assert "| lcma |" in table and "paired Δ per seed" in table and "median" in table
    diagnostics = results["contribution_diagnostics"]
    assert [d["blocks"] for d in diagnostics] == [16, 8]  # 4x4x4 then 8x2x2 groups of 4
    assert all(0.0 <= d["differs_from_channel"] <= 1.0 for d in diagnostics)
    assert "| split | blocks | ties |" in table
    for index, entry in enumerate(diagnostics):  # the consistency columns come from the json
        row = next(line for line in table.splitlines() if line.startswith(f"| {index} | "))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[-2] == f"{entry['agrees_with_channel_granularity']:.3f}"  # as written
        assert cells[-1] == f"{entry['kept_position_entropy']:.3f}"


def test_rerun_resumes_without_retraining(
    quick_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (quick_run / "runs").iterdir()}
    first = json.loads((quick_run / "results.json").read_text())
    assert main([*QUICK, "--out", str(quick_run)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (quick_run / "runs").iterdir()}
    assert before == after
    second = json.loads((quick_run / "results.json").read_text())
    assert second["arms"]["lcma"]["bpd_per_seed"] == first["arms"]["lcma"]["bpd_per_seed"]
    # Another configuration may not reuse the folder.
    assert main([*QUICK, "--out", str(quick_run), "--epochs", "1"]) == 2
    message = capsys.readouterr().err.strip()
    assert "expected --out to hold runs of the same configuration" in message
    assert "epochs" in message and "\n" not in message


def test_interrupted_arm_resumes_from_its_checkpoint(quick_run: Path, tmp_path: Path) -> None:
    # Copy the finished run minus one arm's summary: that arm reloads its last checkpoint.
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(quick_run, out)
    (out / "runs" / "random_seed1.json").unlink()
    (out / "results.json").unlink()
    assert main([*QUICK, "--out", str(out)]) == 0
    old = json.loads((quick_run / "runs" / "random_seed1.json").read_text())
    new = json.loads((out / "runs" / "random_seed1.json").read_text())
    assert new["test_bpd"] == pytest.approx(old["test_bpd"], rel=1e-6)
    assert new["train_bpd_curve"] == old["train_bpd_curve"]


def test_granularity_arms_run_beside_the_defaults(
    quick_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "granularity"
    shutil.copytree(quick_run, out)
    arms = "lcma,lcma-channel,high-region"
    assert main([*QUICK, "--out", str(out), "--arms", arms]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == arms.split(",") and results["reference_arm"] == "lcma"
    first = json.loads((quick_run / "results.json").read_text())
    assert results["arms"]["lcma"]["bpd_per_seed"] == first["arms"]["lcma"]["bpd_per_seed"]
    for arm in ("lcma-channel", "high-region"):
        assert all(math.isfinite(b) for b in results["arms"][arm]["bpd_per_seed"]), arm
        assert (out / "checkpoints" / f"{arm}_seed1.pt").is_file()
        assert results["arms"][arm]["parameters"] == results["arms"]["lcma"]["parameters"]
    # another tile size is another configuration
    assert main([*QUICK, "--out", str(out), "--arms", "lcma-region", "--region-size", "2"]) == 2
    assert "region_size" in capsys.readouterr().err


def test_contributions_command(quick_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps"
    checkpoint = quick_run / "checkpoints" / "nms.pt"
    assert main(["contributions", str(checkpoint), "--out", str(out), "--no-progress"]) == 0
    assert (out / "contributions_level0.png").is_file()
    assert (out / "contributions_level1.png").is_file()
    from lcma_ext.contributions import ContributionMaps

    fresh, stored = (ContributionMaps.load(p / "contributions.pt") for p in (out, quick_run))
    for a, b in zip(fresh.data_maps, stored.data_maps):
        torch.testing.assert_close(a, b)


def test_ablate_levels_quick(tmp_path: Path) -> None:
    out = tmp_path / "ablate"
    args = ["ablate-levels", "--quick", "--no-progress", "--seeds", "1", "--epochs", "1"]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"high-high", "high-low", "low-high", "low-low"}
    assert results["reference_arm"] == "low-low"
    assert all(math.isfinite(e["bpd_mean"]) for e in results["arms"].values())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--lr", "-1"], "expected lr as a number > 0; got -1.0"),
        (["run", "--ema-decay", "1"], "expected ema_decay as a number in [0, 1); got 1.0"),
    ],
)
def test_recipe_option_errors_are_one_line_before_any_training(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--epochs", "0"], "expected an integer >= 1; got 0"),
        (["run", "--seeds", "two"], "expected an integer; got 'two'"),
        (["run", "--model", "maf"], "invalid choice"),
    ],
)
def test_argparse_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--device", "cuda:7"], "expected an available device"),
        (["run", "--device", "nonsense"], "expected a torch device"),
        (["run", "--levels", "5"], "expected --levels <= 3"),
        (["run", "--dataset", "mnist"], "expected --data-root"),
        # arm names are validated once, by the configuration
        (["run", "--arms", "lcma,foo"], "expected arms as a comma-separated subset"),
    ],
)
def test_runtime_errors_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if "cuda" in argv[-1] and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main([*argv, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("lcma-ext run: error:")


def test_module_entry_point_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lcma_ext", "run", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--nms-epochs" in done.stdout and "--arms" in done.stdout


def test_the_api_gives_the_cli_figures(quick_run: Path, tmp_path: Path) -> None:
    results = run_comparison(ExperimentConfig(quick=True, out=tmp_path / "api", progress=False))
    cli = json.loads((quick_run / "results.json").read_text())
    for arm in ARMS:
        assert results["arms"][arm]["bpd_per_seed"] == cli["arms"][arm]["bpd_per_seed"], arm
    assert results["nms"]["test_bpd"] == cli["nms"]["test_bpd"]
    assert results["config"] == cli["config"]


def test_no_progress_still_prints_the_results(
    quick_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*QUICK, "--out", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert "| lcma | exact |" in out and "Smoke run" in out


def test_help_shows_every_default_quick_and_resuming() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lcma_ext", "run", "--help"], capture_output=True, text=True
    )
    text = " ".join(done.stdout.split())
    options = [o for o in ("--dataset", "--model", "--size", "--levels", "--epochs",
               "--nms-epochs", "--seeds", "--batch-size", "--lr", "--device", "--out",
               "--data-root", "--limit", "--image-size", "--outlier-gap", "--arms",
               "--region-size", "--quick", "--no-progress", "--allow-diverged-nms")]  # fmt: skip
    help_lines = done.stdout.split("\n  -")[1:]
    for option in options:
        entry = next(line for line in help_lines if line.startswith(option[1:]))
        assert "default" in entry, option
    assert (
        "learning rate (default: the recipe's)" in text
        and "digits 30" in text
        and "--quick 3" in text
    )
    assert "--quick is a smoke run" in text and "Rerun the same command with the same --out" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import lcma_ext

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lcma-ext {lcma_ext.__version__}"


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str = "run") -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"lcma-ext {command}: error:"), err
    return err


def test_an_unusable_out_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    assert main([*QUICK, "--out", str(file)]) == 2
    assert "expected --out to be a folder" in _one_line_error(capsys)


def test_a_corrupt_state_file_is_one_line(
    quick_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(quick_run, out)
    (out / "runs" / "lcma_seed0.json").write_text('{"arm": "lc')
    assert main([*QUICK, "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "lcma_seed0.json' is corrupt or truncated" in err and "delete it and rerun" in err


def test_a_diverged_nms_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*QUICK, "--limit", "64", "--epochs", "1", "--nms-epochs", "1", "--lr", "1000"]
    assert main([*argv, "--out", str(tmp_path / "d")]) == 2
    err = _one_line_error(capsys)
    assert "NMS pre-training diverged" in err and "--allow-diverged-nms" in err
    assert "not found" not in err


def test_config_from_args_follows_the_fields() -> None:
    """Every field of ExperimentConfig is an option of ``run``; the defaults agree."""
    import dataclasses

    from lcma_ext.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run"])
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    assert fields - set(vars(args)) == {"progress"}  # given as --no-progress
    assert config_from_args(args) == ExperimentConfig()
    argv = ["ablate-levels", "--no-progress", "--ema-decay", "0.5", "--levels", "3"]
    ablate = config_from_args(build_parser().parse_args(argv))
    assert ablate == ExperimentConfig(
        command="ablate-levels", progress=False, ema_decay=0.5, levels=3
    )
