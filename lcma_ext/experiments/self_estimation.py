"""LCMA estimated from the model being trained: the ``lcma-self`` and ``lcma-reestimate`` arms.

The paper chooses the split from a separately pre-trained non-multi-scale (NMS) flow and names
choosing it during training as future work. These arms do that, in phases of ``E`` epochs
(:attr:`lcma_ext.experiments.ExperimentConfig.reestimate_epochs`) inside the same total epoch
budget as every other arm:

``lcma-self``
    Phase 0 trains the ``channel`` arm's flow (the same initial weights, batches and noise as the
    ``channel`` arm, so its first ``E`` epochs are that arm's). Then the contributions of this
    multi-scale model itself are estimated, the model switches to the LCMA split they imply, and
    trains on to the end of the budget.
``lcma-reestimate``
    Re-chooses the split the same way every ``E`` epochs.

**Self-contributions** (:func:`_self_contributions`). In the multi-scale model a dimension
factored out at split point ``j`` passes through levels ``0 .. j`` only. The contribution map at
split point ``k`` is therefore defined on the dimensions *still alive at k* (those every earlier
split kept), and it is their averaged cumulative per-dimension log|det| over the layers of the
current model up to and including level ``k`` (the ``forward_with_diag`` running map, averaged
over the contribution data). Dimensions factored out earlier have no contribution at ``k``: they
are not candidates there. The split points are chosen in order: the split at point ``k`` comes
from the map at ``k``, and the map at ``k + 1`` is then measured on the survivors of the *new*
split at ``k`` (so the levels after a changed split point are re-measured on the dimensions they
will actually receive). This is the paper's tracking rule (Sec. 3.4) with the NMS flow replaced
by the model being trained; at split point 0 both definitions measure level 0's output.

**What is kept at a switch.** Every phase is an exact flow: the splits are fixed permutations
with log-det 0, so only the permutation of which dimensions are factored out changes. Every
parameter of the level transforms is kept (no re-initialization), and so is the Adam state (see
below). Level 0 sees exactly the data it saw before. Each later level keeps its weights but
receives a rearranged input: its input positions now hold other dimensions (the LCMA kept half
places the two kept dimensions of block ``(c, i, j)`` at channels ``2c, 2c + 1``, the channel split
kept whole channels), so the function it learned no longer matches its input layout and must
re-adapt. The alternatives are worse: re-initializing the later levels throws away training
inside a fixed budget, and a layout that keeps surviving dimensions in their old positions is
no longer the LCMA split (and cannot place the dimensions that newly survive). The cost of the
choice is measured, not assumed: every switch records the test bits/dim right before and right
after it (``switches[*].test_bpd_before_switch`` / ``test_bpd_after_switch`` in the run summary).

**Optimizer and random state.** The Adam moments are kept across a switch. A switch changes no
parameter (only a buffer), and Adam's state is per parameter, so keeping it makes the switch
the only difference from the ``channel`` arm; a fresh Adam would also restart its bias
correction (steps of about ``lr`` in every coordinate, the well-trained level 0's included),
confounding the split with an optimizer restart. The data order, the dequantization noise and
torch's generators continue too: phase ``p`` starts from a copy of phase ``p - 1``'s last
:func:`lcma_ext.training.train_flow` checkpoint (model, optimizer, every random state, learning
curves) with only the model replaced by the switched flow's state, and ``train_flow`` resumes it
to the phase's end. So every arm sees the same batches and noise per seed; the learning curves,
``epochs_done`` and ``train_time_s`` cover the whole budget.

**Training recipe.** The phases run the recipe of every other arm over the whole budget, as one
run: the learning-rate schedule spans all the epochs (``TrainConfig.schedule_epochs``), and its
state, the EMA of the parameters and the count of clipped steps go on from phase to phase in the
copied checkpoint (the EMA keeps averaging across a switch: a switch changes no parameter). Each
phase trains from the raw weights of the previous phase's checkpoint, never from the EMA. The
EMA weights (the evaluated ones, which :func:`lcma_ext.training.train_flow` leaves in the flow)
are what a switch measures: the self-contributions that choose the new split, and the test
bits/dim right before and after it, as the NMS flow's EMA weights choose the ``lcma`` arm's.

Files (next to the arm's checkpoint ``checkpoints/<arm>_seed<k>.pt``): ``checkpoints/phases/
<arm>_seed<k>_phase<p>.pt`` (``train_flow``'s checkpoint of phase ``p``), ``..._phase<p>_switch.pt``
(the maps chosen at the start of phase ``p >= 1``, the estimation time, the test bits/dim around
the switch) and finally ``<arm>_seed<k>.pt`` (the scored weights and the last phase's maps, what
:func:`lcma_ext.experiments.load_arm` rebuilds). A killed run resumes in the phase it was in.

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 3.2-3.4, Algorithm 1, Sec. 5 (future work).
    D. Kingma, J. Ba. Adam: A Method for Stochastic Optimization. ICLR 2015.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from nflows.flows import Flow
from torch import Tensor

from lcma_ext.contributions import track_splits
from lcma_ext.diagnostics import NEAR_TIE_RTOL, split_diagnostics
from lcma_ext.distributed import barrier
from lcma_ext.experiments.jobs import ArmJob
from lcma_ext.experiments.markdown import number
from lcma_ext.experiments.store import StateFileError
from lcma_ext.flows import eval_mode, flow_parts
from lcma_ext.multiscale import ContributionMultiscaleFlow, SplitPoint
from lcma_ext.splits import Split, SplitSpec
from lcma_ext.training import (
    TrainResult,
    evaluate_bpd,
    evaluation_state_dict,
    load_checkpoint,
    save_checkpoint,
    train_flow,
)

__all__ = [
    "PhasedTrainer",
    "phase_bounds",
    "switched_flow",
]

#: The rule every switch applies: factor out the low-contribution half, per site (the paper).
_LCMA_RULE = SplitSpec("lcma")
#: Batch size of the self-contribution measurement.
ESTIMATE_BATCH_SIZE = 256


class _NonFiniteContributionsError(ValueError):
    """The model being trained gave a non-finite contribution map (it has diverged)."""


def phase_bounds(epochs: int, every: int, repeat: bool) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` epochs of the phases of a budget of ``epochs``.

    Args:
        epochs: The total epoch budget.
        every: Epochs ``E`` before a switch.
        repeat: ``False`` (``lcma-self``): two phases, ``[0, E)`` and ``[E, epochs)``;
            ``True`` (``lcma-reestimate``): a switch every ``E`` epochs.

    Raises:
        ValueError: unless ``1 <= every < epochs``.
    """
    if not 1 <= every < epochs:
        raise ValueError(
            f"expected 1 <= reestimate_every < epochs ({epochs}) so that the split switches at "
            f"least once; got {every}"
        )
    starts = list(range(0, epochs, every)) if repeat else [0, every]
    return list(zip(starts, [*starts[1:], epochs]))


