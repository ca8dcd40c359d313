"""The run folder's files: atomic writes, and one-line errors for corrupt or truncated ones.

Every state file of a run folder (``config.json``, ``runs/*.json``, ``contributions.pt``,
``results.json``, ``results.md``, checkpoints, figures) is written to a temporary file in the
same folder and then renamed over the target (``os.replace``), so an interrupted write never
leaves a truncated file behind. Reading a file that is corrupt anyway (a disk fault, a copy cut
short) raises :class:`StateFileError`, one line naming the file and how to recover.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lcma_ext.storage import atomic_path, atomic_write_text

__all__ = [
    "ExperimentError",
    "NMSDivergedError",
    "StateFileError",
    "atomic_path",
    "read_json",
    "strict_json",
    "write_json",
    "write_text",
]


class ExperimentError(ValueError):
    """A user-facing error of an experiment (the command line prints it as one line)."""


class StateFileError(ExperimentError):
    """A file of the run folder is corrupt or truncated."""

    def __init__(self, path: str | Path, error: BaseException | str) -> None:
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        reason = " ".join(str(reason).split())
        if len(reason) > 160:
            reason = reason[:157] + "..."
        self.path = Path(path)
        super().__init__(
            f"{str(path)!r} is corrupt or truncated ({reason}); delete it and rerun the same "
            "command to redo that step"
        )


class NMSDivergedError(ExperimentError):
    """The NMS pre-training diverged (its contributions would choose the LCMA splits)."""


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_text(path, text)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinities) replaced by ``None``.

    Dicts, lists and tuples are converted element-wise (tuples become lists), anything else is
    returned as it is. Strict JSON has no ``NaN`` or ``Infinity`` token; ``null`` stands for
    a value that is not a finite number (a diverged run, a statistic of too few seeds).
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as indented strict JSON to ``path`` atomically (non-finite: ``null``).

    Raises:
        ValueError: for a value ``json`` cannot write (after :func:`strict_json`).
    """
    write_text(path, json.dumps(strict_json(value), indent=2, allow_nan=False))


def read_json(path: str | Path) -> Any:
    """Read a JSON state file; :class:`StateFileError` when it is corrupt or truncated."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StateFileError(path, error) from error
