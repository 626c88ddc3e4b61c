"""Readers for the generation tasks' file formats, with file-and-line errors and ``skip_bad``.

Every reader checks the whole file before any work starts, so that a malformed record deep in a large
file stops the run at once with ``path:line: what is wrong`` instead of after an hour of training.
With ``skip_bad=True`` a malformed *record* is dropped and counted instead (the count comes back in
:class:`ReadResult` so that callers can report it); a file that is not valid JSON at all cannot be
resynchronised and stays an error.

Formats (see NOTES.md):

* E2E: the official CSV (columns ``mr``, ``ref``; several rows per MR are several references), or
  text lines ``MR||reference``. References are grouped by MR, in order of first appearance.
* DART: a JSON list of ``{"tripleset": [[s, p, o], ...], "annotations": [{"text": ...}, ...]}``.
* WebNLG 2017: ``{"entries": [{"<n>": {"category", "modifiedtripleset": [{"subject", "property",
  "object"}], "lexicalisations": [{"lex", "comment"}]}}]}``.
* GSM8K: JSONL ``{"question", "answer"}``, final answer after ``####``.
* MATH: ``{"problem", "solution"}`` (JSONL, JSON list or one object), answer in ``\\boxed{}``.
* MetaMathQA: a JSON list (or JSONL) of ``{"query", "response", "type"}``.
* Plain reference files: groups of references separated by blank lines (the layout the official E2E
  scorer reads), and predictions one per line.
"""

from __future__ import annotations

import bisect
import csv
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from lorma.errors import DataFormatError

T = TypeVar("T")

