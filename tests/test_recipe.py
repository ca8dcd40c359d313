"""The training recipe: warm-up, cosine schedule, gradient clipping with its count, EMA weights
(what is scored, what the flow and the checkpoint hold), bit-identical resume, and the legacy
recipe reproducing the figures of version 0.2."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from nflows.flows import Flow

from lcma_ext.data import LogitPreprocessing, load_digits_dataset
from lcma_ext.models import build_flow, make_level_factory
from lcma_ext.training import (
    DEFAULT_RECIPE,
    LEGACY_RECIPE,
    RECIPES,
    ParameterEMA,
    Recipe,
    TrainConfig,
    evaluate_bpd,
    evaluation_state_dict,
    load_checkpoint,
    lr_factor,
    train_flow,
)

SHAPE = (1, 8, 8)
#: A recipe with every part active on the 9 steps of 3 epochs of 192 digits at batch 64: the
#: gradient norms of this Glow are 0.61-0.65 there, so about half the steps are clipped.
ACTIVE = Recipe(warmup_steps=2, lr_schedule="cosine", grad_clip=0.625, ema_decay=0.8)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, LogitPreprocessing]:
    data = load_digits_dataset()
    return data.train[:192], data.test[:64], LogitPreprocessing(data.levels)


def _flow(seed: int = 0) -> Flow:
    torch.manual_seed(seed)
    return build_flow(make_level_factory("glow", "tiny", hidden=8, steps=1)(0, SHAPE), SHAPE)


def _config(recipe: Recipe, epochs: int, **kwargs) -> TrainConfig:
    fields = {"batch_size": 64, "progress": False, **kwargs}
    return TrainConfig.from_recipe(recipe, epochs=epochs, **fields)


def test_lr_factor_against_the_formulas() -> None:
    # linear warm-up (s + 1) / w, then cos from 1 to 0 over the remaining steps
    assert [lr_factor(s, 4, "cosine", 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, "cosine", 12) == 1.0
    assert lr_factor(8, 4, "cosine", 12) == pytest.approx(0.5, abs=1e-15)  # halfway
    assert lr_factor(6, 4, "cosine", 12) == pytest.approx((1 + math.sqrt(0.5)) / 2, abs=1e-15)
    assert lr_factor(12, 4, "cosine", 12) == 0.0
    assert lr_factor(30, 4, "cosine", 12) == 0.0  # capped after the run
    assert [lr_factor(s, 2, "constant", 0) for s in (0, 1, 2, 100)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0, "constant", 0) == 1.0


def test_recipes_and_validation() -> None:
    assert (
        LEGACY_RECIPE
        == Recipe(warmup_steps=0, lr_schedule="constant", grad_clip=100.0, ema_decay=0.0)
        == RECIPES["legacy"]
    )
    assert TrainConfig().recipe == RECIPES[DEFAULT_RECIPE]
    legacy = TrainConfig.from_recipe("legacy", epochs=3, ema_decay=0.5)
    assert (
        legacy.recipe
        == Recipe(warmup_steps=0, lr_schedule="constant", grad_clip=100.0, ema_decay=0.5)
        and legacy.epochs == 3
    )
    assert not LEGACY_RECIPE.schedules_lr and Recipe(warmup_steps=1).schedules_lr
    with pytest.raises(ValueError, match="expected recipe in default, legacy; got 'x'"):
        TrainConfig.from_recipe("x")
    with pytest.raises(ValueError, match="expected warmup_steps as an integer >= 0; got -1"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match=r"expected ema_decay as a number in \[0, 1\); got 1"):
        TrainConfig(ema_decay=1)
    with pytest.raises(ValueError, match="expected grad_clip as a number >= 0; got nan"):
        TrainConfig(grad_clip=float("nan"))
    with pytest.raises(ValueError, match="expected a valid schedule_epochs; got 0"):
        TrainConfig(schedule_epochs=0)


def test_warmup_scales_the_first_adam_step(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    """Adam's first step moves a parameter by lr m / (sqrt(v) + eps) = lr g / (|g| + eps): the
    largest move is the step's learning rate, lr / warmup_steps during a warm-up."""
    train, _, pre = digits
    moves = []
    for warmup in (0, 4):
        flow = _flow()
        with torch.no_grad():  # ActNorm's data-dependent initialisation first
            flow.log_prob(pre(train[:64], generator=torch.Generator().manual_seed(0))[0])
        before = [p.detach().clone() for p in flow.parameters()]
        recipe = Recipe(warmup_steps=warmup, lr_schedule="constant")
        train_flow(flow, train, pre, _config(recipe, 1, batch_size=192, l2_scale=0.0))
        after = [p.detach() for p in flow.parameters()]
        moves.append(max(float((p - q).abs().max()) for p, q in zip(after, before)))
    assert moves[0] == pytest.approx(1e-3, rel=1e-4)
    assert moves[1] == pytest.approx(1e-3 / 4, rel=1e-4)


