"""The metrics of classification and regression: GLUE's (accuracy, F1, Matthews, Pearson / Spearman) and
macro-F1, one evaluation at a time (scikit-learn / scipy) or thousands of resamples at once (the verdicts'
bootstrap)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["batched_metric", "classification_metrics"]


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
    formula gives what :func:`classification_metrics` gives on one row (tests/test_verdicts.py checks them
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
