"""Statistics: outliers flagged never dropped, NaN left out of mean/std/median, paired diffs,
paired Student-t intervals and verdicts against the best static split (by hand and by scipy)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import pytest
from scipy.stats import t as scipy_t

from lcma_ext.experiments.stats import (
    Comparison,
    add_comparisons,
    aggregate,
    best_static,
    flag_outliers,
    paired_comparison,
    seeds_needed,
    summary_stats,
    t_interval,
    t_quantile,
    verdict,
)
from lcma_ext.experiments.store import strict_json, write_json


def _run(seed: int, bpd: float, diverged: bool = False) -> dict[str, Any]:
    return {
        "seed": seed,
        "test_bpd": bpd,
        "diverged": diverged,
        "diverged_reason": "non-finite loss" if diverged else "",
        "train_time_s": 1.0,
        "parameters": 10,
        "epochs_done": 1,
    }


def test_aggregate_flags_without_dropping() -> None:
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


def test_flag_outliers_needs_two_finite_runs() -> None:
    runs = [_run(0, 50.0), _run(1, float("nan"), diverged=True)]
    flag_outliers(runs, 0.5)
    assert [r["diverged"] for r in runs] == [False, True]


def test_summary_stats_of_too_few_values() -> None:
    stats = summary_stats([float("nan"), 1.0])
    assert stats["mean"] == 1.0 and stats["median"] == 1.0 and math.isnan(stats["std"])
    assert all(math.isnan(v) for v in summary_stats([]).values())


# ----------------------------------------------------------------------------------------------
# paired intervals, verdicts, the best static split, seeds for 1 %

#: Student-t 0.975 quantiles, tabulated (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2).
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 16: 2.120, 17: 2.110}


def test_t_quantiles_match_the_table() -> None:
    for dof, value in T975.items():
        assert t_quantile(0.975, dof) == pytest.approx(value, abs=5e-4)


def test_the_interval_is_the_hand_computed_student_t_interval() -> None:
    diffs = [-0.05, -0.03, -0.04, -0.06, -0.02]
    mean = sum(diffs) / 5  # -0.04
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)  # sqrt(0.001 / 4)
    assert sd == pytest.approx(math.sqrt(0.00025), rel=1e-12)
    half = scipy_t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert half == pytest.approx(T975[4] * 0.0158114 / math.sqrt(5), rel=2e-4)  # table: 3 decimals
    low, high = t_interval(diffs)
    assert low == pytest.approx(mean - half, rel=1e-12)
    assert high == pytest.approx(mean + half, rel=1e-12)
    assert (low, high) == pytest.approx((-0.0596323, -0.0203677), abs=1e-6)
    assert verdict((low, high)) == "better"
    # non-finite values and nulls are left out: the same interval
    assert t_interval([*diffs, math.nan, None, math.inf]) == (low, high)
    assert t_interval([0.1]) is None and t_interval([0.1, math.nan]) is None


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ((-0.2, -1e-12), "better"),
        ((1e-12, 0.2), "worse"),
        ((-0.2, 0.0), "no evidence"),  # 0 is inside a closed interval
        ((0.0, 0.2), "no evidence"),
        ((-0.1, 0.1), "no evidence"),
        (None, "no evidence"),
    ],
)
def test_verdict_boundaries(interval: tuple[float, float] | None, expected: str) -> None:
    assert verdict(interval) == expected


def test_seeds_needed_is_the_smallest_n_whose_half_width_is_below_the_effect() -> None:
    # std 0.02, effect 0.01: t(0.975, n - 1) / sqrt(n) < 0.5 first at n = 18
    assert T975[16] / math.sqrt(17) > 0.5 > T975[17] / math.sqrt(18)
    assert seeds_needed(0.02, 0.01) == 18
    assert seeds_needed(0.0, 0.01) == 2
    assert seeds_needed(math.nan, 0.01) is None and seeds_needed(None, 0.01) is None
    assert seeds_needed(0.02, 0.0) is None


def _entry(seeds_bpd: Iterable[float], prior: str = "standard") -> dict[str, Any]:
    bpd = list(seeds_bpd)
    finite = [b for b in bpd if math.isfinite(b)]
    return {
        "seeds": list(range(len(bpd))),
        "bpd_per_seed": bpd,
        "bpd_mean": sum(finite) / len(finite) if finite else math.nan,
        "prior": prior,
    }


def test_best_static_split_is_chosen_per_prior() -> None:
    arms = {
        "lcma": _entry([1.95, 1.96]),
        "channel": _entry([2.0, 2.0]),
        "checkerboard": _entry([1.9, 1.92]),
        "random": _entry([2.1, 2.1]),
        "high": _entry([2.05, 2.0]),
        "lcma+cond": _entry([1.7, 1.75], "conditional"),
        "channel+cond": _entry([1.8, 1.8], "conditional"),
        "checkerboard+cond": _entry([1.85, 1.9], "conditional"),
        "lcma-self": _entry([1.5, 1.5]),  # data-driven: never a static candidate
    }
    assert best_static(arms, "standard") == "checkerboard"
    assert best_static(arms, "conditional") == "channel+cond"
    add_comparisons(arms, "channel")
    assert arms["checkerboard"]["vs_best_static"] is None  # itself the best
    assert arms["channel+cond"]["vs_best_static"] is None
    assert arms["lcma"]["vs_best_static"]["reference"] == "checkerboard"
    assert arms["lcma"]["vs_best_static"]["diff_per_seed"] == pytest.approx([0.05, 0.04])
    assert arms["lcma+cond"]["vs_best_static"]["reference"] == "channel+cond"
    assert arms["channel"]["vs_best_static"]["reference"] == "checkerboard"
    assert arms["channel"]["vs_reference"] is None
    assert arms["lcma+cond"]["vs_reference"]["reference"] == "channel"
    # --prior conditional: every split arm has the conditional prior, no "+cond" in the names
    conditional = {
        "lcma": _entry([1.7, 1.71], "conditional"),
        "channel": _entry([1.8, 1.8], "conditional"),
    }
    add_comparisons(conditional, "channel")
    assert conditional["lcma"]["vs_best_static"]["reference"] == "channel"
    # no static split of the arm's prior, or none compared (ablate-levels)
    alone = {"lcma": _entry([1.7, 1.71])}
    add_comparisons(alone, "lcma")
    assert alone["lcma"]["vs_best_static"] is None and alone["lcma"]["vs_reference"] is None
    ablation = {"high": _entry([2.0, 2.1]), "low": _entry([1.9, 2.0])}
    add_comparisons(ablation, "low", static=())
    assert ablation["high"]["vs_best_static"] is None
    assert ablation["high"]["vs_reference"]["ci95"] == pytest.approx([0.1, 0.1])  # sd 0
    assert ablation["high"]["vs_reference"]["verdict"] == "worse"


def test_a_comparison_of_one_seed_has_no_interval_and_no_evidence() -> None:
    comparison = paired_comparison({0: 1.9}, {0: 2.0}, "channel")
    assert comparison.diff_per_seed == pytest.approx([-0.1])
    assert comparison.ci95 is None and comparison.verdict == "no evidence"
    assert comparison.n == 1 and comparison.seeds_for_1pct is None
    assert math.isnan(comparison.std)


def test_non_finite_seeds_are_left_out_of_the_comparison() -> None:
    bpd = {0: 1.90, 1: math.nan, 2: 1.92, 3: None, 4: 1.91}
    other = {0: 2.00, 1: 2.01, 2: 2.03, 3: 2.02, 4: 2.00}
    comparison = paired_comparison(bpd, other, "channel")
    assert comparison.seeds == [0, 1, 2, 3, 4] and comparison.n == 3
    assert math.isnan(comparison.diff_per_seed[1]) and math.isnan(comparison.diff_per_seed[3])
    finite = [-0.10, -0.11, -0.09]
    low, high = t_interval(finite)
    assert comparison.ci95 == pytest.approx((low, high), rel=1e-9)
    assert comparison.mean == pytest.approx(-0.1) and comparison.verdict == "better"
    # 1 % of the other arm's mean over those seeds, at the measured std of the differences
    scale = 0.01 * sum(other.values()) / 5
    assert comparison.seeds_for_1pct == seeds_needed(comparison.std, scale)


def test_a_comparison_is_stored_and_read_back_as_results_json_has_it() -> None:
    comparison = paired_comparison({0: 1.9, 1: math.nan, 2: 1.8}, {0: 2.0, 1: 2.1, 2: 2.0}, "c")
    record = comparison.to_record()
    assert list(record) == [
        "reference", "seeds", "diff_per_seed", "n", "mean", "std", "ci95", "verdict",
        "seeds_for_1pct",
    ]  # fmt: skip
    assert isinstance(record["ci95"], list)
    stored = json.loads(json.dumps(strict_json(record)))
    assert stored["diff_per_seed"][1] is None
    back = Comparison.from_record(stored)
    assert back.ci95 == comparison.ci95 and back.diff_per_seed[0] == comparison.diff_per_seed[0]
    assert math.isnan(back.diff_per_seed[1])


def test_aggregated_results_are_strict_json(tmp_path: Path) -> None:
    """One seed and a diverged seed: no NaN token; null where a figure is not finite."""
    runs = {
        "channel": [_run(0, 2.0)],
        "lcma": [_run(0, float("nan"), diverged=True)],
    }
    arms = aggregate(
        runs, "channel", [0], gap=0.5, priors={"channel": "standard", "lcma": "standard"}
    )
    path = tmp_path / "results.json"
    write_json(path, {"arms": arms})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(token: str) -> NoReturn:
        raise ValueError(f"non-strict JSON token {token}")

    stored = json.loads(text, parse_constant=refuse)["arms"]
    assert stored["lcma"]["bpd_per_seed"] == [None] and stored["channel"]["bpd_std"] is None
    assert stored["lcma"]["vs_best_static"]["ci95"] is None
    assert stored["lcma"]["vs_best_static"]["verdict"] == "no evidence"
    assert stored["lcma"]["vs_best_static"]["diff_per_seed"] == [None]
    assert stored["channel"]["vs_best_static"] is None
    # a reader gets the same comparisons back from the stored (null) figures
    again = {
        name: {k: v for k, v in e.items() if k != "vs_best_static"} for name, e in stored.items()
    }
    add_comparisons(again, "channel")
    assert again["lcma"]["vs_best_static"]["verdict"] == "no evidence"
