"""Verdicts of ``lorma compare``: is a method better than the first one, or can the data not tell them apart?

For each method against the first of ``--methods``, on the task's main metric:

- the difference of the means over seeds;
- a 95% interval over seeds, paired (seed i of one method against seed i of the other: the same data order
  and the same split), from Student's t (``scipy.stats.ttest_rel``): the run-to-run variation;
- a 95% interval over eval examples: a paired bootstrap (``scipy.stats.bootstrap``, percentile method) that
  resamples the eval examples, the same resample for both methods, and recomputes the difference of the
  means over seeds from the saved predictions (``eval_predictions.json``): the sampling noise of the eval set.

The data tell two methods apart when every interval that could be computed excludes 0; with one seed the
run-to-run variation is unmeasured and the verdict says so.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lorma.plumbing.fileio import read_json
from lorma.recipes.collapse import EVAL_PREDICTIONS

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def paired_seed_interval(
    values: list[float], reference: list[float], confidence: float = CONFIDENCE
) -> dict[str, Any] | None:
    """Mean difference ``values - reference`` (seed by seed) with its t interval; None with fewer than 2 seeds."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if a.size != b.size or a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    differences = a - b
    mean = float(differences.mean())
    if np.ptp(differences) == 0:  # every seed differs by the same amount: the interval is that point
        return {"difference": mean, "low": mean, "high": mean, "seeds": int(a.size)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        interval = ttest_rel(a, b).confidence_interval(confidence_level=confidence)
    return {"difference": mean, "low": float(interval.low), "high": float(interval.high), "seeds": int(a.size)}


def bootstrap_interval(
    metric: str,
    predictions: list[np.ndarray],
    reference_predictions: list[np.ndarray],
    labels: np.ndarray,
    confidence: float = CONFIDENCE,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any] | None:
    """Paired bootstrap over eval examples of ``mean over seeds of metric(predictions) - the same of the
    reference``; ``predictions`` are per seed, all on the same ``labels``. None when the metric is undefined."""
    from scipy.stats import bootstrap

    from lorma.scoring.classification import batched_metric

    ours = np.stack([np.asarray(p) for p in predictions])  # (seeds, n)
    theirs = np.stack([np.asarray(p) for p in reference_predictions])
    labels = np.asarray(labels)

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        y = labels[index]  # (..., n)
        mine = batched_metric(metric, ours[:, index], y)  # (seeds, ...)
        other = batched_metric(metric, theirs[:, index], y)
        return mine.mean(axis=0) - other.mean(axis=0)

    index = np.arange(labels.size)
    estimate = float(statistic(index[None, :])[0])
    if not math.isfinite(estimate):
        return None
    result = bootstrap((index,), statistic, n_resamples=n_resamples, batch=100, vectorized=True,
                       confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return {"difference": estimate, "low": low, "high": high, "examples": int(labels.size),
            "resamples": n_resamples}


def read_eval_predictions(run_dir: str | Path) -> dict[str, dict[str, np.ndarray]] | None:
    """``{eval set: {"predictions", "labels"}}`` saved by a run, or None (an older run, or a task without them)."""
    path = Path(run_dir) / EVAL_PREDICTIONS
    if not path.is_file():
        return None
    data = read_json(path)
    return {key: {k: np.asarray(v) for k, v in value.items()} for key, value in data.items()}


def _metric_key(main_metric: str, eval_set: str) -> str:
    """``eval_macro_f1`` on eval set ``""`` / ``"eval"``; ``eval_matched_accuracy`` on MNLI's matched set."""
    name = main_metric.removeprefix("eval_")
    return f"eval_{name}" if eval_set in ("", "eval") else f"eval_{eval_set}_{name}"


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def _excludes_zero(interval: dict[str, Any] | None) -> bool | None:
    if interval is None:
        return None
    return interval["low"] > 0 or interval["high"] < 0


def verdict(
    method: str,
    reference: str,
    metric_key: str,
    greater_is_better: bool,
    seeds: dict[str, Any] | None,
    boot: dict[str, Any] | None,
    difference: float,
    n_seeds: int,
    collapsed: dict[str, int],
) -> dict[str, Any]:
    """The verdict record and its sentence (see the module docstring for the rule)."""
    metric = metric_key.removeprefix("eval_")
    parts = [f"{method} - {reference} on {metric} (main metric): {_signed(difference)}"]
    if seeds is not None:
        parts.append(f"95% interval over {seeds['seeds']} paired seeds [{_signed(seeds['low'])}, "
                     f"{_signed(seeds['high'])}]")
    else:
        parts.append("no interval over seeds (one seed)" if n_seeds < 2 else "no interval over seeds")
    if boot is not None:
        parts.append(f"over the {boot['examples']} eval examples (bootstrap) [{_signed(boot['low'])}, "
                     f"{_signed(boot['high'])}]")
    else:
        parts.append("no bootstrap over eval examples (no saved predictions, or the metric is undefined)")
    seeds_clear, boot_clear = _excludes_zero(seeds), _excludes_zero(boot)
    better = (difference > 0) == greater_is_better
    direction = f"{method} is {'better' if better else 'worse'} than {reference}"
    if seeds_clear is None and boot_clear is None:
        distinguishable, conclusion = None, "No interval could be computed: the data cannot be judged."
    elif seeds_clear is False or boot_clear is False:
        where = [w for w, clear in (("over seeds", seeds_clear), ("over eval examples", boot_clear)) if clear is False]
        distinguishable = False
        conclusion = (f"The data cannot tell them apart: the interval {where[0]} includes 0." if len(where) == 1 else
                      "The data cannot tell them apart: both intervals include 0.")
    elif seeds_clear is None:
        distinguishable = None
        conclusion = (f"On this eval set {direction}, but with one seed the run-to-run variation is unmeasured: "
                      "rerun with --seeds 3 or more before believing it.")
    else:
        distinguishable = True
        conclusion = f"The data tell them apart: {direction} (every interval excludes 0)."
    notes = [f"{name} collapsed in {count} of {n_seeds} seeds" for name, count in collapsed.items() if count]
    if notes:
        conclusion += f" Note: {', '.join(notes)} (a collapsed run scores the label prior)."
    return {
        "method": method,
        "reference": reference,
        "metric": metric_key,
        "difference": difference,
        "seeds": seeds,
        "bootstrap": boot,
        "distinguishable": distinguishable,
        "better": better if distinguishable else None,
        "sentence": "; ".join(parts) + ". " + conclusion,
    }


def compare_verdicts(
    runs: dict[str, list[dict[str, Any]]],
    run_dirs: dict[str, list[str]],
    main_metric: str,
    greater_is_better: bool = True,
) -> list[dict[str, Any]]:
    """A verdict for each method after the first against the first, per eval set, from the runs' metrics and
    saved predictions."""
    methods = list(runs)
    if len(methods) < 2:
        return []
    reference = methods[0]
    predictions = {m: [read_eval_predictions(d) for d in run_dirs[m]] for m in methods}
    eval_sets = sorted({key for m in methods for p in predictions[m] if p for key in p}) or [""]
    out = []
    for method in methods[1:]:
        for eval_set in eval_sets:
            key = _metric_key(main_metric, eval_set)
            ours = [r["eval"].get(key, math.nan) for r in runs[method]]
            theirs = [r["eval"].get(key, math.nan) for r in runs[reference]]
            if not ours or not theirs or all(math.isnan(v) for v in ours + theirs):
                continue
            difference = float(np.nanmean(ours) - np.nanmean(theirs))
            seeds = paired_seed_interval(ours, theirs) if len(ours) == len(theirs) else None
            boot = None
            mine = [p.get(eval_set) if p else None for p in predictions[method]]
            other = [p.get(eval_set) if p else None for p in predictions[reference]]
            if all(x is not None for x in mine + other):
                labels = other[0]["labels"]
                if all(np.array_equal(x["labels"], labels) for x in mine + other):
                    boot = bootstrap_interval(main_metric.removeprefix("eval_"), [x["predictions"] for x in mine],
                                              [x["predictions"] for x in other], labels)
            collapsed = {m: sum(bool(r.get("collapsed")) for r in runs[m]) for m in (reference, method)}
            record = verdict(method, reference, key, greater_is_better, seeds, boot, difference,
                             min(len(ours), len(theirs)), collapsed)
            record["eval_set"] = eval_set or "eval"
            out.append(record)
    return out
