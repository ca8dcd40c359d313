"""A finished run folder, looked at again: samples, interpolations and rescored checkpoints.

``lcma-ext sample``, ``lcma-ext interpolate`` and ``lcma-ext evaluate`` are these functions. Each
rebuilds the trained flows from the run folder alone (:func:`~lcma_ext.experiments.load_arm`,
:func:`~lcma_ext.experiments.load_run_data`) and leaves torch's global random state alone:

* :func:`sample_run`: a titled grid of samples of one arm and seed at a temperature
  (:func:`lcma_ext.sampling.sample`);
* :func:`interpolate_run`: a titled grid of latent interpolations between pairs of test images
  (:func:`lcma_ext.sampling.interpolate`), one row per pair;
* :func:`evaluate_run`: every checkpoint rescored on the test set, against the recorded figure.

Example (on the folder of a finished ``lcma-ext run --quick --out runs/smoke``)::

    from lcma_ext.experiments.inspection import evaluate_run, sample_run

    sample_run("runs/smoke", "lcma", 0, temperature=0.7)   # runs/smoke/samples_lcma_seed0_T0.7.png
    rows = evaluate_run("runs/smoke")                     # and evaluation.md / evaluation.json

References:
    D. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018
    (temperature, latent interpolation).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from nflows.flows import Flow

from lcma_ext.data import ImageDataset, LogitPreprocessing
from lcma_ext.distributions import bpd_kind, evaluate_bpd_mc, is_bound_only
from lcma_ext.experiments.markdown import number, table
from lcma_ext.experiments.runner import MC_SAMPLES, load_arm, load_run_data
from lcma_ext.experiments.store import (
    ExperimentError,
    RunStore,
    atomic_path,
    warn,
    write_json,
    write_text,
)
from lcma_ext.flows import flow_dtype_device
from lcma_ext.plotting import sample_title, save_image_grid
from lcma_ext.sampling import MODES, interpolate, sample
from lcma_ext.training import EVAL_NOISE_SEED, evaluate_bpd

__all__ = ["evaluate_run", "evaluation_markdown", "interpolate_run", "sample_run"]

#: ``<arm>_seed<k>`` of a checkpoint or run summary.
_RUN_NAME = re.compile(r"^(?P<arm>.+)_seed(?P<seed>\d+)$")


def _run_folder(run_dir: str | Path) -> Path:
    """``run_dir`` as a path; a one-line error when it is no folder."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ExperimentError(
            f"expected a run folder of lcma-ext run or ablate-levels; got {str(path)!r} "
            "(no such folder)"
        )
    return path


def _recorded(store: RunStore, arm: str, seed: int) -> dict[str, Any] | None:
    """The run summary ``runs/<arm>_seed<k>.json`` (``runs/nms.json`` for ``"nms"``), if any."""
    path = store.summary_path("nms" if arm == "nms" else f"{arm}_seed{seed}")
    return store.read_summary(path) if path.is_file() else None


def _title(arm: str, seed: int, temperature: float, summary: dict[str, Any] | None) -> str:
    if summary is None:  # an unfinished run: no recorded figure
        return f"{arm}, seed {seed}: T = {temperature:g} (unfinished run)"
    kind = summary.get("bpd_kind", "exact")
    return sample_title(arm, temperature, summary["test_bpd"], seed, kind)