__all__ = [
    "DataFormatError",
    "DataToTextExample",
    "MathExample",
    "ReadResult",
    "boxed_answer",
    "gsm8k_answer",
    "linearize_triples",
    "read_dart",
    "read_data_to_text",
    "read_e2e",
    "read_gsm8k",
    "read_math",
    "read_math_eval",
    "read_metamathqa",
    "read_predictions",
    "read_reference_groups",
    "read_webnlg",
    "sniff_format",
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


@dataclass(frozen=True)
class DataToTextExample:
    """One input (linearised MR or triple set) with all its references.

    ``line`` is where the input's first record starts, for messages; ``category`` is WebNLG's
    category (empty elsewhere), kept so that results can be split into seen / unseen categories.
    """

    source: str
    references: tuple[str, ...]
    line: int
    category: str = ""


@dataclass(frozen=True)
class MathExample:
    """A math problem: the prompt text, the target response (training) and the gold final answer."""

    question: str
    response: str
    answer: str
    line: int
    kind: str = ""


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


class _Collector(Generic[T]):
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


def _read_text(path: str | Path) -> tuple[Path, str]:
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


class _Lines:
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


def _expect(text: str, pos: int, chars: str, path: Path, lines: _Lines, what: str) -> str:
    if pos >= len(text) or text[pos] not in chars:
        found = repr(text[pos]) if pos < len(text) else "end of file"
        raise DataFormatError(path, lines(pos), f"invalid JSON: expected {what}, found {found}")
    return text[pos]


def _iter_array(text: str, pos: int, path: Path, lines: _Lines) -> Iterator[tuple[Any, int]]:
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


def _object_member_array(
    text: str, path: Path, lines: _Lines, key: str
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


def _iter_records(text: str, path: Path) -> Iterator[tuple[Any, int]]:
    """Yield (record, line) from a JSON list, a single JSON object, or JSON Lines."""
    lines = _Lines(text)
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
            yield _BadLine(f"invalid JSON ({err.msg}, column {err.colno})"), number


@dataclass(frozen=True)
class _BadLine:
    """A JSON Lines line that did not parse: skippable, unlike a broken JSON list."""

    problem: str


def _str_field(record: dict[str, Any], key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------------
# Data-to-text
# --------------------------------------------------------------------------------------------------


def _clean_entity(text: str) -> str:
    """WebNLG writes entities as DBpedia names (``Aarhus_Airport``, ``"1.8"``): make them words."""
    text = text.replace("_", " ").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return " ".join(text.split())


def linearize_triples(triples: list[tuple[str, str, str]]) -> str:
    """Flatten (subject, property, object) triples to one line: ``s : p : o | s : p : o``."""
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def _group(pairs: list[tuple[str, str | None, int]]) -> list[DataToTextExample]:
    """Group (source, reference, line) rows by source, keeping first-appearance order."""
    order: dict[str, tuple[int, list[str]]] = {}
    for source, ref, line in pairs:
        if source not in order:
            order[source] = (line, [])
        if ref is not None:
            order[source][1].append(ref)
    return [DataToTextExample(src, tuple(refs), line) for src, (line, refs) in order.items()]


def read_e2e(path: str | Path, skip_bad: bool = False) -> ReadResult[DataToTextExample]:
    """Read E2E data: the official CSV (``mr``, ``ref``) or ``MR||reference`` lines.

    A CSV without a ``ref`` column (the official test inputs) gives examples with no references.
    """
    p, text = _read_text(path)
    col: _Collector[DataToTextExample] = _Collector(p, skip_bad)
    pairs: list[tuple[str, str | None, int]] = []
    if p.suffix.lower() == ".csv" or _has_mr_header(text):
        allow_large_csv_fields()
        reader = csv.reader(text.splitlines(keepends=True))
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(p, 1, "empty CSV file (expected a header with 'mr' and 'ref')") from None
        names = [h.strip().lower() for h in header]
        if "mr" not in names:
            raise DataFormatError(p, 1, f"CSV header {header!r} has no 'mr' column")
        i_mr = names.index("mr")
        i_ref = names.index("ref") if "ref" in names else None
        last = 1
        try:
            for row in reader:
                line = last + 1
                last = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    col.bad(line, f"row has {len(row)} fields, the header has {len(header)}")
                    continue
                mr = " ".join(row[i_mr].split())
                ref = " ".join(row[i_ref].split()) if i_ref is not None else None
                if not mr:
                    col.bad(line, "empty 'mr' field")
                    continue
                if i_ref is not None and not ref:
                    col.bad(line, "empty 'ref' field")
                    continue
                pairs.append((mr, ref, line))
        except csv.Error as err:
            raise DataFormatError(p, reader.line_num, f"malformed CSV ({err})") from None
    else:
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            parts = raw.split("||")
            if len(parts) != 2:
                col.bad(number, f"expected one 'MR||reference' separator, found {len(parts) - 1}")
                continue
            mr, ref = (" ".join(x.split()) for x in parts)
            if not mr or not ref:
                col.bad(number, "empty MR or reference around '||'")
                continue
            pairs.append((mr, ref, number))
    col.result.items = _group(pairs)
    return col.result


def read_dart(path: str | Path, skip_bad: bool = False) -> ReadResult[DataToTextExample]:
    """Read DART: a JSON list of records with ``tripleset`` and ``annotations``."""
    p, text = _read_text(path)
    col: _Collector[DataToTextExample] = _Collector(p, skip_bad)
    for record, line in _iter_records(text, p):
        if isinstance(record, _BadLine):
            col.bad(line, record.problem)
            continue
        if not isinstance(record, dict):
            col.bad(line, f"expected a JSON object, found {type(record).__name__}")
            continue
        tripleset = record.get("tripleset")
        if not isinstance(tripleset, list) or not tripleset:
            col.bad(line, "'tripleset' must be a non-empty list of [subject, predicate, object]")
            continue
        if not all(
            isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t) for t in tripleset
        ):
            col.bad(line, "each triple in 'tripleset' must be a list of 3 strings")
            continue
        annotations = record.get("annotations", [])
        if not isinstance(annotations, list) or not all(
            isinstance(a, dict) and isinstance(a.get("text"), str) for a in annotations
        ):
            col.bad(line, "'annotations' must be a list of objects with a 'text' string")
            continue
        refs = tuple(" ".join(a["text"].split()) for a in annotations if a["text"].strip())
        triples = [(_clean_entity(s), _clean_entity(pr), _clean_entity(o)) for s, pr, o in tripleset]
        col.result.items.append(DataToTextExample(linearize_triples(triples), refs, line))
    return col.result


def read_webnlg(path: str | Path, skip_bad: bool = False) -> ReadResult[DataToTextExample]:
    """Read WebNLG 2017 JSON (``entries``).

    Lexicalisations whose ``comment`` is present and not ``"good"`` are dropped (the 2017 release
    marks each one); an entry whose lexicalisations are all dropped keeps them all rather than none.
    """
    p, text = _read_text(path)
    col: _Collector[DataToTextExample] = _Collector(p, skip_bad)
    lines = _Lines(text)
    for entry, line in _object_member_array(text, p, lines, "entries"):
        if not isinstance(entry, dict) or len(entry) != 1:
            col.bad(line, "each item of 'entries' must be an object with one key (the entry number)")
            continue
        body = next(iter(entry.values()))
        if not isinstance(body, dict):
            col.bad(line, "an entry must map its number to an object")
            continue
        triples_raw = body.get("modifiedtripleset")
        if not isinstance(triples_raw, list) or not triples_raw or not all(
            isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ("subject", "property", "object"))
            for t in triples_raw
        ):
            col.bad(line, "'modifiedtripleset' must be a non-empty list of {subject, property, object}")
            continue
        lexs = body.get("lexicalisations", [])
        if not isinstance(lexs, list) or not all(isinstance(x, dict) and isinstance(x.get("lex"), str)
                                                 for x in lexs):
            col.bad(line, "'lexicalisations' must be a list of objects with a 'lex' string")
            continue
        good = [x["lex"] for x in lexs if x.get("comment", "good") == "good"]
        refs = tuple(" ".join(r.split()) for r in (good or [x["lex"] for x in lexs]) if r.strip())
        triples = [
            (_clean_entity(t["subject"]), _clean_entity(t["property"]), _clean_entity(t["object"]))
            for t in triples_raw
        ]
        category = body.get("category", "")
        col.result.items.append(
            DataToTextExample(linearize_triples(triples), refs, line, category if isinstance(category, str)
                              else "")
        )
    return col.result


_DATA_TO_TEXT_READERS: dict[str, Callable[..., ReadResult[DataToTextExample]]] = {
    "e2e": read_e2e,
    "dart": read_dart,
    "webnlg": read_webnlg,
}


def read_data_to_text(task: str, path: str | Path, skip_bad: bool = False) -> ReadResult[DataToTextExample]:
    """Read ``path`` in the format of ``task`` (``e2e``, ``dart`` or ``webnlg``)."""
    try:
        reader = _DATA_TO_TEXT_READERS[task]
    except KeyError:
        raise ValueError(f"unknown data-to-text task {task!r}; known: {sorted(_DATA_TO_TEXT_READERS)}") from None
    return reader(path, skip_bad=skip_bad)


# --------------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------------


def gsm8k_answer(answer_field: str) -> str | None:
    """The final answer of a GSM8K ``answer`` field: the text after the last ``####``."""
    if "####" not in answer_field:
        return None
    final = answer_field.rsplit("####", 1)[1].strip()
    return final or None


def closing_brace(text: str, pos: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``text[pos]`` (nested braces counted), or None."""
    depth = 0
    for i in range(pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched.

    Also accepts the brace-less form ``\\boxed 5``. Returns None when there is none.
    """
    best: str | None = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        pos = match.end()
        if pos < len(text) and text[pos] == "{":
            end = closing_brace(text, pos)
            if end is not None:
                best = text[pos + 1 : end].strip()
        elif match.group(0).endswith(" "):
            word = re.match(r"[^\s$]+", text[pos:])
            if word:
                best = word.group(0)
    return best


def read_gsm8k(path: str | Path, skip_bad: bool = False) -> ReadResult[MathExample]:
    """Read GSM8K JSONL (``question``, ``answer`` with the final answer after ``####``)."""
    p, text = _read_text(path)
    col: _Collector[MathExample] = _Collector(p, skip_bad)
    for record, line in _iter_records(text, p):
        if isinstance(record, _BadLine):
            col.bad(line, record.problem)
            continue
        if not isinstance(record, dict):
            col.bad(line, f"expected a JSON object, found {type(record).__name__}")
            continue
        question, answer = _str_field(record, "question"), _str_field(record, "answer")
        if not question or answer is None:
            col.bad(line, "a GSM8K record needs string fields 'question' and 'answer'")
            continue
        final = gsm8k_answer(answer)
        if final is None:
            col.bad(line, "the 'answer' field has no final answer after '####'")
            continue
        col.result.items.append(MathExample(question, answer, final, line, "gsm8k"))
    return col.result


def read_math(path: str | Path, skip_bad: bool = False) -> ReadResult[MathExample]:
    """Read MATH records (``problem``, ``solution`` with ``\\boxed{}``; an ``answer`` field wins)."""
    p, text = _read_text(path)
    col: _Collector[MathExample] = _Collector(p, skip_bad)
    for record, line in _iter_records(text, p):
        if isinstance(record, _BadLine):
            col.bad(line, record.problem)
            continue
        if not isinstance(record, dict):
            col.bad(line, f"expected a JSON object, found {type(record).__name__}")
            continue
        problem, solution = _str_field(record, "problem"), _str_field(record, "solution")
        if not problem or solution is None:
            col.bad(line, "a MATH record needs string fields 'problem' and 'solution'")
            continue
        final = _str_field(record, "answer") or boxed_answer(solution)
        if not final:
            col.bad(line, "the 'solution' field has no \\boxed{...} answer")
            continue
        kind = _str_field(record, "type") or "math"
        col.result.items.append(MathExample(problem, solution, final, line, kind))
    return col.result


def read_math_eval(task: str, path: str | Path, skip_bad: bool = False) -> ReadResult[MathExample]:
    """Read an evaluation file for ``task`` (``gsm8k`` or ``math``)."""
    if task == "gsm8k":
        return read_gsm8k(path, skip_bad)
    if task == "math":
        return read_math(path, skip_bad)
    raise ValueError(f"unknown math task {task!r}; known: ['gsm8k', 'math']")


def read_metamathqa(path: str | Path, skip_bad: bool = False) -> ReadResult[MathExample]:
    """Read MetaMathQA training data (``query``, ``response``, optional ``type``).

    The gold answer is what follows the last ``The answer is:`` in the response (empty if none:
    training needs only the response).
    """
    p, text = _read_text(path)
    col: _Collector[MathExample] = _Collector(p, skip_bad)
    for record, line in _iter_records(text, p):
        if isinstance(record, _BadLine):
            col.bad(line, record.problem)
            continue
        if not isinstance(record, dict):
            col.bad(line, f"expected a JSON object, found {type(record).__name__}")
            continue
        query, response = _str_field(record, "query"), _str_field(record, "response")
        if not query or not response:
            col.bad(line, "a MetaMathQA record needs non-empty string fields 'query' and 'response'")
            continue
        final = ""
        marker = re.findall(r"The answer is:?\s*(.+)", response)
        if marker:
            final = marker[-1].strip()
        col.result.items.append(MathExample(query, response, final, line, _str_field(record, "type") or ""))
    return col.result


# --------------------------------------------------------------------------------------------------
# Predictions and plain reference files
# --------------------------------------------------------------------------------------------------


def read_predictions(path: str | Path) -> list[str]:
    """Predictions, one per line (an empty line is an empty prediction; a final newline ends the file)."""
    _, text = _read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _has_mr_header(text: str, csv_named: bool = False) -> bool:
    """Whether the first non-empty line is a CSV header with an ``mr`` column (E2E's CSV, whatever its name; a
    lone ``mr`` column counts only in a file named ``.csv``)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    header = next(csv.reader([first]), []) if "||" not in first else []
    return (len(header) > 1 or csv_named) and "mr" in [cell.strip().lower() for cell in header]


def sniff_format(path: str | Path) -> str:
    """What a references file holds, judged by its content rather than its name.

    ``"json"`` (a JSON document, JSON Lines, or lines that are each a quoted JSON string), ``"e2e-csv"`` (a CSV
    whose header has an ``mr`` column), ``"mr-lines"`` (``MR||reference`` lines) or ``"lines"`` (plain text:
    the blank-line layout, or one answer per line). Commands use it to read a file in the format it really has,
    or to refuse one that cannot be what the task expects, instead of scoring a header or a JSON document as
    text.
    """
    p, text = _read_text(path)
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        return "json"
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "lines"
    if "||" in lines[0]:
        return "mr-lines"
    if _has_mr_header(text, p.suffix.lower() == ".csv"):
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
    p, text = _read_text(path)
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
