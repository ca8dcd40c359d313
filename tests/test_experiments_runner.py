"""The runner: results, resume, load_arm, the honesty rules and the faults of the run store."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

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


def _config(out, **changes):
    return ExperimentConfig(out=out, **{**TINY, "arms": "lcma,channel", **changes})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, run_comparison(_config(out))


def _copy(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run[0], out)
    return out


def test_results_are_results_json(tiny_run):
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
def test_load_arm_gives_the_recorded_bpd(tiny_run, arm, seed):
    out, results = tiny_run
    state = torch.random.get_rng_state()
    flow = load_arm(out, arm, seed)
    assert torch.equal(torch.random.get_rng_state(), state)  # global random state untouched
    data, preprocessing = load_run_data(out)
    recorded = json.loads((out / "runs" / f"{arm}_seed{seed}.json").read_text())["test_bpd"]
    assert evaluate_bpd(flow, data.test, preprocessing) == recorded
    assert results["arms"][arm]["bpd_per_seed"][seed] == recorded


def test_load_arm_names_what_the_folder_holds(tiny_run, tmp_path):
    out, _ = tiny_run
    with pytest.raises(ExperimentError, match="channel_seed0, channel_seed1, lcma_seed0"):
        load_arm(out, "random", 0)
    with pytest.raises(ExperimentError, match="got 'lcma' seed 5"):
        load_arm(out, "lcma", 5)
    with pytest.raises(ExperimentError, match=r"without config\.json"):
        load_arm(tmp_path, "lcma", 0)


def test_rerun_reuses_every_finished_run(tiny_run):
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
def test_a_corrupt_state_file_is_named_and_deleting_it_recovers(tiny_run, tmp_path, name):
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


def test_a_corrupt_checkpoint_is_named_before_training_resumes(tiny_run, tmp_path):
    out = _copy(tiny_run, tmp_path)
    (out / "runs" / "channel_seed1.json").unlink()
    path = out / "checkpoints" / "channel_seed1.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StateFileError, match=r"channel_seed1\.pt' is corrupt or truncated"):
        run_comparison(_config(out))
    with pytest.raises(StateFileError, match=r"channel_seed1\.pt"):
        load_arm(out, "channel", 1)


def test_an_unusable_out_is_one_error(tmp_path):
    file = tmp_path / "file"
    file.write_text("not a folder")
    with pytest.raises(ExperimentError, match=r"to be a folder .*\(a file, not a folder\)"):
        run_comparison(_config(file))
    with pytest.raises(ExperimentError, match="expected --out to be a folder"):
        run_comparison(_config(file / "below"))


def test_the_configuration_is_checked_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="divide the 4x4 block grid"):
        run_comparison(_config(out, arms="lcma-region", region_size=3))
    assert not out.exists()


def test_a_diverged_nms_stops_the_run_unless_asked(tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(NMSDivergedError) as info:
        run_comparison(_config(out, lr=1000.0))
    message = str(info.value)
    assert message.startswith("NMS pre-training diverged (non-finite")
    assert "--lr (now 1000.0)" in message and "--allow-diverged-nms" in message
    assert not list((out / "checkpoints").glob("*_seed*.pt"))  # no arm trained
    assert (out / "checkpoints" / "nms.pt").is_file()  # the lcma-ext contributions input
    with pytest.raises(NMSDivergedError):  # the stored summary says so on a rerun
        run_comparison(_config(out, lr=1000.0))
    with pytest.raises(NMSDivergedError, match="no usable contributions"):  # NaN weights
        run_comparison(_config(out, lr=1000.0, allow_diverged_nms=True))


def test_an_nms_far_above_the_uniform_baseline_has_diverged(tmp_path):
    out = tmp_path / "lr1"  # lr 1: a finite NMS of ~14.6 bpd, far above log2(17) = 4.09
    with pytest.raises(NMSDivergedError, match=r"test bpd 1\d\.\d+ > 2 x uniform baseline 4\.087"):
        run_comparison(_config(out, lr=1.0, seeds=1))
    results = run_comparison(_config(out, lr=1.0, seeds=1, allow_diverged_nms=True))
    assert results["nms_diverged"] is True
    assert results["arms"]["lcma"]["built_on_diverged_nms"] is True
    assert "built_on_diverged_nms" not in results["arms"]["channel"]
    text = (out / "results.md").read_text()
    assert "NMS pre-trained 1 epochs (diverged:" in text and "built on a diverged NMS" in text
