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

from lorma.runs.loss_curve import Smoothing, loss_auc, smooth, validate_curve

__all__ = [
    "smooth",
    "loss_auc",
    "auc_decrease_pct",
    "steps_to_reach",
    "convergence_table",
]


def auc_decrease_pct(auc: float, reference_auc: float) -> float:
    """Percentage decrease of ``auc`` against ``reference_auc`` (positive: the run converges faster)."""
    if not reference_auc > 0:
        raise ValueError(f"reference AUC must be > 0, got {reference_auc}")
    return 100.0 * (reference_auc - auc) / reference_auc


def steps_to_reach(
    steps: Sequence[float], losses: Sequence[float], target: float, smoothing: Smoothing = None
) -> float | None:
    """First logged step at which the (smoothed) loss is <= ``target``; None if it never gets there."""
    x, y = validate_curve(steps, losses, "loss curve")
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
    checked = {name: validate_curve(s, v, f"loss curve of {name}") for name, (s, v) in curves.items()}
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
