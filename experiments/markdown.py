"""Markdown pieces for the experiments' reports: tables, mean ± sd cells."""

from __future__ import annotations

import math
from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def sample_sd(values: Sequence[float]) -> float:
    """The sample standard deviation; 0 for fewer than two values."""
    values = [float(value) for value in values]
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``mean ± sample sd`` of the values (the mean alone for one value), thousands separated."""
    mean = sum(float(value) for value in values) / len(values)
    if len(values) == 1:
        return f"{mean:,.{digits}f}"
    return f"{mean:,.{digits}f} ± {sample_sd(values):,.{digits}f}"
