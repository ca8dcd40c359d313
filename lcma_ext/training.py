"""Maximum-likelihood training of flows on integer images, test bits/dim, and checkpoints.

The loss is the mean bits/dim of a batch (dequantization noise redrawn every batch, see
:mod:`lcma_ext.data.preprocess`) plus ``l2_scale`` times the squared norm of the nets' weight-norm
scales (paper 001, Sec. 4: Adam, L2 5e-5 on the weight scale parameters, batch 64).

A run never crashes on divergence: a non-finite loss stops it and marks it ``diverged`` (the
result keeps the epoch and the step). After every epoch the model, the optimizer, the epoch, the
learning curves and every random state (the data order and noise generator, the loader's
generator, torch's CPU and CUDA generators of every rank) are written atomically to
``checkpoint_path``, so an interrupted run resumes where it stopped and ends with the same
figures as an uninterrupted one. numpy's and Python's random states are not used in training.

The training recipe (``TrainConfig`` fields, one :class:`Recipe`; named recipes in
:data:`RECIPES`, the default :data:`DEFAULT_RECIPE`):

- ``warmup_steps``: the learning rate rises linearly over the first optimizer steps
  (``lr (s + 1) / warmup_steps`` at step ``s``);
- ``lr_schedule``: ``"constant"``, or ``"cosine"``: after the warm-up the learning rate falls
  as ``lr (1 + cos(pi t)) / 2``, ``t`` going from 0 to 1 over the remaining optimizer steps of
  the whole run (``schedule_epochs`` epochs of the training data, see :func:`lr_factor`);
  ``torch.optim.lr_scheduler.LambdaLR`` applies it;
- ``grad_clip``: the global gradient norm is clipped to this (``get_total_norm`` and
  ``clip_grads_with_norm_``, the two halves of ``clip_grad_norm_``; the gradients are scaled
  only when the norm exceeds the limit); the steps it clipped are counted
  (``TrainResult.clipped_steps``); ``0`` disables clipping (and the non-finite-gradient check
  that comes with it);
- ``ema_decay``: an exponential moving average of the parameters (:class:`ParameterEMA`,
  ``torch.optim.swa_utils.get_ema_multi_avg_fn``'s update) is what is evaluated: the test
  bits/dim of the learning curve and the weights :func:`train_flow` leaves in the flow. Buffers
  (split permutations, ActNorm flags, power-iteration vectors) are never averaged: the live
  model's are used. ``0`` disables it.

:data:`RECIPES` ``["legacy"]`` is the recipe of versions up to 0.2 (Adam at a constant learning
rate, no warm-up, no EMA, the gradient norm clipped at 100); it reproduces their figures bit
for bit.

**What the flow holds after** :func:`train_flow`: the *evaluation* weights (the EMA parameters
with the live buffers; the trained parameters without EMA). The raw training state (the
parameters the optimizer updates) is the checkpoint's ``"model"``, the EMA its ``"ema"``, so a
resumed run, or a later phase of a phased trainer, continues from the raw weights;
:func:`evaluation_state_dict` turns a checkpoint into the evaluated weights.

Scale-out (``TrainConfig`` fields):

- ``precision``: ``"bf16"`` or ``"fp16"`` runs the flow's transform under ``torch.autocast``
  (fp16 with a ``torch.amp.GradScaler``); the base log-density is computed on float32 latents and
  the summed log-determinant is cast to float32 before they are added. Test bits/dim are always
  scored in the flow's own dtype.
- ``compile``: the training step's log-density goes through ``torch.compile``.
- ``torch.distributed``: when a process group is initialised (``torchrun``, see
  :mod:`lcma_ext.distributed`), the flow is wrapped in ``DistributedDataParallel``, every rank
  takes ``batch_size / world_size`` images of each global batch from a ``DistributedSampler``,
  and the dequantization noise (and flips) of the whole global batch are drawn on every rank from
  the same generator, each rank keeping its rows ``rank, rank + W, ...``. So a run of ``W`` ranks
  takes the steps a one-rank run (``torchrun --nproc_per_node 1``) takes, to float tolerance.
  Data-dependent initialisation (ActNorm) runs once on the whole first global batch before the
  wrap, and ``DistributedDataParallel`` broadcasts rank 0's parameters and buffers (also the
  Lipschitz power-iteration vectors, at every forward), so every rank holds the same state.
  Ranks other than 0 reseed torch's global generator (Hutchinson probes and roulette terms of
  residual flows) with ``1_000_003 * rank + seed``, so their estimates are independent.

References:
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 4.
    D. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
    I. Loshchilov, F. Hutter. SGDR: Stochastic Gradient Descent with Warm Restarts. ICLR 2017
    (the cosine schedule).
    R. Chen, J. Behrmann, D. Duvenaud, J.-H. Jacobsen. Residual Flows for Invertible Generative
    Modeling. NeurIPS 2019 (learning-rate warm-up, EMA of the weights evaluated).
    S. Zhai et al. Normalizing Flows are Capable Generative Models (TarFlow). 2024 (warm-up and
    a cosine schedule).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from nflows.flows import Flow
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm.auto import tqdm

from lcma_ext.data.loading import image_loader, set_loader_epoch
from lcma_ext.data.preprocess import LogitPreprocessing
from lcma_ext.distributed import World, all_gather_objects, all_reduce_sum, barrier, world
from lcma_ext.flows import eval_mode, flow_dtype_device, flow_parts
from lcma_ext.models.nets import scale_parameters
from lcma_ext.storage import atomic_save, load_stamped, stamped

__all__ = [
    "DEFAULT_RECIPE",
    "EVAL_NOISE_SEED",
    "LEGACY_RECIPE",
    "LR_SCHEDULES",
    "PRECISIONS",
    "RECIPES",
    "RECIPE_FIELDS",
    "ParameterEMA",
    "Recipe",
    "TrainConfig",
    "TrainResult",
    "evaluate_bpd",
    "evaluation_state_dict",
    "load_checkpoint",
    "lr_factor",
    "save_checkpoint",
    "train_flow",
]

#: Seed of the dequantization noise used for every test evaluation, so all arms and seeds are
#: scored on the same dequantized test set (paired comparisons).
EVAL_NOISE_SEED = 2024

#: ``--precision`` choices and the autocast dtype of each (``None``: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

#: Ranks other than 0 reseed torch's global generator with ``RANK_SEED_STRIDE * rank + seed``.
RANK_SEED_STRIDE = 1_000_003

ImageBatchesLike = Tensor | Iterable[Any]

#: ``lr_schedule`` choices.
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The training recipe: learning rate, warm-up, schedule, clipping and EMA (see the module
    docstring).

    Attributes:
        lr: Adam's learning rate (the peak, when there is a warm-up or a cosine schedule).
        warmup_steps: Optimizer steps of the linear learning-rate warm-up (``0``: none).
        lr_schedule: ``"constant"`` or ``"cosine"`` (to 0 over the run's remaining steps).
        grad_clip: Max global gradient norm (``0``: no clipping).
        ema_decay: Decay of the EMA of the parameters that is evaluated (``0``: no EMA, the
            trained parameters are evaluated); in ``[0, 1)``.
    """

    lr: float = 1e-3
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float = 0.0
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if not _number_in(self.lr, 0.0, math.inf) or self.lr == 0:
            raise ValueError(f"expected lr as a number > 0; got {self.lr!r}")
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"expected warmup_steps as an integer >= 0; got {warmup!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"expected lr_schedule in {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}"
            )
        if not _number_in(self.grad_clip, 0.0, math.inf):
            raise ValueError(f"expected grad_clip as a number >= 0; got {self.grad_clip!r}")
        if not _number_in(self.ema_decay, 0.0, 1.0) or self.ema_decay == 1.0:
            raise ValueError(f"expected ema_decay as a number in [0, 1); got {self.ema_decay!r}")

    @property
    def schedules_lr(self) -> bool:
        """True when the learning rate is not constant (a warm-up or a cosine schedule)."""
        return bool(self.warmup_steps) or self.lr_schedule != "constant"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number_in(value: Any, low: float, high: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not math.isnan(value)
        and low <= value < high
    )


