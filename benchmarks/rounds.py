"""The round scheduler: every method once per round, in a fresh random order, rounds added until precise enough.

Kept free of torch and of the models so that its behaviour (the shuffling, the pairing within a round, the
stopping rule) is tested with fake measurements.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

Measure = Callable[[], float]

STOP_PRECISE = "precise"  # every tracked interval narrower than the target
STOP_CAP = "round cap"  # max_rounds reached first
STOP_BUDGET = "time budget"  # the table's time budget ran out first


@dataclass
class RoundLog:
    """What a run of rounds measured: one ``{key: value}`` per round, the order each round ran in, and why it
    stopped."""

    values: list[dict[Hashable, float]] = field(default_factory=list)
    orders: list[list[Hashable]] = field(default_factory=list)
    stop_reason: str = ""
    seconds: float = 0.0

    @property
    def rounds(self) -> int:
        return len(self.values)


def run_rounds(
    measures: dict[Hashable, Measure],
    *,
    min_rounds: int,
    max_rounds: int,
    precise: Callable[[list[dict[Hashable, float]]], bool] | None = None,
    budget_s: float | None = None,
    warmup_rounds: int = 0,
    seed: int = 0,
    clock: Callable[[], float] = time.monotonic,
    on_round: Callable[[RoundLog], None] | None = None,
) -> RoundLog:
    """Run rounds of ``measures`` (each call measures one method once and returns the value: seconds, bytes).

    Each round calls every measure exactly once, in an order shuffled afresh (``random.Random(seed)``), so no
    method always runs first or right after a heavy one. ``warmup_rounds`` full rounds run first and are
    discarded. After ``min_rounds`` kept rounds, rounds continue until ``precise(values)`` holds, ``max_rounds``
    are kept, or ``budget_s`` seconds (from the first kept round) have passed, whichever comes first; the
    reason is recorded.
    """
    if not measures:
        raise ValueError("run_rounds needs at least one measure")
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds} and {max_rounds}")
    rng = random.Random(seed)
    order = list(measures)

    def one_round() -> tuple[dict[Hashable, float], list[Hashable]]:
        rng.shuffle(order)
        values = {key: float(measures[key]()) for key in order}
        return values, list(order)

    for _ in range(warmup_rounds):
        one_round()
    log = RoundLog()
    start = clock()
    while True:
        values, ran = one_round()
        log.values.append(values)
        log.orders.append(ran)
        log.seconds = clock() - start
        if on_round is not None:
            on_round(log)
        if log.rounds < min_rounds:
            continue
        if precise is not None and precise(log.values):
            log.stop_reason = STOP_PRECISE
        elif log.rounds >= max_rounds:
            log.stop_reason = STOP_CAP
        elif budget_s is not None and log.seconds >= budget_s:
            log.stop_reason = STOP_BUDGET
        else:
            continue
        return log