def test_the_schedule_runs_over_schedule_epochs(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing], tmp_path: Path
) -> None:
    """After epoch 1 (3 steps) of a 3-epoch budget: lr = 1e-3 (1 + cos(pi (3 - 2) / (9 - 2))) / 2
    is the rate of the next step; after the budget it is 0."""
    train, _, pre = digits
    path = tmp_path / "run.pt"
    train_flow(_flow(), train, pre, _config(ACTIVE, 1, schedule_epochs=3), checkpoint_path=path)
    state = load_checkpoint(path)
    expected = 1e-3 * (1 + math.cos(math.pi / 7)) / 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert state["scheduler"]["last_epoch"] == 3 and state["recipe"] == ACTIVE.to_dict()
    train_flow(_flow(), train, pre, _config(ACTIVE, 3), checkpoint_path=path)
    assert load_checkpoint(path)["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_clipped_steps_are_counted(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count equals the steps whose norm n gives clip / (n + 1e-6) < 1, the rule of
    ``clip_grad_norm_``; those steps and only those have their gradients scaled."""
    train, test, pre = digits
    norms, scaled = [], []
    total_norm, scale = torch.nn.utils.get_total_norm, torch.nn.utils.clip_grads_with_norm_

    def norm_spy(*args, **kwargs) -> torch.Tensor:
        norm = total_norm(*args, **kwargs)
        norms.append(float(norm))
        return norm

    def scale_spy(
        parameters: Iterable[torch.Tensor], max_norm: float, norm: torch.Tensor, *args, **kwargs
    ) -> None:
        scaled.append(float(norm))
        return scale(parameters, max_norm, norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", norm_spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", scale_spy)
    result = train_flow(_flow(), train, pre, _config(ACTIVE, 3), test_data=test)
    expected = [n for n in norms if ACTIVE.grad_clip / (n + 1e-6) < 1]
    assert len(norms) == result.steps == 9
    assert 0 < len(expected) < 9  # the threshold splits the steps: the count has something to see
    assert result.clipped_steps == len(expected) and scaled == expected
    norms.clear()
    unclipped = train_flow(_flow(), train, pre, _config(Recipe(grad_clip=0.0), 1))
    assert unclipped.clipped_steps == 0 and norms == []  # 0 disables clipping


def test_clipping_is_clip_grad_norm(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing],
) -> None:
    """A step with the recipe's clipping equals one with ``clip_grad_norm_``, clipped or not."""
    train, _, pre = digits
    y, _ = pre(train[:64], generator=torch.Generator().manual_seed(0))
    for max_norm in (0.3, 100.0):  # the norm of this step is about 0.65
        grads = []
        for use_torch in (True, False):
            flow = _flow()
            flow.log_prob(y)  # ActNorm's initialisation
            (-flow.log_prob(y).mean()).backward()
            parameters = list(flow.parameters())
            if use_torch:
                torch.nn.utils.clip_grad_norm_(parameters, max_norm)
            else:
                from lcma_ext.training import _clips

                norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
                if _clips(norm, max_norm):
                    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
            grads.append([p.grad.clone() for p in parameters])
        assert all(torch.equal(a, b) for a, b in zip(*grads)), max_norm


def test_ema_is_the_average_of_the_raw_trajectory(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing], tmp_path: Path
) -> None:
    """One step per epoch: the raw weights after each step (a run without EMA, resumed epoch by
    epoch) folded by hand, e_1 = w_1, e_t = d e_(t-1) + (1 - d) w_t in float64, against the EMA
    run's flow; the EMA run's raw checkpoint equals the run without EMA bit for bit."""
    train, test, pre = digits
    decay, epochs = ACTIVE.ema_decay, 4
    raw_recipe = Recipe(
        warmup_steps=ACTIVE.warmup_steps,
        lr_schedule=ACTIVE.lr_schedule,
        grad_clip=ACTIVE.grad_clip,
        ema_decay=0.0,
    )
    raw_path, trajectory = tmp_path / "raw.pt", []
    for epoch in range(1, epochs + 1):
        config = _config(raw_recipe, epoch, batch_size=192, schedule_epochs=epochs)
        train_flow(_flow(), train, pre, config, checkpoint_path=raw_path)
        trajectory.append({k: v.double() for k, v in load_checkpoint(raw_path)["model"].items()})
    flow, path = _flow(), tmp_path / "ema.pt"
    config = _config(ACTIVE, epochs, batch_size=192)
    result = train_flow(flow, train, pre, config, test_data=test, checkpoint_path=path)
    state = load_checkpoint(path)
    assert state["ema"]["updates"] == result.steps == epochs
    for name, value in state["model"].items():
        assert torch.equal(value, trajectory[-1][name].to(value.dtype)), name
    moved = 0.0
    for name, param in flow.named_parameters():
        average = trajectory[0][name]
        for weights in trajectory[1:]:
            average = decay * average + (1 - decay) * weights[name]
        torch.testing.assert_close(param.double(), average, rtol=0, atol=1e-7)
        moved = max(moved, float((average - trajectory[-1][name]).abs().max()))
    assert moved > 1e-5  # the EMA is far from the last raw weights compared with the tolerance