def _multiscale(flow: Flow) -> ContributionMultiscaleFlow:
    transform = flow_parts(flow).transform
    if not isinstance(transform, ContributionMultiscaleFlow):
        raise TypeError(
            f"expected a flow around a ContributionMultiscaleFlow; got {type(transform).__name__}"
        )
    if any(prior is not None for prior in transform.priors):
        raise ValueError(
            "expected standard-normal priors of the factored halves (a switch would drop a "
            "conditional prior's weights); got a conditional prior"
        )
    return transform


@torch.no_grad()
def _self_contributions(
    transform: ContributionMultiscaleFlow,
    data: Tensor,
    rule: SplitSpec = _LCMA_RULE,
    batch_size: int = ESTIMATE_BATCH_SIZE,
) -> tuple[list[Tensor], list[Split]]:
    """The multi-scale model's own contribution maps, and the splits ``rule`` chooses from them.

    Split point by split point (see the module docstring): level ``k`` runs
    ``forward_with_diag`` on the dimensions alive at ``k`` (the survivors of the splits already
    chosen), the running map is averaged over ``data`` (float64), the split at ``k`` is built
    from it, and its kept half (values and running map) goes on to level ``k + 1``. Runs in eval
    mode without gradient; every submodule's mode is restored.

    Args:
        transform: The multi-scale transform being trained (its current splits are ignored,
            except for their placement).
        data: Pre-processed images ``(N, *event_shape)`` as the flow sees them.
        rule: The split rule (default: LCMA, factor out the low half per site).
        batch_size: Examples per forward pass.

    Returns:
        ``(maps, splits)``: per split point, the map in the split's input layout (CPU float64)
        and the split built from it (on the transform's device).

    Raises:
        _NonFiniteContributionsError: for a non-finite map (a diverged model).
        ValueError: for empty data.
    """
    if data.shape[0] == 0:
        raise ValueError("expected at least one example in data; got none")
    levels, placement = transform.levels, transform.splits[0].placement
    reference = next(transform.parameters())
    maps: list[Tensor] = []
    splits: list[Split] = []
    with eval_mode(transform):  # every submodule's mode restored afterwards
        states: list[tuple[Tensor, Tensor | None]] = [
            (x.to(reference), None) for x in data.split(batch_size)
        ]
        for index, level in enumerate(levels[:-1]):
            outputs: list[tuple[Tensor, Tensor]] = []
            for hidden, carried in states:
                out, _, diag = level.forward_with_diag(hidden, None, carried)
                outputs.append((out, diag))
            sums = [diag.sum(0).double().cpu() for _, diag in outputs]
            mean = functools.reduce(operator.add, sums) / data.shape[0]  # batch by batch
            if not torch.isfinite(mean).all():
                raise _NonFiniteContributionsError(
                    f"expected a finite self-contribution map at split point {index}; got "
                    f"{int((~torch.isfinite(mean)).sum())} NaN or inf values (the model diverged)"
                )
            split = rule.build(tuple(mean.shape), mean, placement=placement).to(reference.device)
            maps.append(mean)
            splits.append(split)
            point = SplitPoint(split)  # the kept half and its running map go on
            kept = [point.forward_with_diag(out, diag) for out, diag in outputs]
            states = [(step.kept, step.kept_diag) for step in kept]
    return maps, splits


