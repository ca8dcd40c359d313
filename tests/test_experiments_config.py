"""ExperimentConfig: defaults, quick, resolved values, validation before training, config.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcma_ext.data import load_dataset
from lcma_ext.experiments import ARMS, VAE_ARMS, ExperimentConfig
from lcma_ext.experiments.config import recipe_options
from lcma_ext.training import DEFAULT_RECIPE, RECIPES, Recipe


def test_defaults_and_quick_resolution() -> None:
    config = ExperimentConfig()
    assert (config.train_epochs, config.nms_train_epochs, config.seed_list) == (30, 30, [0, 1, 2])
    assert config.data_limit is None and config.arms == ARMS and config.progress
    assert config.out_dir == Path("runs/run-digits-realnvp-tiny")
    quick = ExperimentConfig(quick=True, epochs=5)
    assert (quick.train_epochs, quick.nms_train_epochs, quick.seed_list) == (5, 3, [0, 1])
    assert quick.data_limit == 512 and quick.out_dir == Path("runs/run-digits-realnvp-tiny-quick")
    patches = ExperimentConfig(command="ablate-levels", dataset="patches", model="glow")
    assert patches.train_epochs == 10 and patches.out_dir.name == "ablate-levels-patches-glow-tiny"


def test_arms_are_parsed_and_flow_vae_expands() -> None:
    config = ExperimentConfig(arms="lcma, flow-vae,lcma", out="/tmp/somewhere")
    assert config.arms == ("lcma", *VAE_ARMS) and config.out == Path("/tmp/somewhere")
    assert ExperimentConfig(arms=["haar"]).arms == ("haar",)


def test_arm_names_and_reference() -> None:
    assert ExperimentConfig().reference_arm(3) == "channel"
    assert ExperimentConfig(arms="lcma,high").reference_arm(3) == "lcma"
    ablate = ExperimentConfig(command="ablate-levels")
    assert ablate.arm_names(3) == ("high-high", "high-low", "low-high", "low-low")
    assert ablate.reference_arm(3) == "low-low"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"command": "train"}, "expected command in run, ablate-levels; got 'train'"),
        ({"dataset": "svhn"}, "expected dataset in"),
        ({"model": "maf"}, "expected model in"),
        ({"size": "huge"}, "expected size in"),
        ({"epochs": 0}, "expected epochs as an integer >= 1; got 0"),
        ({"seeds": 1.5}, "expected seeds as an integer >= 1"),
        ({"levels": 1}, "expected levels as an integer >= 2"),
        ({"lr": -1.0}, "expected lr as a number > 0"),
        ({"outlier_gap": float("nan")}, "expected outlier_gap as a positive number"),
        ({"batch_size": 0}, "expected batch_size as an integer >= 1"),
        ({"region_size": 0}, "expected region_size as an integer >= 1"),
        ({"arms": "lcma,foo"}, "expected arms as a comma-separated subset"),
        ({"arms": ""}, "expected arms as a comma-separated subset"),
        ({"device": "nonsense"}, "expected a torch device"),
        ({"levels": 5}, "expected --levels <= 3 for images of shape (1, 8, 8); got 5"),
        ({"dataset": "mnist"}, "expected --data-root"),
        ({"model": "iresnet", "arms": "haar"}, "expected --model realnvp or glow for the haar"),
        # patches: 16x16 -> split grids 8x8, 4x4, 2x2; a tile of 3 divides none of them
        (
            {"dataset": "patches", "arms": "lcma-region", "region_size": 3},
            "expected --region-size to divide the 8x8 block grid of split point 0",
        ),
    ],
)
def test_validate_names_the_problem_before_any_training(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        ExperimentConfig(**changes).validate()
    assert message in str(info.value)


def test_region_size_capped_at_the_grid_is_valid() -> None:
    # digits: split grids 4x4 and 2x2; 4 is capped to 2 at split 1, 8 to 4 and 2
    for size in (1, 2, 4, 8):
        ExperimentConfig(arms="lcma-region", region_size=size).validate()
    with pytest.raises(ValueError, match="divide the 4x4 block grid of split point 0"):
        ExperimentConfig(arms="lcma-region", region_size=3).validate()


def test_ablation_split_count_is_checked_from_the_shape() -> None:
    ExperimentConfig(command="ablate-levels", dataset="patches", levels=4).validate()
    config = ExperimentConfig(command="ablate-levels")
    with pytest.raises(ValueError, match="at most 4 split points"):
        config.replace(levels=6).check_shape((1, 64, 64))


def test_record_is_the_stored_config_and_round_trips() -> None:
    config = ExperimentConfig(quick=True, recipe="legacy")
    data = load_dataset("digits", limit=config.data_limit)
    record = config.record(data, 0.05, 3)
    assert list(record) == [
        "command",
        "dataset",
        "model",
        "size",
        "levels",
        "epochs",
        "nms_epochs",
        "seeds",
        "batch_size",
        "lr",
        "l2_scale",
        "grad_clip",
        "alpha",
        "levels_of_data",
        "shape",
        "num_train",
        "num_test",
        "limit",
        "quick",
    ]  # fmt: skip  (the legacy recipe: the record of earlier versions, so their folders match)
    assert record["limit"] is None and record["quick"] is True and record["seeds"] == [0, 1]
    assert record["grad_clip"] == 100.0
    assert "region_size" not in record  # only when not the default (old run folders match)
    assert "region_size" in config.replace(region_size=2).record(data, 0.05, 3)
    again = ExperimentConfig.from_record(record, out="/tmp/r")
    assert again.record(data, 0.05, 3) == record and again.levels == 3
    assert again.training_recipe == RECIPES["legacy"]
    # the default recipe records the fields that differ from the legacy one, and round-trips
    default = ExperimentConfig(quick=True).record(data, 0.05, 3)
    recipe = RECIPES[DEFAULT_RECIPE]
    legacy = RECIPES["legacy"].to_dict()
    changed = {k: v for k, v in recipe.to_dict().items() if v != legacy[k]}
    assert {k: default[k] for k in changed} == changed
    unchanged = [k for k in record if k not in changed]
    assert [k for k in default if k not in changed] == unchanged
    assert all(default[k] == record[k] for k in unchanged)
    restored = ExperimentConfig.from_record(default)
    assert restored.training_recipe == recipe and restored.record(data, 0.05, 3) == default


def test_the_recipe_is_one_switch_and_its_fields_override_it() -> None:
    assert ExperimentConfig().training_recipe == RECIPES[DEFAULT_RECIPE]
    assert ExperimentConfig(recipe="legacy").training_recipe == Recipe(
        warmup_steps=0, lr_schedule="constant", grad_clip=100.0, ema_decay=0.0
    )
    mixed = ExperimentConfig(recipe="legacy", ema_decay=0.9, warmup_steps=5)
    assert mixed.training_recipe == Recipe(
        warmup_steps=5, lr_schedule="constant", grad_clip=100.0, ema_decay=0.9
    )
    assert recipe_options(mixed.training_recipe) == (
        "--recipe legacy --warmup-steps 5 --ema-decay 0.9"
    )
    assert recipe_options(RECIPES["legacy"]) == "--recipe legacy"
    for bad, message in [
        ({"recipe": "fast"}, "expected recipe in default, legacy; got 'fast'"),
        ({"lr_schedule": "linear"}, "expected lr_schedule in constant, cosine; got 'linear'"),
        ({"ema_decay": 1.0}, r"expected ema_decay as a number in \[0, 1\); got 1.0"),
        ({"grad_clip": -1.0}, "expected grad_clip as a number >= 0; got -1.0"),
        ({"warmup_steps": 1.5}, "expected warmup_steps as an integer >= 0; got 1.5"),
    ]:
        with pytest.raises(ValueError, match=message):
            ExperimentConfig(**bad).validate()