def test_the_flow_holds_the_scored_ema_weights(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing], tmp_path: Path
) -> None:
    train, test, pre = digits
    flow, path = _flow(), tmp_path / "run.pt"
    result = train_flow(flow, train, pre, _config(ACTIVE, 2), test_data=test, checkpoint_path=path)
    assert evaluate_bpd(flow, test, pre) == result.test_bpd[-1][1]
    state = load_checkpoint(path)
    rebuilt = _flow(seed=5)
    rebuilt.load_state_dict(evaluation_state_dict(state))
    for (name, p), q in zip(flow.named_parameters(), rebuilt.parameters()):
        assert torch.equal(p, q), name
    for (name, b), c in zip(flow.named_buffers(), rebuilt.buffers()):
        assert torch.equal(b, c), name  # ActNorm flags etc.: the live model's
    assert any(not torch.equal(state["model"][n], p) for n, p in flow.named_parameters())
    raw = _flow(seed=5)
    raw.load_state_dict(state["model"])
    assert evaluate_bpd(raw, test, pre) != result.test_bpd[-1][1]  # the raw weights differ
    legacy = {"model": state["model"]}  # no EMA: the model itself
    assert evaluation_state_dict(legacy).keys() == state["model"].keys()


@pytest.mark.parametrize("recipe", [LEGACY_RECIPE, ACTIVE], ids=["legacy", "active"])
def test_resume_after_a_kill_is_bit_identical(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing], tmp_path: Path, recipe: Recipe
) -> None:
    """Killed after epoch 1 (same budget, so the same schedule), resumed from another init."""
    train, test, pre = digits
    straight = _flow()
    reference = train_flow(straight, train, pre, _config(recipe, 3), test_data=test)
    path = tmp_path / "run.pt"
    partial = _config(recipe, 1, schedule_epochs=3)
    train_flow(_flow(), train, pre, partial, test_data=test, checkpoint_path=path)
    resumed_flow = _flow(seed=123)
    resumed = train_flow(
        resumed_flow, train, pre, _config(recipe, 3), test_data=test, checkpoint_path=path
    )
    assert resumed.train_bpd == reference.train_bpd and resumed.test_bpd == reference.test_bpd
    assert (resumed.steps, resumed.clipped_steps) == (reference.steps, reference.clipped_steps)
    for (name, p), q in zip(straight.named_parameters(), resumed_flow.parameters()):
        assert torch.equal(p, q), name
    if recipe is ACTIVE:
        assert 0 < reference.clipped_steps < reference.steps


