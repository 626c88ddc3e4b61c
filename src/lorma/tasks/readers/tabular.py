"""Classification data files: CSV, TSV (GLUE's too) and JSON Lines with text, optional text-pair and label columns.

Every column and cell is checked before a model loads; an error names the file and line (and the column or key).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lorma.plumbing.errors import InputError
from lorma.tasks.readers.records import allow_large_csv_fields

__all__ = ["Examples", "read_examples"]


@dataclass
class Examples:
    """Raw examples of one split: texts, optional pair texts, raw labels, and where each came from."""

    source: str
    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list[Any] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: list[int] | np.ndarray) -> Examples:
        """The examples at ``index``, in that order."""
        return Examples(
            self.source,
            [self.texts[i] for i in index],
            None if self.pairs is None else [self.pairs[i] for i in index],
            [self.labels[i] for i in index],
            [self.lines[i] for i in index],
        )


def _missing_column(path: Path, column: str | int, header: list[str]) -> InputError:
    if isinstance(column, int):
        return InputError(f"{path}: has no column number {column} (rows have {len(header)} columns)")
    return InputError(f"{path}: no column '{column}' (columns: {', '.join(header) or 'none'})")


def _read_rows(
    path: Path, columns: list[str | int], encoding: str, delimiter: str, has_header: bool, quoting: int
) -> tuple[list[list[str]], list[int]]:
    """Rows of a delimited file, restricted to ``columns`` (names or indices); errors name file and line."""
    rows: list[list[str]] = []
    lines: list[int] = []
    allow_large_csv_fields()
    start = 1  # the line a record starts on (a quoted field may span lines; reader.line_num is where it ends)
    try:
        with open(path, encoding=encoding, newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
            header: list[str] = []
            if has_header:
                header = next(reader, [])
                start = reader.line_num + 1
                if not header:
                    raise InputError(f"{path}: empty file (expected a header line)")
            index: list[int] = []
            for column in columns:
                if isinstance(column, int):
                    index.append(column)
                elif column in header:
                    index.append(header.index(column))
                else:
                    raise _missing_column(path, column, header)
            need = max(index) + 1
            separator = "a comma" if delimiter == "," else "a tab"
            for row in reader:
                line, start = start, reader.line_num + 1
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if header and len(row) != len(header):
                    # more fields than the header: most often a text with an unquoted separator, which would
                    # shift the label column; fewer: a truncated row. Either way the columns are not trustworthy.
                    hint = (f" (a text containing {separator} must be in double quotes)"
                            if len(row) > len(header) else "")
                    raise InputError(f"{path}:{line}: row has {len(row)} fields, the header has {len(header)}{hint}")
                if len(row) < need:
                    raise InputError(f"{path}:{line}: row has {len(row)} fields, expected at least {need}")
                rows.append([row[i] for i in index])
                lines.append(line)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid {encoding} text ({err.reason} at byte {err.start}); "
                          "set --file-encoding") from None
    except csv.Error as err:
        raise InputError(f"{path}:{start}: malformed CSV ({err})") from None
    return rows, lines


def _read_jsonl(path: Path, columns: list[str], encoding: str) -> tuple[list[list[Any]], list[int]]:
    """Rows of a JSONL file restricted to ``columns``; errors name file, line and key."""
    rows: list[list[Any]] = []
    lines: list[int] = []
    try:
        with open(path, encoding=encoding) as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{number}: invalid JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                for column in columns:
                    if column not in record:
                        keys = ", ".join(record) or "none"
                        raise InputError(f"{path}:{number}: no key '{column}' (keys: {keys})")
                rows.append([record[c] for c in columns])
                lines.append(number)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid {encoding} text ({err.reason}); set --file-encoding") from None
    return rows, lines


def read_examples(
    path: str | Path,
    text: str | int,
    pair: str | int | None,
    label: str | int,
    encoding: str = "utf-8",
    has_header: bool = True,
    glue_tsv: bool = False,
) -> Examples:
    """Read one data file (CSV, TSV, JSONL) into :class:`Examples`, checking columns and empty cells."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file not found: {p}")
    columns: list[str | int] = [text] + ([pair] if pair is not None else []) + [label]
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows, lines = _read_jsonl(p, [str(c) for c in columns], encoding)
    elif suffix in (".csv", ".tsv", ".txt"):
        delimiter = "," if suffix == ".csv" else "\t"
        # GLUE's TSVs contain unbalanced quotes: they must be read without quote handling.
        quoting = csv.QUOTE_NONE if glue_tsv else csv.QUOTE_MINIMAL
        rows, lines = _read_rows(p, columns, encoding, delimiter, has_header, quoting)
    else:
        raise InputError(f"{p}: unknown data file type '{suffix}' (expected .csv, .tsv, .jsonl)")
    if not rows:
        raise InputError(f"{p}: no data rows")
    out = Examples(str(p), pairs=[] if pair is not None else None)
    names = ["text", "text pair", "label"] if pair is not None else ["text", "label"]
    for row, line in zip(rows, lines):
        for value, what, column in zip(row, names, columns):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise InputError(f"{p}:{line}: empty {what} (column '{column}')")
        out.texts.append(str(row[0]))
        if out.pairs is not None:
            out.pairs.append(str(row[1]))
        out.labels.append(row[-1])
        out.lines.append(line)
    return out
