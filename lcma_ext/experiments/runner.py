"""The runner: ``run_comparison``, ``run_level_ablation``, ``load_arm``, ``load_run_data``.

Its files are the run folder ``out`` (:class:`~lcma_ext.experiments.store.RunStore`: the
configuration, the provenance with the fingerprints of the data and launcher, run summaries,
checkpoints, contributions, results and figures). A rerun with the same configuration, data and
launcher skips finished runs (their summaries), resumes an unfinished one from its last epoch
(its checkpoint), and rewrites the results. A corrupt, truncated or foreign state file raises
:class:`~lcma_ext.experiments.store.StateFileError` or
:class:`~lcma_ext.experiments.store.RunMismatchError` naming the file; deleting it and rerunning
redoes that step.

Reproducibility: the NMS flow is built after ``torch.manual_seed(0)``; every arm builder calls
``torch.manual_seed(seed)`` right before building its levels; the contributions are estimated on
the first 2048 training images with dequantization noise seed 7; runs are trained in the order
``for seed in seeds: for arm in arms``; sample grids use their own generator.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from nflows.flows import Flow

from lcma_ext.data import (
    NPZ_PREFIX,
    VISION_DATASETS,
    ImageDataset,
    LogitPreprocessing,
    check_dataset_size,
    load_dataset,
    npz_path,
)
from lcma_ext.distributed import barrier, init_from_env, world
from lcma_ext.distributions import bpd_kind, evaluate_bpd_mc, is_bound_only
from lcma_ext.experiments.arms import build_arm, restore_arm
from lcma_ext.experiments.config import ExperimentConfig
from lcma_ext.experiments.cost import pipeline_cost
from lcma_ext.experiments.jobs import ArmJob
from lcma_ext.experiments.registry import STATIC_ARMS, arm_prior, arm_spec
from lcma_ext.experiments.report import uniform_bpd, versions, write_results
from lcma_ext.experiments.stats import aggregate
from lcma_ext.experiments.store import (
    ExperimentError,
    NMSDivergedError,
    Provenance,
    RunIdentity,
    RunStore,
    atomic_path,
    build_nms_flow,
    config_fingerprint,
    current_launch,
    data_fingerprints,
    data_source,
    foreign_weights,
    load_weights,
    read_json,
    warn,
    write_json,
)
from lcma_ext.models import count_parameters, make_level_factory
from lcma_ext.plotting import (
    plot_contributions,
    plot_learning_curves,
    sample_title,
    save_image_grid,
)
from lcma_ext.sampling import sample_images
from lcma_ext.training import TrainConfig, TrainResult, evaluate_bpd, train_flow

if TYPE_CHECKING:
    from lcma_ext.contributions import ContributionMaps

__all__ = [
    "CONTRIBUTION_EXAMPLES",
    "CONTRIBUTION_NOISE_SEED",
    "MC_SAMPLES",
    "load_arm",
    "load_run_data",
    "plot_checkpoint_contributions",
    "run_comparison",
    "run_level_ablation",
]

#: Contribution estimation uses this many training examples at most.
CONTRIBUTION_EXAMPLES = 2048
#: Dequantization noise of the data the contributions are estimated on.
CONTRIBUTION_NOISE_SEED = 7
#: Monte Carlo samples of the IWAE-K test estimate of bound-only arms (16 with ``quick``).
MC_SAMPLES = 128
#: An NMS flow scoring more than this times the uniform baseline has diverged (finite, but far
#: worse than a model that learned nothing; its contributions mean nothing). An undertrained
#: NMS (one epoch on 64 digits: about 5.4 bpd against 4.09) stays below it.
NMS_UNIFORM_FACTOR = 2.0
#: Sampling temperatures of the sample grids (seed 0 of every arm).
TEMPERATURES = (1.0, 0.7)
#: A model draws a warning when it has more parameters than this times the training values
#: (images x dimensions), or when its checkpoints would exceed :data:`LARGE_CHECKPOINT_BYTES`.
PARAMETERS_PER_VALUE = 100
LARGE_CHECKPOINT_BYTES = 2**30


class _Run:
    """Everything one comparison shares: configuration, data, device, run folder."""

    def __init__(self, config: ExperimentConfig) -> None:
        config.validate()
        self.config = config
        self.device = init_from_env(config.torch_device)
        self.world = world()
        self.data: ImageDataset = load_dataset(
            config.dataset,
            data_root=config.data_root,
            limit=config.data_limit,
            image_size=config.image_size,
        )
        config.check_shape(self.data.shape)
        self.num_levels = config.num_levels(self.data.shape)
        self.arm_config = config.replace(levels=self.num_levels)
        self.preprocessing = LogitPreprocessing(self.data.levels)
        self.out = config.out_dir
        self.seeds = config.seed_list
        self.record = config.record(self.data, self.preprocessing.alpha, self.num_levels)
        self.store = RunStore(self.out)

    def train_config(self, epochs: int, seed: int) -> TrainConfig:
        """The optimizer settings and training recipe of every arm and of the NMS."""
        return TrainConfig.from_recipe(
            self.config.training_recipe,
            epochs=epochs,
            batch_size=self.config.batch_size,
            seed=seed,
            progress=self.config.progress,
            precision=self.config.precision,
            compile=self.config.compile,
            num_workers=self.config.workers,
            hflip=self.config.hflip,
        )

    @property
    def writes(self) -> bool:
        """True on the one process that writes the run folder (rank 0)."""
        return self.world.is_main

    def say(self, text: str) -> None:
        if self.config.progress and self.writes:
            print(text, flush=True)


# ----------------------------------------------------------------------------------------------
# the run folder


def _provenance(run: _Run) -> Provenance:
    """The run's fingerprints (of its record, data and launcher) and its data source."""
    train, test = data_fingerprints(run.data)
    launcher, world_size = current_launch()
    identity = RunIdentity(config_fingerprint(run.record), train, test, launcher, world_size)
    source = data_source(run.config.dataset, run.config.data_root)
    return Provenance(identity, source, run.data.shape[0])


