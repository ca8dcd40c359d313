"""Statistics of a comparison: per-arm aggregation, outlier flags, paired differences.

Honesty rules: a run is flagged, never dropped. Non-finite runs are left out of mean, std and
median (and counted in ``n_diverged``); finite outliers (more than ``gap`` bits/dim above the
median of the same arm's seeds) are flagged and kept in every statistic. The paired difference
of an arm is its bits/dim minus the reference arm's on the same seed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["aggregate", "flag_outliers", "standard_error", "summary_stats"]


def flag_outliers(runs: list[dict[str, Any]], gap: float) -> None:
    """Flag (in place) runs far above the median of the same arm's seeds; never drop them."""
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


def summary_stats(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std", "median"}`` of the finite ``values`` (``nan`` when too few)."""
    finite = [v for v in values if math.isfinite(v)]
    nan = float("nan")
    return {
        "mean": statistics.fmean(finite) if finite else nan,
        "std": statistics.stdev(finite) if len(finite) > 1 else nan,
        "median": statistics.median(finite) if finite else nan,
    }


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of the finite ``values``: ``std / sqrt(n)`` (``nan``: n < 2)."""
    finite = [v for v in values if math.isfinite(v)]
    std = summary_stats(finite)["std"]
    return std / math.sqrt(len(finite)) if len(finite) > 1 else float("nan")


def aggregate(
    runs: dict[str, list[dict[str, Any]]], reference: str, seeds: Sequence[int], gap: float
) -> dict[str, dict[str, Any]]:
    """Per arm: per-seed bpd, mean/std/median, paired differences against ``reference``.

    Args:
        runs: Per arm, the run summaries (``runs/<arm>_seed<k>.json``) in seed order; outliers
            are flagged in place.
        reference: The arm the paired differences are taken against.
        seeds: The seeds of the comparison.
        gap: Outlier gap in bits/dim.
    """
    arms: dict[str, dict[str, Any]] = {}
    for arm, arm_runs in runs.items():
        flag_outliers(arm_runs, gap)
        bpd = [r["test_bpd"] for r in arm_runs]
        stats = summary_stats(bpd)
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
            stats = summary_stats(diffs)
            finite = [d for d in diffs if math.isfinite(d)]
            entry[f"paired_diff_vs_{reference}"] = diffs
            entry["paired_diff_mean"] = stats["mean"]
            entry["paired_diff_std"] = stats["std"]
            entry["paired_diff_median"] = stats["median"]
            entry["wins_vs_reference"] = sum(d < 0 for d in finite)
            entry["diff_of_means_vs_reference"] = entry["bpd_mean"] - arms[reference]["bpd_mean"]
    return arms
