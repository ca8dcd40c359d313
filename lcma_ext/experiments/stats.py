"""Statistics of a comparison: per-arm aggregation, outlier flags, paired intervals and verdicts.

Honesty rules: a run is flagged, never dropped. Non-finite runs are left out of mean, std and
median (and counted in ``n_diverged``); finite outliers (more than ``gap`` bits/dim above the
median of the same arm's seeds) are flagged and kept in every statistic. The paired difference
of an arm is its bits/dim minus the reference arm's on the same seed.

**Comparisons that decide** (:func:`paired_comparison`). Each arm is compared, seed by seed, with

- the run's reference arm (``vs_reference``; ``channel`` by default), and
- the **best static split of the same prior** (``vs_best_static``): the arm with the best mean
  bits/dim among :data:`~lcma_ext.experiments.registry.STATIC_ARMS` (``channel``,
  ``checkerboard``, ``random``, ``high``) of that run whose factored halves have the same prior
  as the arm's (the ``+cond`` twins for the ``+cond`` arms, every split arm under
  ``--prior conditional``), see :func:`best_static`.

For each: the paired differences ``d_s = bpd(arm, s) - bpd(other, s)`` over the seeds both ran
(non-finite pairs left out, ``n`` finite pairs), their mean ``m`` and sample standard deviation
``sd``, the paired 95 % Student-t interval ``m ± t(0.975, n - 1) sd / sqrt(n)``
(:func:`t_interval`) and a verdict (:func:`verdict`): ``better`` when the interval lies below 0
(lower bits/dim), ``worse`` when it lies above 0, ``no evidence`` when it contains 0 or when
there are fewer than 2 finite pairs (no interval). ``seeds_for_1pct`` (:func:`seeds_needed`) is
the smallest number of seeds ``n >= 2`` whose 95 % t half-width ``t(0.975, n - 1) sd / sqrt(n)``,
at the measured ``sd``, is below 1 % of the compared arm's mean bits/dim: with that many seeds an
observed mean difference of 1 % would give an interval that excludes 0 (a detection threshold
at the measured spread, not a power calculation: a true 1 % difference is found about half the
time with that many seeds).

**Typed results.** An arm over its seeds is an :class:`ArmResult` (with its
:class:`PairedDiffs` against the reference arm) and a comparison a :class:`Comparison`; each
is turned into its ``results.json`` form in one place, its ``to_record`` (key for key as
``results.json`` has stored it; :func:`lcma_ext.experiments.store.write_json` writes
non-finite figures as ``null``). :func:`aggregate` returns those records.

References:
    Student (W. S. Gosset). The probable error of a mean. Biometrika 6(1), 1908.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lcma_ext.experiments.registry import STATIC_ARMS, base_arm

__all__ = [
    "ArmResult",
    "Comparison",
    "PairedDiffs",
    "add_comparisons",
    "aggregate",
    "best_static",
    "compared_arms",
    "finite",
    "finite_values",
    "flag_outliers",
    "paired_comparison",
    "seeds_needed",
    "standard_error",
    "summary_stats",
    "t_interval",
    "t_quantile",
    "verdict",
]

#: Confidence level of the paired intervals.
_CONFIDENCE = 0.95
#: The difference ``seeds_for_1pct`` is sized for, relative to the compared arm's mean bpd.
_RELATIVE_EFFECT = 0.01
#: The verdicts of :func:`verdict`.
_VERDICTS = ("better", "worse", "no evidence")
#: Most seeds :func:`seeds_needed` reports (more: ``None``).
MAX_SEEDS = 1_000_000


def finite(value: Any) -> bool:
    """True for a finite number; ``None`` (a JSON ``null``), NaN and infinities are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_values(values: Iterable[Any]) -> list[float]:
    """The finite numbers of ``values`` as floats (``None``, NaN and infinities left out)."""
    return [float(v) for v in values if finite(v)]