#: The recipe of lcma-ext up to 0.2: Adam at a constant learning rate from step 0, the gradient
#: norm clipped at 100, no EMA (reproduces the figures of run folders of those versions).
LEGACY_RECIPE = Recipe(
    lr=1e-3, warmup_steps=0, lr_schedule="constant", grad_clip=100.0, ema_decay=0.0
)
#: The named recipes (``--recipe``); the defaults of :class:`TrainConfig` and of
#: ``lcma-ext run`` are ``RECIPES[DEFAULT_RECIPE]``. ``"default"`` was chosen by
#: ``benchmarks/recipe_search.py`` on the ``channel`` arm's seed spread (tiny RealNVP, embedded
#: patches, 10 epochs, 5 seeds; docs/science.md has the table): peak learning rate 1e-2, a
#: linear warm-up over 100 steps, a cosine schedule to 0 and the gradient norm clipped at 20 cut
#: the seed std from 0.089 to 0.027 bits/dim (0.30 x) and the mean from 4.743 to 3.952; an EMA
#: of the weights did not help under the cosine schedule (0.98: 4.233 +- 0.069 against 4.220 +-
#: 0.067 without, at lr 5e-3), so it is off by default (``--ema-decay``).
RECIPES: dict[str, Recipe] = {
    "default": Recipe(
        lr=1e-2, warmup_steps=100, lr_schedule="cosine", grad_clip=20.0, ema_decay=0.0
    ),
    "legacy": LEGACY_RECIPE,
}
#: The recipe :class:`TrainConfig` and ``lcma-ext run`` use unless told otherwise.
DEFAULT_RECIPE = "default"
#: The fields of a :class:`Recipe` (also fields of :class:`TrainConfig` and
#: ``ExperimentConfig``).
RECIPE_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Recipe))


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (from 0) as a fraction of ``lr``.

    ``(step + 1) / warmup_steps`` during the warm-up; then 1 (``"constant"``) or
    ``(1 + cos(pi t)) / 2`` with ``t = (step - warmup_steps) / (total_steps - warmup_steps)``
    (``"cosine"``, ``t`` capped at 1).

    Args:
        step: The optimizer step, counted from 0 over the whole run.
        warmup_steps: Steps of the linear warm-up.
        schedule: ``"constant"`` or ``"cosine"``.
        total_steps: Optimizer steps of the whole run.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class ParameterEMA:
    """An exponential moving average of a module's parameters; buffers are never averaged.

    The update is ``torch.optim.swa_utils.get_ema_multi_avg_fn(decay)`` (``ema <- decay ema +
    (1 - decay) p``), and the first update copies the parameters, as
    ``torch.optim.swa_utils.AveragedModel`` does. Unlike ``AveragedModel`` it holds no copy of
    the module: the averaged parameters are swapped into the live module to evaluate it
    (:meth:`swapped`), so the buffers are always the live model's (split permutations that a
    phased trainer changes, ActNorm ``initialized`` flags, Lipschitz power-iteration vectors),
    and a flow whose split is switched (same parameters, new buffers) keeps its average. The
    module's parameters are listed once, here (walking a deep flow's modules costs more than
    the update itself).

    Args:
        module: The module whose parameters are averaged (in ``named_parameters`` order); its
            parameters must stay the same tensors (``load_state_dict`` copies into them).
        decay: In ``[0, 1)``.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        named = list(module.named_parameters())
        self.module = module
        self.decay = float(decay)
        self.names = [name for name, _ in named]
        self.live: list[Tensor] = [p for _, p in named]
        self.average = [p.detach().clone() for p in self.live]
        self.updates = 0
        self._update = get_ema_multi_avg_fn(self.decay)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the module's current parameters into the average (the first call copies them)."""
        if self.updates == 0:
            torch._foreach_copy_(self.average, self.live)
        else:
            self._update(self.average, self.live, self.updates)
        self.updates += 1

    @torch.no_grad()
    def copy_to_module(self) -> None:
        """Write the averaged parameters into the module (nothing before the first update)."""
        if self.updates:
            torch._foreach_copy_(self.live, self.average)

    @contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """The module with the averaged parameters inside the block, its own restored after."""
        if not self.updates:
            yield self.module
            return
        with torch.no_grad():
            saved = [p.clone() for p in self.live]
            torch._foreach_copy_(self.live, self.average)
        try:
            yield self.module
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.live, saved)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "parameters": dict(zip(self.names, self.average)),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the same decay and parameter names)."""
        stored = state["parameters"]
        if float(state["decay"]) != self.decay or list(stored) != self.names:
            raise ValueError(
                f"expected an EMA state of decay {self.decay} over the same parameters; got "
                f"decay {state['decay']} over {len(stored)} parameters"
            )
        for average, name in zip(self.average, self.names):
            average.copy_(stored[name])
        self.updates = int(state["updates"])


def evaluation_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The weights a checkpoint of :func:`train_flow` evaluates: ``"model"`` with the EMA in.

    The checkpoint's ``"model"`` is the raw training state; when it has an ``"ema"`` with at
    least one update, its averaged parameters replace the raw ones (buffers stay the model's).
    A checkpoint without one (the legacy recipe, or a file of the scored weights) gives
    ``"model"`` itself.
    """
    model = dict(checkpoint["model"])
    ema = checkpoint.get("ema")
    if ema and ema.get("updates"):
        missing = [name for name in ema["parameters"] if name not in model]
        if missing:
            raise ValueError(
                f"expected the EMA's parameters in the checkpoint's model; got {missing[:3]} "
                "missing"
            )
        model.update(ema["parameters"])
    return model