def _prepare_out(run: _Run) -> None:
    """Create ``out``; check or write ``config.json`` and ``provenance.json``."""
    run.store.create(run.record, _provenance(run), run.writes)


def _describe_data(run: _Run) -> None:
    """Print the data's summary line and warn about splits too small to mean much."""
    run.say(f"data: {run.data.summary()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        messages = check_dataset_size(run.data, run.config.batch_size)
    for message in messages:
        warn(message)


def _check_model_size(run: _Run, flow: Flow) -> None:
    """Warn when the model dwarfs the data (parameters, or the size of every checkpoint)."""
    parameters = count_parameters(flow)
    values = int(run.data.train.shape[0]) * run.data.num_dims
    copies = 3 + bool(run.config.training_recipe.ema_decay)  # weights, Adam's 2 moments, EMA
    checkpoint_bytes = parameters * copies * 4
    if parameters > PARAMETERS_PER_VALUE * values or checkpoint_bytes > LARGE_CHECKPOINT_BYTES:
        warn(
            f"{run.config.model} ({run.config.size}) has {parameters / 1e6:.1f} M parameters for "
            f"{run.data.train.shape[0]} training images of {run.data.num_dims} values "
            f"({parameters / values:.0f} per value), about {checkpoint_bytes / 1e9:.2f} GB per "
            "checkpoint; a smaller --size suits this data"
        )


def _summary(run: _Run, arm: str, seed: int, flow: Flow, result: TrainResult) -> dict[str, Any]:
    """The ``runs/<arm>_seed<k>.json`` summary of a finished training."""
    data, preprocessing = run.data, run.preprocessing
    bpd = evaluate_bpd(flow, data.test, preprocessing) if result.epochs_done else math.nan
    estimate: dict[str, Any] = {"bpd_kind": bpd_kind(flow)}
    if is_bound_only(flow) and result.epochs_done:
        # bound-only flows: score the IWAE-K bound (Monte Carlo, with standard errors)
        samples = 16 if run.config.quick else MC_SAMPLES
        estimate = evaluate_bpd_mc(flow, data.test, preprocessing, num_samples=samples)
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
        "steps": result.steps,
        "clipped_steps": result.clipped_steps,
        "train_bpd_curve": result.train_bpd,
        "test_bpd_curve": result.test_bpd,
    }