def flag_outliers(runs: list[dict[str, Any]], gap: float) -> None:
    """Flag (in place) runs far above the median of the same arm's seeds; never drop them."""
    values = finite_values(r["test_bpd"] for r in runs)
    if len(values) < 2:
        return
    median = statistics.median(values)
    for run in runs:
        if finite(run["test_bpd"]) and run["test_bpd"] > median + gap:
            run["diverged"] = True
            run["diverged_reason"] = (
                run["diverged_reason"]
                or f"test bpd {run['test_bpd']:.3f} > arm median {median:.3f} + {gap}"
            )


def summary_stats(values: Sequence[Any]) -> dict[str, float]:
    """``{"mean", "std", "median"}`` of the finite ``values`` (``nan`` when too few)."""
    values = finite_values(values)
    nan = float("nan")
    return {
        "mean": statistics.fmean(values) if values else nan,
        "std": statistics.stdev(values) if len(values) > 1 else nan,
        "median": statistics.median(values) if values else nan,
    }


def standard_error(values: Sequence[Any]) -> float:
    """Standard error of the mean of the finite ``values``: ``std / sqrt(n)`` (``nan``: n < 2)."""
    values = finite_values(values)
    std = summary_stats(values)["std"]
    return std / math.sqrt(len(values)) if len(values) > 1 else float("nan")


# ----------------------------------------------------------------------------------------------
# intervals and verdicts


def t_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of Student's t with ``dof`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def t_interval(
    values: Sequence[Any], confidence: float = _CONFIDENCE
) -> tuple[float, float] | None:
    """The Student-t interval ``mean ± t((1 + confidence) / 2, n - 1) sd / sqrt(n)``.

    Args:
        values: Paired differences (non-finite ones and ``None`` left out).
        confidence: The confidence level (0.95).

    Returns:
        ``(low, high)``, or ``None`` with fewer than 2 finite values.
    """
    values = finite_values(values)
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def verdict(interval: Sequence[float] | None) -> str:
    """``"better"`` (interval below 0: lower bits/dim), ``"worse"`` (above 0), else
    ``"no evidence"`` (it contains 0, or there is no interval)."""
    if interval is None:
        return "no evidence"
    low, high = interval
    if high < 0:
        return "better"
    if low > 0:
        return "worse"
    return "no evidence"


def seeds_needed(
    std: float | None, effect: float | None, confidence: float = _CONFIDENCE
) -> int | None:
    """The smallest ``n >= 2`` with ``t((1 + confidence) / 2, n - 1) std / sqrt(n) < effect``.

    The seeds at which an observed paired mean difference of ``effect`` would give an interval
    that excludes 0, at the paired standard deviation ``std``. ``None`` when ``std`` or
    ``effect`` is unknown (non-finite, fewer than 2 seeds), ``effect <= 0``, or when more than
    :data:`MAX_SEEDS` would be needed.
    """
    if std is None or effect is None or not finite(std) or not finite(effect) or effect <= 0:
        return None
    level = (1 + confidence) / 2
    z = statistics.NormalDist().inv_cdf(level)  # t > z, so n >= (z std / effect)^2
    n = max(2, math.ceil((z * std / effect) ** 2))
    while n <= MAX_SEEDS:
        if t_quantile(level, n - 1) * std / math.sqrt(n) < effect:
            return n
        n += 1
    return None


