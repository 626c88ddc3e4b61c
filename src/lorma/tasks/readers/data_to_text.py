"""Readers of the data-to-text formats (paper Tables 3, 13, 16).

* E2E: the official CSV (columns ``mr``, ``ref``; several rows per MR are several references), or
  text lines ``MR||reference``. References are grouped by MR, in order of first appearance.
* DART: a JSON list of ``{"tripleset": [[s, p, o], ...], "annotations": [{"text": ...}, ...]}``.
* WebNLG 2017: ``{"entries": [{"<n>": {"category", "modifiedtripleset": [{"subject", "property",
  "object"}], "lexicalisations": [{"lex", "comment"}]}}]}``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorma.tasks.readers.records import (
    Collector,
    DataFormatError,
    LineIndex,
    ReadResult,
    allow_large_csv_fields,
    iter_objects,
    object_member_array,
    read_text,
)

__all__ = [
    "DataToTextExample",
    "has_mr_header",
    "linearize_triples",
    "read_dart",
    "read_data_to_text",
    "read_e2e",
    "read_webnlg",
]


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
    p, text = read_text(path)
    col: Collector[DataToTextExample] = Collector(p, skip_bad)
    pairs: list[tuple[str, str | None, int]] = []
    if p.suffix.lower() == ".csv" or has_mr_header(text):
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
    p, text = read_text(path)
    col: Collector[DataToTextExample] = Collector(p, skip_bad)
    for record, line in iter_objects(text, p, col):
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
    p, text = read_text(path)
    col: Collector[DataToTextExample] = Collector(p, skip_bad)
    lines = LineIndex(text)
    for entry, line in object_member_array(text, p, lines, "entries"):
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



def has_mr_header(text: str, csv_named: bool = False) -> bool:
    """Whether the first non-empty line is a CSV header with an ``mr`` column (E2E's CSV, whatever its name; a
    lone ``mr`` column counts only in a file named ``.csv``)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    header = next(csv.reader([first]), []) if "||" not in first else []
    return (len(header) > 1 or csv_named) and "mr" in [cell.strip().lower() for cell in header]

