"""What choosing the split costs: per arm, the seconds spent choosing it and their share.

The share of an arm is ``selection / (selection + training)`` for one trained model:

- an arm built from the NMS contributions (``lcma``, ``high``, the granularity arms): the offline
  pipeline, ``selection`` = NMS pre-training + contribution estimation (one NMS per run, as a
  user adopting offline LCMA trains one NMS and then one model), ``training`` = the arm's mean
  training time per seed;
- a self-estimated arm (``lcma-self``, ``lcma-reestimate``): ``selection`` = its in-training
  contribution estimations (mean per seed), ``training`` = its own training;
- a static arm (``channel`` ...): no selection, no entry.

Every time is a wall time measured by the runner on the run's device: training times count the
epochs' steps only (no test evaluation), the estimation times the forward passes over the
contribution data.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Algorithm 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

from lcma_ext.experiments.markdown import paragraph

__all__ = ["cost_markdown", "pipeline_cost", "selection_share"]


def _share(selection: float | None, training: float) -> float | None:
    if selection is None or not math.isfinite(selection) or selection + training <= 0:
        return None
    return selection / (selection + training)


def pipeline_cost(
    arms: dict[str, dict[str, Any]],
    runs: dict[str, list[dict[str, Any]]],
    nms: dict[str, Any] | None,
    contribution_time_s: float | None,
    offline: Iterable[str],
) -> dict[str, dict[str, Any]]:
    """Per arm that chooses its split from data, the selection and training seconds and share.

    Args:
        arms: The aggregated arms (:func:`lcma_ext.experiments.aggregate`), with
            ``train_time_s_mean``.
        runs: Per arm, the run summaries (a self-estimated arm's have ``estimate_time_s``).
        nms: The NMS run summary (``train_time_s``), or ``None``.
        contribution_time_s: Seconds of the NMS contribution estimation (``None``: not recorded,
            e.g. a run folder of an earlier version).
        offline: The arms built from the NMS contributions.

    Returns:
        ``{arm: {"kind": "offline" | "self", "selection_time_s", "train_time_s", "share", ...}}``;
        offline entries also hold ``nms_train_time_s`` and ``contribution_time_s``. ``share``
        and ``selection_time_s`` are ``None`` when a time was not recorded.
    """
    offline = set(offline)
    costs: dict[str, dict[str, Any]] = {}
    for arm, entry in arms.items():
        training = float(entry["train_time_s_mean"])
        if arm in offline:
            nms_time = (nms or {}).get("train_time_s")
            selection = (
                None
                if nms_time is None or contribution_time_s is None
                else float(sum((nms_time, contribution_time_s)))
            )
            costs[arm] = {
                "kind": "offline",
                "nms_train_time_s": nms_time,
                "contribution_time_s": contribution_time_s,
                "selection_time_s": selection,
                "train_time_s": training,
                "share": _share(selection, training),
            }
            continue
        estimates = [r.get("estimate_time_s") for r in runs.get(arm, [])]
        if estimates and all(e is not None for e in estimates):
            selection = statistics.fmean(float(e) for e in estimates if e is not None)
            costs[arm] = {
                "kind": "self",
                "selection_time_s": selection,
                "train_time_s": training,
                "share": _share(selection, training),
            }
    return costs


def selection_share(results: dict[str, Any], arm: str) -> float | None:
    """The stored selection share of ``arm`` in a results dictionary (``None``: none)."""
    return ((results.get("cost") or {}).get(arm) or {}).get("share")


def _seconds(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.1f} s"


def cost_markdown(cost: dict[str, dict[str, Any]] | None) -> list[str]:
    """``results.md`` lines: per arm, what choosing its split cost and its share."""
    if not cost:
        return []
    parts = []
    for arm, entry in cost.items():
        share = entry.get("share")
        percent = "share unknown" if share is None else f"{100 * share:.1f} %"
        if entry["kind"] == "offline":
            what = (
                f"NMS pre-training {_seconds(entry.get('nms_train_time_s'))} + contribution "
                f"estimation {_seconds(entry.get('contribution_time_s'))}"
            )
        else:
            what = f"in-training estimations {_seconds(entry.get('selection_time_s'))}"
        parts.append(
            f"`{arm}`: {what} against {entry['train_time_s']:.1f} s of its own training ({percent})"
        )
    return paragraph(
        "Split-selection cost per trained model (share of the arm's whole pipeline: selection "
        "/ (selection + training)): " + "; ".join(parts) + "."
    )
