"""The arm vocabulary: every arm name parsed once, the name tuples, and the arm registry.

An arm name is read in one place, :meth:`ArmName.parse`: ``"lcma-region+cond"`` is a split
arm whose split at every split point is ``SplitSpec.parse("lcma-region")``
(:class:`lcma_ext.splits.SplitSpec`) and whose factored halves have Glow's conditional prior.
The kinds of arm:

``split``
    A split name of :data:`lcma_ext.splits.SPLIT_NAMES` or
    :data:`lcma_ext.splits.GRANULAR_SPLIT_NAMES` (:data:`ARMS`, :data:`GRANULARITY_ARMS`),
    optionally ending in :data:`PRIOR_SUFFIX` (:data:`CONDITIONAL_ARMS`). Its prior is
    ``ExperimentConfig.prior`` (``None`` here) unless the suffix fixes it to ``"conditional"``.
``ablation``
    One ``high``/``low`` choice per split point joined by ``-`` (``"low-high"``, Table 4):
    ``SplitSpec.parse("high")`` or ``SplitSpec.parse("lcma")`` at each split point.
``latent``
    The latent-shaping arms :data:`LATENT_ARMS` (their own prior or squeeze, no split choice).
``self``
    The self-estimated arms :data:`SELF_ARMS` (built as the ``channel`` arm, then re-split
    from their own contributions while they train).
``custom``
    An arm registered under another name (:func:`register_arm`); what it is, its builder says.

The registry maps an arm name to its :class:`ArmSpec` (builder, trainer, prior); the built-in
arms (:data:`BUILTIN_ARMS`) are registered by :mod:`lcma_ext.experiments.arms`, which imports
this module, never the other way round, so :mod:`lcma_ext.experiments.config` validates names
and checks shapes from here without importing the builders.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lcma_ext.splits import DEFAULT_REGION_SIZE, GRANULAR_SPLIT_NAMES, SPLIT_NAMES, SplitSpec
from lcma_ext.transforms.factor_prior import PRIORS

if TYPE_CHECKING:
    from nflows.flows import Flow

    from lcma_ext.contributions import ContributionMaps
    from lcma_ext.experiments.config import ExperimentConfig
    from lcma_ext.experiments.jobs import ArmTrainer

__all__ = [
    "ARMS",
    "BUILTIN_ARMS",
    "CONDITIONAL_ARMS",
    "GRANULARITY_ARMS",
    "LATENT_ARMS",
    "LISTED_ARMS",
    "MAX_ABLATION_SPLITS",
    "PRIOR_SUFFIX",
    "SELF_ARMS",
    "STATIC_ARMS",
    "VAE_ARMS",
    "VAE_REDUCTIONS",
    "ArmBuilder",
    "ArmName",
    "ArmSpec",
    "ablation_choices",
    "ablation_splits",
    "arm_name",
    "arm_prior",
    "arm_spec",
    "base_arm",
    "choice_name",
    "parse_arms",
    "register_arm",
    "registered_arms",
]

#: The split arms ``run`` trains by default, in training order: LCMA first, then the other
#: split names of :data:`lcma_ext.splits.SPLIT_NAMES`.
ARMS: tuple[str, ...] = ("lcma", *(name for name in SPLIT_NAMES if name != "lcma"))
#: Arms that ``arms`` also accepts (not run by default): LCMA with a coarser granularity.
GRANULARITY_ARMS: tuple[str, ...] = GRANULAR_SPLIT_NAMES
#: An arm name ending in this is the split arm before it with Glow's conditional prior of the
#: factored halves (``lcma+cond``), whatever ``prior`` says: one run compares both priors.
PRIOR_SUFFIX = "+cond"
#: The split arms with Glow's conditional prior (not run by default).
CONDITIONAL_ARMS: tuple[str, ...] = tuple(arm + PRIOR_SUFFIX for arm in (*ARMS, *GRANULARITY_ARMS))
#: ``R`` of the Flow-VAE arms ``flow-vae-R`` (paper 001 Sec. 3.1: dim(eps) = D / R).
VAE_REDUCTIONS: tuple[int, ...] = (16, 4, 2)
#: Flow-VAE arms: the ``channel`` arm's flow with a VAE prior; ``flow-vae`` in ``arms`` means
#: all three.
VAE_ARMS: tuple[str, ...] = tuple(f"flow-vae-{reduction}" for reduction in VAE_REDUCTIONS)
#: Latent-shaping arms (not run by default), see docs/latent_shaping.md.
LATENT_ARMS: tuple[str, ...] = (*VAE_ARMS, "denseflow", "haar")
#: Arms whose split is re-chosen from the contributions of the model being trained (not run by
#: default), see :mod:`lcma_ext.experiments.self_estimation` and docs/science.md.
SELF_ARMS: tuple[str, ...] = ("lcma-self", "lcma-reestimate")
#: The arms a user picks from (``--arms``; the ``+cond`` and ablation names besides).
LISTED_ARMS: tuple[str, ...] = (*ARMS, *GRANULARITY_ARMS, *LATENT_ARMS, *SELF_ARMS)
#: The split arms whose split does not come from a ranking of the contributions' low half: the
#: candidates of the best static split (:func:`lcma_ext.experiments.stats.best_static`).
STATIC_ARMS: tuple[str, ...] = ("channel", "checkerboard", "random", "high")
#: Most split points ``ablate-levels`` accepts (2^4 = 16 arms).
MAX_ABLATION_SPLITS = 4
#: ``ablate-levels``' two sides of a split point and the split name each stands for.
_SIDES = {"high": "high", "low": "lcma"}

#: The kinds of arm (:attr:`ArmName.kind`).
ArmKind = Literal["split", "ablation", "latent", "self", "custom"]
#: ``builder(config, maps, seed) -> Flow``.
ArmBuilder = Callable[["ExperimentConfig", "ContributionMaps", int], "Flow"]


def base_arm(name: str) -> str:
    """The arm without the :data:`PRIOR_SUFFIX`: ``"lcma+cond"`` -> ``"lcma"``."""
    return name.removesuffix(PRIOR_SUFFIX)


def choice_name(choice: Sequence[str]) -> str:
    """``("low", "high")`` -> ``"low-high"``."""
    return "-".join(choice)


def ablation_choices(num_splits: int) -> list[tuple[str, ...]]:
    """Every high/low choice over ``num_splits`` split points, in training order."""
    return list(itertools.product(("high", "low"), repeat=num_splits))


def ablation_splits(choice: Sequence[str]) -> tuple[SplitSpec, ...]:
    """The splits of ``ablate-levels``' choice: ``"lcma"`` for ``"low"``, ``"high"`` for ``"high"``.

    Raises:
        ValueError: for an empty choice or a side other than ``"high"``/``"low"``.
    """
    choice = tuple(choice)
    if not choice or any(side not in _SIDES for side in choice):
        raise ValueError(f"expected a sequence of 'high'/'low'; got {choice!r}")
    return tuple(SplitSpec.parse(_SIDES[side]) for side in choice)


def parse_arms(arms: str | Sequence[str]) -> tuple[str, ...]:
    """``"lcma,flow-vae"`` or a sequence -> a tuple of arm names (``flow-vae`` expanded, deduped).

    Names are not checked here (see :meth:`lcma_ext.experiments.ExperimentConfig.validate`).
    """
    items = arms.split(",") if isinstance(arms, str) else list(arms)
    names = tuple(str(a).strip() for a in items if str(a).strip())
    names = tuple(x for a in names for x in (VAE_ARMS if a == "flow-vae" else (a,)))
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ArmName:
    """An arm name parsed once: its kind, its split(s) and the prior of its factored halves.

    Attributes:
        name: The arm's name.
        kind: ``"split"``, ``"ablation"``, ``"latent"``, ``"self"`` or ``"custom"`` (see the
            module docstring).
        split: The split of every split point (a split arm; a self-estimated arm's first phase,
            ``channel``), one per split point (an ablation arm), or ``None`` (a latent or
            custom arm).
        prior: The prior of the factored halves: ``"standard"``, ``"conditional"``, or
            ``None`` for ``ExperimentConfig.prior`` (split and ablation arms without the suffix).
    """

    name: str
    kind: ArmKind
    split: SplitSpec | tuple[SplitSpec, ...] | None = None
    prior: str | None = "standard"

    @classmethod
    def parse(cls, name: str, region_size: int = DEFAULT_REGION_SIZE) -> ArmName:
        """The parse of a built-in arm name (every kind but ``"custom"``).

        Args:
            name: The arm's name, e.g. ``"lcma-region+cond"``, ``"low-high"``, ``"haar"``.
            region_size: Tile side of a ``*-region`` split (``ExperimentConfig.region_size``).

        Raises:
            ValueError: for a name outside the vocabulary (a registered custom arm included:
                see :func:`arm_name`).
        """
        base = base_arm(name)
        if base in SPLIT_NAMES + GRANULAR_SPLIT_NAMES:
            prior = "conditional" if name != base else None
            return cls(name, "split", SplitSpec.parse(base, region_size), prior)
        if name == base:
            if name in LATENT_ARMS:
                return cls(name, "latent")
            if name in SELF_ARMS:  # phase 0 is the channel arm's flow, standard priors only
                return cls(name, "self", SplitSpec.parse("channel", region_size))
            sides = name.split("-")
            if len(sides) <= MAX_ABLATION_SPLITS and all(side in _SIDES for side in sides):
                return cls(name, "ablation", ablation_splits(sides), None)
        raise ValueError(
            f"expected an arm name of {', '.join(LISTED_ARMS)}, a split arm ending in "
            f"{PRIOR_SUFFIX}, or high/low choices joined by '-'; got {name!r}"
        )

    @property
    def splits(self) -> tuple[SplitSpec, ...]:
        """The arm's split specs (one for every split point, or one per split point)."""
        if self.split is None:
            return ()
        return self.split if isinstance(self.split, tuple) else (self.split,)

    @property
    def uses_contributions(self) -> bool:
        """Whether its splits come from the NMS contributions."""
        return any(spec.needs_contributions for spec in self.splits)

    @property
    def has_region_split(self) -> bool:
        """Whether a split of the arm has region granularity (needs a tiling ``region_size``)."""
        return any(spec.granularity == "region" for spec in self.splits)

    def prior_under(self, config_prior: str) -> str:
        """The prior of the factored halves when ``ExperimentConfig.prior`` is ``config_prior``."""
        return config_prior if self.prior is None else self.prior


