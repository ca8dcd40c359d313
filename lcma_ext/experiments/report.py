"""Reports of a comparison: ``results.json`` and ``results.md``.

``results.md`` is the table of :func:`results_markdown` (mean ± std, median, difference of
means, paired per-seed differences and wins against the reference arm, the paired 95 %
interval and verdict against the best static split of the arm's prior, flags), the table of
both comparisons (:func:`_comparisons_markdown`: mean, interval, verdict, seeds a 1 % difference
would need; :mod:`lcma_ext.experiments.stats`), the notes on
non-exact bits/dim, the split diagnostics of the NMS maps, the switches of the self-estimated
arms, the cost of choosing each data-driven split (:mod:`lcma_ext.experiments.cost`), the NMS
flow's own bits/dim and the uniform-model baseline. A ``quick`` run is marked as a smoke run,
a diverged run says "diverged", and every arm built on the contributions of a diverged NMS says
so.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcma_ext.distributions import RESIDUAL_KINDS
from lcma_ext.experiments.cost import cost_markdown
from lcma_ext.experiments.markdown import number, paragraph, table
from lcma_ext.experiments.registry import STATIC_ARMS, arm_spec, registered_arms
from lcma_ext.experiments.stats import compared_arms
from lcma_ext.experiments.store import write_json, write_text

__all__ = [
    "bound_notes",
    "comparison_cells",
    "diagnostics_markdown",
    "flags_cell",
    "prior_notes",
    "results_markdown",
    "uniform_bpd",
    "versions",
    "write_results",
]

#: An arm whose mean bits/dim is within this of the uniform baseline (or above) is marked.
_UNIFORM_MARGIN = 0.05


def uniform_bpd(levels_of_data: int) -> float:
    """Bits/dim of the uniform model on the dequantized data: ``log2(levels)`` (4.09 for digits).

    The pre-processing's bits/dim include the logit Jacobian and the discretization term, so a
    model uniform on ``v = (x + u) / levels`` scores exactly ``log2(levels)``.
    """
    return math.log2(levels_of_data)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Library versions, platform, CPU and torch threads, as ``results.json`` records them."""
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


def diagnostics_markdown(diagnostics: Sequence[dict[str, Any]]) -> list[str]:
    """Per split point: how decisive and how static the LCMA split of the NMS maps is."""
    if not diagnostics:
        return []
    intro = (
        "LCMA split diagnostics of the NMS contribution maps (per split point: local blocks, "
        "exact ties and near-ties of the 2nd/3rd contribution, share of blocks whose kept set "
        "differs from `channel`, `checkerboard`, and the most common pattern of the block's own "
        "channel group, 0 meaning a static split in disguise; share of sites whose kept set "
        "equals the channel-granularity choice; entropy in bits of the kept-position pattern, "
        "0 to 2; see docs/granularity.md):"
    )
    header = [
        "split", "blocks", "ties", "near-ties", "≠ channel", "≠ checkerboard", "≠ group mode",
        "= channel granularity", "pattern entropy",
    ]  # fmt: skip
    rows = [
        [
            index,
            entry["blocks"],
            entry["ties"],
            entry["near_ties"],
            f"{entry['differs_from_channel']:.3f}",
            f"{entry['differs_from_checkerboard']:.3f}",
            f"{entry['differs_from_group_modal']:.3f}",
            number(entry.get("agrees_with_channel_granularity", math.nan), 3),
            number(entry.get("kept_position_entropy", math.nan), 3),
        ]
        for index, entry in enumerate(diagnostics)
    ]
    return [*paragraph(intro), *table(header, rows), ""]


def prior_notes(arms: dict[str, dict[str, Any]]) -> list[str]:
    """Name the arms with Glow's conditional prior of the factored halves; empty if none."""
    conditional = [arm for arm, entry in arms.items() if entry.get("prior") == "conditional"]
    if not conditional:
        return []
    return [
        "Prior of the factored halves: the standard normal, except Glow's conditional prior "
        "N(mu(kept), sigma(kept)^2) (a zero-initialised convolution of the kept half, learned "
        "with the flow; `--prior conditional` or the `+cond` arms) for "
        f"{', '.join(f'`{arm}`' for arm in conditional)}. Its net adds parameters (see the "
        "params column); each `+cond` arm starts from its standard arm's weights and function.",
        "",
    ]


def bound_notes(arms: dict[str, dict[str, Any]]) -> list[str]:
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


def _interval(interval: Sequence[float] | None) -> str:
    if interval is None:
        return "no interval (< 2 seeds)"
    low, high = interval
    return f"[{number(low, 4, signed=True)}, {number(high, 4, signed=True)}]"


def comparison_cells(comparison: dict[str, Any] | None) -> tuple[str, str]:
    """``("Δ mean [95 % CI] vs other", verdict)`` cells of a :func:`paired_comparison` entry
    (``("—", "—")`` for ``None``: the arm is the one compared with)."""
    if comparison is None:
        return "—", "—"
    cell = (
        f"{number(comparison['mean'], 4, signed=True)} {_interval(comparison['ci95'])} vs "
        f"{comparison['reference']}"
    )
    return cell, comparison["verdict"]


