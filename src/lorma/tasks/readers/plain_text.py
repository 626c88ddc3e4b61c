"""Plain text files of ``lorma evaluate``: predictions one per line, reference groups separated by blank lines
(the layout the official E2E scorer reads), and what a references file really holds."""

from __future__ import annotations

import json
from pathlib import Path

from lorma.tasks.readers.data_to_text import has_mr_header
from lorma.tasks.readers.records import DataFormatError, read_text

__all__ = ["read_predictions", "read_reference_groups", "sniff_format"]


def read_predictions(path: str | Path) -> list[str]:
    """Predictions, one per line (an empty line is an empty prediction; a final newline ends the file)."""
    _, text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def sniff_format(path: str | Path) -> str:
    """What a references file holds, judged by its content rather than its name.

    ``"json"`` (a JSON document, JSON Lines, or lines that are each a quoted JSON string), ``"e2e-csv"`` (a CSV
    whose header has an ``mr`` column), ``"mr-lines"`` (``MR||reference`` lines) or ``"lines"`` (plain text:
    the blank-line layout, or one answer per line). Commands use it to read a file in the format it really has,
    or to refuse one that cannot be what the task expects, instead of scoring a header or a JSON document as
    text.
    """
    p, text = read_text(path)
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        return "json"
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "lines"
    if "||" in lines[0]:
        return "mr-lines"
    if has_mr_header(text, p.suffix.lower() == ".csv"):
        return "e2e-csv"
    quoted = 0
    for line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return "lines"
        quoted += isinstance(value, (str, dict, list))
    return "json" if quoted else "lines"


def read_reference_groups(path: str | Path) -> list[tuple[str, ...]]:
    """References as groups of consecutive lines separated by blank lines (the E2E scorer's layout)."""
    p, text = read_text(path)
    groups: list[tuple[str, ...]] = []
    current: list[str] = []
    for raw in text.splitlines():
        if raw.strip():
            current.append(" ".join(raw.split()))
        elif current:
            groups.append(tuple(current))
            current = []
    if current:
        groups.append(tuple(current))
    if not groups:
        raise DataFormatError(p, None, "no references in the file")
    return groups