@dataclass(frozen=True)
class Comparison:
    """An arm against another on the seeds both ran (see the module docstring).

    ``results.json`` stores it as :meth:`to_record` under ``vs_reference`` and
    ``vs_best_static`` of each arm (non-finite figures: ``null``).

    Attributes:
        reference: The name of the arm compared with.
        seeds: The seeds both ran.
        diff_per_seed: ``bpd(arm, s) - bpd(other, s)`` per common seed (non-finite ones
            ``nan``).
        n: The number of finite differences; ``mean``, ``std`` and ``ci95`` count only those.
        mean, std: Their mean and sample standard deviation (``nan`` when too few).
        ci95: The paired 95 % Student-t interval, ``None`` below 2 finite pairs.
        verdict: ``"better"``, ``"worse"`` or ``"no evidence"`` (:func:`verdict`).
        seeds_for_1pct: :func:`seeds_needed` for 1 % of the other arm's mean bits/dim.
    """

    reference: str
    seeds: list[int]
    diff_per_seed: list[float]
    n: int
    mean: float
    std: float
    ci95: tuple[float, float] | None
    verdict: str
    seeds_for_1pct: int | None

    def to_record(self) -> dict[str, Any]:
        """The ``results.json`` form (``ci95`` a list)."""
        record = dataclasses.asdict(self)
        record["ci95"] = None if self.ci95 is None else list(self.ci95)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Comparison:
        """The comparison of a ``results.json`` entry (``null`` figures read as ``nan``)."""
        ci95 = record["ci95"]
        return cls(
            reference=record["reference"],
            seeds=list(record["seeds"]),
            diff_per_seed=[_number(d) for d in record["diff_per_seed"]],
            n=record["n"],
            mean=_number(record["mean"]),
            std=_number(record.get("std")),
            ci95=None if ci95 is None else (float(ci95[0]), float(ci95[1])),
            verdict=record["verdict"],
            seeds_for_1pct=record.get("seeds_for_1pct"),
        )


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def paired_comparison(
    bpd: Mapping[int, Any], other_bpd: Mapping[int, Any], other: str
) -> Comparison:
    """An arm against ``other`` on the seeds both ran (see the module docstring).

    Args:
        bpd: The arm's bits/dim per seed.
        other_bpd: ``other``'s bits/dim per seed.
        other: The name of the arm compared with.
    """
    seeds = [seed for seed in bpd if seed in other_bpd]
    diffs = [
        float(bpd[s]) - float(other_bpd[s]) if finite(bpd[s]) and finite(other_bpd[s]) else math.nan
        for s in seeds
    ]
    stats = summary_stats(diffs)
    interval = t_interval(diffs)
    scale = summary_stats([other_bpd[s] for s in seeds])["mean"]
    return Comparison(
        reference=other,
        seeds=seeds,
        diff_per_seed=diffs,
        n=len(finite_values(diffs)),
        mean=stats["mean"],
        std=stats["std"],
        ci95=interval,
        verdict=verdict(interval),
        seeds_for_1pct=seeds_needed(stats["std"], _RELATIVE_EFFECT * abs(scale)),
    )


def best_static(
    arms: Mapping[str, Mapping[str, Any]], prior: str, static: Sequence[str] = STATIC_ARMS
) -> str | None:
    """The static split of ``prior`` with the best (lowest) finite mean bits/dim, or ``None``.

    Candidates are the arms ``s`` and ``s+cond`` for ``s`` in ``static`` whose ``prior`` field
    (``"standard"`` when absent) is ``prior``; the first in ``arms``' order wins a tie.
    """
    candidates = [
        (float(entry["bpd_mean"]), index, name)
        for index, (name, entry) in enumerate(arms.items())
        if base_arm(name) in static
        and entry.get("prior", "standard") == prior
        and finite(entry.get("bpd_mean"))
    ]
    return min(candidates)[2] if candidates else None


def _per_seed(entry: Mapping[str, Any]) -> dict[int, Any]:
    return dict(zip(entry["seeds"], entry["bpd_per_seed"]))


def add_comparisons(
    arms: dict[str, dict[str, Any]], reference: str, static: Sequence[str] = STATIC_ARMS
) -> None:
    """Add ``vs_reference`` and ``vs_best_static`` (:func:`paired_comparison`) to every arm.

    ``vs_reference`` is ``None`` for the reference arm itself (or when it did not run);
    ``vs_best_static`` is ``None`` for the static arm that is itself the best of its prior, and
    when the run has no static split of the arm's prior (``static=()``: never compared).
    """
    for name, entry in arms.items():
        if name == reference or reference not in arms:
            entry["vs_reference"] = None
        else:
            entry["vs_reference"] = paired_comparison(
                _per_seed(entry), _per_seed(arms[reference]), reference
            ).to_record()
        best = best_static(arms, entry.get("prior", "standard"), static)
        if best is None or best == name:
            entry["vs_best_static"] = None
        else:
            entry["vs_best_static"] = paired_comparison(
                _per_seed(entry), _per_seed(arms[best]), best
            ).to_record()