@dataclass
class TrainConfig:
    """Optimization settings, identical for every arm of a comparison.

    Attributes:
        epochs: Passes over the training set.
        batch_size: Examples per step (64 in the paper); under ``torch.distributed`` the global
            batch, split evenly over the ranks.
        l2_scale: L2 coefficient on the weight-norm scales (5e-5 in the paper).
        lr, warmup_steps, lr_schedule, grad_clip, ema_decay: The training recipe (:class:`Recipe`;
            defaults ``RECIPES[DEFAULT_RECIPE]``, :meth:`from_recipe` for a named one).
        schedule_epochs: Epochs the cosine schedule spans (``None``: ``epochs``). A trainer that
            calls :func:`train_flow` once per phase (``epochs`` = the end of the phase) passes
            the whole budget here, so the schedule runs over the whole run.
        eval_batch_size: Batch size of the test evaluation.
        eval_every: Evaluate test bits/dim every this many epochs for the learning curve
            (``0``: only at the end).
        seed: Seed of the shuffling and dequantization noise.
        progress: Show tqdm progress bars.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast of the transform; see the
            module docstring).
        compile: Run the step's log-density through ``torch.compile``.
        num_workers: ``DataLoader`` worker processes for tensor input.
        hflip: Flip each training image horizontally with probability 1/2 (RealNVP and Glow on
            CIFAR-10 and CelebA); off by default.
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = RECIPES[DEFAULT_RECIPE].lr
    l2_scale: float = 5e-5
    warmup_steps: int = RECIPES[DEFAULT_RECIPE].warmup_steps
    lr_schedule: str = RECIPES[DEFAULT_RECIPE].lr_schedule
    grad_clip: float = RECIPES[DEFAULT_RECIPE].grad_clip
    ema_decay: float = RECIPES[DEFAULT_RECIPE].ema_decay
    schedule_epochs: int | None = None
    eval_batch_size: int = 500
    eval_every: int = 1
    seed: int = 0
    progress: bool = True
    precision: str = "fp32"
    compile: bool = False
    num_workers: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "l2_scale": self.l2_scale >= 0,
            "schedule_epochs": self.schedule_epochs is None or self.schedule_epochs >= 1,
            "eval_batch_size": self.eval_batch_size >= 1,
            "eval_every": self.eval_every >= 0,
            "num_workers": self.num_workers >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"expected a valid {name}; got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"expected precision in {tuple(PRECISIONS)}; got {self.precision!r}")
        self.recipe  # noqa: B018 - validates the recipe fields

    @property
    def recipe(self) -> Recipe:
        """The recipe fields as a :class:`Recipe`."""
        return Recipe(**{name: getattr(self, name) for name in RECIPE_FIELDS})

    @classmethod
    def from_recipe(cls, recipe: str | Recipe = DEFAULT_RECIPE, **fields: Any) -> TrainConfig:
        """A config with the named (or given) recipe; ``fields`` override any field.

        Example:
            >>> TrainConfig.from_recipe("legacy", epochs=3).grad_clip
            100.0
        """
        if isinstance(recipe, str):
            if recipe not in RECIPES:
                raise ValueError(f"expected recipe in {', '.join(RECIPES)}; got {recipe!r}")
            recipe = RECIPES[recipe]
        return cls(**{**recipe.to_dict(), **fields})


@dataclass
class TrainResult:
    """Outcome of :func:`train_flow`.

    Attributes:
        train_bpd: Mean training bits/dim of each epoch (over every rank's batches).
        test_bpd: ``(epoch, test bits/dim)`` pairs of the learning curve.
        epochs_done: Completed epochs.
        diverged: True when a non-finite loss stopped the run.
        diverged_reason: Where it diverged.
        train_time_s: Wall time spent in training (summed over resumed sessions).
        world_size: Processes that trained (1 without ``torch.distributed``).
        rank_batch_size: Images per step on each rank.
        steps: Optimizer steps taken (checkpoints of version 0.2 and earlier: counted from
            the resume).
        clipped_steps: Steps whose gradient norm was clipped (``grad_clip``).
    """

    train_bpd: list[float] = field(default_factory=list)
    test_bpd: list[tuple[int, float]] = field(default_factory=list)
    epochs_done: int = 0
    diverged: bool = False
    diverged_reason: str = ""
    train_time_s: float = 0.0
    world_size: int = 1
    rank_batch_size: int = 0
    steps: int = 0
    clipped_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _LogDensity(nn.Module):
    """``flow.log_prob`` as a module, so ``DistributedDataParallel`` and ``torch.compile`` wrap it.

    With an autocast dtype the transform runs under ``torch.autocast``; the base log-density is
    then computed on float32 latents and the log-determinant is cast to float32 before the sum.
    Without one it is exactly ``flow.log_prob(y)``.
    """

    def __init__(self, flow: Flow, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.flow = flow
        self.autocast_dtype = autocast_dtype

    def forward(self, y: Tensor) -> Tensor:
        if self.autocast_dtype is None:
            return self.flow.log_prob(y)
        parts = flow_parts(self.flow)
        with torch.autocast(y.device.type, dtype=self.autocast_dtype):
            noise, logabsdet = parts.transform(y)
        return parts.distribution.log_prob(noise.float()) + logabsdet.float()


def _images(batch: Any) -> Tensor:
    """The image tensor of a loader batch (a tensor, or the first item of ``(images, labels)``)."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor) or batch.dim() < 2:
        raise ValueError(
            f"expected batches of integer images (B, C, H, W) or (images, labels) pairs; got "
            f"{type(batch).__name__}{tuple(batch.shape) if isinstance(batch, Tensor) else ''}"
        )
    if batch.is_floating_point() or batch.is_complex():
        raise ValueError(f"expected integer image batches (e.g. uint8); got {batch.dtype}")
    return batch


def _preprocess(
    batch: Tensor,
    preprocessing: LogitPreprocessing,
    generator: torch.Generator,
    dtype: torch.dtype,
    where: World,
    hflip: bool = False,
) -> tuple[Tensor, Tensor]:
    """Flip and dequantize this rank's rows of a global batch with the run's generator.

    One process draws the random numbers of its own batch (as in earlier versions, bit for
    bit). Under ``torch.distributed`` every rank draws them for the whole global batch of
    ``W b`` rows and keeps rows ``rank::W`` (the rows its ``DistributedSampler`` holds).
    """
    rows = batch.shape[0] * (where.size if where.distributed else 1)
    keep = slice(where.rank, None, where.size) if where.distributed else slice(None)
    if hflip:
        flips = (torch.rand(rows, generator=generator) < 0.5)[keep].to(batch.device)
        batch = torch.where(flips.view(-1, *([1] * (batch.dim() - 1))), batch.flip(-1), batch)
    noise = torch.rand((rows, *batch.shape[1:]), generator=generator, dtype=dtype)[keep]
    return preprocessing(batch, dtype=dtype, noise=noise)


def _batch_bpd(
    log_density: Callable[[Tensor], Tensor],
    y: Tensor,
    logit_logdet: Tensor,
    preprocessing: LogitPreprocessing,
) -> Tensor:
    return preprocessing.bits_per_dim(log_density(y), logit_logdet, y[0].numel())


@torch.no_grad()
def evaluate_bpd(
    flow: Flow,
    data: ImageBatchesLike,
    preprocessing: LogitPreprocessing,
    batch_size: int = 500,
    seed: int = EVAL_NOISE_SEED,
) -> float:
    """Mean test bits/dim of ``flow`` on integer images ``data`` (fixed dequantization noise).

    Under ``torch.distributed`` every rank must call it: a tensor's batches are shared out row
    by row (each rank scores rows ``rank::W`` with the noise a single process would draw for
    them) and the sums are all-reduced, so every rank returns the one-process figure to float
    tolerance. An iterable is taken to be this rank's share.

    Args:
        flow: nflows ``Flow`` over pre-processed images.
        data: Integer images ``(N, C, H, W)``, or an iterable of integer image batches (a
            ``DataLoader``; ``(images, labels)`` pairs are accepted).
        preprocessing: The dequantization + logit pre-processing.
        batch_size: Evaluation batch size (tensor input).
        seed: Seed of the dequantization noise (the same for every model scored).

    Returns:
        The mean bits/dim over ``data`` (``nan`` if any example is non-finite).
    """
    dtype, device = flow_dtype_device(flow)
    generator = torch.Generator().manual_seed(seed)
    where = world()
    shard = where if isinstance(data, Tensor) else World()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with eval_mode(flow):  # every submodule's mode restored afterwards
        for batch in _eval_batches(data, batch_size):
            rows = slice(shard.rank, None, shard.size) if shard.distributed else slice(None)
            images = batch[rows].to(device)
            y, logit_logdet = _preprocess(images, preprocessing, generator, dtype, shard)
            bpd = _batch_bpd(flow.log_prob, y, logit_logdet, preprocessing)
            total[0] += bpd.double().sum()
            total[1] += images.shape[0]
    if where.distributed:
        all_reduce_sum(total)
    value, count = float(total[0]), float(total[1])
    return value / max(count, 1.0) if math.isfinite(value) else float("nan")


def _eval_batches(data: ImageBatchesLike, batch_size: int) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
    else:
        for batch in data:
            yield _images(batch)


def save_checkpoint(
    path: str | Path, *, identity: Mapping[str, Any] | None = None, **state: Any
) -> None:
    """``torch.save(state, path)`` atomically (write to a temporary file, then rename).

    The file carries a stamp (:func:`lcma_ext.storage.stamped`): a checksum of ``state``, which
    :func:`load_checkpoint` verifies, and ``identity`` (e.g. a run folder's fingerprints).
    """
    atomic_save(stamped(state, identity), path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    The stamp's checksum is verified and the stamp left out of the returned state (a checkpoint
    of an earlier version, without one, loads as it is).

    Raises:
        ValueError: if ``path`` does not exist, or is corrupt, truncated or changed on disk (its
            content does not match its checksum); the message names the file (the
            ``torch.load`` error is the ``__cause__``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"expected a checkpoint file; got {str(path)!r} (not found)")
    expected = "a checkpoint written by save_checkpoint"
    return load_stamped(path, expected, map_location, weights_only=False)[0]


# ----------------------------------------------------------------------------------------------
# random state


def _rank_random_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _random_state(generator: torch.Generator, loader: Any, device: torch.device) -> dict[str, Any]:
    """Every random state of the run: shared generators once, torch's generators per rank."""
    loader_generator = getattr(loader, "generator", None)
    return {
        "generator": generator.get_state(),
        "loader_generator": None if loader_generator is None else loader_generator.get_state(),
        "ranks": all_gather_objects(_rank_random_state(device)),
    }


def _restore_random_state(
    state: dict[str, Any],
    generator: torch.Generator,
    loader: Any,
    device: torch.device,
    path: Path,
) -> None:
    generator.set_state(state["generator"])
    random_state = state.get("random_state")
    if random_state is None:  # a checkpoint of version 0.1.0: only the data generator
        return
    where = world()
    ranks = random_state["ranks"]
    if len(ranks) != where.size:
        raise ValueError(
            f"expected to resume {str(path)!r} with the world size it was written with "
            f"({len(ranks)} processes); got {where.size}"
        )
    mine = ranks[where.rank]
    torch.set_rng_state(mine["torch"].cpu())
    if "cuda" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"].cpu(), device)
    loader_generator = getattr(loader, "generator", None)
    if loader_generator is not None and random_state["loader_generator"] is not None:
        loader_generator.set_state(random_state["loader_generator"])


# ----------------------------------------------------------------------------------------------
# training


def _check_setup(flow: Flow, config: TrainConfig, where: World) -> tuple[torch.dtype, Any]:
    dtype, device = flow_dtype_device(flow)
    if config.precision != "fp32" and dtype != torch.float32:
        raise ValueError(f"expected a float32 flow for precision {config.precision!r}; got {dtype}")
    if where.distributed and config.batch_size % where.size:
        raise ValueError(
            f"expected a batch size divisible by the world size {where.size}; got "
            f"{config.batch_size}"
        )
    return dtype, device


def _train_loader(
    train_data: ImageBatchesLike,
    config: TrainConfig,
    generator: torch.Generator,
    where: World,
    device: torch.device,
) -> Iterable[Any]:
    if not isinstance(train_data, Tensor):
        return train_data
    return image_loader(
        train_data,
        config.batch_size // where.size if where.distributed else config.batch_size,
        generator,
        seed=config.seed,
        rank=where.rank,
        world_size=where.size,
        distributed=where.distributed,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda" and train_data.device.type == "cpu",
    )


def _needs_data_init(flow: nn.Module) -> bool:
    """True when a module (ActNorm) still waits for its data-dependent initialisation."""
    return any(
        isinstance(getattr(module, "initialized", None), Tensor) and not bool(module.initialized)
        for module in flow.modules()
    )


@torch.no_grad()
def _initialize_on_first_batch(
    flow: Flow,
    train_data: ImageBatchesLike,
    preprocessing: LogitPreprocessing,
    generator: torch.Generator,
    config: TrainConfig,
    dtype: torch.dtype,
    device: torch.device,
    where: World,
) -> None:
    """Run data-dependent initialisation (ActNorm) in the flow's dtype on the first batch.

    The batch and its noise are those the first step draws: for tensor input the first
    ``batch_size`` images of epoch 0's order (under ``torch.distributed``, of the shared order
    before it is dealt out, so every rank and a one-rank run initialise identically), with
    flips and noise drawn from a copy of the run's generator. Other iterables give their first
    batch (``DistributedDataParallel`` then broadcasts rank 0's result). It runs without
    autocast, so initialised parameters stay float32 under mixed precision.
    """
    if not _needs_data_init(flow):
        return
    copy = torch.Generator().manual_seed(0)
    copy.set_state(generator.get_state())
    if isinstance(train_data, Tensor):
        first = image_loader(
            train_data,
            config.batch_size,
            copy,
            seed=config.seed,
            distributed=where.distributed,
            rank=0,
            world_size=1,
        )
        set_loader_epoch(first, 0)
        batch = next(iter(first))
    else:
        batch = _images(next(iter(train_data)))
    y, _ = _preprocess(batch.to(device), preprocessing, copy, dtype, World(), config.hflip)
    flow.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        flow.log_prob(y)


def _steps_per_epoch(loader: Iterable[Any], recipe: Recipe) -> int:
    """Optimizer steps of one epoch (``len(loader)``); 0 when no schedule needs it."""
    if recipe.lr_schedule == "constant":
        return 0
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"expected training batches with a length (len()) for lr_schedule "
            f"{recipe.lr_schedule!r}; got {type(loader).__name__} without one"
        ) from None


def _scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int
) -> LambdaLR | None:
    """``LambdaLR`` of :func:`lr_factor`; ``None`` for a constant rate without warm-up."""
    if not recipe.schedules_lr:
        return None

    def factor(step: int) -> float:
        return lr_factor(step, recipe.warmup_steps, recipe.lr_schedule, total_steps)

    return LambdaLR(optimizer, factor)


def _check_recipe(state: dict[str, Any], recipe: Recipe, path: Path) -> None:
    """A checkpoint resumes only under the recipe it was written with (no key: legacy; no
    ``lr`` in it, as before ``lr`` joined the recipe: the learning rate is not checked)."""
    legacy = {k: v for k, v in LEGACY_RECIPE.to_dict().items() if k != "lr"}
    written = state.get("recipe", legacy)
    stored = Recipe(**{"lr": recipe.lr, **written})
    if stored != recipe:
        options = ", ".join(f"{k}={v!r}" for k, v in stored.to_dict().items())
        raise ValueError(
            f"expected to resume {str(path)!r} with the training recipe it was written with "
            f"({options}); got {', '.join(f'{k}={v!r}' for k, v in recipe.to_dict().items())}"
        )


def train_flow(
    flow: Flow,
    train_data: ImageBatchesLike,
    preprocessing: LogitPreprocessing,
    config: TrainConfig,
    test_data: ImageBatchesLike | None = None,
    checkpoint_path: str | Path | None = None,
    desc: str = "train",
    checkpoint_identity: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``flow`` by maximum likelihood on integer images, resuming from a checkpoint.

    Args:
        flow: nflows ``Flow`` over pre-processed images, already on its device and dtype.
        train_data: Integer training images ``(N, C, H, W)`` (any device; served by a
            ``DataLoader`` of ``config.num_workers`` workers, pinned on CUDA), or any iterable of
            integer image batches such as a ``DataLoader`` (its sampler's ``set_epoch`` is
            called every epoch; ``(images, labels)`` pairs are accepted; with a cosine schedule
            it must have a ``len()``).
        preprocessing: Dequantization + logit pre-processing.
        config: Optimization settings and the training recipe.
        test_data: Integer test images (or batches) for the learning curve (optional); scored
            with the evaluation weights (the EMA when ``config.ema_decay``).
        checkpoint_path: Where to save after every epoch (rank 0 only); if the file exists,
            training resumes from it (model, optimizer, learning-rate schedule, EMA, epoch,
            curves, every random state).
        desc: Label of the progress bar.
        checkpoint_identity: Recorded in every checkpoint's stamp (see
            :func:`save_checkpoint`), e.g. the run folder's fingerprints; verifying it before a
            resume is the caller's business.

    Returns:
        The :class:`TrainResult`. The flow holds the evaluation weights: the EMA parameters
        (with the live buffers) when ``config.ema_decay`` and at least one step was taken, the
        trained parameters otherwise. The raw training state is the checkpoint's ``"model"``.

    Raises:
        ValueError: for a float64 flow with mixed precision, a batch size the world size does
            not divide, bad batches, or a checkpoint written with another world size or
            another recipe.
    """
    where = world()
    dtype, device = _check_setup(flow, config, where)
    recipe = config.recipe
    parameters = list(flow.parameters())  # listed once: walking a deep flow costs per step
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    penalized = scale_parameters(flow)
    generator = torch.Generator().manual_seed(config.seed)
    loader = _train_loader(train_data, config, generator, where, device)
    total_steps = _steps_per_epoch(loader, recipe) * (config.schedule_epochs or config.epochs)
    scheduler = _scheduler(optimizer, recipe, total_steps)
    ema = ParameterEMA(flow, recipe.ema_decay) if recipe.ema_decay else None
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    log_density: nn.Module = _LogDensity(flow, PRECISIONS[config.precision])
    result = TrainResult(world_size=where.size)
    checkpoint = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, map_location=device)
        _check_recipe(state, recipe, checkpoint)
        flow.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        _restore_random_state(state, generator, loader, device, checkpoint)
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        result = TrainResult(**state["result"])
        # (epoch, bpd) pairs, stored as lists
        result.test_bpd = cast("list[tuple[int, float]]", [tuple(p) for p in result.test_bpd])
    else:
        if where.distributed and where.rank:
            torch.manual_seed(RANK_SEED_STRIDE * where.rank + config.seed)
        if where.distributed or config.precision != "fp32" or config.compile:
            _initialize_on_first_batch(
                flow, train_data, preprocessing, generator, config, dtype, device, where
            )
    if where.distributed:
        from torch.nn.parallel import DistributedDataParallel

        log_density = DistributedDataParallel(
            log_density, device_ids=[device.index] if device.type == "cuda" else None
        )
    step_density = torch.compile(log_density) if config.compile else log_density
    epochs = tqdm(
        range(result.epochs_done, config.epochs),
        desc=desc,
        disable=not (config.progress and where.is_main),
        initial=result.epochs_done,
        total=config.epochs,
        leave=False,
        dynamic_ncols=True,
    )
    for epoch in epochs:
        if result.diverged:
            break
        flow.train()
        start_time = time.perf_counter()
        set_loader_epoch(loader, epoch)
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        for step, raw in enumerate(loader):
            batch = _images(raw).to(device, non_blocking=True)
            result.rank_batch_size = max(result.rank_batch_size, batch.shape[0])
            y, logit_logdet = _preprocess(
                batch, preprocessing, generator, dtype, where, config.hflip
            )
            bpd = _batch_bpd(step_density, y, logit_logdet, preprocessing).mean()
            loss = bpd
            if config.l2_scale and penalized:
                loss = loss + config.l2_scale * sum(p.square().sum() for p in penalized)
            if not _finite_everywhere(loss, where):
                result.diverged = True
                result.diverged_reason = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recipe.grad_clip:
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in parameters if p.grad is not None]
                )
                finite = bool(torch.isfinite(norm))  # not with fp16: the scaler skips the step
                if not finite and not scaler.is_enabled():
                    result.diverged = True
                    result.diverged_reason = (
                        f"non-finite gradient at epoch {epoch + 1}, step {step + 1}"
                    )
                    break
                if finite and _clips(norm, recipe.grad_clip):
                    torch.nn.utils.clip_grads_with_norm_(parameters, recipe.grad_clip, norm)
                    result.clipped_steps += 1
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            if ema is not None:
                ema.update()
            result.steps += 1
            totals[0] += bpd.detach().double() * batch.shape[0]
            totals[1] += batch.shape[0]
        result.train_time_s += time.perf_counter() - start_time
        if result.diverged:
            break
        all_reduce_sum(totals)
        result.train_bpd.append(float(totals[0]) / max(float(totals[1]), 1.0))
        result.epochs_done = epoch + 1
        last = result.epochs_done == config.epochs
        if test_data is not None and (
            last or (config.eval_every and result.epochs_done % config.eval_every == 0)
        ):
            with ema.swapped() if ema is not None else nullcontext():
                score = evaluate_bpd(flow, test_data, preprocessing, config.eval_batch_size)
            result.test_bpd.append((result.epochs_done, score))
        epochs.set_postfix(train_bpd=f"{result.train_bpd[-1]:.3f}")
        if checkpoint is not None:
            random_state = _random_state(generator, loader, device)
            if where.is_main:
                save_checkpoint(
                    checkpoint,
                    identity=checkpoint_identity,
                    model=flow.state_dict(),
                    optimizer=optimizer.state_dict(),
                    recipe=recipe.to_dict(),
                    **({"scheduler": scheduler.state_dict()} if scheduler is not None else {}),
                    **({"ema": ema.state_dict()} if ema is not None else {}),
                    generator=random_state["generator"],
                    random_state=random_state,
                    **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                    result=result.to_dict(),
                    epoch=result.epochs_done,
                )
            barrier()  # no rank reads the checkpoint before rank 0 has written it
    epochs.close()
    if ema is not None:
        ema.copy_to_module()  # the flow holds the evaluation weights
    return result


def _clips(norm: Tensor, max_norm: float) -> bool:
    """True when ``clip_grad_norm_`` would scale the gradients: its coefficient
    ``max_norm / (norm + 1e-6)`` is below 1 (otherwise it multiplies them by 1, which
    :func:`train_flow` skips: the same values)."""
    return bool(max_norm / (norm + 1e-6) < 1)


def _finite_everywhere(loss: Tensor, where: World) -> bool:
    """True when the loss is finite on every rank (one all-reduce under ``torch.distributed``)."""
    if not where.distributed:
        return bool(torch.isfinite(loss))
    bad = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
    return not bool(all_reduce_sum(bad))
