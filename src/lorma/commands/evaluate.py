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

from lorma.recipes.evaluate import is_math


def scored_tasks() -> list[str]:
    """The tasks ``lorma evaluate`` scores: those whose class says how (``Task.scored_by``), from the task registry
    (its modules import no torch, so ``--help`` stays fast)."""
    from lorma.tasks import task_class, task_names

    return [name for name in task_names() if task_class(name).scored_by]


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


def run(args: argparse.Namespace) -> int:
    """The ``evaluate`` command: print the scores (and write them with ``--output``)."""
    from lorma.plumbing.errors import InputError
    from lorma.scoring.data_to_text import MetricDataError, WordNetUnavailableError, scorer_label
    from lorma.scoring.java import JavaUnavailableError, OfficialScorerError
    from lorma.tasks.readers import DataFormatError

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if is_math(args.task) and metrics:
        raise InputError(f"--metrics does not apply to {args.task} (its score is accuracy)")
    out_path = Path(args.output) if args.output else None
    if out_path is not None:
        from lorma.runs.paths import check_not_input

        check_not_input(out_path, {"--predictions": args.predictions, "--references": args.references},
                        replacing=False, flag="--output")
    if out_path is not None and out_path.exists() and not args.overwrite:
        raise InputError(f"{out_path} already exists (pass --overwrite to replace it)")
    label = None if is_math(args.task) else scorer_label(args.task, args.scorer)
    try:
        from lorma.recipes.evaluate import evaluate_files

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
        from lorma.plumbing.fileio import atomic_write_json

        payload = {"task": args.task, "predictions": str(args.predictions), "references": str(args.references),
                   "scorer": label, "scores": scores}
        atomic_write_json(out_path, payload)
    return 0