# ----------------------------------------------------------------------------------------------
# NMS pre-training and contributions


def _nms_diverged_message(run: _Run, summary: dict[str, Any]) -> str:
    reason = summary.get("diverged_reason") or "non-finite test bpd"
    return (
        f"NMS pre-training diverged ({reason}; {summary.get('epochs_done', 0)} of "
        f"{run.config.nms_train_epochs} epochs done, test bpd {summary['test_bpd']}), so its "
        "contributions cannot choose the LCMA splits; try a smaller --lr (now "
        f"{run.config.training_recipe.lr:g}) with another --out, or rerun with "
        "--allow-diverged-nms to go on "
        "(every LCMA arm is then labelled as built on a diverged NMS)"
    )


def _nms_verdict(run: _Run, summary: dict[str, Any]) -> dict[str, Any]:
    """Mark an NMS summary diverged when its finite bpd is over twice the uniform baseline."""
    uniform = uniform_bpd(run.data.levels)
    bpd = summary["test_bpd"]
    if not summary["diverged"] and math.isfinite(bpd) and bpd > NMS_UNIFORM_FACTOR * uniform:
        reason = f"test bpd {bpd:.3f} > {NMS_UNIFORM_FACTOR:g} x uniform baseline {uniform:.3f}"
        summary = {**summary, "diverged": True, "diverged_reason": reason}
    return summary


def _check_nms(run: _Run, summary: dict[str, Any]) -> None:
    if not summary["diverged"]:
        return
    message = _nms_diverged_message(run, summary)
    if not run.config.allow_diverged_nms:
        raise NMSDivergedError(message)
    print(f"lcma-ext: warning: {message.split(', so ')[0]}; going on as asked", file=sys.stderr)


def _train_nms(run: _Run) -> tuple[Flow, dict[str, Any]]:
    """Pre-train the NMS flow (seed 0) or load it; returns ``(flow, summary)``."""
    config, store = run.config, run.store
    torch.manual_seed(0)
    flow = build_nms_flow(config.model, config.size, run.data.shape, run.num_levels)
    flow = flow.to(run.device)
    _check_model_size(run, flow)
    checkpoint = store.checkpoint_path("nms")
    summary_path = store.summary_path("nms")
    if summary_path.is_file() and checkpoint.is_file():  # no checkpoint: pre-train again
        summary = _nms_verdict(run, store.read_summary(summary_path))
        _check_nms(run, summary)
        load_weights(flow, store.load_state(checkpoint, run.device), checkpoint)
        return flow, summary
    if checkpoint.is_file() and "optimizer" not in store.load_state(checkpoint):
        barrier()  # every rank has looked before rank 0 removes it
        if run.writes:
            checkpoint.unlink()  # the weights a diverged first epoch left, not a resumable state
        barrier()
    result = train_flow(
        flow,
        run.data.train,
        run.preprocessing,
        run.train_config(config.nms_train_epochs, 0),
        test_data=run.data.test,
        checkpoint_path=checkpoint,
        desc="nms",
        checkpoint_identity=store.stamp,
    )
    summary = _nms_verdict(run, _summary(run, "nms", 0, flow, result))
    if summary["diverged"]:
        # Keep the last finished epoch's weights (or, when the first epoch diverged, these):
        # the same flow a rerun would load.
        if checkpoint.is_file():
            load_weights(flow, store.load_state(checkpoint, run.device), checkpoint)
        elif run.writes:
            state = {"model": flow.state_dict(), "result": result.to_dict(), "epoch": 0}
            store.save_state(checkpoint, state)
    if run.writes:
        _save_meta(run, checkpoint)
        store.write_summary(summary_path, summary)
    barrier()
    _check_nms(run, summary)
    return flow, summary


