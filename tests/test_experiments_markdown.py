"""The one markdown helper of the reports (lcma_ext.experiments.markdown)."""

from __future__ import annotations

import math

import pytest

from lcma_ext.experiments.markdown import number, paragraph, table


def test_number_prints_digits_sign_and_placeholders() -> None:
    assert number(1.23456) == "1.2346" and number(-0.5, 2, signed=True) == "-0.50"
    assert number(0.5, 3, signed=True) == "+0.500"
    assert number(None) == "nan" and number(math.inf) == "nan" and number(math.nan) == "nan"
    assert number(None, missing="—", non_finite="non-finite") == "—"
    assert number(-math.inf, missing="—", non_finite="non-finite") == "non-finite"


def test_table_and_paragraph_lines() -> None:
    assert table(["a", "b"], [[1, "x"], ["y", 2.5]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 | x |",
        "| y | 2.5 |",
    ]
    assert table(["a"], []) == ["| a |", "|---|"]
    assert paragraph("text") == ["text", ""]
    with pytest.raises(ValueError, match="expected 2 cells per row; got 1"):
        table(["a", "b"], [["only"]])
