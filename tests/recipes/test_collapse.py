"""Collapse detection (a model that predicts one class, or a constant) and the class-weighted loss, through the
real training path and against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lorma.cli import main
from lorma.plumbing.errors import InputError
from lorma.recipes.collapse import describe_collapse, next_command
from lorma.recipes.config import build_config
from lorma.tasks.base import get_task
from recipe_support import make_tiny_bert, sentiment_rows, write_csv

# a model whose head ignores its input: logits (BIAS, -BIAS) for every text, so it always says "neg"
BIAS = 3.0


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("collapse")
    model_dir = make_tiny_bert(root / "constant", id2label={0: "neg", 1: "pos"})
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([BIAS, -BIAS]))
    model.save_pretrained(model_dir)
    pos = [r for r in sentiment_rows(200, seed=4) if r[1] == "pos"][:60]
    neg = [r for r in sentiment_rows(200, seed=5) if r[1] == "neg"][:20]
    return {
        "model": model_dir,
        "train": write_csv(root / "train.csv", ["text", "label"], pos + neg),  # 75% pos
        "eval": write_csv(root / "eval.csv", ["text", "label"], sentiment_rows(30, seed=9)),
    }


def _train(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    # head-only at learning rate 1e-9 (0 is refused): one AdamW step moves the head by about 1e-9, so the constant
    # head stays constant; one batch of all 80 training rows
    return ["train", "--model", str(data["model"]), "--train-file", str(data["train"]), "--eval-file",
            str(data["eval"]), "--method", "head-only", "--learning-rate", "1e-9", "--max-steps", "1",
            "--per-device-train-batch-size", "80", "--warmup-steps", "0", "--save-strategy", "no",
            "--report-to", "none", "--output-dir", str(out), *extra]


def _cross_entropy(logits: tuple[float, float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def test_a_constant_classifier_is_marked_with_causes_and_the_next_command(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = _train(data, out, "--class-weights", "none")  # plain cross-entropy (the default would balance 3:1)
    assert main(argv) == 0
    captured = capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    eval_labels = [label for _, label in sentiment_rows(30, seed=9)]
    assert metrics["predicts_single_class"] is True and metrics["collapsed"] is True
    report = metrics["collapse"]
    assert report["sets"]["eval"]["predicted_classes"] == {"neg": 30}
    assert report["majority_class"] == "pos" and report["majority_share"] == pytest.approx(0.75)
    # macro-F1 of always "neg", by hand: F1(neg) = 2 * n_neg / (30 + n_neg), F1(pos) = 0
    n_neg = eval_labels.count("neg")
    assert report["sets"]["eval"]["macro_f1"] == pytest.approx(2 * n_neg / (30 + n_neg) / 2)
    assert metrics["eval"]["eval_macro_f1"] == pytest.approx(report["sets"]["eval"]["macro_f1"])
    # the log (stderr) says what and why; the summary says what to run next
    assert "warning: head-only (seed 42) collapsed to one class for every input" in captured.err
    assert "'neg' x30" in captured.err and "Likely causes: the learning rate" in captured.err
    assert "class imbalance (the majority class 'pos' is 75.0% of the training rows)" in captured.err
    assert "COLLAPSED" in captured.out and "Try next:" in captured.out
    suggestion = captured.out.split("Try next:")[1].strip().splitlines()[0]
    assert suggestion.startswith("lorma train ")
    assert suggestion.endswith("--tune learning_rate --class-weights balanced")
    assert f"--output-dir {out}-next" in suggestion
    # the run's predictions are saved for the verdicts' bootstrap
    saved = json.loads((out / "eval_predictions.json").read_text())
    assert saved[""]["predictions"] == [0] * 30
    assert saved[""]["labels"] == [["neg", "pos"].index(v) for v in eval_labels]
    # the logged training loss is the plain cross-entropy of the constant logits over all 80 rows
    loss = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    plain = (60 * _cross_entropy((BIAS, -BIAS), 1) + 20 * _cross_entropy((BIAS, -BIAS), 0)) / 80
    assert loss == pytest.approx(plain, rel=1e-4)


def test_balanced_class_weights_weigh_the_loss_by_hand(data: dict[str, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "weighted"
    assert main(_train(data, out, "--class-weights", "balanced")) == 0
    captured = capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    # n / (classes x count): 80 / (2 x 20) for neg, 80 / (2 x 60) for pos
    assert metrics["class_weights"] == pytest.approx({"neg": 2.0, "pos": 80 / 120})
    loss = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    weighted = (60 * (80 / 120) * _cross_entropy((BIAS, -BIAS), 1) + 20 * 2.0 * _cross_entropy((BIAS, -BIAS), 0)) / 80
    assert loss == pytest.approx(weighted, rel=1e-4)
    assert "class-weighted loss (balanced): neg 2, pos 0.667" in captured.out
    # the advice does not add what is already on
    suggestion = captured.out.split("Try next:")[1].strip().splitlines()[0]
    assert suggestion.count("--class-weights balanced") == 1 and suggestion.endswith("--tune learning_rate")


def test_a_learning_classifier_is_not_marked(data: dict[str, Path]) -> None:
    task = get_task(build_config({"model": str(data["model"]), "train_file": str(data["train"]),
                                  "eval_file": str(data["eval"])}, {}))
    task.check_inputs()
    labels = np.array([0, 1, 1, 0, 1, 0])
    task._eval_outputs = {"": (np.array([0, 1, 1, 0, 0, 0]), labels)}
    report = task.collapse_report()
    assert report is not None and report["collapsed"] is False and report["predicts_single_class"] is False
    # two classes predicted, but no better than always predicting the majority class "pos" (id 1)
    task._eval_outputs = {"": (np.array([1, 1, 1, 1, 1, 0]), np.array([1, 1, 1, 1, 0, 1]))}
    report = task.collapse_report()
    assert report is not None and report["predicts_single_class"] is False
    assert report["sets"]["eval"]["majority_macro_f1"] == pytest.approx(2 * 5 / (6 + 5) / 2)
    assert report["sets"]["eval"]["no_better_than_majority"] is True and report["collapsed"] is True


def test_a_constant_regressor_is_marked(tmp_path: Path, data: dict[str, Path]) -> None:
    rows = [(f"text {i}", f"{i / 10:.1f}") for i in range(20)]
    train = write_csv(tmp_path / "r.csv", ["text", "label"], rows)
    model = make_tiny_bert(tmp_path / "m")
    task = get_task(build_config({"model": str(model), "train_file": str(train), "problem_type": "regression"}, {}))
    task.check_inputs()
    labels = np.linspace(0.0, 1.9, 8)
    task._eval_outputs = {"": (np.full(8, 0.95) + 1e-4 * np.arange(8), labels)}
    report = task.collapse_report()
    assert report is not None and report["predicts_constant"] is True and report["collapsed"] is True
    metrics = {"method": "lora", "seed": 0, "collapsed": True, "collapse": report}
    assert "predicts (nearly) one value for every eval example" in describe_collapse(metrics)
    task._eval_outputs = {"": (labels * 0.5 + 0.1, labels)}
    assert task.collapse_report()["predicts_constant"] is False


def test_next_command_after_tuning_asks_for_more_steps() -> None:
    cfg = build_config({"tune": ["learning_rate"], "max_steps": 150, "output_dir": "runs/x", "class_weights":
                        "balanced"}, {})
    argv = ["compare", "c.yaml", "--tune", "learning_rate", "--max-steps", "150", "--output-dir", "runs/x",
            "--overwrite"]
    assert next_command(argv, cfg, []) == \
        "lorma compare c.yaml --tune learning_rate --max-steps 300 --output-dir runs/x-next"


def test_class_weights_need_classes(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="class_weights must be one of auto, balanced, none"):
        build_config({"class_weights": "inverse"}, {})
    rows = [(f"text {i}", f"{i / 10:.1f}") for i in range(20)]
    train = write_csv(tmp_path / "r.csv", ["text", "label"], rows)
    model = make_tiny_bert(tmp_path / "m")
    task = get_task(build_config({"model": str(model), "train_file": str(train), "problem_type": "regression",
                                  "class_weights": "balanced"}, {}))
    task.check_inputs()
    with pytest.raises(InputError, match="--class-weights applies to classification"):
        task.loss_function()
