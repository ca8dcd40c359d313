"""Statistics: outliers flagged never dropped, NaN left out of mean/std/median, paired diffs."""

from __future__ import annotations

import math

import pytest

from lcma_ext.experiments.stats import aggregate, flag_outliers, summary_stats


def _run(seed, bpd, diverged=False):
    return {
        "seed": seed,
        "test_bpd": bpd,
        "diverged": diverged,
        "diverged_reason": "non-finite loss" if diverged else "",
        "train_time_s": 1.0,
        "parameters": 10,
        "epochs_done": 1,
    }


def test_aggregate_flags_without_dropping():
    runs = {
        "channel": [_run(0, 2.0), _run(1, 2.1), _run(2, 2.2)],
        "lcma": [_run(0, 1.9), _run(1, 9.0), _run(2, float("nan"), diverged=True)],
    }
    arms = aggregate(runs, "channel", [0, 1, 2], gap=0.5)
    lcma = arms["lcma"]
    assert lcma["diverged"] == [False, True, True] and lcma["n_diverged"] == 2
    assert lcma["bpd_mean"] == pytest.approx((1.9 + 9.0) / 2)  # outlier kept, NaN left out
    assert lcma["bpd_median"] == pytest.approx((1.9 + 9.0) / 2)
    assert lcma["paired_diff_vs_channel"][:2] == pytest.approx([-0.1, 6.9])
    assert math.isnan(lcma["paired_diff_vs_channel"][2])
    assert lcma["wins_vs_reference"] == 1
    assert arms["channel"]["diverged"] == [False, False, False]
    assert arms["channel"]["paired_diff_vs_channel"] == [0.0, 0.0, 0.0]
    assert "arm median 5.450 + 0.5" in lcma["diverged_reasons"][1]


def test_flag_outliers_needs_two_finite_runs():
    runs = [_run(0, 50.0), _run(1, float("nan"), diverged=True)]
    flag_outliers(runs, 0.5)
    assert [r["diverged"] for r in runs] == [False, True]


def test_summary_stats_of_too_few_values():
    stats = summary_stats([float("nan"), 1.0])
    assert stats["mean"] == 1.0 and stats["median"] == 1.0 and math.isnan(stats["std"])
    assert all(math.isnan(v) for v in summary_stats([]).values())