def _save_meta(run: _Run, checkpoint: Path) -> None:
    """Add what ``lcma-ext contributions`` and :func:`load_arm` need to rebuild the NMS flow."""
    state = run.store.load_state(checkpoint)
    config = run.config
    state["meta"] = {
        "dataset": config.dataset,
        "model": config.model,
        "size": config.size,
        "levels": run.num_levels,
        "limit": config.data_limit,
        "image_size": config.image_size,
    }
    run.store.save_state(checkpoint, state)


def _contribution_data(
    data: ImageDataset, preprocessing: LogitPreprocessing, device: torch.device
) -> torch.Tensor:
    """Pre-processed training images (fixed noise) on which contributions are estimated."""
    images = data.train[:CONTRIBUTION_EXAMPLES]
    generator = torch.Generator().manual_seed(CONTRIBUTION_NOISE_SEED)
    y, _ = preprocessing(images, generator=generator)
    return y.to(device)


def _contributions(run: _Run, nms_flow: Flow, nms_diverged: bool = False) -> ContributionMaps:
    """Estimate (or load) the contribution maps of the NMS flow and plot them per split."""
    from lcma_ext.contributions import estimate_contributions

    barrier()  # every rank sees the same files
    if run.store.maps_path.is_file():
        maps = run.store.load_maps()
    else:
        nms_flow.eval()
        begin = time.perf_counter()
        try:
            maps = estimate_contributions(
                nms_flow._transform,
                _contribution_data(run.data, run.preprocessing, run.device),
                make_level_factory(run.config.model, run.config.size),
                run.data.shape,
                progress=run.config.progress,
            )
        except ValueError as error:
            if not nms_diverged:
                raise
            raise NMSDivergedError(
                f"the diverged NMS flow has no usable contributions ({error}); try a smaller "
                f"--lr (now {run.config.training_recipe.lr:g}) with another --out"
            ) from error
        if run.writes:  # every rank estimated the same maps; rank 0 writes them
            run.store.save_maps(maps)
            timing = {"estimate_time_s": time.perf_counter() - begin}
            write_json(run.out / "runs" / "contributions.json", timing)
    if run.writes:
        _plot_contributions(maps, run.out)
    barrier()
    return maps


def _contribution_time(run: _Run) -> float | None:
    """Seconds of the NMS contribution estimation (``None`` for folders of earlier versions)."""
    path = run.out / "runs" / "contributions.json"
    return read_json(path).get("estimate_time_s") if path.is_file() else None


def _plot_contributions(maps: ContributionMaps, out: Path, overwrite: bool = False) -> list[Path]:
    paths: list[Path] = []
    for level in range(len(maps.data_maps)):
        path = out / f"contributions_level{level}.png"
        if overwrite or not path.is_file():
            with atomic_path(path) as tmp:
                plot_contributions(maps, tmp, splits=[level])
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# arms


def _build(run: _Run, arm: str, maps: ContributionMaps, seed: int) -> Flow:
    return build_arm(run.arm_config, arm, maps, seed).to(run.device)


def _save_samples(run: _Run, arm: str, flow: Flow, summary: dict[str, Any]) -> None:
    """The sample grids of ``arm`` (seed ``summary["seed"]``), titled with its test bits/dim."""
    for temperature in TEMPERATURES:
        path = run.out / f"samples_{arm}_T{temperature}.png"
        if not path.is_file():
            try:
                images = sample_images(flow, run.preprocessing, 64, temperature, seed=0)
            except (RuntimeError, ValueError) as error:  # e.g. a diverged model
                print(f"lcma-ext: warning: no samples for {arm}: {error}", file=sys.stderr)
                continue
            kind = summary.get("bpd_kind", "exact")
            title = sample_title(arm, temperature, summary["test_bpd"], summary["seed"], kind)
            with atomic_path(path) as tmp:
                save_image_grid(images, tmp, title=title)