def _comparisons_markdown(results: dict[str, Any]) -> list[str]:
    """``results.md`` lines: every arm against the reference arm and the best static split."""
    arms = compared_arms(results)
    rows = []
    for arm, entry in arms.items():
        for key, what in (("vs_reference", "reference"), ("vs_best_static", "best static")):
            comparison = entry.get(key)
            if comparison is None:
                continue
            seeds = comparison.get("seeds_for_1pct")
            rows.append(
                [
                    arm,
                    f"{comparison['reference']} ({what})",
                    comparison["n"],
                    number(comparison["mean"], 4, signed=True),
                    number(comparison.get("std"), 4),
                    _interval(comparison["ci95"]),
                    comparison["verdict"],
                    "—" if seeds is None else seeds,
                ]
            )
    if not rows:
        return []
    return [
        "Paired comparisons: Δ = arm − other arm on the same seed (negative: lower bits/dim), "
        "over the n seeds with finite figures for both; 95 % Student-t interval of the mean "
        "Δ; verdict `better` or `worse` only when the interval excludes 0, else `no "
        "evidence`. The best static split is the best mean among "
        f"{', '.join(f'`{a}`' for a in STATIC_ARMS)} of this run with the arm's prior of the "
        "factored halves. Seeds for 1 %: the smallest number of seeds whose 95 % half-width, "
        "at this paired std, is below 1 % of the other arm's mean bits/dim (an observed 1 % "
        "difference would then exclude 0).",
        "",
        *table(
            ["arm", "compared with", "n", "Δ mean", "Δ std", "95 % CI", "verdict", "seeds for 1 %"],
            rows,
        ),
        "",
    ]


def flags_cell(entry: dict[str, Any], uniform: float | None) -> str:
    """The ``flagged`` cell: diverged / outlier seeds, a diverged NMS, the uniform baseline."""
    flags = []
    reasons = entry.get("diverged_reasons") or [""] * len(entry["seeds"])
    for seed, flagged, reason in zip(entry["seeds"], entry["diverged"], reasons):
        if flagged:
            kind = "outlier" if reason.startswith("test bpd ") else "diverged"
            flags.append(f"seed {seed} ({kind})")
    if entry.get("built_on_diverged_nms"):
        flags.append("built on a diverged NMS")
    mean = entry.get("bpd_mean")
    if uniform is not None and mean is not None and math.isfinite(mean):
        if mean > uniform + _UNIFORM_MARGIN:
            flags.append("above the uniform baseline")
        elif mean >= uniform - _UNIFORM_MARGIN:
            flags.append("at the uniform baseline")
    return ", ".join(flags) or "none"


def _trainer_sections(results: Mapping[str, Any]) -> list[str]:
    """The lines the trainers of the arms (:class:`~lcma_ext.experiments.jobs.ArmTrainer`)
    contribute about their arms, in the order of ``results["runs"]``; empty if none."""
    lines = []
    for arm in results.get("runs", {}):
        trainer = arm_spec(arm).trainer if arm in registered_arms() else None
        report_lines = getattr(trainer, "report_lines", None)
        if report_lines is not None:
            lines += report_lines(arm, results)
    return [*lines, ""] if lines else []


