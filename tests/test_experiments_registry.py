"""The arm vocabulary: every arm name parsed once (lcma_ext.experiments.registry)."""

from __future__ import annotations

import pytest

from lcma_ext.experiments import ExperimentConfig, arm_spec, registered_arms
from lcma_ext.experiments.arms import split_arm
from lcma_ext.experiments.registry import (
    ARMS,
    BUILTIN_ARMS,
    CONDITIONAL_ARMS,
    GRANULARITY_ARMS,
    LATENT_ARMS,
    SELF_ARMS,
    ArmName,
    arm_name,
    register_arm,
)
from lcma_ext.splits import GRANULAR_SPLIT_NAMES, SPLIT_NAMES, SplitSpec


def test_a_conditional_region_arm_is_a_split_spec_and_a_prior() -> None:
    arm = ArmName.parse("lcma-region+cond", region_size=2)
    assert arm.kind == "split" and arm.prior == "conditional"
    assert arm.split == SplitSpec("lcma", "low", "region", 2)
    assert arm.uses_contributions and arm.has_region_split
    assert arm.prior_under("standard") == "conditional"
    plain = ArmName.parse("random")
    assert (plain.kind, plain.split, plain.prior) == ("split", SplitSpec("random"), None)
    assert plain.prior_under("conditional") == "conditional"
    assert not plain.uses_contributions and not plain.has_region_split


def test_every_kind_parses() -> None:
    ablation = ArmName.parse("low-high")
    assert ablation.kind == "ablation" and ablation.prior is None
    assert ablation.split == (SplitSpec("lcma"), SplitSpec("lcma", "high"))
    assert ArmName.parse("low").splits == (SplitSpec("lcma"),)
    assert ArmName.parse("high").kind == "split"  # ("high",) is the high arm
    for name in LATENT_ARMS:
        latent = ArmName.parse(name)
        assert (latent.kind, latent.split, latent.prior) == ("latent", None, "standard")
    for name in SELF_ARMS:
        arm = ArmName.parse(name)
        assert (arm.kind, arm.split, arm.prior) == ("self", SplitSpec("channel"), "standard")


@pytest.mark.parametrize(
    "name", ["foo", "haar+cond", "low-high+cond", "lcma-self+cond", "low-low-low-low-low", ""]
)
def test_names_outside_the_vocabulary_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="expected an arm name of lcma,"):
        ArmName.parse(name)


def test_the_name_tuples_have_one_home() -> None:
    assert set(ARMS) == set(SPLIT_NAMES) and ARMS[0] == "lcma"
    assert GRANULARITY_ARMS == GRANULAR_SPLIT_NAMES
    assert CONDITIONAL_ARMS == tuple(f"{a}+cond" for a in (*ARMS, *GRANULARITY_ARMS))


def test_registration_derives_from_the_parse() -> None:
    assert registered_arms()[: len(BUILTIN_ARMS)] == BUILTIN_ARMS
    assert len(BUILTIN_ARMS) == 18 + 5 + 2 + (2 + 4 + 8 + 16 - 1)
    for name in BUILTIN_ARMS:
        arm, spec = ArmName.parse(name), arm_spec(name)
        assert spec.prior == arm.prior and spec.uses_contributions == arm.uses_contributions
        assert (spec.trainer is not None) == (arm.kind == "self")


def test_a_registered_arm_outside_the_vocabulary_is_custom() -> None:
    from lcma_ext.experiments import registry

    name = "test-registry-custom"
    register_arm(name, split_arm("checkerboard", "conditional"), prior="conditional")
    try:
        arm = arm_name(name)
        assert (arm.kind, arm.split, arm.prior) == ("custom", None, "conditional")
        ExperimentConfig(arms=("channel", name)).validate()
        assert ExperimentConfig(arms=(name,)).arm(name) == arm
    finally:
        del registry._REGISTRY[name]
    with pytest.raises(ValueError, match="expected an arm name"):
        arm_name(name)


def test_the_configuration_parses_with_its_region_size() -> None:
    config = ExperimentConfig(arms=("lcma-region",), region_size=2)
    assert config.arm("lcma-region").split == SplitSpec("lcma", "low", "region", 2)
    assert config.reference_arm(3) == "lcma-region"
    ablate = ExperimentConfig(command="ablate-levels")
    assert ablate.reference_arm(4) == "low-low-low"
    assert ablate.arm_names(3) == ("high-high", "high-low", "low-high", "low-low")
