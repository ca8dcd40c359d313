"""The runner: results, resume, load_arm, the honesty rules and the faults of the run store."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, NoReturn

import pytest
import torch
from nflows.flows import Flow

from lcma_ext.contributions import ContributionMaps
from lcma_ext.experiments import (
    ExperimentConfig,
    ExperimentError,
    NMSDivergedError,
    StateFileError,
    load_arm,
    load_run_data,
    run_comparison,
)
from lcma_ext.training import evaluate_bpd

TINY = {"quick": True, "limit": 64, "epochs": 1, "nms_epochs": 1, "seeds": 2, "progress": False}


def _config(out: Path, **changes) -> ExperimentConfig:
    return ExperimentConfig(out=out, **{**TINY, "arms": "lcma,channel", **changes})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("tiny")
    return out, run_comparison(_config(out))


def _copy(tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(tiny_run[0], out)
    return out


def test_results_are_results_json(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = tiny_run
    stored = json.loads((out / "results.json").read_text())
    assert json.loads(json.dumps(results)) == stored
    assert list(stored["arms"]) == ["lcma", "channel"] and stored["reference_arm"] == "channel"
    assert stored["uniform_bpd"] == pytest.approx(math.log2(17)) and stored["smoke_run"] is True
    assert stored["config"] == json.loads((out / "config.json").read_text())
    for arm in ("lcma", "channel"):
        paths = [out / "runs" / f"{arm}_seed{seed}.json" for seed in (0, 1)]
        bpd = [json.loads(path.read_text())["test_bpd"] for path in paths]
        assert stored["arms"][arm]["bpd_per_seed"] == bpd
    assert "nms_diverged" not in stored and "built_on_diverged_nms" not in stored["arms"]["lcma"]
    assert not list(out.rglob("*.tmp*"))  # every write was atomic


@pytest.mark.parametrize(("arm", "seed"), [("lcma", 0), ("channel", 1)])
def test_load_arm_gives_the_recorded_bpd(
    tiny_run: tuple[Path, dict[str, Any]], arm: str, seed: int
) -> None:
    out, results = tiny_run
    state = torch.random.get_rng_state()
    flow = load_arm(out, arm, seed)
    assert torch.equal(torch.random.get_rng_state(), state)  # global random state untouched
    data, preprocessing = load_run_data(out)
    recorded = json.loads((out / "runs" / f"{arm}_seed{seed}.json").read_text())["test_bpd"]
    assert evaluate_bpd(flow, data.test, preprocessing) == recorded
    assert results["arms"][arm]["bpd_per_seed"][seed] == recorded


def test_load_arm_names_what_the_folder_holds(
    tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = tiny_run
    with pytest.raises(ExperimentError, match="channel_seed0, channel_seed1, lcma_seed0"):
        load_arm(out, "random", 0)
    with pytest.raises(ExperimentError, match="got 'lcma' seed 5"):
        load_arm(out, "lcma", 5)
    with pytest.raises(ExperimentError, match=r"without config\.json"):
        load_arm(tmp_path, "lcma", 0)


def test_rerun_reuses_every_finished_run(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    again = run_comparison(_config(out))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == before
    assert again["arms"]["lcma"]["bpd_per_seed"] == results["arms"]["lcma"]["bpd_per_seed"]
    with pytest.raises(ExperimentError, match="different epochs"):
        run_comparison(_config(out, epochs=2))


@pytest.mark.parametrize(
    "name",
    ["runs/lcma_seed1.json", "runs/nms.json", "config.json", "contributions.pt"],
)
def test_a_corrupt_state_file_is_named_and_deleting_it_recovers(
    tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path, name: str
) -> None:
    out = _copy(tiny_run, tmp_path)
    path = out / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StateFileError) as info:
        run_comparison(_config(out))
    message = str(info.value)
    assert str(path) in message and "corrupt or truncated" in message and "\n" not in message
    assert "delete it and rerun the same command" in message
    path.unlink()
    again = run_comparison(_config(out))
    assert again["arms"]["lcma"]["bpd_per_seed"] == tiny_run[1]["arms"]["lcma"]["bpd_per_seed"]


def test_a_corrupt_checkpoint_is_named_before_training_resumes(
    tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out = _copy(tiny_run, tmp_path)
    (out / "runs" / "channel_seed1.json").unlink()
    path = out / "checkpoints" / "channel_seed1.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StateFileError, match=r"channel_seed1\.pt' is corrupt or truncated"):
        run_comparison(_config(out))
    with pytest.raises(StateFileError, match=r"channel_seed1\.pt"):
        load_arm(out, "channel", 1)


def test_an_unusable_out_is_one_error(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("not a folder")
    with pytest.raises(ExperimentError, match=r"to be a folder .*\(a file, not a folder\)"):
        run_comparison(_config(file))
    with pytest.raises(ExperimentError, match="expected --out to be a folder"):
        run_comparison(_config(file / "below"))


def test_the_configuration_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="divide the 4x4 block grid"):
        run_comparison(_config(out, arms="lcma-region", region_size=3))
    assert not out.exists()


def test_a_diverged_nms_stops_the_run_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "diverged"  # the legacy recipe (no warm-up, clip 100) diverges at lr 1000
    with pytest.raises(NMSDivergedError) as info:
        run_comparison(_config(out, lr=1000.0, recipe="legacy"))
    message = str(info.value)
    assert message.startswith("NMS pre-training diverged (non-finite")
    assert "--lr (now 1000)" in message and "--allow-diverged-nms" in message
    assert not list((out / "checkpoints").glob("*_seed*.pt"))  # no arm trained
    assert (out / "checkpoints" / "nms.pt").is_file()  # the lcma-ext contributions input
    with pytest.raises(NMSDivergedError):  # the stored summary says so on a rerun
        run_comparison(_config(out, lr=1000.0, recipe="legacy"))
    with pytest.raises(NMSDivergedError, match="no usable contributions"):  # NaN weights
        run_comparison(_config(out, lr=1000.0, recipe="legacy", allow_diverged_nms=True))


def test_an_nms_far_above_the_uniform_baseline_has_diverged(tmp_path: Path) -> None:
    out = tmp_path / "lr1"  # lr 1, legacy recipe: a finite NMS of ~14.6 bpd, above 2 x 4.09
    legacy = {"lr": 1.0, "seeds": 1, "recipe": "legacy"}
    with pytest.raises(NMSDivergedError, match=r"test bpd 1\d\.\d+ > 2 x uniform baseline 4\.087"):
        run_comparison(_config(out, **legacy))
    results = run_comparison(_config(out, **legacy, allow_diverged_nms=True))
    assert results["nms_diverged"] is True
    assert results["arms"]["lcma"]["built_on_diverged_nms"] is True
    assert "built_on_diverged_nms" not in results["arms"]["channel"]
    text = (out / "results.md").read_text()
    assert "NMS pre-trained 1 epochs (diverged:" in text and "built on a diverged NMS" in text


def _refuse(token: str) -> NoReturn:
    raise ValueError(f"non-strict JSON token {token}")


def test_one_seed_and_a_diverged_run_write_strict_json(tmp_path: Path) -> None:
    """No NaN or Infinity in any JSON file; null is read back where NaN was read before."""
    from lcma_ext.experiments import registry
    from lcma_ext.experiments.arms import split_arm
    from lcma_ext.experiments.inspection import evaluate_run
    from lcma_ext.experiments.registry import register_arm
    from lcma_ext.experiments.report import results_markdown
    from lcma_ext.experiments.sweep import cell_rows

    name = "test-nan-channel"
    channel = split_arm("channel")

    def diverging(config: ExperimentConfig, maps: ContributionMaps, seed: int) -> Flow:
        flow = channel(config, maps, seed)
        with torch.no_grad():
            next(flow.parameters()).fill_(float("nan"))
        return flow

    register_arm(name, diverging)
    try:
        out = tmp_path / "strict"
        config = _config(out, seeds=1, arms=f"lcma,channel,{name}")
        results = run_comparison(config)
        files = sorted(out.rglob("*.json"))
        assert {p.name for p in files} >= {"results.json", "config.json", f"{name}_seed0.json"}
        for path in files:
            assert "NaN" not in path.read_text() and "Infinity" not in path.read_text(), path
            json.loads(path.read_text(), parse_constant=_refuse)
        summary = json.loads((out / "runs" / f"{name}_seed0.json").read_text())
        assert summary["test_bpd"] is None and summary["diverged"] is True
        stored = json.loads((out / "results.json").read_text())
        assert stored["arms"][name]["bpd_per_seed"] == [None]
        assert stored["arms"]["lcma"]["bpd_std"] is None  # one seed
        for arm in ("lcma", name):
            comparison = stored["arms"][arm]["vs_best_static"]
            assert comparison["reference"] == "channel" and comparison["ci95"] is None
            assert comparison["verdict"] == "no evidence"
        assert stored["arms"]["channel"]["vs_best_static"] is None
        # the readers take the nulls: a rerun (summaries read back), reports, sweep rows
        again = run_comparison(config)
        assert math.isnan(again["arms"][name]["bpd_per_seed"][0])
        assert again["arms"]["lcma"]["bpd_per_seed"] == results["arms"]["lcma"]["bpd_per_seed"]
        text = results_markdown(stored)
        assert f"| {name} |" in text and "seed 0 (diverged)" in text
        row = next(r for r in cell_rows(stored) if r["arm"] == name)
        assert row["n"] == 0 and row["vs_best_static"]["verdict"] == "no evidence"
        rows = evaluate_run(out)  # the diverged arm left no checkpoint: named, not rescored
        assert {r["arm"] for r in rows} == {"nms", "lcma", "channel", name}
        missing = next(r for r in rows if r["arm"] == name)
        assert missing["bpd_kind"] == "no checkpoint" and missing["rescored_bpd"] is None
        json.loads((out / "evaluation.json").read_text(), parse_constant=_refuse)
    finally:
        del registry._REGISTRY[name]


def test_an_earlier_versions_folder_names_the_option_of_its_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder written by version 0.2 (the legacy recipe) refuses the new defaults in one line
    that names --recipe legacy, and resumes under it."""
    from lcma_ext.cli import main
    from lcma_ext.data import load_dataset
    from lcma_ext.data.preprocess import LogitPreprocessing
    from lcma_ext.experiments.store import write_json

    out = tmp_path / "old"
    legacy = _config(out, recipe="legacy", seeds=1, arms="channel")
    data = load_dataset("digits", limit=legacy.data_limit)
    record = legacy.record(data, LogitPreprocessing(data.levels).alpha, 3)
    assert "ema_decay" not in record and record["grad_clip"] == 100.0  # what 0.2 wrote
    out.mkdir()
    write_json(out / "config.json", record)
    with pytest.raises(ExperimentError) as info:
        run_comparison(_config(out, seeds=1, arms="channel"))
    message = str(info.value)
    assert "--recipe legacy reproduces its training recipe" in message and "\n" not in message
    argv = ["run", "--quick", "--limit", "64", "--epochs", "1", "--nms-epochs", "1"]
    argv += ["--seeds", "1", "--arms", "channel", "--no-progress", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--recipe legacy reproduces" in err and "\n" not in err
    assert main([*argv, "--recipe", "legacy"]) == 0
    assert json.loads((out / "config.json").read_text()) == record
