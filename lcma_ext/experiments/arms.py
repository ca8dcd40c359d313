"""The arm registry: arm name -> builder ``(config, maps, seed) -> Flow``.

Every arm of ``lcma-ext run`` (the split arms, the granularity arms, the latent-shaping arms)
and every per-level high/low choice of ``lcma-ext ablate-levels`` is one entry. A builder gets
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
:data:`~lcma_ext.experiments.config.CONDITIONAL_ARMS`), so one run compares both priors;
``ExperimentConfig(prior="conditional")`` (``--prior conditional``) gives it to every split arm
instead (:func:`arm_prior`).

An arm that trains itself (in phases that change the split, say) also passes a ``trainer``
(:class:`lcma_ext.experiments.jobs.ArmTrainer`): the runner then hands it the built flow instead
of training it, and rebuilds its stored flow through :func:`restore_arm`. ``lcma-self`` and
``lcma-reestimate`` are registered so (:mod:`lcma_ext.experiments.self_estimation`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lcma_ext.experiments.config import (
    ARMS,
    GRANULARITY_ARMS,
    MAX_ABLATION_SPLITS,
    PRIOR_SUFFIX,
    PRIORS,
    SELF_ARMS,
    VAE_ARMS,
)
from lcma_ext.models import build_flow, make_level_factory

if TYPE_CHECKING:
    from nflows.flows import Flow

    from lcma_ext.contributions import ContributionMaps
    from lcma_ext.experiments.config import ExperimentConfig
    from lcma_ext.experiments.jobs import ArmTrainer

__all__ = [
    "ArmBuilder",
    "ArmSpec",
    "ablation_arm",
    "ablation_choices",
    "arm_prior",
    "arm_spec",
    "build_arm",
    "choice_name",
    "register_arm",
    "registered_arms",
    "restore_arm",
    "split_arm",
    "vae_arm",
]

#: ``builder(config, maps, seed) -> Flow``.
ArmBuilder = Callable[["ExperimentConfig", "ContributionMaps", int], "Flow"]


@dataclass(frozen=True)
class ArmSpec:
    """A registered arm.

    Attributes:
        name: The arm's name in ``arms``, results and file names.
        builder: ``builder(config, maps, seed) -> Flow``.
        uses_contributions: Whether its splits come from the NMS contributions (such an arm is
            labelled when the NMS pre-training diverged).
        trainer: ``None`` (the runner trains the built flow for the whole budget) or an
            :class:`~lcma_ext.experiments.jobs.ArmTrainer` that trains it itself.
        prior: The prior of its factored halves: ``"standard"`` (the standard normal),
            ``"conditional"`` (Glow's, the ``+cond`` arms), or ``None`` for
            ``ExperimentConfig.prior`` (the split arms; see :func:`arm_prior`).
    """

    name: str
    builder: ArmBuilder
    uses_contributions: bool = False
    trainer: ArmTrainer | None = None
    prior: str | None = "standard"


_REGISTRY: dict[str, ArmSpec] = {}


def register_arm(
    name: str,
    builder: ArmBuilder,
    *,
    uses_contributions: bool = False,
    replace: bool = False,
    trainer: ArmTrainer | None = None,
    prior: str | None = "standard",
) -> ArmSpec:
    """Register ``builder`` as arm ``name``; returns its :class:`ArmSpec`.

    ``prior`` says which prior of the factored halves the builder gives (``None``: it follows
    ``config.prior``, as :func:`split_arm` does); ``--prior conditional`` refuses an arm whose
    prior is fixed to ``"standard"``.

    Raises:
        ValueError: if ``name`` is taken (unless ``replace``) or contains a comma or a path
            separator, or for an unknown prior.
    """
    if prior is not None and prior not in PRIORS:
        raise ValueError(f"expected prior in {', '.join(PRIORS)} or None; got {prior!r}")
    if not name or any(c in name for c in ",/\\ ") or name == "nms":
        raise ValueError(f"expected an arm name without ',', '/', spaces, not 'nms'; got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"expected a new arm name; got {name!r} (already registered)")
    spec = ArmSpec(name, builder, uses_contributions, trainer, prior)
    _REGISTRY[name] = spec
    return spec


def arm_prior(config: ExperimentConfig, name: str) -> str:
    """The prior of arm ``name``'s factored halves under ``config`` (``"standard"`` or
    ``"conditional"``)."""
    prior = arm_spec(name).prior
    return config.prior if prior is None else prior


def registered_arms() -> tuple[str, ...]:
    """Every registered arm name, in registration order."""
    return tuple(_REGISTRY)


def arm_spec(name: str) -> ArmSpec:
    """The :class:`ArmSpec` of ``name`` (``ValueError`` for an unknown arm)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"expected a registered arm; got {name!r}") from None


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


