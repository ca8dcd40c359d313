"""The arm registry: every arm is one entry, builders seed torch, ablation choices, registration."""

from __future__ import annotations

import pytest
import torch
from nflows.flows import Flow

from lcma_ext.contributions import ContributionMaps
from lcma_ext.experiments import (
    ARMS,
    GRANULARITY_ARMS,
    LATENT_ARMS,
    ExperimentConfig,
    arm_spec,
    build_arm,
    register_arm,
    registered_arms,
)
from lcma_ext.experiments.arms import ablation_arm, split_arm

SHAPE = (1, 8, 8)
CONFIG = ExperimentConfig(levels=3)


def test_every_arm_of_today_is_registered() -> None:
    names = registered_arms()
    assert set(ARMS + GRANULARITY_ARMS + LATENT_ARMS) <= set(names)
    assert {"high-high", "high-low", "low-high", "low-low", "low", "low-low-low-low"} <= set(names)
    uses = {name for name in names if arm_spec(name).uses_contributions}
    assert {"lcma", "high", "lcma-region", "low-high"} <= uses
    assert not {"channel", "checkerboard", "random", "haar", "denseflow", "flow-vae-4"} & uses


@pytest.mark.parametrize("arm", [*ARMS, *GRANULARITY_ARMS, *LATENT_ARMS, "low-high"])
def test_builders_give_a_flow_of_the_data_shape(arm: str, maps: ContributionMaps) -> None:
    flow = build_arm(CONFIG, arm, maps, seed=1)
    with torch.no_grad():
        log_prob = flow.log_prob(torch.randn(2, *SHAPE))
    assert log_prob.shape == (2,)


def test_every_arm_of_a_seed_starts_from_the_same_weights(maps: ContributionMaps) -> None:
    def weights(arm: str, seed: int) -> list[torch.Tensor]:
        return [p.detach().clone() for p in build_arm(CONFIG, arm, maps, seed).parameters()]

    lcma, channel, again = weights("lcma", 3), weights("channel", 3), weights("lcma", 3)
    assert all(torch.equal(a, b) for a, b in zip(lcma, channel))
    assert all(torch.equal(a, b) for a, b in zip(lcma, again))
    assert not all(torch.equal(a, b) for a, b in zip(lcma, weights("lcma", 4)))


def test_ablation_all_low_is_lcma_and_all_high_is_high(maps: ContributionMaps) -> None:
    def indices(flow: Flow) -> list[torch.Tensor]:
        return [split.index for split in flow._transform.splits]

    low_low, low_high = (
        indices(build_arm(CONFIG, name, maps, 0)) for name in ("low-low", "low-high")
    )
    for name, arm in (("low-low", "lcma"), ("high-high", "high")):
        for a, b in zip(
            indices(build_arm(CONFIG, name, maps, 0)), indices(build_arm(CONFIG, arm, maps, 0))
        ):
            assert torch.equal(a, b)
    assert torch.equal(low_high[0], low_low[0]) and not torch.equal(low_high[1], low_low[1])


def test_ablation_arm_checks_its_choice(maps: ContributionMaps) -> None:
    with pytest.raises(ValueError, match="expected 2 high/low choices for 3 levels"):
        ablation_arm(("low",))(CONFIG, maps, 0)
    with pytest.raises(ValueError, match="'high'/'low'"):
        ablation_arm(("low", "middle"))


def test_register_arm_is_one_call(maps: ContributionMaps) -> None:
    name = "test-checkerboard-again"
    spec = register_arm(name, split_arm("checkerboard"))
    try:
        assert name in registered_arms() and not spec.uses_contributions
        ExperimentConfig(arms=("channel", name)).validate()
        flow = build_arm(CONFIG, name, maps, 0)
        reference = build_arm(CONFIG, "checkerboard", maps, 0)
        for a, b in zip(flow.parameters(), reference.parameters()):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="already registered"):
            register_arm(name, split_arm("channel"))
        with pytest.raises(ValueError, match="without ','"):
            register_arm("a,b", split_arm("channel"))
    finally:
        from lcma_ext.experiments import registry

        del registry._REGISTRY[name]
    with pytest.raises(ValueError, match="expected a registered arm"):
        arm_spec(name)


def test_haar_needs_realnvp_or_glow(maps: ContributionMaps) -> None:
    with pytest.raises(ValueError, match="expected --model realnvp or glow for the haar arm"):
        build_arm(CONFIG.replace(model="iresnet"), "haar", maps, 0)