def sample_run(
    run_dir: str | Path,
    arm: str,
    seed: int,
    *,
    temperature: float = 1.0,
    num: int = 64,
    noise_seed: int = 0,
    out: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """``lcma-ext sample``: a titled PNG grid of ``num`` samples of a trained arm.

    Args:
        run_dir: The ``out`` folder of a finished run.
        arm, seed: The arm and the seed it was trained with.
        temperature: ``T >= 0`` (:func:`lcma_ext.sampling.sample`).
        num: Number of samples (8 per row).
        noise_seed: Seed of the sampling noise (the runner's own grids use 0).
        out: The PNG; default ``run_dir/samples_<arm>_seed<seed>_T<T>.png``.
        device: Where to sample.

    Returns:
        The PNG's path. Its title names the arm, seed, temperature and recorded test bits/dim.

    Raises:
        lcma_ext.experiments.ExperimentError: for a missing run folder, arm or seed.
        ValueError: for a negative temperature or ``num < 1``.
    """
    store = RunStore.open(_run_folder(run_dir))
    record, _ = store.stored_config()
    flow = load_arm(run_dir, arm, seed, device=device)
    preprocessing = LogitPreprocessing(record["levels_of_data"], record["alpha"])
    images = sample(flow, num, temperature, preprocessing=preprocessing, seed=noise_seed)
    default = store.root / f"samples_{arm}_seed{seed}_T{temperature:g}.png"
    path = Path(out) if out is not None else default
    title = _title(arm, seed, temperature, _recorded(store, arm, seed))
    with atomic_path(path) as tmp:
        save_image_grid(images, tmp, title=title)
    return path


def _test_pairs(
    data: ImageDataset, preprocessing: LogitPreprocessing, pairs: int, flow: Flow
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``2 pairs`` test images, dequantized with the evaluation noise, as pairs."""
    if not isinstance(pairs, int) or isinstance(pairs, bool) or pairs < 1:
        raise ValueError(f"expected pairs as an integer >= 1; got {pairs!r}")
    available = int(data.test.shape[0]) // 2
    if pairs > available:
        raise ValueError(
            f"expected --pairs <= {available} (half the {data.test.shape[0]} test images); "
            f"got {pairs}"
        )
    dtype, device = flow_dtype_device(flow)
    generator = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    y, _ = preprocessing(data.test[: 2 * pairs], generator=generator, dtype=dtype)
    y = y.to(device)
    return y[:pairs], y[pairs:]


def interpolate_run(
    run_dir: str | Path,
    arm: str,
    seed: int,
    *,
    steps: int = 8,
    pairs: int = 4,
    mode: str = "spherical",
    out: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """``lcma-ext interpolate``: latent interpolations between pairs of test images, as a grid.

    Pair ``i`` is test images ``i`` and ``pairs + i`` (dequantized with the evaluation noise);
    row ``i`` of the grid goes from the reconstruction of one to that of the other in ``steps``
    images (:func:`lcma_ext.sampling.interpolate`).

    Args:
        run_dir: The ``out`` folder of a finished run.
        arm, seed: The arm and the seed it was trained with.
        steps: Images per row, ``>= 2``.
        pairs: Rows, at most half the test images.
        mode: ``"linear"`` or ``"spherical"``.
        out: The PNG; default ``run_dir/interpolation_<arm>_seed<seed>_<mode>.png``.
        data_root: For torchvision datasets (not stored in the run folder).
        device: Where to run the flow.

    Returns:
        The PNG's path, titled with the arm, seed, mode and recorded test bits/dim.

    Raises:
        lcma_ext.experiments.ExperimentError: for a missing run folder, arm or seed.
        ValueError: for ``steps < 2``, too many pairs or an unknown mode.
    """
    run_dir = _run_folder(run_dir)
    if mode not in MODES:
        raise ValueError(f"expected mode in {', '.join(MODES)}; got {mode!r}")
    flow = load_arm(run_dir, arm, seed, device=device)
    data, preprocessing = load_run_data(run_dir, data_root)
    x0, x1 = _test_pairs(data, preprocessing, pairs, flow)
    images = interpolate(flow, x0, x1, steps, mode, preprocessing=preprocessing)
    summary = _recorded(RunStore.open(run_dir), arm, seed)
    bpd = "unfinished run" if summary is None else f"test {summary['test_bpd']:.3f} bits/dim"
    title = f"{arm}, seed {seed}: {mode} interpolation of test images, {bpd}"
    path = Path(out) if out is not None else run_dir / f"interpolation_{arm}_seed{seed}_{mode}.png"
    with atomic_path(path) as tmp:
        save_image_grid(images.flatten(0, 1), tmp, nrow=steps, title=title)
    return path


def _score(
    flow: Flow, data: ImageDataset, preprocessing: LogitPreprocessing, quick: bool
) -> tuple[float, str]:
    """``(bpd, kind)`` as the runner scores a flow: exact, or IWAE-K for bound-only flows."""
    if is_bound_only(flow):
        samples = 16 if quick else MC_SAMPLES
        estimate = evaluate_bpd_mc(flow, data.test, preprocessing, num_samples=samples)
        return estimate["bpd_iwae"], estimate["bpd_kind"]
    return evaluate_bpd(flow, data.test, preprocessing), bpd_kind(flow)


def _checkpoints(run_dir: Path) -> list[tuple[str, int]]:
    """``(arm, seed)`` of every checkpoint, the NMS first, then by arm and seed."""
    folder = run_dir / "checkpoints"
    found = [] if not folder.is_dir() else sorted(folder.glob("*.pt"))
    named = [_RUN_NAME.match(path.stem) for path in found]
    runs = sorted((m["arm"], int(m["seed"])) for m in named if m is not None)
    return ([("nms", 0)] if (folder / "nms.pt").is_file() else []) + runs


def _missing(store: RunStore, found: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """``(arm, seed)`` of every run with a summary but no checkpoint (deleted or lost)."""
    folder = store.root / "runs"
    summaries = [] if not folder.is_dir() else sorted(folder.glob("*_seed*.json"))
    named = [_RUN_NAME.match(path.stem) for path in summaries]
    runs = sorted((m["arm"], int(m["seed"])) for m in named if m is not None)
    have = set(found)
    extra = [("nms", 0)] if store.summary_path("nms").is_file() else []
    return [run for run in extra + runs if run not in have]


def evaluate_run(
    run_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    device: str = "cpu",
    out: str | Path | None = None,
) -> list[dict[str, Any]]:
    """``lcma-ext evaluate``: rescore every checkpoint of a run folder on its test set.

    Each flow (the NMS flow and every ``<arm>_seed<k>`` checkpoint) is rebuilt from the folder
    and scored as the runner scored it (the same dequantization noise; IWAE-K for bound-only
    arms), next to the figure its run summary recorded. A finished run rescores to its recorded
    bits/dim; an unfinished one (no summary) shows its last epoch's weights.

    Args:
        run_dir: The ``out`` folder of a run.
        data_root: For torchvision datasets.
        device: Where to score.
        out: Folder for ``evaluation.json`` and ``evaluation.md``; default ``run_dir``.

    Returns:
        One row per checkpoint: ``arm``, ``seed``, ``bpd_kind``, ``recorded_bpd`` (``None``
        without a summary), ``rescored_bpd`` and ``difference``; then one row per run with a
        summary but no checkpoint (``bpd_kind`` ``"no checkpoint"``, ``rescored_bpd``
        ``None``), each also named in a warning.

    Raises:
        lcma_ext.experiments.ExperimentError: for a missing run folder or one without
            checkpoints.
    """
    run_dir = _run_folder(run_dir)
    store = RunStore.open(run_dir)
    record, config = store.stored_config(device=device)
    runs = _checkpoints(run_dir)
    if not runs:
        raise ExperimentError(f"expected checkpoints in {str(run_dir / 'checkpoints')!r}; got none")
    data, preprocessing = load_run_data(run_dir, data_root)
    rows = []
    for arm, seed in runs:
        if arm == "nms":
            flow = store.load_nms(config, tuple(record["shape"]), record["levels"])
        else:
            flow = load_arm(run_dir, arm, seed, device)
        bpd, kind = _score(flow, data, preprocessing, config.quick)
        summary = _recorded(store, arm, seed)
        recorded = None if summary is None else summary["test_bpd"]
        difference = None if recorded is None else bpd - recorded
        rows.append(
            {"arm": arm, "seed": seed, "bpd_kind": kind, "recorded_bpd": recorded,
             "rescored_bpd": bpd, "difference": difference}
        )  # fmt: skip
    for arm, seed in _missing(store, runs):
        name = "nms" if arm == "nms" else f"{arm}_seed{seed}"
        warn(f"{arm} seed {seed} is left out: {str(store.checkpoint_path(name))!r} is missing")
        summary = _recorded(store, arm, seed)
        recorded = None if summary is None else summary["test_bpd"]
        rows.append(
            {"arm": arm, "seed": seed, "bpd_kind": "no checkpoint", "recorded_bpd": recorded,
             "rescored_bpd": None, "difference": None}
        )  # fmt: skip
    folder = Path(out) if out is not None else run_dir
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "evaluation.json", {"run_dir": str(run_dir), "rows": rows})
    write_text(folder / "evaluation.md", evaluation_markdown(rows, run_dir))
    return rows


def evaluation_markdown(rows: list[dict[str, Any]], run_dir: str | Path = "") -> str:
    """The table of :func:`evaluate_run`: arm, seed, kind, recorded, rescored bits/dim, Δ."""
    lines = [
        f"# lcma-ext evaluate: {run_dir}",
        "",
        "Test bits/dim of every checkpoint, rescored now (same dequantization noise as the run) "
        "next to the figure its run summary recorded (— : no summary, an unfinished run).",
        "",
    ]

    def cell(value: float | None, signed: bool = False) -> str:
        return number(value, 6, signed, missing="—", non_finite="non-finite")

    header = ["arm", "seed", "bpd kind", "recorded bpd", "rescored bpd", "Δ"]
    lines += table(
        header,
        [
            [row["arm"], row["seed"], row["bpd_kind"], cell(row["recorded_bpd"]),
             cell(row["rescored_bpd"]), cell(row["difference"], signed=True)]
            for row in rows
        ],
    )  # fmt: skip
    return "\n".join([*lines, ""])
