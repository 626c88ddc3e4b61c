"""The training loss a run records, read back and measured: the per-step loss log (``train_log.jsonl``, or
Trainer's ``trainer_state.json`` for a run that has none), smoothing, and the area under the loss curve that
``metrics.json`` records (``loss_auc``; the paper's convergence measure, Section 5.4) and that
:mod:`lorma.analysis.convergence` compares between runs."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorma.plumbing.errors import DataFormatError
from lorma.plumbing.fileio import read_json, read_jsonl
from lorma.runs.layout import TRAINER_STATE_FILE


def _loss_points(records: list[dict[str, Any]], where: Path) -> tuple[list[float], list[float]]:
    """``(steps, losses)`` of the training-loss records among HF-style log records, sorted by step.

    Evaluation and summary records are skipped; a later record for a step replaces an earlier one (a resumed
    run may log some steps again).
    """
    by_step: dict[float, float] = {}
    for rec in records:
        loss = rec.get("loss", rec.get("train_loss_step"))
        step = rec.get("step", rec.get("global_step"))
        if loss is None or step is None or "eval_loss" in rec or "train_runtime" in rec:
            continue
        try:
            by_step[float(step)] = float(loss)
        except (TypeError, ValueError):
            raise DataFormatError(where, None, f"step {step!r} / loss {loss!r} is not a number") from None
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def read_loss_log(path: Path) -> tuple[list[float], list[float]]:
    """``(steps, losses)`` of the training loss logged in ``path``: this layout's :data:`LOSS_LOG`, another
    tool's JSON Lines or CSV log (columns ``step`` and ``loss``), or a ``trainer_state.json`` (its
    ``log_history``). A line torn by a kill at the end of a JSON Lines log is dropped; anything else malformed
    is an error naming the file (and line)."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"step", "loss"} <= set(reader.fieldnames):
                raise DataFormatError(path, 1, f"expected columns 'step' and 'loss', got {reader.fieldnames}")
            return _loss_points(list(reader), path)
    if path.name == TRAINER_STATE_FILE:
        state = read_json(path)
        history = state.get("log_history") if isinstance(state, dict) else None
        return _loss_points(history if isinstance(history, list) else [], path)
    return _loss_points(read_jsonl(path), path)


Smoothing = int | float | None


def validate_curve(steps: Sequence[float], losses: Sequence[float], what: str) -> tuple[np.ndarray, ...]:
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{what}: steps and losses must be 1-D sequences")
    if x.shape != y.shape:
        raise ValueError(f"{what}: {x.size} steps but {y.size} losses")
    if x.size < 2:
        raise ValueError(f"{what}: need at least 2 logged points, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        bad = int(np.flatnonzero(~(np.isfinite(x) & np.isfinite(y)))[0])
        raise ValueError(f"{what}: non-finite value at point {bad} (step {steps[bad]}, loss {losses[bad]})")
    if np.any(np.diff(x) <= 0):
        bad = int(np.flatnonzero(np.diff(x) <= 0)[0]) + 1
        raise ValueError(f"{what}: steps must increase strictly; step {x[bad]:g} at point {bad} follows {x[bad - 1]:g}")
    return x, y


def smooth(losses: Sequence[float], smoothing: Smoothing = None) -> np.ndarray:
    """The losses smoothed as described in the module docstring (a new float64 array)."""
    y = np.asarray(losses, dtype=np.float64).copy()
    if smoothing is None:
        return y
    if isinstance(smoothing, bool):
        raise ValueError("smoothing must be None, an int window or a float EMA weight, not a bool")
    if isinstance(smoothing, (int, np.integer)):
        window = int(smoothing)
        if window < 0:
            raise ValueError(f"smoothing window must be >= 0, got {window}")
        if window <= 1:
            return y
        from scipy.ndimage import uniform_filter1d

        return uniform_filter1d(y, size=window, mode="nearest")
    weight = float(smoothing)
    if weight == 0.0:
        return y
    if not 0.0 < weight < 1.0:
        raise ValueError(f"float smoothing is an EMA weight in [0, 1), got {weight}; use an int for a window")
    out = np.empty_like(y)
    acc = 0.0
    # written out because the bias correction (divide by 1 - w^t) has no one-call numpy equivalent
    for i, value in enumerate(y):
        acc = weight * acc + (1.0 - weight) * value
        out[i] = acc / (1.0 - weight ** (i + 1))
    return out


def _clip_to(x: np.ndarray, y: np.ndarray, max_step: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Restrict a curve to steps <= max_step, linearly interpolating the loss at max_step."""
    if max_step is None or max_step >= x[-1]:
        return x, y
    if max_step <= x[0]:
        raise ValueError(f"max_step {max_step:g} is not after the first logged step {x[0]:g}")
    keep = x < max_step
    end = float(np.interp(max_step, x, y))
    return np.append(x[keep], max_step), np.append(y[keep], end)


def loss_auc(
    steps: Sequence[float],
    losses: Sequence[float],
    smoothing: Smoothing = None,
    *,
    max_step: float | None = None,
) -> float:
    """Area under the (smoothed) training-loss curve by the trapezoid rule over the logged steps.

    Smoothing is applied to the whole curve before any clipping to ``max_step`` (use the last step of
    the shortest run so that runs of different lengths are compared over the same range).
    """
    x, y = validate_curve(steps, losses, "loss curve")
    x, y = _clip_to(x, smooth(y, smoothing), max_step)
    return float(np.trapezoid(y, x))
