"""Loss AUC, % decrease and steps-to-reach against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from lorma.analysis.convergence import auc_decrease_pct, convergence_table, steps_to_reach
from lorma.runs.loss_curve import loss_auc, smooth


def test_auc_is_the_hand_computed_trapezoid() -> None:
    steps = [0, 1, 3, 6]
    losses = [4.0, 2.0, 1.0, 1.0]
    # (4+2)/2*1 + (2+1)/2*2 + (1+1)/2*3 = 3 + 3 + 3
    assert loss_auc(steps, losses) == pytest.approx(9.0)
    # clipped at step 2: the loss at 2 is interpolated to 1.5: 3 + (2+1.5)/2*1
    assert loss_auc(steps, losses, max_step=2) == pytest.approx(4.75)


def test_smoothing_window_and_ema() -> None:
    y = [3.0, 0.0, 3.0, 0.0, 3.0]
    # centred 3-point window, edges padded with the nearest value
    assert np.allclose(smooth(y, 3), [2.0, 2.0, 1.0, 2.0, 2.0])
    assert np.allclose(smooth(y, None), y) and np.allclose(smooth(y, 1), y) and np.allclose(smooth(y, 0.0), y)
    # debiased EMA with weight 0.5: a_t = 0.5 a_{t-1} + 0.5 y_t, divided by 1 - 0.5^t
    acc, expected = 0.0, []
    for t, v in enumerate(y, start=1):
        acc = 0.5 * acc + 0.5 * v
        expected.append(acc / (1 - 0.5**t))
    assert np.allclose(smooth(y, 0.5), expected)
    assert smooth([2.0, 2.0], 0.9)[0] == pytest.approx(2.0)  # bias corrected from the first point
    # the same smoothing feeds the AUC
    assert loss_auc(range(5), y, 3) == pytest.approx(np.trapezoid([2.0, 2.0, 1.0, 2.0, 2.0]))


@pytest.mark.parametrize("bad", [1.5, -2, True])
def test_bad_smoothing_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="smoothing"):
        smooth([1.0, 2.0], bad)  # type: ignore[arg-type]


def test_bad_curves_are_refused() -> None:
    with pytest.raises(ValueError, match="increase strictly"):
        loss_auc([0, 2, 2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="3 steps but 2 losses"):
        loss_auc([0, 1, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        loss_auc([0, 1], [1.0, float("nan")])
    with pytest.raises(ValueError, match="at least 2"):
        loss_auc([0], [1.0])


def test_decrease_and_steps_to_reach() -> None:
    assert auc_decrease_pct(70.0, 100.0) == pytest.approx(30.0)
    assert auc_decrease_pct(120.0, 100.0) == pytest.approx(-20.0)
    with pytest.raises(ValueError, match="reference AUC"):
        auc_decrease_pct(1.0, 0.0)
    steps = [10, 20, 30, 40]
    losses = [1.0, 0.6, 0.4, 0.5]
    assert steps_to_reach(steps, losses, 0.6) == 20.0
    assert steps_to_reach(steps, losses, 0.45) == 30.0
    assert steps_to_reach(steps, losses, 0.1) is None


def test_convergence_table_against_reference() -> None:
    steps = list(range(0, 101, 10))
    ref = [1.0 - 0.008 * s for s in steps]  # linear from 1.0 to 0.2 at step 100 (its minimum)
    fast = [max(1.0 - 0.02 * s, 0.1) for s in steps]  # reaches 0.2 at step 40
    table = convergence_table({"lora": (steps, ref), "lorma": (steps, fast)}, reference="lora")
    assert table["lora"]["auc_decrease_pct"] == pytest.approx(0.0)
    assert table["lora"]["speedup"] == pytest.approx(1.0)
    assert table["lorma"]["steps_to_ref_min"] == 40.0
    assert table["lorma"]["speedup"] == pytest.approx(100 / 40)
    ref_auc = np.trapezoid(ref, steps)
    run_auc = np.trapezoid(fast, steps)
    assert table["lorma"]["auc"] == pytest.approx(run_auc)
    assert table["lorma"]["auc_decrease_pct"] == pytest.approx(100 * (ref_auc - run_auc) / ref_auc)
    # runs of different lengths are compared over the shared range
    short = convergence_table({"lora": (steps, ref), "x": (steps[:6], fast[:6])}, reference="lora")
    assert short["lora"]["auc"] == pytest.approx(np.trapezoid(ref[:6], steps[:6]))
    with pytest.raises(ValueError, match="reference run 'nope'"):
        convergence_table({"lora": (steps, ref)}, reference="nope")