def results_markdown(results: dict[str, Any]) -> str:
    """The ``results.md`` report of a ``run`` or ``ablate-levels`` results dictionary."""
    config, reference = results["config"], results["reference_arm"]
    arms = compared_arms(results)
    seeds = config["seeds"]
    nms: dict[str, Any] = results.get("nms") or {}
    nms_diverged = bool(nms.get("diverged"))
    uniform = results.get("uniform_bpd")
    if uniform is None and config.get("levels_of_data"):
        uniform = uniform_bpd(config["levels_of_data"])
    lines = [
        f"# lcma-ext {config['command']}: {config['model']} ({config['size']}) on "
        f"{config['dataset']}",
        "",
    ]
    if config.get("quick"):
        images = config.get("num_train", "?")
        lines += [
            f"**Smoke run** (`--quick`: {config['epochs']} epochs, {len(seeds)} seeds, "
            f"{images} training images): it checks that the pipeline runs end to end; its "
            "figures and wins are not a result.",
            "",
        ]
    nms_note = ""
    if nms_diverged:
        nms_note = f" (diverged: {nms.get('diverged_reason') or 'non-finite'})"
    lines += [
        f"Test bits/dim (lower is better), {len(seeds)} seeds ({', '.join(map(str, seeds))}), "
        f"{config['epochs']} epochs per arm, NMS pre-trained {config['nms_epochs']} epochs"
        f"{nms_note}, {config['levels']} levels, batch {config['batch_size']}{_ranks(results)}, "
        f"Adam lr "
        f"{config['lr']}{_recipe_note(config)}. Every arm: same architecture, optimizer, "
        "recipe, epochs, seeds and initial weights per seed.",
        "",
    ]
    header = [
        "arm", "bpd kind", "bpd mean ± std", "median", f"Δ mean vs {reference}",
        "paired Δ per seed", "wins", "Δ vs best static (95 % CI)", "verdict", "params",
        "train s/seed", "flagged",
    ]  # fmt: skip
    rows = []
    for arm, entry in arms.items():
        diffs = entry.get(f"paired_diff_vs_{reference}", [])
        paired = ", ".join(number(d, 3, signed=True) for d in diffs) if arm != reference else "—"
        delta = (
            number(entry.get("diff_of_means_vs_reference", math.nan), 4, signed=True)
            if arm != reference
            else "—"
        )
        wins = f"{entry.get('wins_vs_reference', 0)}/{len(diffs)}" if arm != reference else "—"
        static, static_verdict = comparison_cells(entry.get("vs_best_static"))
        rows.append(
            [
                arm,
                entry.get("bpd_kind", "exact"),
                f"{number(entry['bpd_mean'])} ± {number(entry['bpd_std'])}",
                number(entry["bpd_median"]),
                delta,
                paired,
                wins,
                static,
                static_verdict,
                f"{entry['parameters']:,}",
                f"{entry['train_time_s_mean']:.1f}",
                flags_cell(entry, uniform),
            ]
        )
    lines += [*table(header, rows), ""]
    lines += _comparisons_markdown({**results, "arms": arms})
    if nms_diverged:
        lines += [
            f"**The NMS pre-training diverged** ({nms.get('diverged_reason') or 'non-finite'}); "
            "the run went on because it was asked to (`--allow-diverged-nms`). Every arm "
            "flagged 'built on a diverged NMS' took its splits from that flow's contributions, "
            "so its figures say nothing about LCMA.",
            "",
        ]
    lines += prior_notes(arms)
    lines += bound_notes(arms)
    lines += diagnostics_markdown(results.get("contribution_diagnostics") or [])
    lines += _trainer_sections(results)
    lines += cost_markdown(results.get("cost"))
    if nms:
        status = f" — diverged ({nms.get('diverged_reason') or 'non-finite'})" * nms_diverged
        lines.append(
            f"NMS flow (no split, seed 0, {config['nms_epochs']} epochs): "
            f"{number(nms['test_bpd'])} bpd{status}."
        )
    if uniform is not None:
        levels = config.get("levels_of_data")
        lines.append(
            f"Uniform baseline: {number(uniform)} bpd (log2 of the {levels} pixel levels, a model "
            "that learned nothing); an arm within "
            f"{_UNIFORM_MARGIN} of it or above is flagged."
        )
    lines += _clip_notes(arms)
    lines += [
        f"Paired Δ = arm − {reference} on the same seed (negative: lower bits/dim than "
        f"{reference}); wins = seeds where the arm has the lower bits/dim. `better`/`worse` "
        "only where the 95 % interval excludes 0. Flagged runs (non-finite, or more than "
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


def _recipe_note(config: dict[str, Any]) -> str:
    """``, recipe: warm-up 100 steps, cosine ...`` from ``config.json`` (legacy without keys)."""
    from lcma_ext.experiments.config import recipe_options, stored_recipe

    recipe = stored_recipe(config)
    return (
        f", warm-up {recipe.warmup_steps} steps, {recipe.lr_schedule} schedule, gradient norm "
        f"clipped at {recipe.grad_clip:g}, "
        + (f"EMA {recipe.ema_decay:g} of the weights scored" if recipe.ema_decay else "no EMA")
        + f" (`{recipe_options(recipe)}`)"
    )


def _clip_notes(arms: dict[str, dict[str, Any]]) -> list[str]:
    """One line: the clipped steps per arm (summed over seeds), when any run recorded them."""
    counts = {
        arm: [c for c in entry.get("clipped_steps") or [] if c is not None]
        for arm, entry in arms.items()
    }
    counts = {arm: c for arm, c in counts.items() if c}
    if not counts:
        return []
    parts = ", ".join(f"{arm} {sum(c)}" for arm, c in counts.items())
    return [f"Steps whose gradient norm was clipped (summed over seeds): {parts}.", ""]


def _ranks(results: dict[str, Any]) -> str:
    """`` (2 ranks x 32)`` for a distributed run, ``, bf16 autocast`` ..., nothing by default."""
    size = results.get("world_size", 1)
    note = f" ({size} ranks x {results['rank_batch_size']})" if size > 1 else ""
    config = results["config"]
    if config.get("precision", "fp32") != "fp32":
        note += f", {config['precision']} autocast"
    if config.get("compile"):
        note += ", torch.compile"
    if config.get("hflip"):
        note += ", random flips"
    return note


def write_results(out: str | Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.md`` into ``out`` (atomically)."""
    out = Path(out)
    write_json(out / "results.json", results)
    write_text(out / "results.md", results_markdown(results))
