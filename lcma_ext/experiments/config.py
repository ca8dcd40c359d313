"""``ExperimentConfig``: every option of ``lcma-ext run`` and ``lcma-ext ablate-levels``.

A plain dataclass (no argparse): the command line builds one from its arguments, a Python user
builds one directly. :meth:`ExperimentConfig.validate` checks everything that can be checked
before any training (names, numbers, the device, ``levels`` and the ``*-region`` tile against
the shape of the embedded datasets); :meth:`ExperimentConfig.check_shape` repeats the shape
checks once a dataset of unknown shape is loaded, still before the NMS pre-training. Arm names
are read through :mod:`lcma_ext.experiments.registry` (never the builders of
:mod:`lcma_ext.experiments.arms`); ``config.json`` (:meth:`ExperimentConfig.record`,
:meth:`ExperimentConfig.from_record`) follows the fields' metadata.

Example:
    >>> from lcma_ext.experiments import ExperimentConfig
    >>> config = ExperimentConfig(quick=True, out="/tmp/smoke", progress=False)
    >>> config.validate()
    >>> config.train_epochs, config.seed_list, config.data_limit
    (3, [0, 1], 512)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lcma_ext.data import (
    DATASETS,
    VISION_DATASETS,
    check_dataset_options,
    dataset_slug,
    npz_path,
)
from lcma_ext.experiments.registry import (
    ARMS,
    LISTED_ARMS,
    MAX_ABLATION_SPLITS,
    PRIOR_SUFFIX,
    ArmName,
    ablation_choices,
    arm_name,
    arm_prior,
    choice_name,
    parse_arms,
    registered_arms,
)
from lcma_ext.models import MODELS, SIZE_NAMES, default_num_levels, level_shapes, max_num_levels
from lcma_ext.splits import DEFAULT_REGION_SIZE, region_tile
from lcma_ext.training import (
    DEFAULT_RECIPE,
    LEGACY_RECIPE,
    PRECISIONS,
    RECIPE_FIELDS,
    RECIPES,
    Recipe,
)
from lcma_ext.transforms.factor_prior import PRIORS

__all__ = [
    "DEFAULTS",
    "FALLBACK_DEFAULTS",
    "QUICK",
    "ExperimentConfig",
    "recipe_flags",
    "recipe_options",
    "stored_recipe",
]

#: The commands an :class:`ExperimentConfig` describes.
_COMMANDS = ("run", "ablate-levels")
#: The arm every other arm is compared with (the first arm when it is not run).
_REFERENCE_ARM = "channel"

#: Per-dataset defaults (chosen so the digits default finishes in 10 minutes on a 2-core CPU).
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 30, "nms_epochs": 30, "seeds": 3},
    "patches": {"epochs": 10, "nms_epochs": 10, "seeds": 3},
}
FALLBACK_DEFAULTS: dict[str, Any] = {"epochs": 10, "nms_epochs": 10, "seeds": 3}
#: What ``quick`` sets (unless given explicitly): a smoke run of about a minute.
QUICK: dict[str, int] = {"epochs": 3, "nms_epochs": 3, "seeds": 2, "limit": 512}

#: ``precision`` choices (the keys of :data:`lcma_ext.training.PRECISIONS`).
PRECISION_CHOICES = tuple(PRECISIONS)
#: How ``config.json`` stores a field (the field's ``metadata[_STORED]``): ``"always"`` (levels,
#: epochs, nms_epochs and seeds resolved; a record without it is corrupt), ``"optional"``
#: (always; a record without it means the default) or ``"changed"`` (only when not the default:
#: fields newer than ``config.json``, so run folders of earlier versions still match). A field
#: without it is not part of a run's identity: where it runs, what it shows, and the recipe
#: fields, which ``config.json`` stores resolved (:func:`stored_recipe`).
_STORED = "stored"
_ALWAYS = {_STORED: "always"}
_OPTIONAL = {_STORED: "optional"}
_CHANGED = {_STORED: "changed"}

#: Event shapes known without loading the data (not ``imagefolder``'s).
KNOWN_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8),
    "patches": (3, 16, 16),
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "celeba": (3, 64, 64),
}


def _positive_int(value: Any, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@dataclass
class ExperimentConfig:
    """Every option of ``lcma-ext run`` / ``ablate-levels`` (field = option with underscores).

    ``None`` means the per-dataset default (:data:`DEFAULTS`), which ``quick`` replaces by
    :data:`QUICK`. The resolved values are the properties :attr:`train_epochs`,
    :attr:`nms_train_epochs`, :attr:`seed_list`, :attr:`data_limit`, :attr:`out_dir` and
    :meth:`num_levels`.

    Attributes:
        command: ``"run"`` (Algorithm 1, every arm of ``arms``) or ``"ablate-levels"`` (every
            high/low choice over the split points, Table 4).
        dataset, model, size: See :data:`lcma_ext.data.DATASETS`, :data:`lcma_ext.models.MODELS`
            and :data:`lcma_ext.models.SIZE_NAMES`; ``dataset`` may also be ``npz:PATH`` (see
            :func:`lcma_ext.data.load_npz_dataset`).
        levels: Levels (split points + 1); ``None``: as many squeezes as fit, at most 4.
        epochs, nms_epochs: Epochs per arm and of the NMS pre-training.
        seeds: Number of seeds (``0 .. seeds - 1``).
        batch_size: Images per optimizer step (identical for every arm).
        device: A torch device name.
        out: The run folder; ``None``: ``runs/<command>-<dataset>-<model>-<size>[-quick]``.
        data_root, limit, image_size: Data location (torchvision datasets), images per split,
            ImageFolder resize.
        outlier_gap: Flag a run more than this many bits/dim above its arm's median.
        quick: Smoke run: 512 images, 2 seeds, 3 epochs (explicit values still win).
        progress: Show progress bars and status lines.
        arms: ``run`` only: the arms to train
            (:func:`~lcma_ext.experiments.registry.parse_arms` accepts ``"a,b"``).
        region_size: Tile side of the ``*-region`` arms, capped at each split's grid.
        allow_diverged_nms: Go on after a diverged NMS pre-training (every arm built from its
            contributions is then labelled as such); by default a diverged NMS stops the run.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` training (``torch.autocast``; see
            :mod:`lcma_ext.training`); test bits/dim are scored in float32 either way.
        compile: Train through ``torch.compile``.
        workers: ``DataLoader`` worker processes.
        hflip: Random horizontal flips of the training images (off by default).
        reestimate_every: Epochs ``E`` of each phase of the self-estimated arms
            (:data:`~lcma_ext.experiments.registry.SELF_ARMS`: ``lcma-self`` switches its split
            once after ``E`` epochs, ``lcma-reestimate`` every ``E`` epochs); ``None``: a
            third of the epochs, at least 1 (:attr:`reestimate_epochs`).
        prior: Prior of the factored halves of the split arms: ``"standard"`` (default, the
            standard normal) or ``"conditional"`` (Glow's learned Gaussian given the kept half,
            :class:`lcma_ext.transforms.ConditionalGaussianPrior`). The ``+cond`` arms
            (:data:`~lcma_ext.experiments.registry.CONDITIONAL_ARMS`) have the conditional
            prior either way.
        recipe: The training recipe of every arm and of the NMS pre-training, a name of
            :data:`lcma_ext.training.RECIPES` (``"default"``; ``"legacy"``: the recipe of
            versions up to 0.2, Adam at a constant lr, the gradient norm clipped at 100, no
            warm-up, no EMA). The resolved recipe is :attr:`training_recipe`.
        lr, warmup_steps, lr_schedule, grad_clip, ema_decay: Override one field of ``recipe``
            (``None``: the recipe's value); see :class:`lcma_ext.training.Recipe`.
    """

    command: str = field(default="run", metadata=_ALWAYS)
    dataset: str = field(default="digits", metadata=_ALWAYS)
    model: str = field(default="realnvp", metadata=_ALWAYS)
    size: str = field(default="tiny", metadata=_ALWAYS)
    levels: int | None = field(default=None, metadata=_ALWAYS)
    epochs: int | None = field(default=None, metadata=_ALWAYS)
    nms_epochs: int | None = field(default=None, metadata=_ALWAYS)
    seeds: int | None = field(default=None, metadata=_ALWAYS)
    batch_size: int = field(default=64, metadata=_ALWAYS)
    lr: float | None = field(default=None, metadata=_ALWAYS)
    device: str = "cpu"
    out: Path | None = None
    data_root: Path | None = None
    limit: int | None = field(default=None, metadata=_OPTIONAL)
    image_size: int | None = None
    outlier_gap: float = 0.5
    quick: bool = field(default=False, metadata=_OPTIONAL)
    progress: bool = True
    arms: tuple[str, ...] = ARMS
    region_size: int = field(default=DEFAULT_REGION_SIZE, metadata=_CHANGED)
    allow_diverged_nms: bool = False
    precision: str = field(default="fp32", metadata=_CHANGED)
    compile: bool = field(default=False, metadata=_CHANGED)
    workers: int = 0
    hflip: bool = field(default=False, metadata=_CHANGED)
    reestimate_every: int | None = field(default=None, metadata=_CHANGED)
    prior: str = field(default="standard", metadata=_CHANGED)
    recipe: str = DEFAULT_RECIPE
    warmup_steps: int | None = None
    lr_schedule: str | None = None
    grad_clip: float | None = None
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.out is not None:
            if not str(self.out).strip():  # Path("") would be the current folder
                raise ValueError(f"expected out to name a run folder; got {str(self.out)!r}")
            self.out = Path(self.out)
        if self.data_root is not None:
            self.data_root = Path(self.data_root)
        self.arms = parse_arms(self.arms)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------
    # resolved values

    @property
    def _defaults(self) -> dict[str, Any]:
        defaults = dict(DEFAULTS.get(self.dataset, FALLBACK_DEFAULTS))
        if self.quick:
            defaults.update({k: v for k, v in QUICK.items() if k != "limit"})
        return defaults

    @property
    def train_epochs(self) -> int:
        """Epochs per arm."""
        return self.epochs or self._defaults["epochs"]

    @property
    def nms_train_epochs(self) -> int:
        """Epochs of the NMS pre-training."""
        return self.nms_epochs or self._defaults["nms_epochs"]

    @property
    def reestimate_epochs(self) -> int:
        """Epochs of each phase of the self-estimated arms (``reestimate_every`` or a third)."""
        return self.reestimate_every or max(1, self.train_epochs // 3)

    @property
    def training_recipe(self) -> Recipe:
        """``recipe`` with the fields given explicitly (raises ``ValueError`` when invalid)."""
        if self.recipe not in RECIPES:
            raise ValueError(f"expected recipe in {', '.join(RECIPES)}; got {self.recipe!r}")
        changes = {name: getattr(self, name) for name in RECIPE_FIELDS}
        return dataclasses.replace(
            RECIPES[self.recipe], **{k: v for k, v in changes.items() if v is not None}
        )

    @property
    def seed_list(self) -> list[int]:
        """The seeds ``0 .. seeds - 1``."""
        return list(range(self.seeds or self._defaults["seeds"]))

    @property
    def data_limit(self) -> int | None:
        """Images per split (``quick``: 512 unless ``limit`` is given)."""
        return self.limit or (QUICK["limit"] if self.quick else None)

    @property
    def out_dir(self) -> Path:
        """The run folder (by default, ``npz:PATH`` data appear in its name as ``npz-<stem>``)."""
        if self.out is not None:
            return self.out
        name = f"{self.command}-{dataset_slug(self.dataset)}-{self.model}-{self.size}"
        return Path("runs") / (name + ("-quick" if self.quick else ""))

    @property
    def torch_device(self) -> torch.device:
        """``device`` as a ``torch.device`` (raises ``ValueError`` when unusable)."""
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"expected a torch device such as cpu or cuda; got {self.device!r}"
            ) from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"expected an available device; got {self.device!r} (CUDA is not available)"
            )
        if device.type == "cuda" and device.index is not None:
            if device.index >= torch.cuda.device_count():
                raise ValueError(
                    f"expected an available device; got {self.device!r} "
                    f"({torch.cuda.device_count()} CUDA devices)"
                )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(
                f"expected an available device; got {self.device!r} (MPS is not available)"
            )
        return device

    def known_shape(self) -> tuple[int, ...] | None:
        """The dataset's event shape when it is known without loading the data, else ``None``."""
        return KNOWN_SHAPES.get(self.dataset)

    def num_levels(self, shape: Sequence[int]) -> int:
        """``levels``, or the default for images of ``shape``."""
        return self.levels if self.levels is not None else default_num_levels(shape)

    def arm_names(self, num_levels: int) -> tuple[str, ...]:
        """The arms this configuration trains, in training order."""
        if self.command == "ablate-levels":
            return tuple(choice_name(c) for c in ablation_choices(num_levels - 1))
        return self.arms

    def arm(self, name: str) -> ArmName:
        """The parse of arm ``name`` under this configuration (its ``region_size``)."""
        return arm_name(name, self.region_size)

    def reference_arm(self, num_levels: int) -> str:
        """The arm the paired differences are taken against."""
        if self.command == "ablate-levels":
            return choice_name(("low",) * (num_levels - 1))
        return _REFERENCE_ARM if _REFERENCE_ARM in self.arms else self.arms[0]

    # ------------------------------------------------------------------------------------------
    # validation

    def validate(self) -> None:
        """Raise ``ValueError`` ("expected ...; got ...") for anything wrong before training."""
        choices = {
            "command": (self.command, _COMMANDS),
            "model": (self.model, tuple(MODELS)),
            "size": (self.size, SIZE_NAMES),
            "prior": (self.prior, PRIORS),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"expected {name} in {', '.join(allowed)}; got {value!r}")
        if self.dataset not in DATASETS and npz_path(self.dataset) is None:
            raise ValueError(
                f"expected dataset in {', '.join(DATASETS)} or npz:PATH; got {self.dataset!r}"
            )
        check_dataset_options(self.dataset, self.image_size)
        counts = {
            "levels": (self.levels, 2),
            "epochs": (self.epochs, 1),
            "nms_epochs": (self.nms_epochs, 1),
            "seeds": (self.seeds, 1),
            "limit": (self.limit, 2),
            "image_size": (self.image_size, 2),
            "reestimate_every": (self.reestimate_every, 1),
        }
        for name, (count, minimum) in counts.items():
            if count is not None and not _positive_int(count, minimum):
                raise ValueError(f"expected {name} as an integer >= {minimum}; got {count!r}")
        if not _positive_int(self.batch_size):
            raise ValueError(f"expected batch_size as an integer >= 1; got {self.batch_size!r}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(
                f"expected precision in {', '.join(PRECISION_CHOICES)}; got {self.precision!r}"
            )
        if not _positive_int(self.workers, 0):
            raise ValueError(f"expected workers as an integer >= 0; got {self.workers!r}")
        if not _positive_int(self.region_size):
            raise ValueError(f"expected region_size as an integer >= 1; got {self.region_size!r}")
        for name in ("outlier_gap",):
            if not _positive_number(getattr(self, name)):
                raise ValueError(
                    f"expected {name} as a positive number; got {getattr(self, name)!r}"
                )
        self.torch_device  # noqa: B018 - raises for an unusable device
        self.training_recipe  # noqa: B018 - raises for an unknown recipe or a bad field
        if self.dataset in VISION_DATASETS and self.data_root is None:
            raise ValueError(f"expected --data-root for dataset {self.dataset!r}; got None")
        if self.command == "run":
            self._validate_arms()
        if self.prior != "standard":
            self._validate_prior()
        shape = self.known_shape()
        if shape is not None:
            self.check_shape(shape)

    def _validate_arms(self) -> None:
        known = registered_arms()
        unknown = [a for a in self.arms if a not in known]
        if not self.arms or unknown:
            raise ValueError(
                f"expected arms as a comma-separated subset of {','.join(LISTED_ARMS)} (or "
                f"flow-vae; a split arm may end in {PRIOR_SUFFIX}); got "
                f"{','.join(self.arms) or 'none'!r}"
            )
        if "haar" in self.arms and self.model not in ("realnvp", "glow"):
            raise ValueError(
                f"expected --model realnvp or glow for the haar arm; got {self.model!r}"
            )
        self_arms = [a for a in self.arms if arm_name(a).kind == "self"]
        if self_arms and self.reestimate_epochs >= self.train_epochs:
            raise ValueError(
                f"expected --reestimate-every below --epochs ({self.train_epochs}) for "
                f"{', '.join(self_arms)} (they switch the split after that many epochs); got "
                f"{self.reestimate_epochs}"
            )

    def _validate_prior(self) -> None:
        """Every arm must take ``prior`` (``ablate-levels``' arms all do)."""
        if self.command != "run":
            return
        fixed = [arm for arm in self.arms if arm_prior(self, arm) != self.prior]
        if fixed:
            raise ValueError(
                f"expected only split arms with --prior {self.prior} (it is the prior of their "
                f"factored halves); got {', '.join(fixed)}"
            )

    def check_shape(self, shape: Sequence[int]) -> None:
        """The checks that need the data's event ``shape``: levels, ablation size, region tiles."""
        shape = tuple(int(s) for s in shape)
        if max_num_levels(shape) < 2:
            raise ValueError(
                f"expected images of dataset {self.dataset!r} with height and width divisible by "
                f"4 (two squeezes); got shape {shape}"
            )
        if self.levels is not None and self.levels > max_num_levels(shape):
            raise ValueError(
                f"expected --levels <= {max_num_levels(shape)} for images of shape {shape}; "
                f"got {self.levels}"
            )
        num_levels = self.num_levels(shape)
        if self.command == "ablate-levels" and num_levels - 1 > MAX_ABLATION_SPLITS:
            raise ValueError(
                f"expected at most {MAX_ABLATION_SPLITS} split points (16 arms) for "
                f"ablate-levels; got {num_levels - 1} (pass a smaller --levels)"
            )
        if self.command == "run" and any(self.arm(a).has_region_split for a in self.arms):
            for step in level_shapes(shape, num_levels):
                if not step.is_split_point:
                    continue
                try:
                    region_tile(step.output_shape, self.region_size)
                except ValueError:
                    _, h, w = step.output_shape  # the split point's grid of local blocks
                    raise ValueError(
                        f"expected --region-size to divide the {h}x{w} block grid of split "
                        f"point {step.index} (capped at the grid); got {self.region_size}"
                    ) from None

    # ------------------------------------------------------------------------------------------
    # the stored configuration

    def record(self, data: Any, alpha: float, num_levels: int) -> dict[str, Any]:
        """``config.json``: what must match for a rerun to reuse finished runs.

        Args:
            data: The loaded :class:`lcma_ext.data.ImageDataset`.
            alpha: The logit pre-processing's ``alpha``.
            num_levels: The resolved number of levels.
        """
        from lcma_ext.training import TrainConfig

        recipe = self.training_recipe
        resolved = {
            "levels": num_levels,
            "epochs": self.train_epochs,
            "nms_epochs": self.nms_train_epochs,
            "seeds": self.seed_list,
            "lr": recipe.lr,
        }
        stored: dict[str, dict[str, Any]] = {"always": {}, "optional": {}, "changed": {}}
        for item in dataclasses.fields(self):
            kind, value = item.metadata.get(_STORED), getattr(self, item.name)
            if kind is not None and (kind != "changed" or value != item.default):
                stored[kind][item.name] = resolved.get(item.name, value)
        return {
            **stored["always"],
            "l2_scale": TrainConfig().l2_scale,
            "grad_clip": recipe.grad_clip,
            "alpha": alpha,
            "levels_of_data": data.levels,
            "shape": list(data.shape),
            "num_train": int(data.train.shape[0]),
            "num_test": int(data.test.shape[0]),
            **stored["optional"],
            **stored["changed"],  # only when not the default
            **_recipe_record(recipe),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], **overrides: Any) -> ExperimentConfig:
        """The configuration of a stored ``config.json`` (``out``, ``data_root`` etc. given).

        The training recipe is the stored one (:func:`stored_recipe`) under ``--recipe legacy``.

        Raises:
            KeyError: for a record without a field that every ``config.json`` has.
        """
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            kind = item.metadata.get(_STORED)
            if kind == "always":
                values[item.name] = record[item.name]
            elif kind is not None:
                values[item.name] = record.get(item.name, item.default)
        values["seeds"] = len(values["seeds"])  # stored as the list of seeds
        values.update({**stored_recipe(record).to_dict(), "recipe": "legacy", **overrides})
        return cls(**values)


def _recipe_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe fields ``config.json`` records besides ``lr`` and ``grad_clip`` (always
    recorded): those that differ from the legacy recipe, so run folders of earlier versions
    still match."""
    legacy = LEGACY_RECIPE.to_dict()
    return {
        key: value
        for key, value in recipe.to_dict().items()
        if key not in ("lr", "grad_clip") and value != legacy[key]
    }


def stored_recipe(record: dict[str, Any]) -> Recipe:
    """The training recipe of a stored ``config.json`` (fields it lacks: the legacy recipe's)."""
    legacy = LEGACY_RECIPE.to_dict()
    return Recipe(**{key: record.get(key, value) for key, value in legacy.items()})


def recipe_flags(recipe: Recipe, against: Recipe | None = None) -> list[str]:
    """``["--warmup-steps 100", ...]``: an option per field of ``recipe`` (:data:`RECIPE_FIELDS`),
    or per field that differs from ``against``."""
    base = None if against is None else against.to_dict()
    return [
        f"--{key.replace('_', '-')} {value:g}"
        if isinstance(value, float)
        else f"--{key.replace('_', '-')} {value}"
        for key, value in recipe.to_dict().items()
        if base is None or value != base[key]
    ]


def recipe_options(recipe: Recipe) -> str:
    """The command-line options that give ``recipe``: ``--recipe NAME`` when it is a named one,
    else ``--recipe legacy`` and the fields that differ from it."""
    for name, named in RECIPES.items():
        if named == recipe:
            return f"--recipe {name}"
    return " ".join(["--recipe legacy", *recipe_flags(recipe, LEGACY_RECIPE)])
