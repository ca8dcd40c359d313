"""The LCMA paper's comparisons from Python: configuration, arms, runner, statistics, reports.

Example (a smoke run of about a minute on a 2-core CPU)::

    from lcma_ext.experiments import ExperimentConfig, load_arm, run_comparison

    results = run_comparison(ExperimentConfig(quick=True, out="runs/smoke", progress=False))
    print(results["arms"]["lcma"]["bpd_per_seed"])
    flow = load_arm("runs/smoke", "lcma", seed=0)   # the trained nflows Flow

Modules: :mod:`~lcma_ext.experiments.config` (:class:`ExperimentConfig`),
:mod:`~lcma_ext.experiments.registry` (every arm name parsed once, the arm registry),
:mod:`~lcma_ext.experiments.arms` (the builders of the built-in arms),
:mod:`~lcma_ext.experiments.runner` (:func:`run_comparison`, :func:`run_level_ablation`,
:func:`load_arm`),
:mod:`~lcma_ext.experiments.stats`, :mod:`~lcma_ext.experiments.report`,
:mod:`~lcma_ext.experiments.store` (the run store: :class:`RunStore`, the run folder's files,
fingerprints and one-line errors),
:mod:`~lcma_ext.experiments.sweep` (:func:`run_sweep`: a grid over size and epochs),
:mod:`~lcma_ext.experiments.self_estimation` (the ``lcma-self`` and ``lcma-reestimate`` arms),
:mod:`~lcma_ext.experiments.cost` (what choosing a split costs),
:mod:`~lcma_ext.experiments.inspection` (samples, interpolations and rescoring of a finished
run folder) and
:mod:`~lcma_ext.experiments.jobs` (the hook of arms that train themselves).
"""

from lcma_ext.experiments.arms import build_arm
from lcma_ext.experiments.config import ExperimentConfig
from lcma_ext.experiments.inspection import evaluate_run, interpolate_run, sample_run
from lcma_ext.experiments.registry import (
    ARMS,
    CONDITIONAL_ARMS,
    GRANULARITY_ARMS,
    LATENT_ARMS,
    SELF_ARMS,
    VAE_ARMS,
    ArmName,
    ArmSpec,
    arm_name,
    arm_spec,
    register_arm,
    registered_arms,
)
from lcma_ext.experiments.report import results_markdown, uniform_bpd
from lcma_ext.experiments.runner import (
    load_arm,
    load_run_data,
    plot_checkpoint_contributions,
    run_comparison,
    run_level_ablation,
)
from lcma_ext.experiments.stats import aggregate
from lcma_ext.experiments.store import (
    ExperimentError,
    NMSDivergedError,
    RunMismatchError,
    RunStore,
    StateFileError,
)
from lcma_ext.experiments.sweep import SweepConfig, load_sweep, run_sweep, sweep_markdown

__all__ = [
    "ARMS",
    "CONDITIONAL_ARMS",
    "GRANULARITY_ARMS",
    "LATENT_ARMS",
    "SELF_ARMS",
    "VAE_ARMS",
    "ArmName",
    "ArmSpec",
    "ExperimentConfig",
    "ExperimentError",
    "NMSDivergedError",
    "RunMismatchError",
    "RunStore",
    "StateFileError",
    "SweepConfig",
    "aggregate",
    "arm_name",
    "arm_spec",
    "build_arm",
    "evaluate_run",
    "interpolate_run",
    "load_arm",
    "load_run_data",
    "load_sweep",
    "plot_checkpoint_contributions",
    "register_arm",
    "registered_arms",
    "results_markdown",
    "run_comparison",
    "run_level_ablation",
    "run_sweep",
    "sample_run",
    "sweep_markdown",
    "uniform_bpd",
]