def test_a_checkpoint_resumes_only_under_its_recipe(
    digits: tuple[torch.Tensor, torch.Tensor, LogitPreprocessing], tmp_path: Path
) -> None:
    train, _, pre = digits
    path = tmp_path / "run.pt"
    train_flow(_flow(), train, pre, _config(LEGACY_RECIPE, 1), checkpoint_path=path)
    state = load_checkpoint(path)
    del state["recipe"]  # a checkpoint of version 0.2: taken to be the legacy recipe
    torch.save(state, path)
    # its learning rate was not recorded (lr joined the recipe later): not checked
    resumed = _config(LEGACY_RECIPE, 2, lr=2e-3)
    assert train_flow(_flow(), train, pre, resumed, checkpoint_path=path).steps
    with pytest.raises(ValueError, match="with the training recipe it was written with"):
        train_flow(_flow(), train, pre, _config(ACTIVE, 3), checkpoint_path=path)
    # a checkpoint of this version records its lr: another one is refused
    path = tmp_path / "new.pt"
    train_flow(_flow(), train, pre, _config(LEGACY_RECIPE, 1), checkpoint_path=path)
    assert load_checkpoint(path)["recipe"]["lr"] == LEGACY_RECIPE.lr
    with pytest.raises(ValueError, match=r"lr=0\.001"):
        train_flow(_flow(), train, pre, _config(LEGACY_RECIPE, 2, lr=2e-3), checkpoint_path=path)


def test_parameter_ema_swaps_and_restores_exactly() -> None:
    flow = _flow()
    ema = ParameterEMA(flow, 0.5)
    live = [p.detach().clone() for p in flow.parameters()]
    with ema.swapped() as swapped:  # before the first update: the live weights
        assert swapped is flow
        assert all(torch.equal(p, q) for p, q in zip(flow.parameters(), live))
    ema.update()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(1.0)
    ema.update()  # (w + w + 1) / 2
    with pytest.raises(RuntimeError, match="inside"), ema.swapped():
        for p, q in zip(flow.parameters(), live):
            torch.testing.assert_close(p, q + 0.5, rtol=0, atol=1e-6)
        raise RuntimeError("inside")
    for p, q in zip(flow.parameters(), live):
        assert torch.equal(p, q + 1.0)  # restored, even after an error
    ema.copy_to_module()
    for p, q in zip(flow.parameters(), live):
        torch.testing.assert_close(p, q + 0.5, rtol=0, atol=1e-6)
    other = ParameterEMA(flow, 0.9)
    with pytest.raises(ValueError, match=r"expected an EMA state of decay 0\.9"):
        other.load_state_dict(ema.state_dict())


#: Per-seed test bits/dim (and the NMS's) of the run below with the code before the recipe
#: existed (commit d3b381b, ``git worktree add /tmp/base d3b381b``), measured in one process
#: with ``torch.set_num_threads(1)``: ``run_comparison(ExperimentConfig(quick=True, limit=256,
#: epochs=2, nms_epochs=1, seeds=2, arms="channel,lcma", progress=False, out=...))``.
VERSION_0_2 = {
    "channel": [5.1486287992447615, 5.143591497093439],
    "lcma": [5.151712233200669, 5.1450710613280535],
}
VERSION_0_2_NMS = 5.230544559657574


