"""Glow's conditional prior in the experiments: ``+cond`` arms, ``prior``, records, reports.

Also the inspection of a finished run folder (samples, interpolations, rescoring) through the
Python API; tests/test_cli_prior.py runs the same through the command line.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from lcma_ext.contributions import ContributionMaps
from lcma_ext.data import load_dataset
from lcma_ext.experiments import (
    ARMS,
    CONDITIONAL_ARMS,
    GRANULARITY_ARMS,
    ExperimentConfig,
    ExperimentError,
    build_arm,
    evaluate_run,
    interpolate_run,
    load_arm,
    run_comparison,
    sample_run,
)
from lcma_ext.experiments import runner as runner_module
from lcma_ext.experiments.arms import split_arm
from lcma_ext.experiments.registry import arm_prior, arm_spec, base_arm, register_arm
from lcma_ext.experiments.report import prior_notes
from lcma_ext.plotting import sample_title
from lcma_ext.transforms import ConditionalGaussianPrior

SHAPE = (1, 8, 8)
CONFIG = ExperimentConfig(levels=3)
TINY = {"quick": True, "limit": 64, "epochs": 1, "nms_epochs": 1, "seeds": 1, "progress": False}


# --- the registry --------------------------------------------------------------------------------


def test_every_split_arm_has_a_cond_arm() -> None:
    assert CONDITIONAL_ARMS == tuple(f"{arm}+cond" for arm in (*ARMS, *GRANULARITY_ARMS))
    for name in CONDITIONAL_ARMS:
        spec = arm_spec(name)
        assert spec.prior == "conditional" and base_arm(name) == name[: -len("+cond")]
        assert spec.uses_contributions == arm_spec(base_arm(name)).uses_contributions
    conditional = CONFIG.replace(prior="conditional")
    assert (
        arm_prior(CONFIG, "lcma") == "standard" and arm_prior(conditional, "lcma") == "conditional"
    )
    assert arm_prior(CONFIG, "lcma+cond") == "conditional" == arm_prior(conditional, "low-high")
    assert arm_prior(conditional, "haar") == "standard"  # not a split arm: fixed


@pytest.mark.parametrize("arm", ["lcma", "checkerboard", "random", "high-region"])
def test_a_cond_arm_starts_from_its_standard_arm(arm: str, maps: ContributionMaps) -> None:
    standard, conditional = (build_arm(CONFIG, name, maps, 2) for name in (arm, f"{arm}+cond"))
    priors = conditional._transform.priors
    assert len(priors) == 2 and all(isinstance(p, ConditionalGaussianPrior) for p in priors)
    assert all(p is None for p in standard._transform.priors)
    conditional_levels = dict(conditional.named_parameters())
    for name, parameter in standard.named_parameters():  # the same level weights
        assert torch.equal(parameter, conditional_levels[name]), name
    assert all(torch.equal(p, torch.zeros_like(p)) for q in priors for p in q.parameters())
    with torch.no_grad():
        x = torch.randn(3, *SHAPE)
        assert torch.equal(conditional.log_prob(x), standard.log_prob(x))
    via_config = build_arm(CONFIG.replace(prior="conditional"), arm, maps, 2)
    for a, b in zip(via_config.parameters(), conditional.parameters(), strict=True):
        assert torch.equal(a, b)


def test_register_arm_checks_its_prior() -> None:
    with pytest.raises(ValueError, match="expected prior in standard, conditional or None"):
        register_arm("test-prior-arm", split_arm("channel"), prior="glow")


# --- the configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prior": "glow"}, "expected prior in standard, conditional; got 'glow'"),
        (
            {"prior": "conditional", "arms": "lcma,haar,flow-vae-4"},
            "expected only split arms with --prior conditional (it is the prior of their "
            "factored halves); got haar, flow-vae-4",
        ),
        (
            {"arms": "lcma-region+cond", "region_size": 3},
            "expected --region-size to divide the 4x4 block grid of split point 0",
        ),
        ({"arms": "lcma+conditional"}, "expected arms as a comma-separated subset"),
    ],
)
def test_validation_of_the_prior(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        ExperimentConfig(**changes).validate()
    assert message in str(info.value)


def test_valid_prior_configurations() -> None:
    ExperimentConfig(arms="channel,lcma,channel+cond,lcma+cond,lcma-region+cond").validate()
    ExperimentConfig(prior="conditional", arms="lcma,lcma+cond,low-high").validate()
    ExperimentConfig(command="ablate-levels", prior="conditional").validate()


def test_the_prior_is_recorded_only_when_not_the_default() -> None:
    data = load_dataset("digits", limit=64)
    record = ExperimentConfig().record(data, 0.05, 3)
    assert "prior" not in record  # the default run's config.json is unchanged
    conditional = ExperimentConfig(prior="conditional").record(data, 0.05, 3)
    assert conditional["prior"] == "conditional"
    assert ExperimentConfig.from_record(conditional).prior == "conditional"
    assert ExperimentConfig.from_record(record).prior == "standard"


def test_the_report_names_the_conditional_arms() -> None:
    arms = {"lcma": {"prior": "standard"}, "lcma+cond": {"prior": "conditional"}}
    (note, blank) = prior_notes(arms)
    assert "`lcma+cond`" in note and "`lcma`," not in note and blank == ""
    assert prior_notes({"lcma": {"prior": "standard"}, "old": {}}) == []


# --- a run with --prior conditional, and the inspection of a run folder ---------------------------


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("conditional")
    config = ExperimentConfig(out=out, arms="lcma,channel", prior="conditional", **TINY)
    return out, run_comparison(config)


def test_a_conditional_run_records_its_prior(conditional_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = conditional_run
    assert json.loads((out / "config.json").read_text())["prior"] == "conditional"
    assert {arm: e["prior"] for arm, e in results["arms"].items()} == {
        "lcma": "conditional",
        "channel": "conditional",
    }
    assert "Prior of the factored halves" in (out / "results.md").read_text()
    flow = load_arm(out, "lcma", 0)  # rebuilt with its priors from config.json
    priors = flow._transform.priors
    assert all(isinstance(p, ConditionalGaussianPrior) for p in priors)
    assert any(p.net.weight.abs().max() > 0 for p in priors)  # trained away from zero
    with pytest.raises(ExperimentError, match="different prior"):
        run_comparison(ExperimentConfig(out=out, arms="lcma,channel", **TINY))


def test_the_sample_grids_are_titled(
    conditional_run: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(conditional_run[0], out)
    (out / "samples_lcma_T0.7.png").unlink()
    titles = []

    def grid(images: torch.Tensor, path: Path, nrow: int = 8, title: str | None = None) -> None:
        titles.append(title)
        path.write_bytes(b"png")

    monkeypatch.setattr(runner_module, "save_image_grid", grid)
    run_comparison(ExperimentConfig(out=out, arms="lcma,channel", prior="conditional", **TINY))
    bpd = conditional_run[1]["arms"]["lcma"]["bpd_per_seed"][0]
    assert titles == [sample_title("lcma", 0.7, bpd, 0)]
    assert titles[0].startswith("lcma, seed 0: T = 0.7, test ") and "bits/dim" in titles[0]


def test_sample_run_writes_a_titled_grid(
    conditional_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = conditional_run
    state = torch.random.get_rng_state()
    path = sample_run(out, "lcma", 0, temperature=0.5, num=6, out=tmp_path / "s.png")
    assert path == tmp_path / "s.png" and path.stat().st_size > 0
    assert torch.equal(torch.random.get_rng_state(), state)
    default = sample_run(out, "channel", 0, temperature=0.0, num=2)
    assert default == out / "samples_channel_seed0_T0.png" and default.is_file()


def test_interpolate_run_and_its_errors(
    conditional_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = conditional_run
    path = interpolate_run(out, "lcma", 0, steps=3, pairs=2, mode="linear", out=tmp_path / "i.png")
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match=r"expected --pairs <= 32 \(half the 64 test images\)"):
        interpolate_run(out, "lcma", 0, pairs=33)
    with pytest.raises(ValueError, match="expected mode in linear, spherical; got 'cubic'"):
        interpolate_run(out, "lcma", 0, mode="cubic")
    with pytest.raises(ValueError, match="expected steps as an integer >= 2; got 1"):
        interpolate_run(out, "lcma", 0, steps=1, out=tmp_path / "never.png")


def test_evaluate_run_rescores_to_the_recorded_figures(
    conditional_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, results = conditional_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "runs" / "channel_seed0.json").unlink()  # an unfinished run: no recorded figure
    rows = evaluate_run(copy, out=tmp_path / "table")
    assert [(row["arm"], row["seed"]) for row in rows] == [("nms", 0), ("channel", 0), ("lcma", 0)]
    by_arm = {row["arm"]: row for row in rows}
    assert by_arm["lcma"]["rescored_bpd"] == results["arms"]["lcma"]["bpd_per_seed"][0]
    assert by_arm["lcma"]["difference"] == 0.0
    assert by_arm["nms"]["rescored_bpd"] == results["nms"]["test_bpd"]
    assert by_arm["channel"]["recorded_bpd"] is None and by_arm["channel"]["difference"] is None
    assert math.isfinite(by_arm["channel"]["rescored_bpd"])
    table = (tmp_path / "table" / "evaluation.md").read_text()
    assert "| arm | seed | bpd kind | recorded bpd | rescored bpd | Δ |" in table
    assert "| channel | 0 | exact | — |" in table
    stored = json.loads((tmp_path / "table" / "evaluation.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(rows))


def test_missing_folders_arms_and_seeds_are_one_error(
    conditional_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = conditional_run
    with pytest.raises(ExperimentError, match=r"got '.*nowhere' \(no such folder\)"):
        sample_run(tmp_path / "nowhere", "lcma", 0)
    with pytest.raises(ExperimentError, match=r"without config\.json"):
        evaluate_run(tmp_path)
    with pytest.raises(
        ExperimentError, match=r"\(channel_seed0, lcma_seed0\); got 'random' seed 0"
    ):
        sample_run(out, "random", 0)
    with pytest.raises(ExperimentError, match="got 'lcma' seed 3"):
        interpolate_run(out, "lcma", 3)