def _builtin_arms() -> Iterator[str]:
    for name in (*ARMS, *GRANULARITY_ARMS):
        yield name
        yield name + PRIOR_SUFFIX
    yield from LATENT_ARMS
    yield from SELF_ARMS
    for splits in range(1, MAX_ABLATION_SPLITS + 1):
        for choice in ablation_choices(splits):
            if choice_name(choice) not in ARMS:  # ("high",) is the "high" arm
                yield choice_name(choice)


#: Every built-in arm name, in registration order.
BUILTIN_ARMS: tuple[str, ...] = tuple(_builtin_arms())


# ----------------------------------------------------------------------------------------------
# the registry


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
    ``config.prior``, as :func:`lcma_ext.experiments.arms.split_arm` does);
    ``--prior conditional`` refuses an arm whose prior is fixed to ``"standard"``.

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


def registered_arms() -> tuple[str, ...]:
    """Every registered arm name, in registration order."""
    return tuple(_REGISTRY)


def arm_spec(name: str) -> ArmSpec:
    """The :class:`ArmSpec` of ``name`` (``ValueError`` for an unknown arm)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"expected a registered arm; got {name!r}") from None


def arm_name(name: str, region_size: int = DEFAULT_REGION_SIZE) -> ArmName:
    """The :class:`ArmName` of a built-in arm (:meth:`ArmName.parse`) or a registered one.

    A registered name outside the vocabulary is a ``"custom"`` arm with its registered prior.

    Raises:
        ValueError: for a name neither built in nor registered.
    """
    try:
        return ArmName.parse(name, region_size)
    except ValueError:
        if name not in _REGISTRY:
            raise
        return ArmName(name, "custom", prior=_REGISTRY[name].prior)


def arm_prior(config: ExperimentConfig, name: str) -> str:
    """The prior of arm ``name``'s factored halves under ``config`` (``"standard"`` or
    ``"conditional"``): the registered prior, or ``config.prior`` when it follows it."""
    prior = arm_spec(name).prior
    return config.prior if prior is None else prior
