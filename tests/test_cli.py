"""The ``lcma-ext`` command line: the --quick smoke run end to end, resume, and argument errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from lcma_ext import cli
from lcma_ext.cli import ARMS, aggregate, main, mixed_lcma_splits

QUICK = ["run", "--quick", "--no-progress"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    assert main([*QUICK, "--out", str(out)]) == 0
    return out


def test_quick_run_writes_every_output(quick_run):
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
    assert "| lcma |" in table and "paired Δ per seed" in table and "median" in table
    diagnostics = results["contribution_diagnostics"]
    assert [d["blocks"] for d in diagnostics] == [16, 8]  # 4x4x4 then 8x2x2 groups of 4
    assert all(0.0 <= d["differs_from_channel"] <= 1.0 for d in diagnostics)
    assert "| split | blocks | ties |" in table
    for index, entry in enumerate(diagnostics):  # the consistency columns come from the json
        row = next(line for line in table.splitlines() if line.startswith(f"| {index} | "))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[-2]) == pytest.approx(entry["agrees_with_channel_granularity"], abs=5e-4)
        assert float(cells[-1]) == pytest.approx(entry["kept_position_entropy"], abs=5e-4)


def test_rerun_resumes_without_retraining(quick_run, capsys):
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


def test_interrupted_arm_resumes_from_its_checkpoint(quick_run, tmp_path):
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


def test_granularity_arms_run_beside_the_defaults(quick_run, tmp_path, capsys):
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


def test_contributions_command(quick_run, tmp_path):
    out = tmp_path / "maps"
    checkpoint = quick_run / "checkpoints" / "nms.pt"
    assert main(["contributions", str(checkpoint), "--out", str(out), "--no-progress"]) == 0
    assert (out / "contributions_level0.png").is_file()
    assert (out / "contributions_level1.png").is_file()
    from lcma_ext.contributions import ContributionMaps

    fresh, stored = (ContributionMaps.load(p / "contributions.pt") for p in (out, quick_run))
    for a, b in zip(fresh.data_maps, stored.data_maps):
        torch.testing.assert_close(a, b)


def test_mixed_splits_all_low_is_lcma_and_all_high_is_high(quick_run):
    from lcma_ext.contributions import ContributionMaps
    from lcma_ext.models import make_level_factory
    from lcma_ext.pipeline import build_levels, build_multiscale_transform

    maps = ContributionMaps.load(quick_run / "contributions.pt")
    factory = make_level_factory("realnvp", "tiny")
    levels = build_levels(factory, (1, 8, 8), 3)
    for side, arm in (("low", "lcma"), ("high", "high")):
        mixed = mixed_lcma_splits(maps, levels, (1, 8, 8), (side, side))
        named = build_multiscale_transform(
            factory, (1, 8, 8), 3, split=arm, contributions=maps, levels=levels, remap=True
        ).splits
        for a, b in zip(mixed, named):
            a.bind(b.input_shape)
            assert torch.equal(a.index, b.index)
    low_high = mixed_lcma_splits(maps, levels, (1, 8, 8), ("low", "high"))
    low_low = mixed_lcma_splits(maps, levels, (1, 8, 8), ("low", "low"))
    for split in (*low_high, *low_low):
        split.bind(split.input_shape or tuple(maps.maps[0].shape))
    assert torch.equal(low_high[0].index, low_low[0].index)
    assert not torch.equal(low_high[1].index, low_low[1].index)


def test_ablate_levels_quick(tmp_path):
    out = tmp_path / "ablate"
    args = ["ablate-levels", "--quick", "--no-progress", "--seeds", "1", "--epochs", "1"]
    assert main([*args, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"high-high", "high-low", "low-high", "low-low"}
    assert results["reference_arm"] == "low-low"
    assert all(math.isfinite(e["bpd_mean"]) for e in results["arms"].values())


def test_aggregate_flags_without_dropping():
    def run(seed, bpd, diverged=False):
        return {
            "seed": seed,
            "test_bpd": bpd,
            "diverged": diverged,
            "diverged_reason": "non-finite loss" if diverged else "",
            "train_time_s": 1.0,
            "parameters": 10,
            "epochs_done": 1,
        }

    runs = {
        "channel": [run(0, 2.0), run(1, 2.1), run(2, 2.2)],
        "lcma": [run(0, 1.9), run(1, 9.0), run(2, float("nan"), diverged=True)],
    }
    arms = aggregate(runs, "channel", [0, 1, 2], gap=0.5)
    lcma = arms["lcma"]
    assert lcma["diverged"] == [False, True, True] and lcma["n_diverged"] == 2
    assert lcma["bpd_mean"] == pytest.approx((1.9 + 9.0) / 2)  # outlier kept, NaN left out
    assert lcma["bpd_median"] == pytest.approx((1.9 + 9.0) / 2)
    assert lcma["paired_diff_vs_channel"][:2] == pytest.approx([-0.1, 6.9])
    assert math.isnan(lcma["paired_diff_vs_channel"][2])
    assert lcma["wins_vs_reference"] == 1
    assert arms["channel"]["diverged"] == [False, False, False]
    assert "lcma" in cli.results_markdown(
        {
            "config": {
                "command": "run",
                "model": "m",
                "size": "s",
                "dataset": "d",
                "seeds": [0, 1, 2],
                "epochs": 1,
                "nms_epochs": 1,
                "levels": 3,
                "batch_size": 64,
                "lr": 1e-3,
            },
            "arms": arms,
            "reference_arm": "channel",
            "outlier_gap": 0.5,
            "nms": None,
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
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("exact", None),
        ("roulette estimate", "unbiased estimate"),
        ("truncated series", "a biased estimate"),
        ("IWAE-128", "upper bound on bits/dim"),
    ],
)
def test_bound_notes_explain_each_bpd_kind(kind, expected):
    arms = {"channel": {"bpd_kind": kind, "bpd_mc_se_per_seed": [0.01]}}
    text = " ".join(cli._bound_notes(arms))
    if expected is None:
        assert text == ""
    else:
        assert expected in text
        assert ("Monte Carlo standard error" in text) == kind.startswith("IWAE")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--epochs", "0"], "expected an integer >= 1; got 0"),
        (["run", "--seeds", "two"], "expected an integer; got 'two'"),
        (["run", "--arms", "lcma,foo"], "expected a comma-separated subset"),
        (["run", "--model", "maf"], "invalid choice"),
        (["run", "--lr", "-1"], "expected a positive number"),
    ],
)
def test_argparse_errors_are_one_line(argv, message, capsys):
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
    ],
)
def test_runtime_errors_are_one_line(argv, message, capsys, tmp_path):
    if "cuda" in argv[-1] and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main([*argv, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("lcma-ext run: error:")


def test_module_entry_point_help():
    done = subprocess.run(
        [sys.executable, "-m", "lcma_ext", "run", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--nms-epochs" in done.stdout and "--arms" in done.stdout
