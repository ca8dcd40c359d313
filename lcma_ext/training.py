"""Maximum-likelihood training of flows on integer images, test bits/dim, and checkpoints.

The loss is the mean bits/dim of a batch (dequantization noise redrawn every batch, see
:mod:`lcma_ext.data.preprocess`) plus ``l2_scale`` times the squared norm of the nets' weight-norm
scales (paper 001, Sec. 4: Adam, L2 5e-5 on the weight scale parameters, batch 64).

A run never crashes on divergence: a non-finite loss stops it and marks it ``diverged`` (the
result keeps the epoch and the step). After every epoch the model, the optimizer, the epoch, the
learning curves and the random state are written atomically to ``checkpoint_path``, so an
interrupted run resumes where it stopped.

References:
    S. Das, P. Abbeel, C. Spanos. Dimensionality Reduction Flows (paper 001), Sec. 4.
    D. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from nflows.flows import Flow
from torch import Tensor
from tqdm.auto import tqdm

from lcma_ext.data.preprocess import LogitPreprocessing
from lcma_ext.flows import flow_dtype_device
from lcma_ext.models.nets import scale_parameters
from lcma_ext.storage import atomic_save, load_torch_file

__all__ = [
    "EVAL_NOISE_SEED",
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


@dataclass
class TrainConfig:
    """Optimization settings, identical for every arm of a comparison.

    Attributes:
        epochs: Passes over the training set.
        batch_size: Examples per step (64 in the paper).
        lr: Adam learning rate.
        l2_scale: L2 coefficient on the weight-norm scales (5e-5 in the paper).
        grad_clip: Max gradient norm (``0`` disables clipping).
        eval_batch_size: Batch size of the test evaluation.
        eval_every: Evaluate test bits/dim every this many epochs for the learning curve
            (``0``: only at the end).
        seed: Seed of the shuffling and dequantization noise.
        progress: Show tqdm progress bars.
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

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "l2_scale": self.l2_scale >= 0,
            "grad_clip": self.grad_clip >= 0,
            "eval_batch_size": self.eval_batch_size >= 1,
            "eval_every": self.eval_every >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"expected a valid {name}; got {getattr(self, name)!r}")


@dataclass
class TrainResult:
    """Outcome of :func:`train_flow`.

    Attributes:
        train_bpd: Mean training bits/dim of each epoch.
        test_bpd: ``(epoch, test bits/dim)`` pairs of the learning curve.
        epochs_done: Completed epochs.
        diverged: True when a non-finite loss stopped the run.
        diverged_reason: Where it diverged.
        train_time_s: Wall time spent in training (summed over resumed sessions).
    """

    train_bpd: list[float] = field(default_factory=list)
    test_bpd: list[tuple[int, float]] = field(default_factory=list)
    epochs_done: int = 0
    diverged: bool = False
    diverged_reason: str = ""
    train_time_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _batch_bpd(
    flow: Flow, batch: Tensor, preprocessing: LogitPreprocessing, generator, dtype
) -> Tensor:
    y, logit_logdet = preprocessing(batch, generator=generator, dtype=dtype)
    log_prob = flow.log_prob(y)
    return preprocessing.bits_per_dim(log_prob, logit_logdet, y[0].numel())


@torch.no_grad()
def evaluate_bpd(
    flow: Flow,
    data: Tensor,
    preprocessing: LogitPreprocessing,
    batch_size: int = 500,
    seed: int = EVAL_NOISE_SEED,
) -> float:
    """Mean test bits/dim of ``flow`` on integer images ``data`` (fixed dequantization noise).

    Args:
        flow: nflows ``Flow`` over pre-processed images.
        data: Integer images ``(N, C, H, W)``.
        preprocessing: The dequantization + logit pre-processing.
        batch_size: Evaluation batch size.
        seed: Seed of the dequantization noise (the same for every model scored).

    Returns:
        The mean bits/dim over ``data`` (``nan`` if any example is non-finite).
    """
    was_training = flow.training
    flow.eval()
    dtype, device = flow_dtype_device(flow)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    try:
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size].to(device)
            bpd = _batch_bpd(flow, batch, preprocessing, generator, dtype)
            total += float(bpd.double().sum())
            count += batch.shape[0]
    finally:
        flow.train(was_training)
    return total / max(count, 1) if math.isfinite(total) else float("nan")


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


def train_flow(
    flow: Flow,
    train_data: Tensor,
    preprocessing: LogitPreprocessing,
    config: TrainConfig,
    test_data: Tensor | None = None,
    checkpoint_path: str | Path | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``flow`` by maximum likelihood on integer images, resuming from a checkpoint.

    Args:
        flow: nflows ``Flow`` over pre-processed images, already on its device and dtype.
        train_data: Integer training images ``(N, C, H, W)`` (any device).
        preprocessing: Dequantization + logit pre-processing.
        config: Optimization settings.
        test_data: Integer test images for the learning curve (optional).
        checkpoint_path: Where to save after every epoch; if the file exists, training resumes
            from it (model, optimizer, epoch, curves, random state).
        desc: Label of the progress bar.

    Returns:
        The :class:`TrainResult`; the flow holds the trained parameters.
    """
    dtype, device = flow_dtype_device(flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=config.lr)
    penalized = scale_parameters(flow)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult()
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        state = load_checkpoint(checkpoint_path, map_location=device)
        flow.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        result = TrainResult(**state["result"])
        result.test_bpd = [tuple(p) for p in result.test_bpd]
    num = train_data.shape[0]
    epochs = tqdm(
        range(result.epochs_done, config.epochs),
        desc=desc,
        disable=not config.progress,
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
        order = torch.randperm(num, generator=generator)
        total, count = 0.0, 0
        for step, start in enumerate(range(0, num, config.batch_size)):
            batch = train_data[order[start : start + config.batch_size]].to(device)
            bpd = _batch_bpd(flow, batch, preprocessing, generator, dtype).mean()
            loss = bpd
            if config.l2_scale and penalized:
                loss = loss + config.l2_scale * sum(p.square().sum() for p in penalized)
            if not torch.isfinite(loss):
                result.diverged = True
                result.diverged_reason = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(flow.parameters(), config.grad_clip)
                if not torch.isfinite(norm):
                    result.diverged = True
                    result.diverged_reason = (
                        f"non-finite gradient at epoch {epoch + 1}, step {step + 1}"
                    )
                    break
            optimizer.step()
            total += float(bpd.detach()) * batch.shape[0]
            count += batch.shape[0]
        result.train_time_s += time.perf_counter() - start_time
        if result.diverged:
            break
        result.train_bpd.append(total / max(count, 1))
        result.epochs_done = epoch + 1
        last = result.epochs_done == config.epochs
        if test_data is not None and (
            last or (config.eval_every and result.epochs_done % config.eval_every == 0)
        ):
            score = evaluate_bpd(flow, test_data, preprocessing, config.eval_batch_size)
            result.test_bpd.append((result.epochs_done, score))
        epochs.set_postfix(train_bpd=f"{result.train_bpd[-1]:.3f}")
        if checkpoint_path is not None:
            save_checkpoint(
                checkpoint_path,
                model=flow.state_dict(),
                optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
                result=result.to_dict(),
                epoch=result.epochs_done,
            )
    epochs.close()
    return result