def _job(run: _Run, arm: str, seed: int, flow: Flow, checkpoint: Path) -> ArmJob:
    """What an arm that trains itself (``ArmSpec.trainer``) gets."""
    return ArmJob(
        config=run.arm_config,
        arm=arm,
        seed=seed,
        flow=flow,
        data=run.data,
        preprocessing=run.preprocessing,
        train_config=run.train_config(run.config.train_epochs, seed),
        checkpoint=checkpoint,
        contribution_data=_contribution_data(run.data, run.preprocessing, run.device),
        desc=f"{arm} seed {seed}",
        writes=run.writes,
        say=run.say,
        store=run.store,
    )


def _run_arm(run: _Run, arm: str, maps: ContributionMaps, seed: int) -> dict[str, Any]:
    """Train one arm for one seed (or load its finished result)."""
    name, store = f"{arm}_seed{seed}", run.store
    summary_path = store.summary_path(name)
    checkpoint = store.checkpoint_path(name)
    flow = None
    barrier()  # the rank that writes has finished the previous arm's files
    if summary_path.is_file():
        summary = store.read_summary(summary_path)
    else:
        if checkpoint.is_file():
            store.load_state(checkpoint)  # a corrupt or foreign one is named before a resume
        flow = _build(run, arm, maps, seed)
        trainer = arm_spec(arm).trainer
        extra: dict[str, Any] = {}
        if trainer is None:
            result = train_flow(
                flow,
                run.data.train,
                run.preprocessing,
                run.train_config(run.config.train_epochs, seed),
                test_data=run.data.test,
                checkpoint_path=checkpoint,
                desc=f"{arm} seed {seed}",
                checkpoint_identity=store.stamp,
            )
        else:
            flow, result, extra = trainer.train(_job(run, arm, seed, flow, checkpoint))
        summary = {**_summary(run, arm, seed, flow, result), **extra}
        if run.writes:
            store.write_summary(summary_path, summary)
        status = "DIVERGED" if summary["diverged"] else f"{summary['test_bpd']:.4f} bpd"
        run.say(f"  {arm:>14} seed {seed}: {status} ({summary['train_time_s']:.1f} s)")
    if (
        run.writes
        and seed == run.seeds[0]
        and not all((run.out / f"samples_{arm}_T{t}.png").is_file() for t in TEMPERATURES)
    ):
        if flow is None:
            flow = _build(run, arm, maps, seed)
            if checkpoint.is_file():
                flow = restore_arm(arm, flow, store.load_state(checkpoint, run.device))
        _save_samples(run, arm, flow, summary)
    return summary


