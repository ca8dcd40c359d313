"""The one small markdown helper of the reports: numbers, tables and paragraphs.

``results.md`` (:mod:`lcma_ext.experiments.report`), ``sweep.md``
(:mod:`lcma_ext.experiments.sweep`), ``evaluation.md`` (:mod:`lcma_ext.experiments.inspection`)
and the sections of :mod:`lcma_ext.experiments.cost` and
:mod:`lcma_ext.experiments.self_estimation` are written with it.

Example:
    >>> from lcma_ext.experiments.markdown import number, table
    >>> table(["arm", "bpd"], [["lcma", number(1.234567)], ["channel", number(None)]])
    ['| arm | bpd |', '|---|---|', '| lcma | 1.2346 |', '| channel | nan |']
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["number", "paragraph", "table"]


def number(
    value: float | None,
    digits: int = 4,
    signed: bool = False,
    missing: str = "nan",
    non_finite: str = "nan",
) -> str:
    """``value`` with ``digits`` decimals (``signed``: always with its sign).

    Args:
        value: The number; ``None`` (a JSON ``null``) prints ``missing``, NaN and infinities
            print ``non_finite``.
        digits: Decimals.
        signed: Print ``+`` before positive values.
        missing, non_finite: What stands for ``None`` and for a non-finite value.
    """
    if value is None:
        return missing
    if not math.isfinite(value):
        return non_finite
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table: the header, the rule, one line per row.

    Raises:
        ValueError: for a row with another number of cells than the header.
    """
    lines = [_row(header), "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"expected {len(header)} cells per row; got {len(row)} ({row!r})")
        lines.append(_row(row))
    return lines


def paragraph(text: str) -> list[str]:
    """A paragraph's lines: ``text`` and the blank line after it."""
    return [text, ""]


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
