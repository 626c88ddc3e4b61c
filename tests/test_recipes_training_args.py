"""TrainingArguments from run configs: `report_to: none`, and which direction is best for each metric."""

from __future__ import annotations

from types import SimpleNamespace

from lorma.recipes.commands import _key_values
from lorma.recipes.config import build_config
from lorma.recipes.train import _best_eval, _training_arguments


def test_report_to_none_from_flag_reaches_trainer_as_the_word(tmp_path) -> None:
    flags = {"model": "m", "train_file": "t.csv", "training": _key_values(["report_to=none"], "--training-arg")}
    cfg = build_config({}, flags)
    task = SimpleNamespace(metric_for_best_model=None, greater_is_better=True)
    args = _training_arguments(cfg, tmp_path, has_eval=False, task=task)
    assert args.report_to in ([], "none", ["none"])


def test_best_eval_direction_per_metric() -> None:
    history = [
        {"eval_accuracy": 0.6, "eval_mse": 0.5, "eval_ter": 70.0, "eval_loss": 1.0},
        {"eval_accuracy": 0.7, "eval_mse": 0.7, "eval_ter": 60.0, "eval_loss": 0.9},
        {"eval_accuracy": 0.65, "eval_mse": 0.4, "eval_ter": 65.0},
    ]
    best = _best_eval(history)
    assert best == {"eval_accuracy": 0.7, "eval_mse": 0.4, "eval_ter": 60.0}
