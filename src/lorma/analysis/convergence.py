"""Convergence measurements of the paper's Table 5 and Fig. 6, from logged training losses.

* ``loss_auc``: area under the training-loss curve, trapezoid rule over the logged steps
  (``numpy.trapezoid``), after the same smoothing for every run. Lower means faster convergence.
* ``auc_decrease_pct``: the paper's "% AUC decrease against LoRA", ``100 * (ref - run) / ref``.
* ``steps_to_reach``: the first logged step at which a (smoothed) curve is at or below a target loss;
  with the target set to the reference run's minimum this gives Fig. 6's "2.9x speedup (step 1460)"
  marks: speedup = (step at which the reference reaches its own minimum) / (step at which the run
  reaches it).

Smoothing, the same for every run that is compared (``smoothing`` argument):

* ``None``, ``0`` or ``1``: none, the raw logged losses;
* an int ``w >= 2``: centred moving average over ``w`` logged points
  (``scipy.ndimage.uniform_filter1d``, edges padded with the nearest value), which does not shift
  the curve in time;
* a float in ``(0, 1)``: TensorBoard-style exponential moving average with that weight, bias-corrected
  for the first points; note that it lags the raw curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "smooth",
    "loss_auc",
    "auc_decrease_pct",
    "steps_to_reach",
    "convergence_table",
]

Smoothing = int | float | None


def _validate_curve(steps: Sequence[float], losses: Sequence[float], what: str) -> tuple[np.ndarray, ...]:
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
    x, y = _validate_curve(steps, losses, "loss curve")
    x, y = _clip_to(x, smooth(y, smoothing), max_step)
    return float(np.trapezoid(y, x))


def auc_decrease_pct(auc: float, reference_auc: float) -> float:
    """Percentage decrease of ``auc`` against ``reference_auc`` (positive: the run converges faster)."""
    if not reference_auc > 0:
        raise ValueError(f"reference AUC must be > 0, got {reference_auc}")
    return 100.0 * (reference_auc - auc) / reference_auc


def steps_to_reach(
    steps: Sequence[float], losses: Sequence[float], target: float, smoothing: Smoothing = None
) -> float | None:
    """First logged step at which the (smoothed) loss is <= ``target``; None if it never gets there."""
    x, y = _validate_curve(steps, losses, "loss curve")
    hits = np.flatnonzero(smooth(y, smoothing) <= target)
    return float(x[hits[0]]) if hits.size else None


def convergence_table(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    reference: str,
    smoothing: Smoothing = None,
    common_range: bool = True,
) -> dict[str, dict[str, Any]]:
    """Table 5 / Fig. 6 numbers for several runs against one reference run.

    For each run: ``auc`` (over the steps all runs share when ``common_range``), ``auc_decrease_pct``
    against the reference, ``min_loss`` of the smoothed curve, ``steps_to_ref_min`` (first step
    reaching the reference's smoothed minimum) and ``speedup`` = the reference's own step at its
    minimum divided by the run's ``steps_to_ref_min``.
    """
    if reference not in curves:
        raise ValueError(f"reference run {reference!r} is not among the runs {sorted(curves)}")
    checked = {name: _validate_curve(s, v, f"loss curve of {name}") for name, (s, v) in curves.items()}
    max_step = min(float(x[-1]) for x, _ in checked.values()) if common_range else None
    ref_x, ref_y = checked[reference]
    ref_smooth = smooth(ref_y, smoothing)
    ref_min = float(ref_smooth.min())
    ref_min_step = float(ref_x[int(np.argmin(ref_smooth))])
    ref_auc = loss_auc(ref_x, ref_y, smoothing, max_step=max_step)
    table: dict[str, dict[str, Any]] = {}
    for name, (x, y) in checked.items():
        auc = loss_auc(x, y, smoothing, max_step=max_step)
        reach = steps_to_reach(x, y, ref_min, smoothing)
        table[name] = {
            "auc": auc,
            "auc_decrease_pct": auc_decrease_pct(auc, ref_auc),
            "min_loss": float(smooth(y, smoothing).min()),
            "steps_to_ref_min": reach,
            "speedup": (ref_min_step / reach) if reach else None,
            "auc_max_step": max_step if max_step is not None else float(x[-1]),
            "reference": reference,
            "reference_min_loss": ref_min,
            "reference_min_step": ref_min_step,
        }
    return table
