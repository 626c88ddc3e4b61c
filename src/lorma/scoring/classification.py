"""The metrics of classification and regression: GLUE's (accuracy, F1, Matthews, Pearson / Spearman) and
macro-F1, one evaluation at a time (scikit-learn / scipy) or thousands of resamples at once (the verdicts'
bootstrap); and, from them, whether an evaluation collapsed and whether a label set is skewed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["IMBALANCE_MARGIN", "batched_metric", "classification_metrics", "collapse_facts", "is_imbalanced"]


def classification_metrics(names: tuple[str, ...], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The named metrics, via scikit-learn / scipy."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0))
        elif name == "macro_f1":
            out[name] = float(f1_score(labels, predictions, average="macro", zero_division=0))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name in ("pearson", "spearmanr"):
            # a constant prediction has no correlation: report nan rather than a warning and a guess
            if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
                out[name] = math.nan
            else:
                stat = pearsonr if name == "pearson" else spearmanr
                out[name] = float(stat(predictions, labels)[0])
        elif name == "mse":
            out[name] = float(mean_squared_error(labels, predictions))
        else:  # pragma: no cover - names come from this module
            raise ValueError(f"unknown metric {name}")
    return out


def batched_metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Metric ``name`` of every row of ``predictions`` / ``labels`` (arrays of shape ``(..., n)``) at once.

    Written by hand because the bootstrap of ``lorma compare``'s verdicts scores thousands of resamples of the
    eval set, and scikit-learn scores one at a time (about a millisecond each, with its input checks). Each
    formula gives what :func:`classification_metrics` gives on one row (tests/recipes/test_verdicts.py checks them
    against scikit-learn and scipy): macro-F1 averages over the classes present in the row's labels or
    predictions, and an undefined F1 or Matthews correlation is 0, as scikit-learn's ``zero_division=0``.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if name == "accuracy":
        return (predictions == labels).mean(axis=-1)
    if name == "mse":
        return ((predictions.astype(float) - labels) ** 2).mean(axis=-1)
    if name in ("pearson", "spearmanr"):
        if name == "spearmanr":
            from scipy.stats import rankdata

            predictions, labels = rankdata(predictions, axis=-1), rankdata(labels, axis=-1)
        x = predictions - predictions.mean(axis=-1, keepdims=True)
        y = labels - labels.mean(axis=-1, keepdims=True)
        denominator = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, (x * y).sum(axis=-1) / denominator, np.nan)
    if name not in ("macro_f1", "f1", "matthews_correlation"):
        raise ValueError(f"no batched form of metric '{name}'")
    classes = np.union1d(np.unique(predictions), np.unique(labels))
    predicted = predictions[..., None] == classes  # (..., n, K)
    true = labels[..., None] == classes
    tp = (predicted & true).sum(axis=-2).astype(float)  # (..., K)
    predicted_count = predicted.sum(axis=-2).astype(float)
    true_count = true.sum(axis=-2).astype(float)
    if name == "matthews_correlation":
        total = float(predictions.shape[-1])
        covariance = tp.sum(axis=-1) * total - (predicted_count * true_count).sum(axis=-1)
        spread_predicted = total**2 - (predicted_count**2).sum(axis=-1)
        spread_true = total**2 - (true_count**2).sum(axis=-1)
        denominator = np.sqrt(spread_predicted * spread_true)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, covariance / denominator, 0.0)
    f1_denominator = predicted_count + true_count  # 2 tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(f1_denominator > 0, 2 * tp / f1_denominator, 0.0)
    if name == "f1":  # binary, positive class 1 (scikit-learn's default pos_label)
        positive = np.flatnonzero(classes == 1)
        return f1[..., positive[0]] if positive.size else np.zeros(predictions.shape[:-1])
    present = f1_denominator > 0
    return f1.sum(axis=-1) / present.sum(axis=-1)


def collapse_facts(label_names: list[str] | None, train_ids: np.ndarray | None,
                   eval_outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Whether an evaluation collapsed: one class for every input (or a macro-F1 no better than always predicting
    the training data's majority class); for regression (``label_names`` None), (nearly) one value for every input.

    ``eval_outputs``: per eval set, ``(predictions, labels)``. Per eval set: the predicted class counts, macro-F1
    against the majority baseline's, the majority class and its share of the training rows (the facts the advice
    in :mod:`lorma.recipes.collapse` is built from).
    """
    if label_names is None:
        sets: dict[str, Any] = {}
        for key, (predictions, labels) in eval_outputs.items():
            spread, label_spread = float(np.std(predictions)), float(np.std(labels))
            # "constant": the predictions vary by less than 1% of the labels' spread
            sets[key or "eval"] = {"rows": int(labels.size), "prediction_std": spread, "label_std": label_spread,
                                   "constant": bool(spread <= 0.01 * label_spread)}
        constant = any(info["constant"] for info in sets.values())
        return {"problem_type": "regression", "predicts_constant": constant, "collapsed": constant, "sets": sets}
    assert train_ids is not None
    train_counts = np.bincount(train_ids, minlength=len(label_names))
    majority = int(train_counts.argmax())
    sets = {}
    for key, (predictions, labels) in eval_outputs.items():
        predicted = np.bincount(predictions.astype(int), minlength=len(label_names))
        macro_f1 = classification_metrics(("macro_f1",), predictions, labels)["macro_f1"]
        majority_f1 = classification_metrics(("macro_f1",), np.full_like(labels, majority), labels)["macro_f1"]
        sets[key or "eval"] = {
            "rows": int(labels.size),
            "predicted_classes": {label_names[i]: int(c) for i, c in enumerate(predicted) if c},
            "single_class": bool(np.count_nonzero(predicted) == 1),
            "macro_f1": macro_f1,
            "majority_macro_f1": majority_f1,
            "no_better_than_majority": bool(macro_f1 <= majority_f1 + 1e-12),
        }
    single = any(info["single_class"] for info in sets.values())
    return {
        "problem_type": "classification",
        "predicts_single_class": single,
        "collapsed": single or any(info["no_better_than_majority"] for info in sets.values()),
        "majority_class": label_names[majority],
        "majority_share": float(train_counts[majority] / train_counts.sum()),
        "classes": len(label_names),
        "sets": sets,
    }


# A majority class this much above an even share (1 / classes) counts as skewed: enough for --class-weights auto
# to balance the loss, and for the collapse advice to name the imbalance.
IMBALANCE_MARGIN = 0.1


def is_imbalanced(majority_share: float, classes: int) -> bool:
    """Whether a majority class of ``majority_share`` among ``classes`` clearly exceeds an even share."""
    return classes > 0 and majority_share > 1.0 / classes + IMBALANCE_MARGIN