def switched_flow(flow: Flow, layout_maps: Sequence[Tensor], input_shape: Sequence[int]) -> Flow:
    """``flow`` with the LCMA split of ``layout_maps`` at every split point, sharing its modules.

    The levels (with every parameter and buffer) and the base distribution are the very same
    objects, so an optimizer over ``flow.parameters()`` goes on over the new flow's.

    Args:
        flow: A flow around a :class:`ContributionMultiscaleFlow` (standard priors).
        layout_maps: Per split point, the map in that split's input layout, as
            :func:`_self_contributions` returns them.
        input_shape: Event shape of the data.

    Raises:
        RuntimeError: if the new flow's parameters are not the old ones (internal guarantee).
    """
    transform = _multiscale(flow)
    device = next(flow.parameters()).device
    flow.cpu()  # the levels' carry (shape and layout tracking) works on CPU index tensors
    shape = tuple(int(size) for size in input_shape)
    placement = transform.splits[0].placement
    tracked = track_splits(
        transform.levels,
        shape,
        [_LCMA_RULE] * len(layout_maps),
        layout_maps=[m.detach().cpu().double() for m in layout_maps],
        placement=placement,
    )
    new = Flow(
        ContributionMultiscaleFlow.from_levels(transform.levels, shape, tracked.splits),
        flow_parts(flow).distribution,
    ).to(device)
    flow.to(device)
    if [id(p) for p in new.parameters()] != [id(p) for p in flow.parameters()]:
        raise RuntimeError("expected the switched flow to share every parameter of the flow")
    return new


def _kept_changed(old: Split, new: Split, shape: Sequence[int]) -> float:
    """Share of split point 0's dimensions (one layout, event shape ``shape``) whose
    kept/factored role changed."""
    numel = math.prod(shape)
    index = torch.arange(numel).view(1, *shape)
    old_kept = torch.zeros(numel, dtype=torch.bool)
    new_kept = torch.zeros(numel, dtype=torch.bool)
    old_kept[old.carry(index.to(_device(old)))[1].reshape(-1).cpu()] = True
    new_kept[new.carry(index.to(_device(new)))[1].reshape(-1).cpu()] = True
    return float((old_kept != new_kept).double().mean())


def _device(split: Split) -> torch.device:
    buffers = list(split.buffers())
    return buffers[0].device if buffers else torch.device("cpu")


def _summary_diagnostics(maps: Sequence[Tensor], placement: str) -> list[dict[str, float]]:
    keys = ("differs_from_channel", "differs_from_checkerboard", "near_ties")
    diagnostics = [split_diagnostics(m, placement, NEAR_TIE_RTOL) for m in maps]
    return [{key: entry[key] for key in keys} for entry in diagnostics]


