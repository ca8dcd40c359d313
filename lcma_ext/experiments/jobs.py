"""The hook of arms that train themselves: :class:`ArmJob` and the :class:`ArmTrainer` protocol.

Most arms are a builder only: the runner builds the flow and trains it with
:func:`lcma_ext.training.train_flow` for the whole budget. An arm registered with a ``trainer``
(``register_arm(name, builder, trainer=...)``) gets its built, untrained flow in an
:class:`ArmJob` instead and trains it itself, e.g. in phases that change the split
(:mod:`lcma_ext.experiments.self_estimation`). The runner still scores, summarizes and stores the
run; the trainer owns its own files next to the arm's checkpoint and must resume from them, and
may contribute its own lines to ``results.md`` (:meth:`ArmTrainer.report_lines`).

References:
    S. Das, P. Abbeel, C. Spanos. Likelihood Contribution based Multi-scale Architecture for
    Generative Flows, Sec. 5 (choosing the split during training as future work).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from nflows.flows import Flow
    from torch import Tensor

    from lcma_ext.data import ImageDataset, LogitPreprocessing
    from lcma_ext.experiments.config import ExperimentConfig
    from lcma_ext.experiments.store import RunStore
    from lcma_ext.training import TrainConfig, TrainResult

__all__ = ["ArmJob", "ArmTrainer"]


@dataclass(frozen=True)
class ArmJob:
    """Everything an :class:`ArmTrainer` needs to train one arm for one seed.

    Attributes:
        config: The resolved configuration (``levels`` set).
        arm: The arm's name.
        seed: The seed.
        flow: The arm's built, untrained flow on the run's device (the builder's weights).
        data: The run's data (``data.train``, ``data.test`` integer images).
        preprocessing: The dequantization + logit pre-processing.
        train_config: The optimizer settings of every arm, ``epochs`` the whole budget.
        checkpoint: The arm's checkpoint path (``checkpoints/<arm>_seed<k>.pt``); after
            training it must hold the scored weights under ``"model"`` (see
            :meth:`ArmTrainer.restore`).
        contribution_data: Pre-processed training images with fixed noise, the data the NMS
            contributions are estimated on.
        desc: Label of progress bars.
        writes: Whether this process writes the run folder (rank 0).
        say: Print a status line (honours ``progress``).
        store: The run folder: the trainer loads its files with ``store.load_state``
            (verified) and writes them with ``store.save_state`` / ``identity=store.stamp``
            (stamped); ``None`` outside a run folder (plain, unverified files).
    """

    config: ExperimentConfig
    arm: str
    seed: int
    flow: Flow
    data: ImageDataset
    preprocessing: LogitPreprocessing
    train_config: TrainConfig
    checkpoint: Path
    contribution_data: Tensor
    desc: str
    writes: bool = True
    say: Callable[[str], None] = print
    store: RunStore | None = None


class ArmTrainer(Protocol):
    """How an arm trains itself and how its stored flow is rebuilt."""

    def train(self, job: ArmJob) -> tuple[Flow, TrainResult, dict[str, Any]]:
        """Train (or resume) ``job``; returns the trained flow, its result and summary extras.

        The extras are merged into the run summary ``runs/<arm>_seed<k>.json`` (plain JSON).
        """
        ...

    def restore(self, flow: Flow, state: dict[str, Any]) -> Flow:
        """The scored flow from the builder's ``flow`` and the arm's loaded checkpoint ``state``."""
        ...

    def report_lines(self, arm: str, results: Mapping[str, Any]) -> list[str]:
        """The trainer's own lines on ``arm`` in ``results.md`` (``[]``: none).

        ``results`` is the results dictionary (``results.json``; ``results["runs"][arm]`` holds
        the arm's run summaries with the extras of :meth:`train`). Optional: the report skips a
        trainer without this method.
        """
        ...