def split_arm(split: str | Sequence[str], prior: str | None = None) -> ArmBuilder:
    """Builder of the multi-scale flow with ``split`` at every split point.

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
            split=split,
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


def _channel_flow(config: ExperimentConfig, maps: ContributionMaps, seed: int, squeeze=None):
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


def vae_arm(reduction: int) -> ArmBuilder:
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


def choice_name(choice: Sequence[str]) -> str:
    """``("low", "high")`` -> ``"low-high"``."""
    return "-".join(choice)


def ablation_choices(num_splits: int) -> list[tuple[str, ...]]:
    """Every high/low choice over ``num_splits`` split points, in training order."""
    return list(itertools.product(("high", "low"), repeat=num_splits))


def ablation_arm(choice: Sequence[str]) -> ArmBuilder:
    """Builder of ``ablate-levels``' arm ``choice``: factor out ``choice[l]`` at split ``l``.

    Split point ``l`` sees the NMS contributions of the dimensions that survived the earlier
    choices (Table 4's mixed high/low rows); all-low is LCMA, all-high the ``high`` arm.
    """
    choice = tuple(choice)
    if not choice or any(side not in ("high", "low") for side in choice):
        raise ValueError(f"expected a sequence of 'high'/'low'; got {choice!r}")
    # one split name per split point; survivors are tracked through each chosen split
    splits = ["lcma" if side == "low" else "high" for side in choice]

    def build(config: ExperimentConfig, maps: ContributionMaps, seed: int) -> Flow:
        num_levels = _levels(config, maps)
        if len(choice) != num_levels - 1:
            raise ValueError(
                f"expected {num_levels - 1} high/low choices for {num_levels} levels; got "
                f"{choice_name(choice)!r}"
            )
        return split_arm(splits)(config, maps, seed)

    return build


def _register_defaults() -> None:
    for name in (*ARMS, *GRANULARITY_ARMS):
        uses = name.startswith(("lcma", "high"))
        register_arm(name, split_arm(name), uses_contributions=uses, prior=None)
        conditional = split_arm(name, "conditional")
        register_arm(name + PRIOR_SUFFIX, conditional, uses_contributions=uses, prior="conditional")
    for name in VAE_ARMS:
        register_arm(name, vae_arm(int(name.rsplit("-", 1)[1])))
    register_arm("denseflow", _denseflow)
    register_arm("haar", _haar)
    from lcma_ext.experiments.self_estimation import PhasedTrainer

    for name in SELF_ARMS:  # phase 0 is the channel arm's flow, weights and batches
        trainer = PhasedTrainer(name == "lcma-reestimate")  # standard priors only
        register_arm(name, split_arm("channel", "standard"), trainer=trainer)
    for splits in range(1, MAX_ABLATION_SPLITS + 1):
        for choice in ablation_choices(splits):
            name = choice_name(choice)
            if name not in _REGISTRY:  # ("high",) is the "high" arm
                register_arm(name, ablation_arm(choice), uses_contributions=True, prior=None)


_register_defaults()