def _results(
    run: _Run,
    runs: dict[str, list[dict[str, Any]]],
    reference: str,
    nms: dict[str, Any],
    start: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    priors = {name: arm_prior(run.arm_config, name) for name in runs}  # of the factored halves
    static = STATIC_ARMS if run.config.command == "run" else ()
    arms = aggregate(runs, reference, run.seeds, run.config.outlier_gap, priors, static)
    contribution_time = _contribution_time(run)
    offline = [name for name in arms if arm_spec(name).uses_contributions]
    nms_diverged = bool(nms and nms.get("diverged"))
    if nms_diverged:
        for name, entry in arms.items():
            if arm_spec(name).uses_contributions:
                entry["built_on_diverged_nms"] = True
    results = {
        "config": run.record,
        "reference_arm": reference,
        "outlier_gap": run.config.outlier_gap,
        "arms": arms,
        "nms": nms,
        "wall_time_s": time.perf_counter() - start,
        "device": str(run.device),
        "world_size": run.world.size,
        "rank_batch_size": run.config.batch_size // run.world.size,
        "versions": versions(),
        "runs": runs,
        **extra,
        "contribution_time_s": contribution_time,
        "cost": pipeline_cost(arms, runs, nms, contribution_time, offline),
        "uniform_bpd": uniform_bpd(run.data.levels),
        "smoke_run": bool(run.config.quick),
        **({"nms_diverged": True} if nms_diverged else {}),
    }
    if run.writes:
        write_results(run.out, results)
        with atomic_path(run.out / "learning_curves.png") as tmp:
            plot_learning_curves(runs, tmp, nms)
    barrier()
    return results


def _compare(config: ExperimentConfig, command: str) -> dict[str, Any]:
    start = time.perf_counter()
    if config.command != command:
        config = config.replace(command=command)
    run = _Run(config)
    _prepare_out(run)
    arms = config.arm_names(run.num_levels)
    if command == "run":
        run.say(
            f"lcma-ext run: {config.model} ({config.size}) on {config.dataset} {run.data.shape}, "
            f"{run.num_levels} levels, arms {','.join(arms)}, seeds {run.seeds}, "
            f"{config.train_epochs} epochs (NMS {config.nms_train_epochs}) -> {run.out}"
        )
    _describe_data(run)
    nms_flow, nms = _train_nms(run)
    maps = _contributions(run, nms_flow, bool(nms["diverged"]))
    del nms_flow
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for seed in run.seeds:
        for arm in arms:
            runs[arm].append(_run_arm(run, arm, maps, seed))
    reference = config.reference_arm(run.num_levels)
    extra: dict[str, Any]
    if command == "run":
        extra = {"contribution_diagnostics": list(maps.diagnostics)}
    else:
        extra = {
            "note": f"{reference} is LCMA (factor out the low-contribution half at every split)"
        }
    return _results(run, runs, reference, nms, start, extra)


def run_comparison(config: ExperimentConfig) -> dict[str, Any]:
    """``lcma-ext run``: Algorithm 1 with every arm of ``config.arms``.

    Pre-trains the NMS flow (or loads it), estimates its contributions, trains every arm for
    every seed (or loads the finished runs), and writes the results into ``config.out_dir``.

    Returns:
        The results, the same content as ``results.json``: ``config``, ``arms`` (per arm
        ``bpd_per_seed``, ``bpd_mean``, ``bpd_std``, ``bpd_median``, flags, paired differences),
        ``nms``, ``runs``, ``uniform_bpd``, ``versions`` ...

    Raises:
        ValueError: for an invalid configuration (before any training).
        lcma_ext.experiments.NMSDivergedError: when the NMS pre-training diverged (unless
            ``config.allow_diverged_nms``).
        lcma_ext.experiments.StateFileError: for a corrupt or truncated file in the run folder.
    """
    return _compare(config, "run")


def run_level_ablation(config: ExperimentConfig) -> dict[str, Any]:
    """``lcma-ext ablate-levels``: every high/low choice over the split points (Table 4).

    As :func:`run_comparison`, with the ``2^(levels - 1)`` arms ``high-high``, ``high-low``, ...
    against the all-low arm (LCMA); ``config.arms`` is ignored.
    """
    return _compare(config, "ablate-levels")


# ----------------------------------------------------------------------------------------------
# reading a run folder back


def load_run_data(
    run_dir: str | Path, data_root: str | Path | None = None
) -> tuple[ImageDataset, LogitPreprocessing]:
    """The data and pre-processing a run folder was trained and scored on.

    Args:
        run_dir: The ``out`` folder of a run.
        data_root: For torchvision datasets (not stored in the run folder).
    """
    store = RunStore.open(run_dir)
    record, config = store.stored_config()
    dataset, root = config.dataset, data_root
    provenance = store.provenance
    if provenance is not None and npz_path(dataset) is not None:
        dataset = NPZ_PREFIX + provenance.source  # the absolute path, wherever the reader is
    elif provenance is not None and root is None and config.dataset in VISION_DATASETS:
        root = provenance.source
    data = load_dataset(
        dataset,
        data_root=root,
        limit=config.data_limit,
        image_size=store.nms_meta().get("image_size"),
    )
    if [int(data.train.shape[0]), int(data.test.shape[0])] != [
        record["num_train"],
        record["num_test"],
    ]:
        raise ExperimentError(
            f"expected {record['num_train']}/{record['num_test']} train/test images as in "
            f"{str(store.config_path)!r}; got {data.train.shape[0]}/{data.test.shape[0]}"
        )
    store.check_data(data, data_source(dataset, root))
    return data, LogitPreprocessing(data.levels)


def load_arm(run_dir: str | Path, arm: str, seed: int, device: str = "cpu") -> Flow:
    """The trained flow of ``arm`` and ``seed``, rebuilt from its run folder alone.

    The arm is rebuilt as the runner built it (``config.json``, ``contributions.pt``, the arm
    registry; torch's global random state is left as it was) and its last checkpoint is
    loaded: the weights that were scored, unless the run diverged (then the last finished
    epoch's).

    Args:
        run_dir: The ``out`` folder of :func:`run_comparison` / :func:`run_level_ablation`.
        arm: An arm of that run.
        seed: One of its seeds.
        device: Where to put the flow.

    Returns:
        The flow in eval mode; its test bits/dim
        (``evaluate_bpd(flow, data.test, preprocessing)`` with :func:`load_run_data`) equals
        ``runs/<arm>_seed<seed>.json``'s ``test_bpd``.
    """
    run_dir = Path(run_dir)
    store = RunStore.open(run_dir)
    record, config = store.stored_config(device=device)
    checkpoint = store.checkpoint_path(f"{arm}_seed{seed}")
    if seed not in record["seeds"] or not checkpoint.is_file():
        found = sorted(p.stem for p in (run_dir / "checkpoints").glob("*_seed*.pt"))
        raise ExperimentError(
            f"expected an arm and seed trained in {str(run_dir)!r} ({', '.join(found) or 'none'});"
            f" got {arm!r} seed {seed}"
        )
    arm_spec(arm)
    maps = store.load_maps()
    with torch.random.fork_rng(devices=[]):
        flow = build_arm(config, arm, maps, seed)
    state = store.load_state(checkpoint)
    try:
        flow = restore_arm(arm, flow, state)
    except (RuntimeError, KeyError) as error:  # load_state_dict: another model's weights
        raise foreign_weights(checkpoint, error) from None
    return flow.to(config.torch_device).eval()


def plot_checkpoint_contributions(
    checkpoint: str | Path,
    out: str | Path | None = None,
    data_root: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> list[Path]:
    """``lcma-ext contributions``: re-estimate and plot an NMS checkpoint's contributions.

    Rebuilds the NMS flow from the checkpoint's metadata, re-estimates the contributions on its
    training data, writes ``contributions_level<l>.png`` and ``contributions.pt`` into ``out``
    (default: the checkpoint's folder) and returns the PNG paths.
    """
    from lcma_ext.contributions import estimate_contributions

    checkpoint = Path(checkpoint)
    store = RunStore(checkpoint.parent.parent)  # checkpoints/nms.pt of a run folder
    if store.provenance_path.is_file():
        store = RunStore.open(store.root)
    state = store.load_state(checkpoint)
    meta = state.get("meta")
    if meta is None:
        raise ExperimentError(
            f"expected an NMS checkpoint written by 'lcma-ext run' (nms.pt); got "
            f"{str(checkpoint)!r} without metadata"
        )
    torch_device = ExperimentConfig(device=device).torch_device
    data = load_dataset(
        meta["dataset"], data_root=data_root, limit=meta["limit"], image_size=meta["image_size"]
    )
    factory = make_level_factory(meta["model"], meta["size"])
    flow = build_nms_flow(meta["model"], meta["size"], data.shape, meta["levels"])
    load_weights(flow, state, checkpoint)
    flow = flow.to(torch_device).eval()
    y = _contribution_data(data, LogitPreprocessing(data.levels), torch_device)
    maps = estimate_contributions(flow._transform, y, factory, data.shape, progress=progress)
    out = Path(out) if out is not None else checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = _plot_contributions(maps, out, overwrite=True)
    if world().is_main:
        maps.save(out / "contributions.pt")
    return paths
