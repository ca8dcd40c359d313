"""The builders of the arms: arm name -> ``(config, maps, seed) -> Flow``, registered once.

Every arm of ``lcma-ext run`` (the split arms, the granularity arms, the latent-shaping arms)
and every per-level high/low choice of ``lcma-ext ablate-levels`` is one entry of the registry
(:mod:`lcma_ext.experiments.registry`); its builder and options derive from the arm's parsed
name (:class:`~lcma_ext.experiments.registry.ArmName`). A builder gets
the resolved :class:`~lcma_ext.experiments.ExperimentConfig` (``levels`` set), the NMS
:class:`~lcma_ext.contributions.ContributionMaps` (their ``input_shape`` is the data's event
shape) and the seed, and returns an untrained nflows ``Flow`` on the CPU; the runner moves it to
the device. Builders seed torch themselves (``torch.manual_seed(seed)`` right before the levels
are built), so every arm of a seed starts from the same weights.

Adding an arm is one registration::

    from lcma_ext.experiments import register_arm
    from lcma_ext.experiments.arms import split_arm

    register_arm("my-arm", split_arm("checkerboard"))   # then ExperimentConfig(arms=("my-arm",))

Every split arm also exists with Glow's conditional prior of the factored halves, named with
the suffix ``+cond`` (``lcma+cond``, ``channel+cond``, ...:
:data:`~lcma_ext.experiments.registry.CONDITIONAL_ARMS`), so one run compares both priors;
``ExperimentConfig(prior="conditional")`` (``--prior conditional``) gives it to every split arm
instead (:func:`~lcma_ext.experiments.registry.arm_prior`).

An arm that trains itself (in phases that change the split, say) also passes a ``trainer``
(:class:`lcma_ext.experiments.jobs.ArmTrainer`): the runner then hands it the built flow instead
of training it, and rebuilds its stored flow through :func:`restore_arm`. ``lcma-self`` and
``lcma-reestimate`` are registered so (:mod:`lcma_ext.experiments.self_estimation`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lcma_ext.experiments.registry import (
    BUILTIN_ARMS,
    VAE_REDUCTIONS,
    ArmBuilder,
    ArmName,
    ablation_splits,
    arm_spec,
    choice_name,
    register_arm,
)
from lcma_ext.models import build_flow, make_level_factory
from lcma_ext.splits import SplitSpec

if TYPE_CHECKING:
    from nflows.flows import Flow

    from lcma_ext.contributions import ContributionMaps
    from lcma_ext.experiments.config import ExperimentConfig
    from lcma_ext.experiments.jobs import ArmTrainer

__all__ = [
    "ablation_arm",
    "build_arm",
    "restore_arm",
    "split_arm",
]

#: A split name or spec for every split point, or one per split point.
Splits = str | SplitSpec | Sequence[str | SplitSpec]


def build_arm(config: ExperimentConfig, name: str, maps: ContributionMaps, seed: int) -> Flow:
    """Build arm ``name`` (untrained, on the CPU) with its registered builder."""
    return arm_spec(name).builder(config, maps, seed)


def restore_arm(name: str, flow: Flow, state: dict[str, Any]) -> Flow:
    """The stored flow of arm ``name``: its built ``flow`` with the checkpoint ``state`` loaded.

    An arm with a trainer rebuilds it through :meth:`ArmTrainer.restore` (its split may differ
    from the builder's); any other arm loads the evaluated weights of its
    :func:`~lcma_ext.training.train_flow` checkpoint
    (:func:`~lcma_ext.training.evaluation_state_dict`: the EMA parameters when the recipe has
    one) into ``flow``.
    """
    from lcma_ext.training import evaluation_state_dict

    trainer = arm_spec(name).trainer
    if trainer is not None:
        return trainer.restore(flow, state)
    flow.load_state_dict(evaluation_state_dict(state))
    return flow


def _shape(maps: ContributionMaps) -> tuple[int, ...]:
    return tuple(int(s) for s in maps.input_shape)


def _levels(config: ExperimentConfig, maps: ContributionMaps) -> int:
    return config.levels if config.levels is not None else maps.num_levels


# ----------------------------------------------------------------------------------------------
# split and granularity arms


def _sized(split: Splits, region_size: int) -> SplitSpec | list[SplitSpec]:
    """``split`` as spec(s) with ``region_size`` (the configuration's ``*-region`` tile side)."""

    def one(item: str | SplitSpec) -> SplitSpec:
        if isinstance(item, SplitSpec):
            return dataclasses.replace(item, region_size=region_size)
        return SplitSpec.parse(item, region_size)

    if isinstance(split, (str, SplitSpec)):
        return one(split)
    return [one(item) for item in split]


def split_arm(split: Splits, prior: str | None = None) -> ArmBuilder:
    """Builder of the multi-scale flow with ``split`` at every split point.

    ``split`` is a split name or :class:`~lcma_ext.splits.SplitSpec` for every split point, or
    one per split point; a ``*-region`` split gets ``config.region_size``.
    The levels are built after ``torch.manual_seed(seed)``; the NMS contributions are mapped onto
    them (``remap=True``: a Glow level's random 1x1-convolution permutation may differ from the
    measured levels'). ``seed`` also seeds the ``random`` split. The factored halves get
    ``prior`` (``None``: ``config.prior``); Glow's conditional prior is built after the levels,
    zero-initialised, so the ``+cond`` arm of a seed starts from the same function and level
    weights as its standard arm.
    """

    def build(config: ExperimentConfig, maps: ContributionMaps, seed: int) -> Flow:
        from lcma_ext.pipeline import build_levels, build_multiscale_transform

        shape, num_levels = _shape(maps), _levels(config, maps)
        factory = make_level_factory(config.model, config.size)
        torch.manual_seed(seed)
        levels = build_levels(factory, shape, num_levels)
        transform = build_multiscale_transform(
            factory,
            shape,
            num_levels,
            split=_sized(split, config.region_size),
            contributions=maps,
            seed=seed,
            levels=levels,
            remap=True,
            region_size=config.region_size,
            prior=config.prior if prior is None else prior,
        )
        return build_flow(transform, shape)

    return build


# ----------------------------------------------------------------------------------------------
# latent-shaping arms (docs/latent_shaping.md)


def _channel_flow(
    config: ExperimentConfig, maps: ContributionMaps, seed: int, squeeze: str | None = None
) -> Flow:
    """The ``channel`` arm's flow (optionally with another squeeze), built as it is."""
    from lcma_ext.pipeline import build_levels, build_multiscale_transform

    shape, num_levels = _shape(maps), _levels(config, maps)
    if squeeze is None:
        factory = make_level_factory(config.model, config.size)
    else:
        factory = make_level_factory(config.model, config.size, squeeze=squeeze)
    torch.manual_seed(seed)
    levels = build_levels(factory, shape, num_levels)
    transform = build_multiscale_transform(
        factory, shape, num_levels, split="channel", seed=seed, levels=levels
    )
    return build_flow(transform, shape)


def _vae_arm(reduction: int) -> ArmBuilder:
    """``flow-vae-R``: the ``channel`` arm's flow and weights, a VAE prior of dim(eps) = D / R."""

    def build(config: ExperimentConfig, maps: ContributionMaps, seed: int) -> Flow:
        from nflows.flows import Flow

        from lcma_ext.distributions import VAEPrior

        flow = _channel_flow(config, maps, seed)
        features = math.prod(_shape(maps))
        latent_dim = max(1, features // reduction)
        return Flow(flow._transform, VAEPrior(features, latent_dim))

    return build


def _denseflow(config: ExperimentConfig, maps: ContributionMaps, seed: int) -> Flow:
    """``denseflow``: a DenseFlow-style Glow model with cross-unit coupling, at ``size``."""
    from lcma_ext.models.denseflow import build_denseflow

    torch.manual_seed(seed)
    return build_denseflow(_shape(maps), _levels(config, maps), config.size)


def _haar(config: ExperimentConfig, maps: ContributionMaps, seed: int) -> Flow:
    """``haar``: the ``channel`` arm with Haar-wavelet squeezes (RealNVP or Glow only)."""
    if config.model not in ("realnvp", "glow"):
        raise ValueError(f"expected --model realnvp or glow for the haar arm; got {config.model!r}")
    return _channel_flow(config, maps, seed, squeeze="haar")


# ----------------------------------------------------------------------------------------------
# ablate-levels: one high/low choice per split point (Table 4)


def _per_point_arm(name: str, splits: Sequence[SplitSpec], prior: str | None) -> ArmBuilder:
    """:func:`split_arm` of one split per split point; the levels must have that many."""

    def build(config: ExperimentConfig, maps: ContributionMaps, seed: int) -> Flow:
        num_levels = _levels(config, maps)
        if len(splits) != num_levels - 1:
            raise ValueError(
                f"expected {num_levels - 1} high/low choices for {num_levels} levels; got {name!r}"
            )
        return split_arm(splits, prior)(config, maps, seed)

    return build


def ablation_arm(choice: Sequence[str]) -> ArmBuilder:
    """Builder of ``ablate-levels``' arm ``choice``: factor out ``choice[l]`` at split ``l``.

    Split point ``l`` sees the NMS contributions of the dimensions that survived the earlier
    choices (Table 4's mixed high/low rows); all-low is LCMA, all-high the ``high`` arm.

    Raises:
        ValueError: for an empty choice or a side other than ``"high"``/``"low"``; the builder
            for a choice whose length is not the number of split points.
    """
    return _per_point_arm(choice_name(choice), ablation_splits(choice), None)


#: The builders of the latent-shaping arms (docs/latent_shaping.md).
_LATENT_BUILDERS: dict[str, ArmBuilder] = {
    **{f"flow-vae-{reduction}": _vae_arm(reduction) for reduction in VAE_REDUCTIONS},
    "denseflow": _denseflow,
    "haar": _haar,
}


def _register(arm: ArmName) -> None:
    """Register a built-in arm: its builder, trainer and options derive from its parse."""
    trainer: ArmTrainer | None = None
    if arm.kind == "latent":
        builder = _LATENT_BUILDERS[arm.name]
    elif arm.kind == "ablation":
        builder = _per_point_arm(arm.name, arm.splits, arm.prior)
    else:  # a split arm, or a self-estimated arm's first phase (the channel arm): one spec
        builder = split_arm(arm.splits[0], arm.prior)
    if arm.kind == "self":
        from lcma_ext.experiments.self_estimation import PhasedTrainer

        trainer = PhasedTrainer(repeat=arm.name == "lcma-reestimate")
    register_arm(
        arm.name,
        builder,
        uses_contributions=arm.uses_contributions,
        trainer=trainer,
        prior=arm.prior,
    )


for _name in BUILTIN_ARMS:
    _register(ArmName.parse(_name))
