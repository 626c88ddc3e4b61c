"""``lorma evaluate``: score existing predictions against references, no model needed.

    lorma evaluate --task e2e --predictions preds.txt --references test.csv
    lorma evaluate --task gsm8k --predictions outputs.txt --references test.jsonl

Data-to-text scores come from the official scorers by default, as the paper's were computed (E2E: the
E2E NLG Challenge scorer; WebNLG / DART: LoRA's decode step and GenerationEval); they need a Java runtime
for METEOR (and for E2E's ROUGE-L / CIDEr, after the PTB tokenizer). ``--scorer approximate`` uses Python
libraries only, and its numbers are labelled as not comparable with published ones.

Predictions are one per line. References: for ``e2e`` the official CSV (``mr``, ``ref``), ``MR||ref``
lines, or groups of reference lines separated by blank lines (the E2E scorer's layout, also what
``lorma train`` writes beside its predictions); for ``dart`` / ``webnlg`` their JSON files or the
blank-line layout; for ``gsm8k`` / ``math`` their JSONL / JSON files, or one gold answer per line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def scored_tasks() -> list[str]:
    """The tasks ``lorma evaluate`` scores: those whose class says how (``Task.scored_by``), from the task registry
    (its modules import no torch, so ``--help`` stays fast)."""
    from lorma.tasks import task_class, task_names

    return [name for name in task_names() if task_class(name).scored_by]


def _is_math(task: str) -> bool:
    from lorma.tasks import task_class

    return task_class(task).scored_by == "math"


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Score predictions (one per line) against references: BLEU, NIST, METEOR, ROUGE-L, CIDEr, TER, "
        "or math accuracy.",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, choices=scored_tasks(), help="Which task's references and metrics.")
    parser.add_argument("--predictions", required=True, help="Predictions file, one per line.")
    parser.add_argument("--references", required=True, help="References file (format: see above).")
    parser.add_argument(
        "--metrics", default=None, help="Comma-separated subset of bleu,nist,meteor,rouge_l,cider,ter."
    )
    parser.add_argument(
        "--scorer",
        default="official",
        choices=("official", "approximate"),
        help="official (default): the paper's scorers, needs Java; approximate: Python libraries, not comparable "
        "with published numbers.",
    )
    parser.add_argument("--skip-bad", action="store_true", help="Skip malformed reference records (reported).")
    parser.add_argument("--output", default=None, help="Also write the scores as JSON to this file.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    parser.set_defaults(func=run)


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

    if not _is_math(task):
        check_scoring_setup(task, metrics, scorer)
    preds = read_predictions(predictions)
    if _is_math(task):
        gold, note = _gold_answers(task, references, skip_bad)
        score = score_math(task, preds, gold, str(predictions), str(references))
        return score.as_dict(), note
    groups, note = _reference_groups(task, references, skip_bad)
    return score_data_to_text(task, preds, groups, metrics, str(predictions), str(references), scorer), note


def run(args: argparse.Namespace) -> int:
    """The ``evaluate`` command: print the scores (and write them with ``--output``)."""
    from lorma.errors import InputError
    from lorma.scoring.data_to_text import MetricDataError, WordNetUnavailableError, scorer_label
    from lorma.scoring.java import JavaUnavailableError, OfficialScorerError
    from lorma.tasks.readers import DataFormatError

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if _is_math(args.task) and metrics:
        raise InputError(f"--metrics does not apply to {args.task} (its score is accuracy)")
    out_path = Path(args.output) if args.output else None
    if out_path is not None:
        from lorma.runs.paths import check_not_input

        check_not_input(out_path, {"--predictions": args.predictions, "--references": args.references},
                        replacing=False, flag="--output")
    if out_path is not None and out_path.exists() and not args.overwrite:
        raise InputError(f"{out_path} already exists (pass --overwrite to replace it)")
    label = None if _is_math(args.task) else scorer_label(args.task, args.scorer)
    try:
        scores, note = evaluate_files(args.task, args.predictions, args.references, metrics, args.skip_bad,
                                      args.scorer)
    except (DataFormatError, MetricDataError, WordNetUnavailableError, JavaUnavailableError, OfficialScorerError,
            ValueError) as err:
        raise InputError(str(err)) from None
    if note:
        print(note)
    if label:
        print(f"scorer: {label}")
    for name, value in scores.items():
        print(f"{name:>10}  {value:.4f}" if isinstance(value, float) else f"{name:>10}  {value}")
    if out_path is not None:
        from lorma.fileio import atomic_write_json

        payload = {"task": args.task, "predictions": str(args.predictions), "references": str(args.references),
                   "scorer": label, "scores": scores}
        atomic_write_json(out_path, payload)
    return 0
