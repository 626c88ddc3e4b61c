"""TrainingArguments from run configs: `report_to: none`, and which direction is best for each metric."""

from __future__ import annotations

from types import SimpleNamespace

from lorma.commands.run_options import _key_values
from lorma.recipes.config import build_config
from lorma.recipes.train import _best_eval, _training_arguments


def test_report_to_none_from_flag_reaches_trainer_as_the_word(tmp_path) -> None:
    flags = {"model": "m", "train_file": "t.csv", "training": _key_values(["report_to=none"], "--training-arg")}
    cfg = build_config({}, flags)
    task = SimpleNamespace(metric_for_best_model=None, greater_is_better=True, loss_divides_by_item_count=True)
    args = _training_arguments(cfg, tmp_path, has_eval=False, task=task)
    assert args.report_to in ([], "none", ["none"])


def test_a_mean_loss_is_not_rescaled_by_the_number_of_processes(tmp_path) -> None:
    """transformers 5 multiplies a loss by the number of processes when the model takes ``num_items_in_batch``;
    BERT's classification loss is a mean that ignores it, so classification turns that off (measured before:
    eval_loss 2.1998 under 2 processes against 1.1003 in one); a causal LM's loss divides by the count, and keeps it."""
    from lorma.tasks.base import task_class

    cfg = build_config({}, {"model": "m", "train_file": "t.csv"})
    for name, averaged in (("classification", False), ("e2e", True), ("chat", True)):
        task = task_class(name)
        args = _training_arguments(cfg, tmp_path, has_eval=False, task=task)
        assert args.average_tokens_across_devices is averaged, name


def test_best_eval_direction_per_metric() -> None:
    history = [
        {"eval_accuracy": 0.6, "eval_mse": 0.5, "eval_ter": 70.0, "eval_loss": 1.0},
        {"eval_accuracy": 0.7, "eval_mse": 0.7, "eval_ter": 60.0, "eval_loss": 0.9},
        {"eval_accuracy": 0.65, "eval_mse": 0.4, "eval_ter": 65.0},
    ]
    best = _best_eval(history)
    assert best == {"eval_accuracy": 0.7, "eval_mse": 0.4, "eval_ter": 60.0}