def test_the_legacy_recipe_reproduces_the_figures_of_version_0_2(tmp_path: Path) -> None:
    from lcma_ext.experiments import ExperimentConfig, run_comparison

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = ExperimentConfig(
            quick=True, limit=256, epochs=2, nms_epochs=1, seeds=2, arms="channel,lcma",
            progress=False, out=tmp_path / "legacy", recipe="legacy",
        )  # fmt: skip
        results = run_comparison(config)
    finally:
        torch.set_num_threads(threads)
    assert results["nms"]["test_bpd"] == VERSION_0_2_NMS
    for arm, figures in VERSION_0_2.items():
        assert results["arms"][arm]["bpd_per_seed"] == figures, arm
    assert results["config"]["grad_clip"] == 100.0 and "ema_decay" not in results["config"]


def test_the_documented_recipes_are_the_code_s() -> None:
    """docs/cli.md's table of the named recipes matches RECIPES (change both together)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for name, recipe in RECIPES.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        lr, warmup, schedule, clip, ema = cells[1:6]
        assert float(lr) == recipe.lr and int(warmup.split()[0]) == recipe.warmup_steps, name
        assert schedule == recipe.lr_schedule and float(clip) == recipe.grad_clip, name
        assert float(ema.split()[0]) == recipe.ema_decay, name


def _recipe_search() -> ModuleType:
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_search.py"
    spec = importlib.util.spec_from_file_location("recipe_search", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_search_parses_candidates_and_selects_on_static_arms_only() -> None:
    search = _recipe_search()
    name, recipe = search.parse_candidate("w:warmup_steps=50,lr_schedule=cosine,ema_decay=0.9")
    assert name == "w" and recipe == Recipe(
        lr=1e-3, warmup_steps=50, lr_schedule="cosine", grad_clip=100.0, ema_decay=0.9
    )  # unset: legacy's
    assert search.parse_candidate("v:lr=3e-3")[1] == Recipe(lr=3e-3, grad_clip=100.0)
    assert search.parse_candidate("legacy") == ("legacy", LEGACY_RECIPE)
    with pytest.raises(ValueError, match="expected fields among"):
        search.parse_candidate("x:beta=1")
    rows = [
        {"candidate": "legacy", "arm": "channel", "n": 5, "mean": 5.50, "std": 0.20},
        {"candidate": "legacy", "arm": "lcma", "n": 5, "mean": 5.40, "std": 0.20},
        # halves the spread, no worse mean: qualifies (whatever LCMA does)
        {"candidate": "a", "arm": "channel", "n": 5, "mean": 5.45, "std": 0.09},
        {"candidate": "a", "arm": "lcma", "n": 5, "mean": 9.00, "std": 3.00},
        # smaller spread but a worse mean: does not qualify
        {"candidate": "b", "arm": "channel", "n": 5, "mean": 5.60, "std": 0.01},
        {"candidate": "b", "arm": "lcma", "n": 5, "mean": 5.00, "std": 0.01},
        # qualifies with a smaller spread than a: chosen
        {"candidate": "c", "arm": "channel", "n": 5, "mean": 5.50, "std": 0.05},
        {"candidate": "c", "arm": "lcma", "n": 5, "mean": 5.40, "std": 0.30},
    ]
    choice = search.select(rows, ["channel"], 0.5)
    verdicts = {name: v["qualifies"] for name, v in choice["candidates"].items()}
    assert verdicts == {"legacy": False, "a": True, "b": False, "c": True}
    assert choice["chosen"] == "c" and choice["rule"] == "halved"
    # none halves it at 0.1: the fallback takes the lowest mean among spreads <= 1.5 x legacy
    fallback = search.select(rows, ["channel"], 0.1)
    assert fallback["chosen"] == "a" and fallback["rule"] == "fallback"
    wide = [dict(r, std=0.5) if r["candidate"] != "legacy" else r for r in rows]
    assert search.select(wide, ["channel"], 0.1)["chosen"] is None
