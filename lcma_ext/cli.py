"""The ``lcma-ext`` command line (also ``python -m lcma_ext``): the paper's comparisons.

``lcma-ext run``
    Algorithm 1 of the LCMA paper on one dataset and one flow family: pre-train the NMS flow,
    estimate the per-dimension contributions, train every split arm (``lcma``, ``channel``,
    ``checkerboard``, ``random``, ``high``) with the same architecture, optimizer, epochs and
    seeds, score test bits/dim and write ``results.json``, ``results.md``, contribution
    heatmaps, sample grids and learning curves (Tables 1-3).
``lcma-ext ablate-levels``
    Every high/low choice of which half to factor out at each of the L split points, 2^L arms
    (Table 4).
``lcma-ext contributions``
    Contribution heatmaps of a saved NMS checkpoint.

Every arm gets the same budget; diverged runs (non-finite loss, or test bits/dim far above the
same arm's other seeds) are flagged, never dropped; the median is reported beside mean +- std
together with per-seed paired differences against the reference arm (``channel``; for
``ablate-levels`` the all-low arm, i.e. LCMA). Finished runs are stored under ``--out`` and
skipped on a rerun, unfinished ones resume from their last epoch.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Algorithm 1 and Tables 1-4.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcma_ext.data import DATASETS, ImageDataset, LogitPreprocessing, load_dataset
from lcma_ext.distributions import RESIDUAL_KINDS, bpd_kind, evaluate_bpd_mc, is_bound_only
from lcma_ext.models import (
    MODELS,
    SIZE_NAMES,
    build_flow,
    count_parameters,
    default_num_levels,
    make_level_factory,
    max_num_levels,
)
from lcma_ext.training import (
    TrainConfig,
    TrainResult,
    evaluate_bpd,
    load_checkpoint,
    save_checkpoint,
    train_flow,
)

__all__ = ["ARMS", "build_parser", "main"]

ARMS = ("lcma", "channel", "checkerboard", "random", "high")
#: Arms that ``--arms`` also accepts (not run by default): LCMA with a coarser granularity.
GRANULARITY_ARMS = ("lcma-channel", "lcma-region", "high-channel", "high-region")
#: Default ``--region-size`` of the ``*-region`` arms (sites of each split's block grid).
REGION_SIZE = 4
REFERENCE_ARM = "channel"
#: Flow-VAE arms (paper 001 Sec. 3.1): the ``channel`` arm's flow with a VAE prior of
#: dim(eps) = D / R for ``flow-vae-R``; ``--arms flow-vae`` means all three.
VAE_ARMS = ("flow-vae-16", "flow-vae-4", "flow-vae-2")
#: Arms that ``--arms`` also accepts (not run by default), see docs/latent_shaping.md: the
#: Flow-VAE arms, ``denseflow`` (a DenseFlow-style Glow model with cross-unit coupling, its own
#: architecture whatever ``--model``) and ``haar`` (the ``channel`` arm with Haar-wavelet
#: squeezes). Each run's ``bpd_kind`` says whether its bits/dim is exact, an estimate (residual
#: flows) or an IWAE-K bound.
LATENT_ARMS = (*VAE_ARMS, "denseflow", "haar")
#: Monte Carlo samples of the IWAE-K test estimate of bound-only arms (16 with ``--quick``).
MC_SAMPLES = 128

#: Per-dataset defaults of ``run`` (chosen so the digits default finishes in 10 minutes on a
#: 2-core CPU, everything included).
DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 30, "nms_epochs": 30, "seeds": 3},
    "patches": {"epochs": 10, "nms_epochs": 10, "seeds": 3},
}
FALLBACK_DEFAULTS: dict[str, Any] = {"epochs": 10, "nms_epochs": 10, "seeds": 3}
QUICK = {"epochs": 3, "nms_epochs": 3, "seeds": 2, "limit": 512}

#: Contribution estimation uses this many training examples at most.
CONTRIBUTION_EXAMPLES = 2048
#: Dequantization noise of the data the contributions are estimated on.
CONTRIBUTION_NOISE_SEED = 7


class CLIError(Exception):
    """A user error, printed as one line."""


# ----------------------------------------------------------------------------------------------
# argument parsing


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number; got {value}")
    return value


def _arms(text: str) -> tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    arms = tuple(x for a in arms for x in (VAE_ARMS if a == "flow-vae" else (a,)))
    known = ARMS + GRANULARITY_ARMS + LATENT_ARMS
    unknown = [a for a in arms if a not in known]
    if not arms or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(known)}; got {text!r}"
        )
    return tuple(dict.fromkeys(arms))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="default: digits")
    parser.add_argument("--model", choices=tuple(MODELS), default="realnvp")
    parser.add_argument("--size", choices=SIZE_NAMES, default="tiny")
    parser.add_argument(
        "--levels", type=_int_at_least(2), default=None, help="levels (splits + 1); default: auto"
    )
    parser.add_argument("--epochs", type=_int_at_least(1), default=None, help="per arm")
    parser.add_argument("--nms-epochs", type=_int_at_least(1), default=None)
    parser.add_argument("--seeds", type=_int_at_least(1), default=None, help="seeds 0..N-1")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=64)
    parser.add_argument("--lr", type=_positive_float, default=1e-3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/<command>-...")
    parser.add_argument("--data-root", type=Path, default=None, help="for torchvision datasets")
    parser.add_argument("--limit", type=_int_at_least(2), default=None, help="max images per split")
    parser.add_argument("--image-size", type=_int_at_least(2), default=None, help="imagefolder")
    parser.add_argument(
        "--outlier-gap",
        type=_positive_float,
        default=0.5,
        help="flag a run whose bpd exceeds its arm's median by this much (default 0.5)",
    )
    parser.add_argument("--quick", action="store_true", help="about one minute smoke run")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``lcma-ext`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lcma-ext",
        description="Reproduce the LCMA paper's comparisons of multi-scale splits.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,ablate-levels,contributions}")
    run = sub.add_parser("run", help="Algorithm 1: NMS, contributions, every split arm")
    _add_common(run)
    run.add_argument(
        "--arms",
        type=_arms,
        default=ARMS,
        help=f"default: {','.join(ARMS)}; also {','.join(GRANULARITY_ARMS + LATENT_ARMS)}, "
        "flow-vae (= the three flow-vae-R)",
    )
    run.add_argument(
        "--region-size",
        type=_int_at_least(1),
        default=REGION_SIZE,
        help=f"tile side of the *-region arms, capped at each split's grid (default {REGION_SIZE})",
    )
    ablate = sub.add_parser("ablate-levels", help="all 2^L high/low choices (Table 4)")
    _add_common(ablate)
    contributions = sub.add_parser("contributions", help="heatmaps of an NMS checkpoint")
    contributions.add_argument("checkpoint", type=Path, help="nms.pt written by run")
    contributions.add_argument("--out", type=Path, default=None, help="default: its folder")
    contributions.add_argument("--data-root", type=Path, default=None)
    contributions.add_argument("--device", default="cpu")
    contributions.add_argument("--no-progress", action="store_true")
    return parser


# ----------------------------------------------------------------------------------------------
# the experiment


@dataclass
class Experiment:
    """Everything a comparison shares: data, pre-processing, model and training settings."""

    args: argparse.Namespace
    data: ImageDataset
    preprocessing: LogitPreprocessing
    device: torch.device
    num_levels: int
    epochs: int
    nms_epochs: int
    seeds: list[int]
    out: Path

    @property
    def progress(self) -> bool:
        return not self.args.no_progress

    @property
    def region_size(self) -> int:
        return getattr(self.args, "region_size", REGION_SIZE)

    def level_factory(self):
        return make_level_factory(self.args.model, self.args.size)

    def train_config(self, epochs: int, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            batch_size=self.args.batch_size,
            lr=self.args.lr,
            seed=seed,
            progress=self.progress,
        )

    def config(self) -> dict[str, Any]:
        """What must match for a rerun to reuse finished runs."""
        return {
            "command": self.args.command,
            "dataset": self.args.dataset,
            "model": self.args.model,
            "size": self.args.size,
            "levels": self.num_levels,
            "epochs": self.epochs,
            "nms_epochs": self.nms_epochs,
            "seeds": self.seeds,
            "batch_size": self.args.batch_size,
            "lr": self.args.lr,
            "l2_scale": TrainConfig().l2_scale,
            "grad_clip": TrainConfig().grad_clip,
            "alpha": self.preprocessing.alpha,
            "levels_of_data": self.data.levels,
            "shape": list(self.data.shape),
            "num_train": int(self.data.train.shape[0]),
            "num_test": int(self.data.test.shape[0]),
            "limit": self.args.limit,
            "quick": self.args.quick,
            # only when not the default, so that existing --out folders still match
            **({"region_size": self.region_size} if self.region_size != REGION_SIZE else {}),
        }


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise CLIError(f"expected a torch device such as cpu or cuda; got {text!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"expected an available device; got {text!r} (CUDA is not available)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"expected an available device; got {text!r} (MPS is not available)")
    return device


def _experiment(args: argparse.Namespace) -> Experiment:
    device = _device(args.device)
    defaults = dict(DEFAULTS.get(args.dataset, FALLBACK_DEFAULTS))
    limit = args.limit
    if args.quick:
        defaults.update({k: v for k, v in QUICK.items() if k != "limit"})
        limit = limit or QUICK["limit"]
    epochs = args.epochs or defaults["epochs"]
    nms_epochs = args.nms_epochs or defaults["nms_epochs"]
    seeds = list(range(args.seeds or defaults["seeds"]))
    data = load_dataset(
        args.dataset, data_root=args.data_root, limit=limit, image_size=args.image_size
    )
    if args.levels is not None:
        if args.levels > max_num_levels(data.shape):
            raise CLIError(
                f"expected --levels <= {max_num_levels(data.shape)} for images of shape "
                f"{data.shape}; got {args.levels}"
            )
        num_levels = args.levels
    else:
        num_levels = default_num_levels(data.shape)
    out = args.out or Path("runs") / (
        f"{args.command}-{args.dataset}-{args.model}-{args.size}" + ("-quick" if args.quick else "")
    )
    return Experiment(
        args,
        data,
        LogitPreprocessing(data.levels),
        device,
        num_levels,
        epochs,
        nms_epochs,
        seeds,
        out,
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    from importlib import metadata

    import lcma_ext

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {
        "lcma_ext": lcma_ext.__version__,
        "torch": torch.__version__,
        "nflows": version("nflows"),
        "normflows": version("normflows"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": f"{_cpu_name()} ({os.cpu_count()} logical cores)",
        "torch_threads": str(torch.get_num_threads()),
    }


def _prepare_out(exp: Experiment) -> None:
    exp.out.mkdir(parents=True, exist_ok=True)
    path = exp.out / "config.json"
    config = exp.config()
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != json.loads(json.dumps(config)):
            changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
            raise CLIError(
                f"expected --out to hold runs of the same configuration or nothing; got "
                f"{str(exp.out)!r} with different {', '.join(changed)} (choose another --out)"
            )
    else:
        path.write_text(json.dumps(config, indent=2))


def _contribution_data(exp: Experiment) -> torch.Tensor:
    """Pre-processed training images (fixed noise) on which contributions are estimated."""
    images = exp.data.train[:CONTRIBUTION_EXAMPLES]
    generator = torch.Generator().manual_seed(CONTRIBUTION_NOISE_SEED)
    y, _ = exp.preprocessing(images, generator=generator)
    return y.to(exp.device)


def _train_nms(exp: Experiment):
    """Pre-train the NMS flow (seed 0) or load it; returns ``(flow, summary)``."""
    from lcma_ext.pipeline import build_nms_transform

    factory = exp.level_factory()
    torch.manual_seed(0)
    transform = build_nms_transform(factory, exp.data.shape, exp.num_levels)
    flow = build_flow(transform, exp.data.shape).to(exp.device)
    checkpoint = exp.out / "checkpoints" / "nms.pt"
    summary_path = exp.out / "runs" / "nms.json"
    if summary_path.is_file():
        flow.load_state_dict(load_checkpoint(checkpoint, exp.device)["model"])
        return flow, json.loads(summary_path.read_text())
    result = train_flow(
        flow,
        exp.data.train,
        exp.preprocessing,
        exp.train_config(exp.nms_epochs, 0),
        test_data=exp.data.test,
        checkpoint_path=checkpoint,
        desc="nms",
    )
    summary = _summary("nms", 0, flow, result, exp)
    _save_meta(exp, checkpoint)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    return flow, summary


def _save_meta(exp: Experiment, checkpoint: Path) -> None:
    """Add what ``lcma-ext contributions`` needs to rebuild the NMS flow."""
    state = load_checkpoint(checkpoint)
    state["meta"] = {
        "dataset": exp.args.dataset,
        "model": exp.args.model,
        "size": exp.args.size,
        "levels": exp.num_levels,
        "limit": exp.args.limit or (QUICK["limit"] if exp.args.quick else None),
        "image_size": exp.args.image_size,
    }
    save_checkpoint(checkpoint, **state)


def _contributions(exp: Experiment, nms_flow):
    """Estimate (or load) the contribution maps of the NMS flow and plot them per split."""
    from lcma_ext.contributions import ContributionMaps, estimate_contributions

    path = exp.out / "contributions.pt"
    if path.is_file():
        maps = ContributionMaps.load(path)
    else:
        nms_flow.eval()
        maps = estimate_contributions(
            nms_flow._transform,
            _contribution_data(exp),
            exp.level_factory(),
            exp.data.shape,
            progress=exp.progress,
        )
        maps.save(path)
    _plot_contributions(maps, exp.out)
    return maps


def _plot_contributions(maps, out: Path) -> list[Path]:
    from lcma_ext.plotting import plot_contributions

    paths = []
    for level in range(len(maps.maps)):
        path = out / f"contributions_level{level}.png"
        if not path.is_file():
            plot_contributions(maps, path, splits=[level])
        paths.append(path)
    return paths


def _build_arm(exp: Experiment, arm: str, maps, seed: int, choice: Sequence[str] | None = None):
    """Multi-scale flow of one arm.

    The levels are built after ``torch.manual_seed(seed)``, so every arm of a seed starts from
    the same weights; the NMS contributions are mapped onto these levels (``remap=True``: a
    Glow level's random 1x1-convolution permutation may differ from the measured levels').

    Args:
        exp: The experiment.
        arm: A split name of :data:`ARMS` (ignored when ``choice`` is given).
        maps: The NMS contribution maps.
        seed: Seed of the weights and of the random split.
        choice: ``ablate-levels``: ``"low"``/``"high"`` per split point.
    """
    from lcma_ext.multiscale import ContributionMultiscaleFlow
    from lcma_ext.pipeline import build_levels, build_multiscale_transform

    if arm in LATENT_ARMS and choice is None:
        return _build_latent_arm(exp, arm, seed)
    factory = exp.level_factory()
    torch.manual_seed(seed)
    levels = build_levels(factory, exp.data.shape, exp.num_levels)
    if choice is None:
        transform = build_multiscale_transform(
            factory,
            exp.data.shape,
            exp.num_levels,
            split=arm,
            contributions=maps,
            seed=seed,
            levels=levels,
            remap=True,
            region_size=exp.region_size,
        )
    else:
        splits = mixed_lcma_splits(maps, levels, exp.data.shape, choice)
        transform = ContributionMultiscaleFlow.from_levels(levels, exp.data.shape, splits)
    return build_flow(transform, exp.data.shape).to(exp.device)


def _build_latent_arm(exp: Experiment, arm: str, seed: int):
    """Flow of a :data:`LATENT_ARMS` arm (see docs/latent_shaping.md).

    ``flow-vae-R`` and ``haar`` build the ``channel`` arm's multi-scale transform after
    ``torch.manual_seed(seed)`` exactly as :func:`_build_arm` does (``flow-vae-R``: the same
    initial weights, then a :class:`lcma_ext.distributions.VAEPrior` with dim(eps) = D / R
    replaces the normal base; ``haar``: Haar squeezes). ``denseflow`` builds
    :func:`lcma_ext.models.denseflow.build_denseflow` at ``--size``.
    """
    from nflows.flows import Flow

    from lcma_ext.pipeline import build_levels, build_multiscale_transform

    shape = exp.data.shape
    if arm == "denseflow":
        from lcma_ext.models.denseflow import build_denseflow

        torch.manual_seed(seed)
        return build_denseflow(shape, exp.num_levels, exp.args.size).to(exp.device)
    if arm == "haar":
        if exp.args.model not in ("realnvp", "glow"):
            raise CLIError(
                f"expected --model realnvp or glow for the haar arm; got {exp.args.model!r}"
            )
        factory = make_level_factory(exp.args.model, exp.args.size, squeeze="haar")
    else:
        factory = exp.level_factory()
    torch.manual_seed(seed)
    levels = build_levels(factory, shape, exp.num_levels)
    transform = build_multiscale_transform(
        factory, shape, exp.num_levels, split="channel", seed=seed, levels=levels
    )
    flow = build_flow(transform, shape)
    if arm in VAE_ARMS:
        from lcma_ext.distributions import VAEPrior

        features = math.prod(shape)
        latent_dim = max(1, features // int(arm.rsplit("-", 1)[1]))
        flow = Flow(flow._transform, VAEPrior(features, latent_dim))
    return flow.to(exp.device)


def mixed_lcma_splits(maps, levels, input_shape: Sequence[int], choice: Sequence[str]) -> list:
    """One :class:`lcma_ext.splits.LCMASplit` per split point with its own ``factor_out``.

    The data dimensions are carried through each level and each chosen split, so split point
    ``l`` sees the NMS contributions (``maps.data_maps[l]``) of the dimensions that survived
    the earlier choices (Table 4's mixed high/low rows).
    """
    from lcma_ext.splits import LCMASplit

    if len(choice) != len(levels) - 1:
        raise ValueError(f"expected {len(levels) - 1} choices; got {len(choice)}")
    positions = torch.arange(math.prod(input_shape)).view(1, *input_shape)
    splits = []
    for index, side in enumerate(choice):
        carried = levels[index].carry(positions)
        contribution = maps.data_maps[index].double().reshape(-1)[carried[0]]
        split = LCMASplit(contribution, factor_out=side, placement=maps.placement)
        _, positions = split.carry(carried)
        splits.append(split)
    return splits


def _summary(arm: str, seed: int, flow, result: TrainResult, exp: Experiment) -> dict[str, Any]:
    bpd = evaluate_bpd(flow, exp.data.test, exp.preprocessing) if result.epochs_done else math.nan
    estimate: dict[str, Any] = {"bpd_kind": bpd_kind(flow)}
    if is_bound_only(flow) and result.epochs_done:
        # bound-only flows: score the IWAE-K bound (Monte Carlo, with standard errors)
        samples = 16 if exp.args.quick else MC_SAMPLES
        estimate = evaluate_bpd_mc(flow, exp.data.test, exp.preprocessing, num_samples=samples)
        estimate["bpd_one_sample"], bpd = bpd, estimate["bpd_iwae"]
    return {
        "arm": arm,
        "seed": seed,
        "test_bpd": bpd,
        **estimate,
        "diverged": bool(result.diverged or not math.isfinite(bpd)),
        "diverged_reason": result.diverged_reason
        or ("" if math.isfinite(bpd) else "non-finite test bpd"),
        "train_time_s": result.train_time_s,
        "parameters": count_parameters(flow),
        "epochs_done": result.epochs_done,
        "train_bpd_curve": result.train_bpd,
        "test_bpd_curve": result.test_bpd,
    }


@torch.no_grad()
def sample_images(flow, preprocessing: LogitPreprocessing, num: int, temperature: float, seed: int):
    """``num`` samples in ``[0, 1]`` drawn at ``temperature`` (noise scaled by it)."""
    flow.eval()
    parameter = next(flow.parameters())
    shape = flow._distribution._shape
    generator = torch.Generator().manual_seed(seed)
    if hasattr(flow._distribution, "sample_at_temperature"):  # a learned prior (Flow-VAE)
        noise = flow._distribution.sample_at_temperature(num, temperature, generator=generator)
    else:
        noise = temperature * torch.randn((num, *shape), generator=generator, dtype=parameter.dtype)
    samples, _ = flow._transform.inverse(noise.to(parameter.device))
    return preprocessing.to_unit(samples).cpu()


def save_image_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Save ``(N, C, H, W)`` images in ``[0, 1]`` as one grid PNG.

    Uses ``torchvision.utils.save_image`` when torchvision is installed, else matplotlib.
    """
    images = torch.nan_to_num(images.float(), nan=0.0).clamp(0, 1)
    try:
        from torchvision.utils import save_image
    except ImportError:
        save_image = None
    if save_image is not None:
        save_image(images, str(path), nrow=nrow, padding=1)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), dtype=np.float32)
    for index in range(n):
        r, q = divmod(index, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = (
            images[index].permute(1, 2, 0).numpy()
        )
    figure = plt.figure(figsize=(nrow * 0.6, rows * 0.6), dpi=100)
    axis = figure.add_axes((0, 0, 1, 1))
    axis.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    axis.axis("off")
    figure.savefig(path)
    plt.close(figure)


def _save_samples(exp: Experiment, arm: str, flow) -> None:
    for temperature in (1.0, 0.7):
        path = exp.out / f"samples_{arm}_T{temperature}.png"
        if not path.is_file():
            try:
                images = sample_images(flow, exp.preprocessing, 64, temperature, seed=0)
            except (RuntimeError, ValueError) as error:  # e.g. a diverged model
                print(f"lcma-ext: warning: no samples for {arm}: {error}", file=sys.stderr)
                continue
            save_image_grid(images, path)


def _run_arm(
    exp: Experiment, arm: str, maps, seed: int, choice: Sequence[str] | None = None
) -> dict[str, Any]:
    """Train one arm for one seed (or load its finished result)."""
    name = f"{arm}_seed{seed}"
    summary_path = exp.out / "runs" / f"{name}.json"
    checkpoint = exp.out / "checkpoints" / f"{name}.pt"
    flow = None
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        flow = _build_arm(exp, arm, maps, seed, choice)
        result = train_flow(
            flow,
            exp.data.train,
            exp.preprocessing,
            exp.train_config(exp.epochs, seed),
            test_data=exp.data.test,
            checkpoint_path=checkpoint,
            desc=f"{arm} seed {seed}",
        )
        summary = _summary(arm, seed, flow, result, exp)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=2))
        status = "DIVERGED" if summary["diverged"] else f"{summary['test_bpd']:.4f} bpd"
        if exp.progress:
            print(f"  {arm:>14} seed {seed}: {status} ({summary['train_time_s']:.1f} s)")
    if seed == exp.seeds[0] and not all(
        (exp.out / f"samples_{arm}_T{t}.png").is_file() for t in (1.0, 0.7)
    ):
        if flow is None:
            flow = _build_arm(exp, arm, maps, seed, choice)
            if checkpoint.is_file():
                flow.load_state_dict(load_checkpoint(checkpoint, exp.device)["model"])
        _save_samples(exp, arm, flow)
    return summary


