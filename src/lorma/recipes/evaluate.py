"""Scoring a file of predictions against a file of references, with no model: what ``lorma evaluate`` does.

The references are read in whatever layout their content has (:mod:`lorma.tasks.readers`), and scored by the
task's scorer (:mod:`lorma.scoring`): data-to-text metrics (official or approximate) or math answer accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _reference_groups(task: str, path: str, skip_bad: bool) -> tuple[list[tuple[str, ...]], str | None]:
    """Reference groups (one per input) from ``path`` in the format its content has, and a skipped-records
    message if any; a format the task cannot take is an error that says what the file is."""
    from lorma.tasks.readers import DataFormatError, read_data_to_text, read_reference_groups, sniff_format

    p = Path(path)
    kind = sniff_format(p)
    if task == "e2e" and kind == "json":
        raise DataFormatError(p, None, "this is JSON, but e2e references are the official CSV (mr, ref), "
                                       "'MR||reference' lines, or groups of lines separated by blank lines")
    if task != "e2e" and kind in ("e2e-csv", "mr-lines"):
        raise DataFormatError(p, None, f"this is E2E data ({kind}); {task} references are its JSON file or "
                                       "groups of lines separated by blank lines")
    if kind == "lines":
        return read_reference_groups(p), None
    result = read_data_to_text(task, p, skip_bad=skip_bad)
    groups = [ex.references for ex in result.items]
    empty = [ex.line for ex in result.items if not ex.references]
    if empty:
        raise DataFormatError(p, empty[0], "input without references (cannot be scored)")
    return groups, result.skip_message()


def _gold_answers(task: str, path: str, skip_bad: bool) -> tuple[list[str], str | None]:
    """Gold answers from a JSON / JSONL file of the task's records, or one answer per line."""
    from lorma.tasks.readers import DataFormatError, read_math_eval, read_predictions, sniff_format

    p = Path(path)
    kind = sniff_format(p)
    if kind == "json" or p.suffix.lower() in (".json", ".jsonl"):
        result = read_math_eval(task, p, skip_bad=skip_bad)
        return [ex.answer for ex in result.items], result.skip_message()
    if kind != "lines" or p.suffix.lower() in (".csv", ".tsv"):
        raise DataFormatError(p, 1, f"this looks like a table or E2E data ({kind}), but {task} references are "
                                    "JSON / JSONL records or one gold answer per line")
    return [line.strip() for line in read_predictions(p)], None


def evaluate_files(
    task: str,
    predictions: str,
    references: str,
    metrics: list[str] | None = None,
    skip_bad: bool = False,
    scorer: str = "official",
) -> tuple[dict[str, Any], str | None]:
    """Scores for a predictions file and a references file; raises on bad or misaligned input.

    For data-to-text tasks, what the scorer needs (Java for the official one) is checked before the files
    are read.
    """
    from lorma.scoring.data_to_text import check_scoring_setup, score_data_to_text
    from lorma.scoring.math_answers import score_math
    from lorma.tasks.readers import read_predictions

    if not is_math(task):
        check_scoring_setup(task, metrics, scorer)
    preds = read_predictions(predictions)
    if is_math(task):
        gold, note = _gold_answers(task, references, skip_bad)
        score = score_math(task, preds, gold, str(predictions), str(references))
        return score.as_dict(), note
    groups, note = _reference_groups(task, references, skip_bad)
    return score_data_to_text(task, preds, groups, metrics, str(predictions), str(references), scorer), note


def is_math(task: str) -> bool:
    from lorma.tasks import task_class

    return task_class(task).scored_by == "math"
