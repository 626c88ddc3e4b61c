"""How a benchmark ratio is estimated and judged: per-round ratios, their median, a bootstrap interval, a verdict.

Why per-round ratios: a shared machine's load drifts over minutes. Within one round every method runs once,
close together in time, so the load that slows one of them slows the others about as much; the ratio taken
inside the round cancels most of it, where a ratio of two medians taken over the whole run does not.

The interval is scipy's percentile bootstrap of the median (``scipy.stats.bootstrap``, ``method="percentile"``):
the median of a handful of rounds is not normal and its standard error has no closed form, and the percentile
method stays defined when every round gave the same value (memory), where BCa does not.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Verdict = Literal["met", "not met", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("met", "not met", "inconclusive")

CONFIDENCE = 0.95
RESAMPLES = 9999
# the precision the rounds are added for: every tracked ratio known to +-0.05 (the target)
TARGET_HALF_WIDTH = 0.05


@dataclass(frozen=True)
class Estimate:
    """The median of per-round values and its bootstrap confidence interval."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def degenerate(self) -> bool:
        """Every resample gave the same median: the rounds agree (memory), or there are too few to vary."""
        return self.low == self.high

    def format(self, digits: int = 2) -> str:
        """``1.05 [1.02, 1.09]``; a point interval is written once, with ``=`` (the same in every round)."""
        if self.degenerate and self.rounds > 1:
            return f"{self.median:.{digits}f} ="
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def estimate(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
             seed: int = 0) -> Estimate:
    """Median of ``values`` with a percentile-bootstrap interval (``scipy.stats.bootstrap``).

    One value has no spread to resample: its interval is unbounded, so every verdict on it is inconclusive.
    """
    from scipy.stats import bootstrap

    xs = np.asarray(values, dtype=float)
    if xs.ndim != 1 or xs.size == 0:
        raise ValueError(f"estimate needs a non-empty 1-D list of values, got shape {xs.shape}")
    if not np.isfinite(xs).all():
        raise ValueError(f"estimate got non-finite values: {values!r}")
    mid = float(np.median(xs))
    if xs.size == 1:
        return Estimate(mid, -math.inf, math.inf, 1)
    res = bootstrap((xs,), np.median, confidence_level=confidence, n_resamples=resamples, method="percentile",
                    vectorized=True, random_state=np.random.default_rng(seed))
    # the percentile interpolation can land one ulp inside the median when the rounds (nearly) agree: the
    # reported interval always contains the reported median
    low = min(float(res.confidence_interval.low), mid)
    high = max(float(res.confidence_interval.high), mid)
    return Estimate(mid, low, high, int(xs.size))


def round_ratios(rounds: Sequence[dict[Hashable, float]], num: Hashable, den: Hashable) -> list[float]:
    """``num / den`` inside each round (both measured in that round): the pairing that cancels the load."""
    out = []
    for i, values in enumerate(rounds):
        if num not in values or den not in values:
            raise KeyError(f"round {i} lacks {num!r} or {den!r}: it has {sorted(map(str, values))}")
        if values[den] <= 0:
            raise ValueError(f"round {i}: {den!r} measured {values[den]!r}, cannot divide by it")
        out.append(values[num] / values[den])
    return out


def ratio_estimate(rounds: Sequence[dict[Hashable, float]], num: Hashable, den: Hashable) -> Estimate:
    return estimate(round_ratios(rounds, num, den))


def verdict(est: Estimate, threshold: float, higher_is_better: bool = False) -> Verdict:
    """``met`` only when the whole interval is on the right side of ``threshold``, ``not met`` when the whole
    interval is on the wrong side, ``inconclusive`` when it straddles it.

    Lower is better for cost ratios (``step / LoRA <= 1.05``); higher for speed-ups (``>= 1.3x faster``). A
    bound equal to the threshold counts as on the right side (the goals are stated as ``<=`` / ``>=``).
    """
    if higher_is_better:
        if est.low >= threshold:
            return "met"
        return "not met" if est.high < threshold else "inconclusive"
    if est.high <= threshold:
        return "met"
    return "not met" if est.low > threshold else "inconclusive"


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """A goal with several parts: met when all are, not met when any is not, inconclusive otherwise."""
    if not verdicts:
        raise ValueError("combine needs at least one verdict")
    if any(v == "not met" for v in verdicts):
        return "not met"
    return "met" if all(v == "met" for v in verdicts) else "inconclusive"


def inverted(more_over_less: Estimate) -> bool:
    """A sanity failure: the method that does strictly more work came out faster beyond the interval."""
    return more_over_less.high < 1.0


def precise_enough(estimates: Sequence[Estimate], half_width: float = TARGET_HALF_WIDTH) -> bool:
    """Whether every estimate is known to ``+-half_width`` (the stopping rule of the rounds)."""
    return all(e.half_width <= half_width for e in estimates)

