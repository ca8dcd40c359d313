"""lcma-self and lcma-reestimate: the split of the model's own contributions, exact phases, budget,
honesty (phase 0 is the channel arm) and resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from nflows.flows import Flow

from lcma_ext.contributions import ContributionMaps
from lcma_ext.data import ImageDataset
from lcma_ext.experiments import ExperimentConfig, load_arm, load_run_data, run_comparison
from lcma_ext.experiments import self_estimation as phased
from lcma_ext.experiments.arms import build_arm
from lcma_ext.experiments.registry import arm_spec
from lcma_ext.experiments.runner import CONTRIBUTION_EXAMPLES, CONTRIBUTION_NOISE_SEED
from lcma_ext.multiscale import ContributionMultiscaleFlow, level_output_shape
from lcma_ext.splits import ChannelSplit, LCMASplit, make_split
from lcma_ext.training import TrainResult, evaluate_bpd, evaluation_state_dict, load_checkpoint

from brute_force import jacobian, slogdet

EPOCHS = 3
TINY = {
    "quick": True,
    "limit": 64,
    "epochs": EPOCHS,
    "nms_epochs": 1,
    "seeds": 1,
    "progress": False,
    "reestimate_every": 1,
    # every part of the recipe active on the 3 steps (1 per epoch): the schedule and the EMA
    # must run over the whole budget across the phases, as for the channel arm
    "warmup_steps": 1,
    "lr_schedule": "cosine",
    "grad_clip": 10.0,
    "ema_decay": 0.5,
}
SELF = "channel,lcma-self,lcma-reestimate"


def _config(out: Path, **changes) -> ExperimentConfig:
    return ExperimentConfig(out=out, **{**TINY, "arms": SELF, **changes})


@pytest.fixture(scope="module")
def self_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("self")
    return out, run_comparison(_config(out))


def _summary(out: Path, arm: str, seed: int = 0) -> dict[str, Any]:
    return json.loads((out / "runs" / f"{arm}_seed{seed}.json").read_text())


def test_phase_bounds() -> None:
    assert phased.phase_bounds(10, 3, repeat=False) == [(0, 3), (3, 10)]
    assert phased.phase_bounds(10, 3, repeat=True) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    for every in (0, 10, 11):
        with pytest.raises(ValueError, match="expected 1 <= reestimate_every < epochs"):
            phased.phase_bounds(10, every, repeat=True)


def test_the_config_refuses_a_phase_as_long_as_the_budget(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected --reestimate-every below --epochs"):
        _config(tmp_path, reestimate_every=EPOCHS).validate()
    assert ExperimentConfig(epochs=30).reestimate_epochs == 10
    assert ExperimentConfig(epochs=2).reestimate_epochs == 1
    with pytest.raises(ValueError, match="expected reestimate_every as an integer >= 1; got 0"):
        _config(tmp_path, reestimate_every=0).validate()


def test_an_explicit_phase_length_is_part_of_the_stored_configuration(
    self_run: tuple[Path, dict[str, Any]],
) -> None:
    out, results = self_run
    record = json.loads((out / "config.json").read_text())
    assert record["reestimate_every"] == 1 == results["config"]["reestimate_every"]
    assert ExperimentConfig.from_record(record).reestimate_every == 1
    assert "reestimate_every" not in ExperimentConfig().record(*_record_args(out))


def _record_args(out: Path) -> tuple[ImageDataset, float, int]:
    data, preprocessing = load_run_data(out)
    return data, preprocessing.alpha, 3


@pytest.mark.parametrize(
    ("arm", "phases"),
    [("lcma-self", [[0, 1], [1, 3]]), ("lcma-reestimate", [[0, 1], [1, 2], [2, 3]])],
)
def test_total_epochs_equal_the_budget(
    self_run: tuple[Path, dict[str, Any]], arm: str, phases: list[list[int]]
) -> None:
    out, results = self_run
    summary = _summary(out, arm)
    assert summary["phase_epochs"] == phases
    assert summary["epochs_done"] == EPOCHS == results["config"]["epochs"]
    assert len(summary["train_bpd_curve"]) == EPOCHS
    assert [epoch for epoch, _ in summary["test_bpd_curve"]] == [1, 2, 3]
    assert [s["epoch"] for s in summary["switches"]] == [start for start, _ in phases[1:]]
    assert math.isfinite(summary["test_bpd"]) and not summary["diverged"]


@pytest.mark.parametrize("arm", ["lcma-self", "lcma-reestimate"])
def test_phase_zero_is_the_channel_arm(self_run: tuple[Path, dict[str, Any]], arm: str) -> None:
    """Same initial weights, batches, noise and optimizer: the curves agree until the switch."""
    out, _ = self_run
    channel, mine = _summary(out, "channel"), _summary(out, arm)
    assert mine["train_bpd_curve"][0] == channel["train_bpd_curve"][0]
    assert mine["test_bpd_curve"][0] == channel["test_bpd_curve"][0]
    assert mine["switches"][0]["test_bpd_before_switch"] == channel["test_bpd_curve"][0][1]
    assert mine["test_bpd_curve"][-1] != channel["test_bpd_curve"][-1]  # the split did change


def _contribution_data(out: Path) -> torch.Tensor:
    data, preprocessing = load_run_data(out)
    generator = torch.Generator().manual_seed(CONTRIBUTION_NOISE_SEED)
    return preprocessing(data.train[:CONTRIBUTION_EXAMPLES], generator=generator)[0]


def _independent_maps(flow: Flow, data: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Split point k's map from a truncated multi-scale flow (levels 0..k, the last unsplit)."""
    levels, splits, maps = flow._transform.levels, [], []
    flow.eval()
    for k in range(len(levels) - 1):
        truncated = ContributionMultiscaleFlow.from_levels(levels[: k + 1], shape, splits)
        level_input = shape if k == 0 else splits[-1].kept_shape
        output_shape = level_output_shape(levels[k], level_input)
        with torch.no_grad():
            _, _, diag = truncated.forward_with_diag(data)
        size = math.prod(output_shape)
        maps.append(diag[:, -size:].double().mean(0).view(output_shape))
        splits.append(make_split("lcma", output_shape, maps[-1]))
    return maps


