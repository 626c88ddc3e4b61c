"""Runs that learned nothing: a classifier that predicts one class for every input (or scores a macro-F1 no
better than always predicting the majority class), a regressor that predicts one value.

Such a run has learned the label prior, not the task; its accuracy equals the majority class's share and looks
like a result. The facts come from the task (:meth:`lorma.tasks.base.Task.collapse_report`); this module turns
them into the fields of ``metrics.json`` (``collapsed``, ``predicts_single_class`` / ``predicts_constant``),
a warning with the likely causes, and the command to try next.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from lorma.plumbing.fileio import atomic_write_json
from lorma.recipes.config import RunConfig

EVAL_PREDICTIONS = "eval_predictions.json"


def outcome_fields(task: Any) -> dict[str, Any]:
    """The fields of ``metrics.json`` about the final evaluation: the main metric and whether the run collapsed."""
    fields: dict[str, Any] = {}
    if task.metric_for_best_model:
        fields["main_metric"] = f"eval_{task.metric_for_best_model}"
    report = task.collapse_report()
    if report is not None:
        fields["collapsed"] = bool(report["collapsed"])
        if report["problem_type"] == "classification":
            fields["predicts_single_class"] = bool(report["predicts_single_class"])
        else:
            fields["predicts_constant"] = bool(report["predicts_constant"])
        fields["collapse"] = report
    if getattr(task, "class_weights", None):
        fields["class_weights"] = task.class_weights
        if getattr(task, "class_weights_reason", None):
            fields["class_weights_reason"] = task.class_weights_reason
    return fields


def save_eval_predictions(path: Path, task: Any) -> None:
    """The final evaluation's predictions and labels (the bootstrap of the verdicts resamples them)."""
    predictions = task.eval_predictions()
    if predictions is not None:
        atomic_write_json(path, predictions, indent=None)


def describe_collapse(metrics: dict[str, Any]) -> str | None:
    """One paragraph on a collapsed run: what it predicts, and the likely causes; None for a run that learned."""
    report = metrics.get("collapse")
    if not metrics.get("collapsed") or not report:
        return None
    who = f"{metrics.get('method')} (seed {metrics.get('seed')})"
    if report["problem_type"] == "regression":
        spreads = ", ".join(f"{info['prediction_std']:.3g} against the labels' {info['label_std']:.3g}"
                            for info in report["sets"].values())
        what = f"{who} predicts (nearly) one value for every eval example (spread {spreads})"
        causes = ["the learning rate (too low to move, or so high that training diverged)", "too few steps"]
    else:
        facts = []
        for name, info in report["sets"].items():
            classes = ", ".join(f"'{label}' x{count}" for label, count in info["predicted_classes"].items())
            facts.append(f"{'' if name == 'eval' else name + ': '}predicts {classes} for {info['rows']} examples, "
                         f"macro-F1 {info['macro_f1']:.4f} against the majority baseline's "
                         f"{info['majority_macro_f1']:.4f}")
        single = "one class for every input" if report["predicts_single_class"] else "no better than the majority class"
        what = f"{who} collapsed to {single} ({'; '.join(facts)}): it learned the label prior, not the task"
        causes = ["the learning rate (too low to leave the prior, or too high and diverged)", "too few steps"]
        if is_imbalanced(report):
            causes.append(f"class imbalance (the majority class '{report['majority_class']}' is "
                          f"{report['majority_share']:.1%} of the training rows)")
    return f"{what}. Likely causes: {'; '.join(causes)}."


def is_imbalanced(report: dict[str, Any]) -> bool:
    """Whether the training data's majority class clearly exceeds an even share."""
    from lorma.scoring.classification import is_imbalanced as skewed

    return skewed(report.get("majority_share", 0.0), report.get("classes") or 0)


def next_command(argv: list[str] | None, cfg: RunConfig, reports: list[dict[str, Any]]) -> str:
    """The command to try after collapsed runs: the same one, with --tune learning_rate (or, when it already
    tuned, twice the steps), balanced class weights where the classes are imbalanced, and a fresh output
    directory (the old results stay)."""
    words = list(argv if argv is not None else sys.argv[1:])
    additions: list[str] = []
    if cfg.tune or cfg.grid:
        steps = int(cfg.training.get("max_steps", -1) or -1)
        if steps > 0:
            _set_flag(words, "--max-steps", str(2 * steps))
        else:
            epochs = float(cfg.training.get("num_train_epochs", 3.0))
            _set_flag(words, "--num-train-epochs", f"{2 * epochs:g}")
    else:
        additions += ["--tune", "learning_rate"]
    if cfg.class_weighting() == "none" and any(r.get("problem_type") == "classification" and is_imbalanced(r)
                                               for r in reports):
        additions += ["--class-weights", "balanced"]
    if cfg.output_dir:
        _set_flag(words, "--output-dir", f"{cfg.output_dir.rstrip('/')}-next")
    words = [w for w in words if w != "--overwrite"]
    return shlex.join(["lorma", *words, *additions])


def _set_flag(words: list[str], flag: str, value: str) -> None:
    """Give ``flag`` the value ``value`` in a command line (``--flag v`` or ``--flag=v``), or add it."""
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            words[i + 1] = value
            return
        if word.startswith(flag + "="):
            words[i] = f"{flag}={value}"
            return
    words += [flag, value]


def collapse_advice(argv: list[str] | None, cfg: RunConfig, collapsed: list[dict[str, Any]]) -> str:
    """The closing lines after a command whose runs (metrics dicts) collapsed: how many, why, what to run."""
    reports = [m["collapse"] for m in collapsed if m.get("collapse")]
    runs = ", ".join(f"{m['method']} seed {m['seed']}" for m in collapsed)
    return (f"warning: {len(collapsed)} run(s) collapsed ({runs}): their scores are the label prior's, not the "
            f"method's. Try next:\n  {next_command(argv, cfg, reports)}")
