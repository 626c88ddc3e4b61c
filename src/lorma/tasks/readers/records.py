"""What every reader of a data file shares: file-and-line errors, ``skip_bad`` counting, JSON with line numbers.

Every reader checks the whole file before any work starts, so that a malformed record deep in a large
file stops the run at once with ``path:line: what is wrong`` instead of after an hour of training.
With ``skip_bad=True`` a malformed *record* is dropped and counted instead (the count comes back in
:class:`ReadResult` so that callers can report it); a file that is not valid JSON at all cannot be
resynchronised and stays an error. A reader of a new format is built from :func:`read_text`,
:func:`iter_records` (or :func:`object_member_array`) and a :class:`Collector`.
"""

from __future__ import annotations

import bisect
import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from lorma.plumbing.errors import DataFormatError

T = TypeVar("T")

__all__ = [
    "BadLine",
    "Collector",
    "DataFormatError",
    "LineIndex",
    "ReadResult",
    "allow_large_csv_fields",
    "iter_objects",
    "iter_records",
    "object_member_array",
    "read_text",
    "str_field",
]


def allow_large_csv_fields() -> None:
    """Lift Python's csv limit of 128 KB per field (a long document is a valid cell, not an error).

    The limit is process-wide and a C ``long``: the largest value the platform takes is used.
    """
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2



@dataclass
class ReadResult(Generic[T]):
    """What a reader returns: the records and how many malformed ones ``skip_bad`` dropped."""

    items: list[T]
    path: Path
    skipped: int = 0
    skipped_lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def skip_message(self) -> str | None:
        """One line for the user when records were skipped (None when none were)."""
        if not self.skipped:
            return None
        shown = ", ".join(str(n) for n in self.skipped_lines[:10])
        more = " ..." if len(self.skipped_lines) > 10 else ""
        return f"{self.path}: skipped {self.skipped} malformed record(s) (lines {shown}{more})"


class Collector(Generic[T]):
    """Collects records; raises on the first bad one, or counts it when ``skip_bad``."""

    def __init__(self, path: Path, skip_bad: bool) -> None:
        self.result: ReadResult[T] = ReadResult(items=[], path=path)
        self.skip_bad = skip_bad

    def bad(self, line: int | None, problem: str) -> None:
        if not self.skip_bad:
            raise DataFormatError(self.result.path, line, problem)
        self.result.skipped += 1
        if line is not None:
            self.result.skipped_lines.append(line)


def read_text(path: str | Path) -> tuple[Path, str]:
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(p, None, "no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise DataFormatError(p, line, f"not valid UTF-8 ({err.reason})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return p, text


# --------------------------------------------------------------------------------------------------
# JSON with line numbers. The json module reports lines only for syntax errors; to name the line of a
# record that is valid JSON but has the wrong shape, the top-level containers are walked by hand and
# each element is decoded with json's own raw_decode, remembering where it started.
# --------------------------------------------------------------------------------------------------

_WS = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


class LineIndex:
    """Maps a character offset to a 1-based line number."""

    def __init__(self, text: str) -> None:
        self.starts = [m.end() for m in re.finditer("\n", text)]

    def __call__(self, pos: int) -> int:
        return bisect.bisect_right(self.starts, pos) + 1


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()  # type: ignore[union-attr]


def _decode_at(text: str, pos: int, path: Path) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, err.lineno, f"invalid JSON ({err.msg}, column {err.colno})") from None


def _expect(text: str, pos: int, chars: str, path: Path, lines: LineIndex, what: str) -> str:
    if pos >= len(text) or text[pos] not in chars:
        found = repr(text[pos]) if pos < len(text) else "end of file"
        raise DataFormatError(path, lines(pos), f"invalid JSON: expected {what}, found {found}")
    return text[pos]


def _iter_array(text: str, pos: int, path: Path, lines: LineIndex) -> Iterator[tuple[Any, int]]:
    """Yield (element, line) for the JSON array starting at ``pos`` (after whitespace)."""
    pos = _skip_ws(text, pos)
    _expect(text, pos, "[", path, lines, "a JSON list '['")
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        pos = _skip_ws(text, pos)
        start = pos
        value, pos = _decode_at(text, pos, path)
        yield value, lines(start)
        pos = _skip_ws(text, pos)
        if _expect(text, pos, ",]", path, lines, "',' or ']'") == "]":
            return
        pos += 1


def object_member_array(
    text: str, path: Path, lines: LineIndex, key: str
) -> Iterator[tuple[Any, int]]:
    """Yield (element, line) of the list stored under ``key`` in the top-level JSON object."""
    pos = _skip_ws(text, 0)
    _expect(text, pos, "{", path, lines, "a JSON object '{'")
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "}":
        raise DataFormatError(path, 1, f"the top-level object has no {key!r} list")
    while True:
        pos = _skip_ws(text, pos)
        _expect(text, pos, '"', path, lines, "a key string")
        name, pos = _decode_at(text, pos, path)
        pos = _skip_ws(text, pos)
        _expect(text, pos, ":", path, lines, "':'")
        pos = _skip_ws(text, pos + 1)
        if name == key:
            yield from _iter_array(text, pos, path, lines)
            return
        _, pos = _decode_at(text, pos, path)
        pos = _skip_ws(text, pos)
        if _expect(text, pos, ",}", path, lines, "',' or '}'") == "}":
            raise DataFormatError(path, 1, f"the top-level object has no {key!r} list")
        pos += 1


def iter_records(text: str, path: Path) -> Iterator[tuple[Any, int]]:
    """Yield (record, line) from a JSON list, a single JSON object, or JSON Lines."""
    lines = LineIndex(text)
    start = _skip_ws(text, 0)
    if start >= len(text):
        return
    if text[start] == "[":
        yield from _iter_array(text, start, path, lines)
        return
    # one JSON object spread over several lines (MATH ships one problem per file)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "\n" in text.strip():
        yield whole, lines(start)
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw), number
        except json.JSONDecodeError as err:
            yield BadLine(f"invalid JSON ({err.msg}, column {err.colno})"), number


def iter_objects(text: str, path: Path, col: Collector[Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """Yield (record, line) for the JSON objects of :func:`iter_records`; a line that did not parse, or a value
    that is not an object, goes to ``col`` as a bad line (an error, or skipped with ``skip_bad``)."""
    for record, line in iter_records(text, path):
        if isinstance(record, BadLine):
            col.bad(line, record.problem)
        elif not isinstance(record, dict):
            col.bad(line, f"expected a JSON object, found {type(record).__name__}")
        else:
            yield record, line


@dataclass(frozen=True)
class BadLine:
    """A JSON Lines line that did not parse: skippable, unlike a broken JSON list."""

    problem: str


def str_field(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) else None