def compared_arms(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The arms of a results dictionary with their comparisons (:func:`add_comparisons`).

    A ``results.json`` written by an earlier version has none: they are computed on a copy
    (from ``bpd_per_seed``, ``seeds`` and ``prior``; ``ablate-levels`` results get no
    ``vs_best_static``). Stored comparisons are returned as they are.
    """
    stored: dict[str, dict[str, Any]] = results["arms"]
    if all("vs_best_static" in entry for entry in stored.values()):
        return stored
    arms = {name: dict(entry) for name, entry in stored.items()}
    static = STATIC_ARMS if results["config"].get("command", "run") == "run" else ()
    add_comparisons(arms, results["reference_arm"], static)
    return arms


@dataclass(frozen=True)
class PairedDiffs:
    """An arm's bits/dim minus the reference arm's, seed by seed.

    Attributes:
        reference: The reference arm.
        diffs: Per seed of the arm that the reference ran (non-finite pairs ``nan``).
        mean, std, median: Of the finite differences (``nan`` when too few).
        wins: Seeds where the arm has the lower bits/dim.
        diff_of_means: The arm's mean bits/dim minus the reference arm's.
    """

    reference: str
    diffs: list[float]
    mean: float
    std: float
    median: float
    wins: int
    diff_of_means: float

    def to_record(self) -> dict[str, Any]:
        """The keys of an arm entry of ``results.json`` (``paired_diff_vs_<reference>`` ...)."""
        return {
            f"paired_diff_vs_{self.reference}": self.diffs,
            "paired_diff_mean": self.mean,
            "paired_diff_std": self.std,
            "paired_diff_median": self.median,
            "wins_vs_reference": self.wins,
            "diff_of_means_vs_reference": self.diff_of_means,
        }


@dataclass(frozen=True)
class ArmResult:
    """One arm of a comparison over its seeds: an entry of ``results.json``'s ``arms``.

    :meth:`to_record` is the entry (key for key as ``results.json`` has always stored it);
    :func:`add_comparisons` then adds ``vs_reference`` and ``vs_best_static``.

    Attributes:
        bpd_per_seed: Test bits/dim per seed (non-finite: diverged).
        bpd_kind: ``"exact"``, an estimate or a bound (:func:`lcma_ext.distributions.bpd_kind`).
        bpd_mc_se_per_seed: Monte Carlo standard error per seed (``None``: exact).
        seeds: The seeds, in the order of the per-seed lists.
        bpd_mean, bpd_std, bpd_median: Of the finite bits/dim.
        diverged, diverged_reasons: Per seed: flagged (non-finite or an outlier), and why.
        n_diverged: Flagged seeds.
        train_time_s, train_time_s_mean: Training seconds per seed and their mean.
        parameters: Trainable parameters.
        epochs_done: Epochs trained per seed.
        clipped_steps: Optimizer steps with a clipped gradient per seed (``None``: unknown).
        prior: The prior of the factored halves (``None``: not recorded).
        paired: The differences against the reference arm (``None``: it did not run).
    """

    bpd_per_seed: list[float]
    bpd_kind: str
    bpd_mc_se_per_seed: list[float | None]
    seeds: list[int]
    bpd_mean: float
    bpd_std: float
    bpd_median: float
    diverged: list[bool]
    diverged_reasons: list[str]
    n_diverged: int
    train_time_s: list[float]
    train_time_s_mean: float
    parameters: int
    epochs_done: list[int]
    clipped_steps: list[int | None]
    prior: str | None = None
    paired: PairedDiffs | None = None

    @classmethod
    def of_runs(cls, runs: Sequence[Mapping[str, Any]], prior: str | None = None) -> ArmResult:
        """The arm of its run summaries (``runs/<arm>_seed<k>.json``), in seed order."""
        bpd = [r["test_bpd"] for r in runs]
        stats = summary_stats(bpd)
        return cls(
            bpd_per_seed=bpd,
            bpd_kind=runs[0].get("bpd_kind", "exact"),
            bpd_mc_se_per_seed=[r.get("bpd_iwae_se") for r in runs],
            seeds=[r["seed"] for r in runs],
            bpd_mean=stats["mean"],
            bpd_std=stats["std"],
            bpd_median=stats["median"],
            diverged=[r["diverged"] for r in runs],
            diverged_reasons=[r["diverged_reason"] for r in runs],
            n_diverged=sum(r["diverged"] for r in runs),
            train_time_s=[r["train_time_s"] for r in runs],
            train_time_s_mean=statistics.fmean(r["train_time_s"] for r in runs),
            parameters=runs[0]["parameters"],
            epochs_done=[r["epochs_done"] for r in runs],
            clipped_steps=[r.get("clipped_steps") for r in runs],
            prior=prior,
        )

    def paired_with(self, reference: str, other: ArmResult) -> PairedDiffs:
        """The differences against ``other``, the run's ``reference`` arm, seed by seed."""
        base = dict(zip(other.seeds, other.bpd_per_seed))
        diffs = [
            bpd - base[seed] if finite(bpd) and finite(base[seed]) else math.nan
            for seed, bpd in zip(self.seeds, self.bpd_per_seed)
            if seed in base
        ]
        stats = summary_stats(diffs)
        return PairedDiffs(
            reference=reference,
            diffs=diffs,
            mean=stats["mean"],
            std=stats["std"],
            median=stats["median"],
            wins=sum(d < 0 for d in finite_values(diffs)),
            diff_of_means=self.bpd_mean - other.bpd_mean,
        )

    def to_record(self) -> dict[str, Any]:
        """The ``results.json`` entry (``prior`` and the paired keys only when known)."""
        fields = dataclasses.fields(self)
        record = {
            f.name: getattr(self, f.name) for f in fields if f.name not in ("prior", "paired")
        }
        if self.prior is not None:
            record["prior"] = self.prior
        if self.paired is not None:
            record.update(self.paired.to_record())
        return record


def aggregate(
    runs: dict[str, list[dict[str, Any]]],
    reference: str,
    seeds: Sequence[int],
    gap: float,
    priors: Mapping[str, str] | None = None,
    static: Sequence[str] = STATIC_ARMS,
) -> dict[str, dict[str, Any]]:
    """Per arm: the ``results.json`` entry (:class:`ArmResult`) and its comparisons.

    Args:
        runs: Per arm, the run summaries (``runs/<arm>_seed<k>.json``) in seed order; outliers
            are flagged in place.
        reference: The arm the paired differences are taken against.
        seeds: The seeds of the comparison.
        gap: Outlier gap in bits/dim.
        priors: Per arm, the prior of its factored halves (stored as ``prior``; absent:
            ``"standard"``), which decides the best static split it is compared with.
        static: The static arms (``()``: no ``vs_best_static`` comparison, e.g. for
            ``ablate-levels``, whose ``high`` arm is a per-level choice).
    """
    results: dict[str, ArmResult] = {}
    for arm, arm_runs in runs.items():
        flag_outliers(arm_runs, gap)
        results[arm] = ArmResult.of_runs(arm_runs, None if priors is None else priors[arm])
    if reference in results:
        base = results[reference]
        results = {
            arm: dataclasses.replace(result, paired=result.paired_with(reference, base))
            for arm, result in results.items()
        }
    arms = {arm: result.to_record() for arm, result in results.items()}
    add_comparisons(arms, reference, static)
    return arms