# ----------------------------------------------------------------------------------------------
# statistics and reports


def _flag_outliers(runs: list[dict[str, Any]], gap: float) -> None:
    """Flag runs far above the median of the same arm's seeds (never drop them)."""
    finite = [r["test_bpd"] for r in runs if math.isfinite(r["test_bpd"])]
    if len(finite) < 2:
        return
    median = statistics.median(finite)
    for run in runs:
        if math.isfinite(run["test_bpd"]) and run["test_bpd"] > median + gap:
            run["diverged"] = True
            run["diverged_reason"] = (
                run["diverged_reason"]
                or f"test bpd {run['test_bpd']:.3f} > arm median {median:.3f} + {gap}"
            )


def _stats(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    nan = float("nan")
    return {
        "mean": statistics.fmean(finite) if finite else nan,
        "std": statistics.stdev(finite) if len(finite) > 1 else nan,
        "median": statistics.median(finite) if finite else nan,
    }


def aggregate(
    runs: dict[str, list[dict[str, Any]]], reference: str, seeds: Sequence[int], gap: float
) -> dict[str, dict[str, Any]]:
    """Per arm: per-seed bpd, mean/std/median, paired differences against ``reference``.

    Non-finite runs are excluded from mean/std/median but counted in ``n_diverged``; finite
    outliers are flagged and kept in every statistic.
    """
    arms: dict[str, dict[str, Any]] = {}
    for arm, arm_runs in runs.items():
        _flag_outliers(arm_runs, gap)
        bpd = [r["test_bpd"] for r in arm_runs]
        stats = _stats(bpd)
        arms[arm] = {
            "bpd_per_seed": bpd,
            "bpd_kind": arm_runs[0].get("bpd_kind", "exact"),
            "bpd_mc_se_per_seed": [r.get("bpd_iwae_se") for r in arm_runs],
            "seeds": [r["seed"] for r in arm_runs],
            "bpd_mean": stats["mean"],
            "bpd_std": stats["std"],
            "bpd_median": stats["median"],
            "diverged": [r["diverged"] for r in arm_runs],
            "diverged_reasons": [r["diverged_reason"] for r in arm_runs],
            "n_diverged": sum(r["diverged"] for r in arm_runs),
            "train_time_s": [r["train_time_s"] for r in arm_runs],
            "train_time_s_mean": statistics.fmean(r["train_time_s"] for r in arm_runs),
            "parameters": arm_runs[0]["parameters"],
            "epochs_done": [r["epochs_done"] for r in arm_runs],
        }
    if reference in arms:
        base = dict(zip(arms[reference]["seeds"], arms[reference]["bpd_per_seed"]))
        for entry in arms.values():
            diffs = [
                bpd - base[seed]
                for seed, bpd in zip(entry["seeds"], entry["bpd_per_seed"])
                if seed in base
            ]
            stats = _stats(diffs)
            finite = [d for d in diffs if math.isfinite(d)]
            entry[f"paired_diff_vs_{reference}"] = diffs
            entry["paired_diff_mean"] = stats["mean"]
            entry["paired_diff_std"] = stats["std"]
            entry["paired_diff_median"] = stats["median"]
            entry["wins_vs_reference"] = sum(d < 0 for d in finite)
            entry["diff_of_means_vs_reference"] = entry["bpd_mean"] - arms[reference]["bpd_mean"]
    return arms


def _fmt(value: float, digits: int = 4, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _diagnostics_markdown(diagnostics: Sequence[dict[str, Any]]) -> list[str]:
    """Per split point: how decisive and how static the LCMA split of the NMS maps is."""
    if not diagnostics:
        return []
    lines = [
        "LCMA split diagnostics of the NMS contribution maps (per split point: local blocks, "
        "exact ties and near-ties of the 2nd/3rd contribution, share of blocks whose kept set "
        "differs from `channel`, `checkerboard`, and the most common pattern of the block's own "
        "channel group, 0 meaning a static split in disguise; share of sites whose kept set "
        "equals the channel-granularity choice; entropy in bits of the kept-position pattern, "
        "0 to 2; see docs/granularity.md):",
        "",
        "| split | blocks | ties | near-ties | ≠ channel | ≠ checkerboard | ≠ group mode "
        "| = channel granularity | pattern entropy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for index, entry in enumerate(diagnostics):
        agrees = entry.get("agrees_with_channel_granularity", math.nan)
        entropy = entry.get("kept_position_entropy", math.nan)
        lines.append(
            f"| {index} | {entry['blocks']} | {entry['ties']} | {entry['near_ties']} "
            f"| {entry['differs_from_channel']:.3f} | {entry['differs_from_checkerboard']:.3f} "
            f"| {entry['differs_from_group_modal']:.3f} | {_fmt(agrees, 3)} "
            f"| {_fmt(entropy, 3)} |"
        )
    return [*lines, ""]


def _bound_notes(arms: dict[str, dict[str, Any]]) -> list[str]:
    """Explain non-exact bits/dim (estimates, IWAE-K bounds) and the Haar arm; empty if exact."""
    lines = []
    kinds = {a: e.get("bpd_kind", "exact") for a, e in arms.items()}
    if set(kinds.values()) & set(RESIDUAL_KINDS):
        lines += [
            "bpd kind: `roulette estimate` is a Residual Flow's eval-mode log-likelihood, its "
            "log-dets by the Russian-roulette power series with 20 exact terms: an unbiased "
            "estimate of the exact bits/dim; `truncated series` is i-ResNet's 20-term series, "
            "a biased estimate (see docs/residual.md).",
            "",
        ]
    bounds = {
        a: e for a, e in arms.items() if kinds[a] != "exact" and kinds[a] not in RESIDUAL_KINDS
    }
    if bounds:
        ses = "; ".join(
            f"{a}: " + ", ".join(f"{se:.2g}" for se in e.get("bpd_mc_se_per_seed", []) if se)
            for a, e in bounds.items()
        )
        lines += [
            "bpd kind: `exact` is the flow's exact likelihood of the dequantized data; "
            "`IWAE-K` is the importance-weighted bound with K Monte Carlo samples per test "
            "image (Flow-VAE: samples of eps; DenseFlow: samples of the cross-unit noise), an "
            "upper bound on bits/dim in expectation, never exact. Monte Carlo standard error of "
            f"each seed's IWAE-K bpd: {ses}.",
            "",
        ]
    if "denseflow" in arms:
        lines += [
            "`denseflow`: its own architecture (DenseFlow-style Glow units with cross-unit "
            "coupling, see the params column), so its difference from the other rows is not a "
            "split-only comparison.",
            "",
        ]
    if "haar" in arms:
        lines += [
            "`haar`: one flow on the finest (full-resolution) image with Haar-wavelet squeezes, "
            "so its bits/dim is that of the finest image, comparable with the other rows (no "
            "joint multi-resolution likelihood, cf. MSFlow Sec. 5).",
            "",
        ]
    return lines


def results_markdown(results: dict[str, Any]) -> str:
    """The ``results.md`` report of a ``run`` or ``ablate-levels`` results dictionary."""
    config, arms, reference = results["config"], results["arms"], results["reference_arm"]
    seeds = config["seeds"]
    lines = [
        f"# lcma-ext {config['command']}: {config['model']} ({config['size']}) on "
        f"{config['dataset']}",
        "",
        f"Test bits/dim (lower is better), {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
        f"{config['epochs']} epochs per arm, NMS pre-trained {config['nms_epochs']} epochs, "
        f"{config['levels']} levels, batch {config['batch_size']}, Adam lr {config['lr']}. "
        f"Every arm: same architecture, optimizer, epochs, seeds and initial weights per seed.",
        "",
        f"| arm | bpd kind | bpd mean ± std | median | Δ mean vs {reference} | paired Δ per seed "
        f"| wins | params | train s/seed | flagged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in arms.items():
        diffs = entry.get(f"paired_diff_vs_{reference}", [])
        paired = ", ".join(_fmt(d, 3, signed=True) for d in diffs) if arm != reference else "—"
        delta = (
            _fmt(entry.get("diff_of_means_vs_reference", math.nan), 4, signed=True)
            if arm != reference
            else "—"
        )
        wins = f"{entry.get('wins_vs_reference', 0)}/{len(diffs)}" if arm != reference else "—"
        flagged = (
            ", ".join(f"seed {s}" for s, d in zip(entry["seeds"], entry["diverged"]) if d) or "none"
        )
        lines.append(
            f"| {arm} | {entry.get('bpd_kind', 'exact')} "
            f"| {_fmt(entry['bpd_mean'])} ± {_fmt(entry['bpd_std'])} "
            f"| {_fmt(entry['bpd_median'])} | {delta} | {paired} | {wins} "
            f"| {entry['parameters']:,} | {entry['train_time_s_mean']:.1f} | {flagged} |"
        )
    nms = results.get("nms")
    lines += [""]
    lines += _bound_notes(arms)
    lines += _diagnostics_markdown(results.get("contribution_diagnostics") or [])
    if nms:
        lines.append(
            f"NMS flow (no split, seed 0, {config['nms_epochs']} epochs): "
            f"{_fmt(nms['test_bpd'])} bpd."
        )
    lines += [
        f"Paired Δ = arm − {reference} on the same seed (negative: the arm is better); "
        f"wins = seeds where the arm beats {reference}. Flagged runs (non-finite, or more than "
        f"{results['outlier_gap']} bpd above their arm's median) are kept in every statistic "
        "except that non-finite values are left out of mean/std/median.",
        "",
        f"Wall time {results['wall_time_s']:.0f} s (this invocation) on "
        f"{results['versions']['cpu']}, {results['versions']['platform']} "
        f"({results['versions']['torch_threads']} torch threads, device {results['device']}); "
        f"torch {results['versions']['torch']}, nflows {results['versions']['nflows']}.",
        "",
    ]
    return "\n".join(lines)


def plot_learning_curves(runs: dict[str, list[dict[str, Any]]], path: Path, nms=None) -> None:
    """Test bits/dim per epoch, one colour per arm, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (arm, arm_runs) in enumerate(runs.items()):
        colour = colours[index % len(colours)]
        for k, run in enumerate(arm_runs):
            label = arm if k == 0 else None
            train = run["train_bpd_curve"]
            axes[0].plot(range(1, len(train) + 1), train, color=colour, alpha=0.7, label=label)
            if run["test_bpd_curve"]:
                epochs, values = zip(*run["test_bpd_curve"])
                axes[1].plot(epochs, values, color=colour, alpha=0.7, label=label)
    if nms and nms["test_bpd_curve"]:
        epochs, values = zip(*nms["test_bpd_curve"])
        axes[1].plot(epochs, values, color="black", linestyle="--", label="nms (no split)")
    for axis, title in zip(axes, ("train bits/dim", "test bits/dim")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    # Zoom on the converged part: the first epochs are far above.
    finals = [
        v
        for arm_runs in runs.values()
        for r in arm_runs
        for _, v in r["test_bpd_curve"]
        if math.isfinite(v)
    ]
    if finals:
        low = min(finals)
        axes[1].set_ylim(low - 0.05, low + max(0.5, 4 * (statistics.median(finals) - low)))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _write_results(
    exp: Experiment,
    runs: dict[str, list[dict[str, Any]]],
    reference: str,
    nms: dict[str, Any] | None,
    wall: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    arms = aggregate(runs, reference, exp.seeds, exp.args.outlier_gap)
    results = {
        "config": exp.config(),
        "reference_arm": reference,
        "outlier_gap": exp.args.outlier_gap,
        "arms": arms,
        "nms": nms,
        "wall_time_s": wall,
        "device": str(exp.device),
        "versions": _versions(),
        "runs": runs,
        **(extra or {}),
    }
    (exp.out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    (exp.out / "results.md").write_text(results_markdown(results))
    plot_learning_curves(runs, exp.out / "learning_curves.png", nms)
    return results


# ----------------------------------------------------------------------------------------------
# commands


def command_run(args: argparse.Namespace) -> dict[str, Any]:
    """``lcma-ext run``: Algorithm 1 with every split arm."""
    start = time.perf_counter()
    exp = _experiment(args)
    _prepare_out(exp)
    if exp.progress:
        print(
            f"lcma-ext run: {args.model} ({args.size}) on {args.dataset} {exp.data.shape}, "
            f"{exp.num_levels} levels, arms {','.join(args.arms)}, seeds {exp.seeds}, "
            f"{exp.epochs} epochs (NMS {exp.nms_epochs}) -> {exp.out}"
        )
    nms_flow, nms = _train_nms(exp)
    maps = _contributions(exp, nms_flow)
    del nms_flow
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
    for seed in exp.seeds:
        for arm in args.arms:
            runs[arm].append(_run_arm(exp, arm, maps, seed))
    reference = REFERENCE_ARM if REFERENCE_ARM in args.arms else args.arms[0]
    results = _write_results(
        exp,
        runs,
        reference,
        nms,
        time.perf_counter() - start,
        {"contribution_diagnostics": list(maps.diagnostics)},
    )
    if exp.progress:
        print((exp.out / "results.md").read_text())
    return results


def level_choice_name(choice: Sequence[str]) -> str:
    """``("low", "high")`` -> ``"low-high"``."""
    return "-".join(choice)


def command_ablate_levels(args: argparse.Namespace) -> dict[str, Any]:
    """``lcma-ext ablate-levels``: every high/low choice over the split points (Table 4)."""
    start = time.perf_counter()
    exp = _experiment(args)
    _prepare_out(exp)
    num_splits = exp.num_levels - 1
    if num_splits > 4:
        raise CLIError(
            f"expected at most 4 split points (16 arms) for ablate-levels; got {num_splits} "
            "(pass a smaller --levels)"
        )
    nms_flow, nms = _train_nms(exp)
    maps = _contributions(exp, nms_flow)
    del nms_flow
    choices = list(itertools.product(("high", "low"), repeat=num_splits))
    runs: dict[str, list[dict[str, Any]]] = {level_choice_name(c): [] for c in choices}
    for seed in exp.seeds:
        for choice in choices:
            name = level_choice_name(choice)
            runs[name].append(_run_arm(exp, name, maps, seed, choice))
    reference = level_choice_name(("low",) * num_splits)
    results = _write_results(
        exp,
        runs,
        reference,
        nms,
        time.perf_counter() - start,
        {"note": f"{reference} is LCMA (factor out the low-contribution half at every split)"},
    )
    if exp.progress:
        print((exp.out / "results.md").read_text())
    return results


def command_contributions(args: argparse.Namespace) -> list[Path]:
    """``lcma-ext contributions CHECKPOINT``: re-estimate and plot an NMS flow's contributions."""
    from lcma_ext.contributions import estimate_contributions
    from lcma_ext.pipeline import build_nms_transform

    state = load_checkpoint(args.checkpoint)
    meta = state.get("meta")
    if meta is None:
        raise CLIError(
            f"expected an NMS checkpoint written by 'lcma-ext run' (nms.pt); got "
            f"{str(args.checkpoint)!r} without metadata"
        )
    device = _device(args.device)
    data = load_dataset(
        meta["dataset"],
        data_root=args.data_root,
        limit=meta["limit"],
        image_size=meta["image_size"],
    )
    factory = make_level_factory(meta["model"], meta["size"])
    transform = build_nms_transform(factory, data.shape, meta["levels"])
    flow = build_flow(transform, data.shape).to(device)
    flow.load_state_dict(state["model"])
    flow.eval()
    preprocessing = LogitPreprocessing(data.levels)
    generator = torch.Generator().manual_seed(CONTRIBUTION_NOISE_SEED)
    y, _ = preprocessing(data.train[:CONTRIBUTION_EXAMPLES], generator=generator)
    maps = estimate_contributions(
        flow._transform,
        y.to(device),
        factory,
        data.shape,
        progress=not args.no_progress,
    )
    out = args.out or args.checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    from lcma_ext.plotting import plot_contributions

    for level in range(len(maps.maps)):
        path = out / f"contributions_level{level}.png"
        plot_contributions(maps, path, splits=[level])
        paths.append(path)
    maps.save(out / "contributions.pt")
    print("\n".join(str(p) for p in paths))
    return paths


COMMANDS = {
    "run": command_run,
    "ablate-levels": command_ablate_levels,
    "contributions": command_contributions,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lcma-ext``; returns the exit status (2 on a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        COMMANDS[args.command](args)
    except (CLIError, ValueError, ImportError) as error:
        message = " ".join(str(error).split())
        print(f"lcma-ext {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lcma-ext: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