@dataclasses.dataclass(frozen=True)
class PhasedTrainer:
    """Train in phases, re-choosing the LCMA split from the model's own contributions.

    Registered as the trainer of ``lcma-self`` (``repeat=False``) and ``lcma-reestimate``
    (``repeat=True``); see the module docstring for the definitions, the files and the resume.

    Attributes:
        repeat: Switch every ``E`` epochs (``True``) or once after ``E`` epochs (``False``).
    """

    repeat: bool = False

    # -- files --------------------------------------------------------------------------------

    @staticmethod
    def _path(job: ArmJob, phase: int, kind: str = "") -> Path:
        suffix = f"_{kind}" if kind else ""
        return job.checkpoint.parent / "phases" / f"{job.checkpoint.stem}_phase{phase}{suffix}.pt"

    def phases(self, job: ArmJob) -> list[tuple[int, int]]:
        """The ``(start, end)`` epochs of ``job``'s phases."""
        return phase_bounds(job.train_config.epochs, job.config.reestimate_epochs, self.repeat)

    def _first_phase(self, job: ArmJob, num_phases: int) -> int:
        """The phase to resume in: the last with a checkpoint whose switches are all there.

        A phase whose switch file is missing (e.g. deleted as corrupt) is redone from the end
        of the phase before: the switch is measured again from the same weights, so the
        maps, and every later figure, are the ones the first attempt had.
        """
        first = 0
        for phase in range(1, num_phases):
            if (
                not self._path(job, phase).is_file()
                or not self._path(job, phase, "switch").is_file()
            ):
                break
            first = phase
        return first

    # -- training -----------------------------------------------------------------------------

    def train(self, job: ArmJob) -> tuple[Flow, TrainResult, dict[str, Any]]:
        """Train ``job`` phase by phase (resuming from its files); see the module docstring."""
        device = next(job.flow.parameters()).device
        if job.checkpoint.is_file():  # finished before the runner wrote its summary
            state = _load(job, job.checkpoint, device)
            if "self_estimation" in state:
                return (
                    self.restore(job.flow, state),
                    _result(state["result"]),
                    state["self_estimation"],
                )
        phases = self.phases(job)
        first = self._first_phase(job, len(phases))
        for phase in range(first, len(phases)):  # named before training resumes from one
            if self._path(job, phase).is_file():
                _load(job, self._path(job, phase), device)
        switches = [_load(job, self._path(job, p, "switch"), device) for p in range(1, first + 1)]
        flow = job.flow
        if switches:
            flow = switched_flow(flow, switches[-1]["layout_maps"], job.data.shape)
        result = TrainResult()
        budget = job.train_config.schedule_epochs or job.train_config.epochs
        for phase in range(first, len(phases)):
            start, end = phases[phase]
            if phase > first:
                try:
                    flow, switch = self._switch(job, flow, phase, start, result)
                except _NonFiniteContributionsError as error:
                    result.diverged, result.diverged_reason = True, str(error)
                    break
                switches.append(switch)
            result = train_flow(
                flow,
                job.data.train,
                job.preprocessing,
                dataclasses.replace(job.train_config, epochs=end, schedule_epochs=budget),
                test_data=job.data.test,
                checkpoint_path=self._path(job, phase),
                desc=f"{job.desc} phase {phase}",
                checkpoint_identity=_identity(job),
            )
            if result.diverged:
                break
        extra = self._extra(job, phases, switches)
        if job.writes:
            save_checkpoint(
                job.checkpoint,
                identity=_identity(job),
                model=flow.state_dict(),
                layout_maps=switches[-1]["layout_maps"] if switches else None,
                input_shape=list(job.data.shape),
                result=result.to_dict(),
                self_estimation=extra,
            )
        barrier()
        return flow, result, extra

    def _switch(
        self, job: ArmJob, flow: Flow, phase: int, start: int, before: TrainResult
    ) -> tuple[Flow, dict[str, Any]]:
        """The switch at the start of ``phase``: choose (or load) the maps, seed its checkpoint."""
        path = self._path(job, phase, "switch")
        device = next(flow.parameters()).device
        if path.is_file():
            switch = _load(job, path, device)
        else:
            begin = time.perf_counter()
            maps, splits = _self_contributions(_multiscale(flow), job.contribution_data)
            seconds = time.perf_counter() - begin
            old = _multiscale(flow).splits[0]
            # splits[0] is bound to its map's shape (rule.build)
            changed = _kept_changed(old, splits[0], maps[0].shape)
            new = switched_flow(flow, maps, job.data.shape)
            after = evaluate_bpd(
                new, job.data.test, job.preprocessing, job.train_config.eval_batch_size
            )
            switch = {
                "phase": phase,
                "epoch": start,
                "layout_maps": maps,
                "estimate_time_s": seconds,
                "test_bpd_before_switch": before.test_bpd[-1][1] if before.test_bpd else math.nan,
                "test_bpd_after_switch": after,
                "kept_changed_at_split0": changed,
                "diagnostics": _summary_diagnostics(maps, old.placement),
            }
            if job.writes:
                save_checkpoint(path, identity=_identity(job), **switch)
            barrier()
            job.say(
                f"  {job.arm:>14} seed {job.seed}: split re-chosen at epoch {start} "
                f"({changed:.0%} of split point 0 changed; test bpd "
                f"{switch['test_bpd_before_switch']:.4f} -> {after:.4f})"
            )
        new = switched_flow(flow, switch["layout_maps"], job.data.shape)
        checkpoint = self._path(job, phase)
        if not checkpoint.is_file():
            state = _load(job, self._path(job, phase - 1), device)
            # the raw weights go on (the flow holds the evaluated ones), with the new split;
            # optimizer, schedule, EMA, random states and curves go on too
            state["model"] = _switched_state(new, state["model"])
            if job.writes:
                save_checkpoint(checkpoint, identity=_identity(job), **state)
            barrier()
        return new, switch

    def _extra(
        self, job: ArmJob, phases: list[tuple[int, int]], switches: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """The summary fields of the phases and switches (plain JSON)."""
        keys = (
            "epoch",
            "estimate_time_s",
            "test_bpd_before_switch",
            "test_bpd_after_switch",
            "kept_changed_at_split0",
            "diagnostics",
        )
        return {
            "reestimate_every": job.config.reestimate_epochs,
            "phase_epochs": [list(bounds) for bounds in phases],
            "estimate_time_s": sum(float(s["estimate_time_s"]) for s in switches),
            "switches": [{key: _plain(s[key]) for key in keys} for s in switches],
        }

    # -- loading ------------------------------------------------------------------------------

    def restore(self, flow: Flow, state: dict[str, Any]) -> Flow:
        """The scored flow: ``flow`` switched to the stored last maps, with the stored weights."""
        if state.get("layout_maps"):
            flow = switched_flow(flow, state["layout_maps"], state["input_shape"])
        flow.load_state_dict(evaluation_state_dict(state))
        return flow

    def report_lines(self, arm: str, results: Mapping[str, Any]) -> list[str]:
        """``results.md``'s line on ``arm``: its switch epochs and the test bpd jumps."""
        return _switches_line(arm, results.get("runs", {}).get(arm, []))


def _switched_state(new: Flow, raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """``new``'s state (its split buffers) with the parameters of the raw state ``raw``.

    The switched flow shares its parameters (and their names) with the flow before the switch,
    so the raw training weights of the previous phase's checkpoint go on under the new split.
    """
    state = new.state_dict()
    for name, _ in new.named_parameters():
        if name not in raw:
            raise RuntimeError(f"expected parameter {name!r} in the previous phase's checkpoint")
        state[name] = raw[name]
    return state


def _identity(job: ArmJob) -> dict[str, Any] | None:
    """What every file of ``job`` carries in its stamp (the run folder's fingerprints)."""
    return None if job.store is None else job.store.stamp


def _load(job: ArmJob, path: Path, device: torch.device) -> dict[str, Any]:
    """A phase file, verified against the run folder (:meth:`RunStore.load_state`); without a
    run folder, :class:`StateFileError` (naming it) when it is corrupt or truncated."""
    if job.store is not None:
        return job.store.load_state(path, device)
    try:
        return load_checkpoint(path, device)
    except ValueError as error:
        raise StateFileError(path, error.__cause__ or error) from error


def _result(stored: dict[str, Any]) -> TrainResult:
    result = TrainResult(**stored)
    # (epoch, bpd) pairs, stored as lists (as training.train_flow restores them)
    result.test_bpd = cast("list[tuple[int, float]]", [tuple(p) for p in result.test_bpd])
    return result


def _plain(value: Any) -> Any:
    """Numbers as Python floats (JSON), lists and dicts element-wise."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _switches_line(arm: str, runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The line on a self-estimated arm's switches over its ``runs`` (none: no line)."""
    switches = [run["switches"] for run in runs if run.get("switches") is not None]
    if not switches:
        return []
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for run_switches in switches:
        for switch in run_switches:
            by_epoch.setdefault(int(switch["epoch"]), []).append(switch)
    jumps = "; ".join(
        f"epoch {epoch}: {number(_mean(s, 'test_bpd_before_switch'))} → "
        f"{number(_mean(s, 'test_bpd_after_switch'))}, {_mean(s, 'kept_changed_at_split0'):.0%} "
        "of split point 0 re-assigned"
        for epoch, s in sorted(by_epoch.items())
    )
    return [
        f"`{arm}`: `channel` split until epoch {min(by_epoch)}, then the LCMA split of the "
        "model's own contributions, re-chosen at every listed epoch; test bpd right before → "
        f"right after each switch, mean over seeds: {jumps}."
    ]


def _mean(switches: list[dict[str, Any]], key: str) -> float:
    values = [float(s[key]) for s in switches if s.get(key) is not None]
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan
