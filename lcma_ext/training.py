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
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from nflows.flows import Flow
from torch import Tensor, nn
from tqdm.auto import tqdm

from lcma_ext.data.loading import image_loader, set_loader_epoch
from lcma_ext.data.preprocess import LogitPreprocessing
from lcma_ext.distributed import World, all_gather_objects, all_reduce_sum, barrier, world
from lcma_ext.flows import flow_dtype_device
from lcma_ext.models.nets import scale_parameters
from lcma_ext.storage import atomic_save, load_torch_file

__all__ = [
    "EVAL_NOISE_SEED",
    "PRECISIONS",
    "TrainConfig",
    "TrainResult",
    "evaluate_bpd",
    "load_checkpoint",
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


@dataclass
class TrainConfig:
    """Optimization settings, identical for every arm of a comparison.

    Attributes:
        epochs: Passes over the training set.
        batch_size: Examples per step (64 in the paper); under ``torch.distributed`` the global
            batch, split evenly over the ranks.
        lr: Adam learning rate.
        l2_scale: L2 coefficient on the weight-norm scales (5e-5 in the paper).
        grad_clip: Max gradient norm (``0`` disables clipping).
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
    lr: float = 1e-3
    l2_scale: float = 5e-5
    grad_clip: float = 100.0
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
            "grad_clip": self.grad_clip >= 0,
            "eval_batch_size": self.eval_batch_size >= 1,
            "eval_every": self.eval_every >= 0,
            "num_workers": self.num_workers >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"expected a valid {name}; got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"expected precision in {tuple(PRECISIONS)}; got {self.precision!r}")


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
    """

    train_bpd: list[float] = field(default_factory=list)
    test_bpd: list[tuple[int, float]] = field(default_factory=list)
    epochs_done: int = 0
    diverged: bool = False
    diverged_reason: str = ""
    train_time_s: float = 0.0
    world_size: int = 1
    rank_batch_size: int = 0

    def to_dict(self) -> dict:
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
        with torch.autocast(y.device.type, dtype=self.autocast_dtype):
            noise, logabsdet = self.flow._transform(y)
        return self.flow._distribution.log_prob(noise.float()) + logabsdet.float()


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
    log_density: nn.Module, y: Tensor, logit_logdet: Tensor, preprocessing: LogitPreprocessing
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
    was_training = flow.training
    flow.eval()
    dtype, device = flow_dtype_device(flow)
    generator = torch.Generator().manual_seed(seed)
    where = world()
    shard = where if isinstance(data, Tensor) else World()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in _eval_batches(data, batch_size):
            rows = slice(shard.rank, None, shard.size) if shard.distributed else slice(None)
            images = batch[rows].to(device)
            y, logit_logdet = _preprocess(images, preprocessing, generator, dtype, shard)
            bpd = _batch_bpd(flow.log_prob, y, logit_logdet, preprocessing)
            total[0] += bpd.double().sum()
            total[1] += images.shape[0]
    finally:
        flow.train(was_training)
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


def save_checkpoint(path: str | Path, **state) -> None:
    """``torch.save(state, path)`` atomically (write to a temporary file, then rename)."""
    atomic_save(state, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ValueError: if ``path`` does not exist, or is corrupt or truncated (the message names
            the file; the ``torch.load`` error is the ``__cause__``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"expected a checkpoint file; got {str(path)!r} (not found)")
    expected = "a checkpoint written by save_checkpoint"
    return load_torch_file(path, expected, map_location, weights_only=False)


# ----------------------------------------------------------------------------------------------
# random state


def _rank_random_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _random_state(generator: torch.Generator, loader: Any, device: torch.device) -> dict:
    """Every random state of the run: shared generators once, torch's generators per rank."""
    loader_generator = getattr(loader, "generator", None)
    return {
        "generator": generator.get_state(),
        "loader_generator": None if loader_generator is None else loader_generator.get_state(),
        "ranks": all_gather_objects(_rank_random_state(device)),
    }


def _restore_random_state(
    state: dict, generator: torch.Generator, loader: Any, device: torch.device, path: Path
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


def train_flow(
    flow: Flow,
    train_data: ImageBatchesLike,
    preprocessing: LogitPreprocessing,
    config: TrainConfig,
    test_data: ImageBatchesLike | None = None,
    checkpoint_path: str | Path | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``flow`` by maximum likelihood on integer images, resuming from a checkpoint.

    Args:
        flow: nflows ``Flow`` over pre-processed images, already on its device and dtype.
        train_data: Integer training images ``(N, C, H, W)`` (any device; served by a
            ``DataLoader`` of ``config.num_workers`` workers, pinned on CUDA), or any iterable of
            integer image batches such as a ``DataLoader`` (its sampler's ``set_epoch`` is
            called every epoch; ``(images, labels)`` pairs are accepted).
        preprocessing: Dequantization + logit pre-processing.
        config: Optimization settings.
        test_data: Integer test images (or batches) for the learning curve (optional).
        checkpoint_path: Where to save after every epoch (rank 0 only); if the file exists,
            training resumes from it (model, optimizer, epoch, curves, every random state).
        desc: Label of the progress bar.

    Returns:
        The :class:`TrainResult`; the flow holds the trained parameters.

    Raises:
        ValueError: for a float64 flow with mixed precision, a batch size the world size does
            not divide, bad batches, or a checkpoint written with another world size.
    """
    where = world()
    dtype, device = _check_setup(flow, config, where)
    optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr)
    penalized = scale_parameters(flow)
    generator = torch.Generator().manual_seed(config.seed)
    loader = _train_loader(train_data, config, generator, where, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    log_density: nn.Module = _LogDensity(flow, PRECISIONS[config.precision])
    result = TrainResult(world_size=where.size)
    checkpoint = Path(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, map_location=device)
        flow.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_random_state(state, generator, loader, device, checkpoint)
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        result = TrainResult(**state["result"])
        result.test_bpd = [tuple(p) for p in result.test_bpd]
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
            if config.grad_clip:
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(flow.parameters(), config.grad_clip)
                if not torch.isfinite(norm) and not scaler.is_enabled():
                    result.diverged = True
                    result.diverged_reason = (
                        f"non-finite gradient at epoch {epoch + 1}, step {step + 1}"
                    )
                    break
            scaler.step(optimizer)
            scaler.update()
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
            score = evaluate_bpd(flow, test_data, preprocessing, config.eval_batch_size)
            result.test_bpd.append((result.epochs_done, score))
        epochs.set_postfix(train_bpd=f"{result.train_bpd[-1]:.3f}")
        if checkpoint is not None:
            random_state = _random_state(generator, loader, device)
            if where.is_main:
                save_checkpoint(
                    checkpoint,
                    model=flow.state_dict(),
                    optimizer=optimizer.state_dict(),
                    generator=random_state["generator"],
                    random_state=random_state,
                    **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                    result=result.to_dict(),
                    epoch=result.epochs_done,
                )
            barrier()  # no rank reads the checkpoint before rank 0 has written it
    epochs.close()
    return result


def _finite_everywhere(loss: Tensor, where: World) -> bool:
    """True when the loss is finite on every rank (one all-reduce under ``torch.distributed``)."""
    if not where.distributed:
        return bool(torch.isfinite(loss))
    bad = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
    return not bool(all_reduce_sum(bad))
