"""The 8 GLUE tasks: where each keeps its columns in its TSV files, its labels and its metrics (paper Table 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GLUE_ALIASES", "GLUE_TASKS", "GlueSpec"]


@dataclass(frozen=True)
class GlueSpec:
    """Where a GLUE task's columns are in its TSV files, its labels and its metrics."""

    text: str | int
    pair: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    has_header: bool = True
    dev_files: dict[str, str] = field(default_factory=lambda: {"": "dev.tsv"})
    # columns of the HF ``glue`` dataset (for saved HF datasets)
    hf_columns: tuple[str, str | None] = ("sentence", None)
    hf_eval_splits: dict[str, str] = field(default_factory=lambda: {"": "validation"})


# Label orders follow the HF ``glue`` datasets, so that integer labels of a saved HF dataset mean the same.
GLUE_TASKS: dict[str, GlueSpec] = {
    # CoLA's TSVs have no header: source, label, original label, sentence
    "cola": GlueSpec(3, None, 1, ("0", "1"), ("matthews_correlation",), has_header=False),
    "sst2": GlueSpec("sentence", None, "label", ("0", "1"), ("accuracy",)),
    "mrpc": GlueSpec("#1 String", "#2 String", "Quality", ("0", "1"), ("f1", "accuracy"),
                     hf_columns=("sentence1", "sentence2")),
    "qqp": GlueSpec("question1", "question2", "is_duplicate", ("0", "1"), ("f1", "accuracy"),
                    hf_columns=("question1", "question2")),
    "stsb": GlueSpec("sentence1", "sentence2", "score", None, ("pearson", "spearmanr"),
                     hf_columns=("sentence1", "sentence2")),
    "mnli": GlueSpec("sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
                     ("accuracy",), dev_files={"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"},
                     hf_columns=("premise", "hypothesis"),
                     hf_eval_splits={"matched": "validation_matched", "mismatched": "validation_mismatched"}),
    "qnli": GlueSpec("question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",),
                     hf_columns=("question", "sentence")),
    "rte": GlueSpec("sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",),
                    hf_columns=("sentence1", "sentence2")),
}
GLUE_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}