def test_the_switched_split_is_the_lcma_split_of_the_models_own_maps(
    self_run: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = self_run
    data = _contribution_data(out)
    shape = tuple(data.shape[1:])
    config = ExperimentConfig.from_record(json.loads((out / "config.json").read_text()))
    maps = ContributionMaps.load(out / "contributions.pt")
    with torch.random.fork_rng(devices=[]):
        trained = build_arm(config, "lcma-self", maps, seed=0)
    phase0 = load_checkpoint(out / "checkpoints" / "phases" / "lcma-self_seed0_phase0.pt")
    trained.load_state_dict(evaluation_state_dict(phase0))  # a switch measures the EMA weights
    assert all(isinstance(s, ChannelSplit) for s in trained._transform.splits)
    expected = _independent_maps(trained, data, shape)

    switch = load_checkpoint(out / "checkpoints" / "phases" / "lcma-self_seed0_phase1_switch.pt")
    switched = load_arm(out, "lcma-self", 0)._transform.splits
    for k, (mine, theirs, split) in enumerate(zip(switch["layout_maps"], expected, switched)):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6), f"split point {k}"
        assert isinstance(split, LCMASplit)
        assert torch.equal(split.index, make_split("lcma", tuple(theirs.shape), theirs).index)
        # the rule itself: in every local block the kept pair outranks the factored pair
        factored, kept = split.carry(theirs.unsqueeze(0))
        groups = kept.shape[1] // 2
        kept_min = kept[0].view(groups, 2, -1).min(1).values
        factored_max = factored[0].view(groups, 2, -1).max(1).values
        assert bool((kept_min >= factored_max).all()), f"split point {k}"


@pytest.mark.parametrize("arm", ["lcma-self", "lcma-reestimate"])
def test_the_flow_after_the_switch_is_exact(
    self_run: tuple[Path, dict[str, Any]], arm: str
) -> None:
    """log_prob against the brute-force Jacobian of the whole switched flow, in float64."""
    out, _ = self_run
    flow = load_arm(out, arm, 0).double()
    assert all(isinstance(s, LCMASplit) for s in flow._transform.splits)
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        z, _ = flow._transform(x)
        back, _ = flow._transform.inverse(z)
    sign, logabsdet = slogdet(jacobian(lambda b: flow._transform(b)[0], x[0], vectorize=True))
    base = -0.5 * float(z.square().sum()) - 0.5 * z.numel() * math.log(2 * math.pi)
    assert sign != 0
    with torch.no_grad():
        assert float(flow.log_prob(x)) == pytest.approx(base + logabsdet, abs=1e-8)
    assert torch.allclose(back, x, atol=1e-10)


@pytest.mark.parametrize("arm", ["lcma-self", "lcma-reestimate"])
def test_load_arm_gives_the_recorded_bpd(self_run: tuple[Path, dict[str, Any]], arm: str) -> None:
    out, results = self_run
    data, preprocessing = load_run_data(out)
    score = evaluate_bpd(load_arm(out, arm, 0), data.test, preprocessing)
    assert score == _summary(out, arm)["test_bpd"] == results["arms"][arm]["bpd_per_seed"][0]


