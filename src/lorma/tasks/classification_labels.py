"""The labels of a classification task: how raw labels compare, their order, whether they look like scores, and
whether they fit the labels of a model that already has a trained head."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.tasks.glue import GlueSpec
from lorma.tasks.readers.tabular import Examples

__all__ = ["check_labels", "fit_model_labels", "label_key", "labels_of", "model_id2label"]

# A label set that looks like scores rather than classes: any fractional value, or more distinct integers than
# this. Training a classifier on it is rarely meant; the user says which with --problem-type.
MAX_INTEGER_CLASSES_UNASKED = 20


def label_key(value: Any) -> str:
    """Labels compare as strings, so 1 (JSON), "1" (CSV) and 1.0 mean the same class."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _sorted_labels(values: set[str]) -> list[str]:
    """Labels in a stable order: numerically when all are integers, else alphabetically."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def _refuse_score_like_labels(source: str, labels: list[str]) -> None:
    """Numeric labels with fractions, or too many distinct integers, look like regression targets: ask."""
    try:
        numbers = [float(label) for label in labels]
    except ValueError:
        return
    fractional = [label for label, x in zip(labels, numbers) if not x.is_integer()]
    if fractional or len(labels) > MAX_INTEGER_CLASSES_UNASKED:
        shown = ", ".join((fractional or labels)[:4])
        raise InputError(
            f"{source}: the labels look like scores ({len(labels)} distinct numbers, e.g. {shown}): give "
            "--problem-type regression to predict the number, or --problem-type classification to make each "
            "value a class"
        )


def _is_default_label_names(id2label: dict[int, str]) -> bool:
    return all(str(name) == f"LABEL_{int(i)}" for i, name in id2label.items())


def labels_of(train: Examples, regression: bool, glue: GlueSpec | None, problem_type: str | None) -> list[str] | None:
    """The class names (None for regression): the GLUE task's, else the training data's, sorted; labels that look
    like scores are refused unless ``problem_type`` says which is meant."""
    if regression:
        return None
    if glue is not None and glue.labels is not None:
        return list(glue.labels)
    labels = _sorted_labels({label_key(v) for v in train.labels})
    if problem_type is None:
        _refuse_score_like_labels(train.source, labels)
    return labels


def check_labels(examples: Examples, label_names: list[str] | None) -> None:
    """Every label is one of ``label_names`` (regression: a finite number); an error names the file and line."""
    if label_names is None:
        for value, line in zip(examples.labels, examples.lines):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise InputError(f"{examples.source}:{line}: regression label {value!r} is not a finite number")
        return
    known = set(label_names)
    for value, line in zip(examples.labels, examples.lines):
        if label_key(value) not in known:
            raise InputError(
                f"{examples.source}:{line}: label {value!r} is not one of the task's labels "
                f"({', '.join(label_names)})"
            )


def model_id2label(model: str) -> dict[int, str]:
    """The model's ``id2label``: from a local ``config.json`` as plain JSON (no transformers import, so that
    bad data is reported at once), else through transformers' ``AutoConfig`` (hub names)."""
    local = Path(model) / "config.json"
    if local.is_file():
        from lorma.plumbing.fileio import read_json

        raw = read_json(local)
        raw = raw.get("id2label") if isinstance(raw, dict) else None
    elif Path(model).is_dir():
        raise InputError(f"cannot load model '{model}': no config.json in that directory")
    else:
        from transformers import AutoConfig

        try:
            raw = getattr(AutoConfig.from_pretrained(model), "id2label", None)
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0]
            raise InputError(f"cannot load the model config of '{model}': {first_line}") from None
    try:
        return {int(k): str(v) for k, v in (raw or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"model '{model}': its config's id2label is not a mapping of ids to labels") from None


def fit_model_labels(model: str, label_names: list[str] | None) -> list[str] | None:
    """The data's labels must fit the model's labels when the model already has a trained head; returns them in
    the model's own order, so that its trained head keeps meaning the same classes."""
    id2label = model_id2label(model)
    if not id2label or _is_default_label_names(id2label):
        return label_names
    if label_names is None:
        if len(id2label) != 1:
            raise InputError(f"model '{model}' has {len(id2label)} labels "
                             f"({', '.join(id2label.values())}); a regression task needs 1")
        return None
    if set(id2label.values()) != set(label_names):
        raise InputError(
            f"the data's labels ({', '.join(label_names)}) do not fit the labels of model "
            f"'{model}' ({', '.join(id2label[i] for i in sorted(id2label))})"
        )
    return [id2label[i] for i in sorted(id2label)]