def test_results_report_the_switches_and_their_cost(self_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = self_run
    text = (out / "results.md").read_text()
    assert "`lcma-reestimate`: `channel` split until epoch 1" in text
    assert "Split-selection cost per trained model" in text
    for arm in ("lcma-self", "lcma-reestimate"):
        cost = results["cost"][arm]
        assert cost["kind"] == "self" and 0 < cost["share"] < 1
        assert cost["selection_time_s"] == _summary(out, arm)["estimate_time_s"] > 0
    assert "channel" not in results["cost"]
    assert not arm_spec("lcma-self").uses_contributions


def test_the_recipe_runs_over_the_whole_budget_across_phases(
    self_run: tuple[Path, dict[str, Any]],
) -> None:
    """Schedule, EMA and step counts of the last phase equal the channel arm's at the end."""
    out, _ = self_run
    channel = load_checkpoint(out / "checkpoints" / "channel_seed0.pt")
    assert channel["optimizer"]["param_groups"][0]["lr"] == 0.0  # the cosine ran to its end
    for arm, last in (("lcma-self", 1), ("lcma-reestimate", 2)):
        state = load_checkpoint(out / "checkpoints" / "phases" / f"{arm}_seed0_phase{last}.pt")
        assert state["scheduler"]["last_epoch"] == channel["scheduler"]["last_epoch"] == EPOCHS
        lrs = [s["optimizer"]["param_groups"][0]["lr"] for s in (state, channel)]
        assert lrs[0] == lrs[1]
        assert state["ema"]["updates"] == channel["ema"]["updates"] == EPOCHS
        assert _summary(out, arm)["steps"] == _summary(out, "channel")["steps"] == EPOCHS


def test_a_switch_continues_from_the_raw_weights(self_run: tuple[Path, dict[str, Any]]) -> None:
    """The next phase starts from the previous phase's raw parameters with the new split's
    buffers, never from the EMA weights the flow holds after a phase."""
    out, _ = self_run
    config = ExperimentConfig.from_record(json.loads((out / "config.json").read_text()))
    maps = ContributionMaps.load(out / "contributions.pt")
    with torch.random.fork_rng(devices=[]):
        flow = build_arm(config, "lcma-reestimate", maps, seed=0)
    phases = out / "checkpoints" / "phases"
    first = load_checkpoint(phases / "lcma-reestimate_seed0_phase1_switch.pt")
    flow = phased.switched_flow(flow, first["layout_maps"], (1, 8, 8))
    phase1 = load_checkpoint(phases / "lcma-reestimate_seed0_phase1.pt")  # after 2 steps
    flow.load_state_dict(evaluation_state_dict(phase1))  # what the flow holds after phase 1
    switch = load_checkpoint(phases / "lcma-reestimate_seed0_phase2_switch.pt")
    new = phased.switched_flow(flow, switch["layout_maps"], (1, 8, 8))
    raw = phase1["model"]
    state = phased._switched_state(new, raw)
    differs = 0
    for name, param in new.named_parameters():
        assert torch.equal(state[name], raw[name]), name
        differs += not torch.equal(param, raw[name])
    assert differs  # the EMA weights the flow holds are not the raw ones
    params = dict(new.named_parameters())
    buffers = {
        n: b for n, b in new.state_dict().items() if n not in params and isinstance(b, torch.Tensor)
    }
    for name, buffer in buffers.items():
        assert torch.equal(state[name], buffer), name
    assert any(n not in raw or not torch.equal(b, raw[n]) for n, b in buffers.items())


def _interrupt_at_last_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    real = phased.train_flow

    def train_flow(flow: Flow, *args, **kwargs) -> TrainResult:
        if args[2].epochs == EPOCHS and "phase2" in str(kwargs["checkpoint_path"]):
            raise KeyboardInterrupt
        return real(flow, *args, **kwargs)

    monkeypatch.setattr(phased, "train_flow", train_flow)


def test_resume_after_a_phase_gives_the_uninterrupted_result(
    self_run: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "killed"
    config = _config(out, arms="lcma-reestimate")
    _interrupt_at_last_phase(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(config)
    phases = out / "checkpoints" / "phases"
    assert (phases / "lcma-reestimate_seed0_phase2_switch.pt").is_file()
    assert not (out / "runs" / "lcma-reestimate_seed0.json").is_file()
    monkeypatch.undo()
    run_comparison(config)
    resumed = _summary(out, "lcma-reestimate")
    uninterrupted = _summary(self_run[0], "lcma-reestimate")
    keys = ("test_bpd", "train_bpd_curve", "test_bpd_curve", "epochs_done", "clipped_steps")
    for key in keys:
        assert resumed[key] == uninterrupted[key], key


def test_a_switch_written_before_its_checkpoint_resumes(
    self_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Killed after a switch's maps were written: they are reused, not re-estimated."""
    out = tmp_path / "copy"
    shutil.copytree(self_run[0], out)
    (out / "runs" / "lcma-reestimate_seed0.json").unlink()
    (out / "checkpoints" / "lcma-reestimate_seed0.pt").unlink()
    (out / "checkpoints" / "phases" / "lcma-reestimate_seed0_phase2.pt").unlink()
    switch = out / "checkpoints" / "phases" / "lcma-reestimate_seed0_phase2_switch.pt"
    before = switch.stat().st_mtime_ns
    results = run_comparison(_config(out))
    assert switch.stat().st_mtime_ns == before
    original = self_run[1]["arms"]["lcma-reestimate"]["bpd_per_seed"]
    assert results["arms"]["lcma-reestimate"]["bpd_per_seed"] == original
