"""Verdicts of ``lorma compare``: the intervals against hand computations, the batched metrics against
scikit-learn / scipy, and the sentences' rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error

from lorma.recipes.verdicts import bootstrap_interval, compare_verdicts, paired_seed_interval, verdict
from lorma.scoring.classification import batched_metric

# Student's t, 97.5% quantile, from a printed table (not from scipy): 2 and 4 degrees of freedom
T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}


def test_paired_seed_interval_is_the_t_interval_of_the_differences() -> None:
    ours, theirs = [0.70, 0.74, 0.69], [0.68, 0.69, 0.70]
    # by hand: differences 0.02, 0.05, -0.01; mean 0.02; sample sd 0.03; half-width t(0.975, 2) * 0.03 / sqrt(3)
    half = T_975[2] * 0.03 / math.sqrt(3)
    got = paired_seed_interval(ours, theirs)
    assert got is not None and got["seeds"] == 3
    assert got["difference"] == pytest.approx(0.02)
    assert got["low"] == pytest.approx(0.02 - half) and got["high"] == pytest.approx(0.02 + half)
    five = paired_seed_interval([1.0, 2.0, 3.0, 4.0, 6.0], [0.0, 0.0, 0.0, 0.0, 0.0])
    sd = np.std([1, 2, 3, 4, 6], ddof=1)
    assert five is not None and five["low"] == pytest.approx(3.2 - T_975[4] * sd / math.sqrt(5))


def test_paired_seed_interval_edge_cases() -> None:
    assert paired_seed_interval([0.7], [0.6]) is None  # one seed: no interval
    assert paired_seed_interval([0.7, 0.8], [0.6]) is None  # unpaired
    same_gap = paired_seed_interval([0.7, 0.8, 0.9], [0.6, 0.7, 0.8])
    assert same_gap is not None and same_gap["low"] == pytest.approx(0.1) and same_gap["high"] == pytest.approx(0.1)


def test_bootstrap_of_an_accuracy_difference_matches_the_normal_approximation() -> None:
    """A paired accuracy difference is the mean of d_i in {-1, 0, 1}: its 95% interval is about
    mean +- 1.96 sd(d) / sqrt(n) by the central limit theorem (computed here by hand)."""
    rng = np.random.default_rng(1)
    n = 600
    labels = rng.integers(0, 3, n)
    ours = np.where(rng.random(n) < 0.75, labels, (labels + 1) % 3)
    theirs = np.where(rng.random(n) < 0.65, labels, (labels + 2) % 3)
    d = (ours == labels).astype(float) - (theirs == labels)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(n)
    got = bootstrap_interval("accuracy", [ours], [theirs], labels, n_resamples=4000)
    assert got is not None and got["examples"] == n
    assert got["difference"] == pytest.approx(d.mean())
    # the bootstrap's own noise is 0.002 at most over seeds 0-5; a 90% interval would be 0.008 narrower per side
    assert got["low"] == pytest.approx(d.mean() - half, abs=0.004)
    assert got["high"] == pytest.approx(d.mean() + half, abs=0.004)
    # identical predictions: a difference of exactly 0 in every resample
    same = bootstrap_interval("macro_f1", [ours, theirs], [ours, theirs], labels, n_resamples=200)
    assert same is not None and same["low"] == same["high"] == 0.0


def test_bootstrap_statistic_is_the_mean_over_seeds() -> None:
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    seeds = [np.array([0, 1, 1, 0, 1, 0, 0, 0]), np.array([0, 1, 0, 0, 1, 1, 0, 1])]
    reference = [np.zeros(8, dtype=int)]
    expected = np.mean([f1_score(labels, p, average="macro") for p in seeds]) - f1_score(
        labels, reference[0], average="macro", zero_division=0
    )
    got = bootstrap_interval("macro_f1", seeds, reference, labels, n_resamples=100)
    assert got is not None and got["difference"] == pytest.approx(expected)


@pytest.mark.parametrize("name", ["accuracy", "macro_f1", "f1", "matthews_correlation", "pearson", "spearmanr", "mse"])
def test_batched_metrics_equal_scikit_learn_and_scipy(name: str) -> None:
    rng = np.random.default_rng(0)
    regression = name in ("pearson", "spearmanr", "mse")
    rows = []
    for i in range(12):
        n = 30
        if regression:
            labels = rng.normal(size=n)
            predictions = labels * rng.uniform(0, 1) + rng.normal(size=n)
            if i == 0:
                predictions = np.round(predictions)  # ties, for spearman's ranks
        else:
            classes = 2 if name == "f1" else 4
            labels = rng.integers(0, classes, n)
            predictions = np.where(rng.random(n) < 0.5, labels, rng.integers(0, classes, n))
            if i == 0:
                predictions = np.zeros(n, dtype=int)  # one class predicted
            if i == 1:
                labels = np.where(labels == classes - 1, 0, labels)  # a class absent from the labels
        rows.append((predictions, labels))
    got = batched_metric(name, np.stack([p for p, _ in rows]), np.stack([y for _, y in rows]))
    reference = {
        "accuracy": accuracy_score,
        "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
        "f1": lambda y, p: f1_score(y, p, zero_division=0),
        "matthews_correlation": matthews_corrcoef,
        "pearson": lambda y, p: pearsonr(p, y)[0],
        "spearmanr": lambda y, p: spearmanr(p, y)[0],
        "mse": mean_squared_error,
    }[name]
    expected = [reference(y, p) for p, y in rows]
    assert got == pytest.approx(expected, abs=1e-12)


def test_batched_metric_of_a_constant_is_undefined_or_zero() -> None:
    labels = np.array([[0.0, 1.0, 2.0, 3.0]])
    assert np.isnan(batched_metric("pearson", np.ones((1, 4)), labels))[0]
    assert batched_metric("matthews_correlation", np.zeros((1, 4), dtype=int), np.array([[0, 1, 0, 1]]))[0] == 0.0
    with pytest.raises(ValueError, match="no batched form"):
        batched_metric("bleu", labels, labels)


def _verdict(seeds: dict | None, boot: dict | None, n_seeds: int = 3, collapsed: dict | None = None) -> dict:
    return verdict("lorma-plus", "lora", "eval_macro_f1", True, seeds, boot, 0.03, n_seeds,
                   collapsed or {"lora": 0, "lorma-plus": 0})


def test_verdict_sentences_follow_the_rule() -> None:
    clear_seeds = {"low": 0.01, "high": 0.05, "seeds": 3}
    clear_boot = {"low": 0.005, "high": 0.055, "examples": 400}
    wide_seeds = {"low": -0.02, "high": 0.08, "seeds": 3}
    both = _verdict(clear_seeds, clear_boot)
    assert both["distinguishable"] is True and both["better"] is True
    assert "tell them apart: lorma-plus is better than lora" in both["sentence"]
    assert "macro_f1 (main metric): +0.0300" in both["sentence"]
    assert "[+0.0100, +0.0500]" in both["sentence"] and "400 eval examples" in both["sentence"]
    wide = _verdict(wide_seeds, clear_boot)
    assert wide["distinguishable"] is False
    assert "cannot tell them apart: the interval over seeds includes 0" in wide["sentence"]
    one_seed = _verdict(None, clear_boot, n_seeds=1)
    assert one_seed["distinguishable"] is None and "one seed" in one_seed["sentence"]
    assert "--seeds 3" in one_seed["sentence"]
    noted = _verdict(wide_seeds, clear_boot, collapsed={"lora": 3, "lorma-plus": 0})
    assert "lora collapsed in 3 of 3 seeds" in noted["sentence"]


def test_compare_verdicts_reads_the_runs_predictions(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    runs: dict[str, list[dict]] = {"lora": [], "lorma-plus": []}
    dirs: dict[str, list[str]] = {"lora": [], "lorma-plus": []}
    for method, skill in (("lora", 0.6), ("lorma-plus", 0.9)):
        for seed in range(3):
            predictions = np.where(rng.random(300) < skill, labels, 1 - labels)
            run_dir = tmp_path / method / f"seed-{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "eval_predictions.json").write_text(
                json.dumps({"": {"predictions": predictions.tolist(), "labels": labels.tolist()}}))
            accuracy = float((predictions == labels).mean())
            runs[method].append({"seed": seed, "eval": {"eval_accuracy": accuracy}, "collapsed": False})
            dirs[method].append(str(run_dir))
    (got,) = compare_verdicts(runs, dirs, "eval_accuracy")
    ours = [r["eval"]["eval_accuracy"] for r in runs["lorma-plus"]]
    theirs = [r["eval"]["eval_accuracy"] for r in runs["lora"]]
    assert got["difference"] == pytest.approx(np.mean(ours) - np.mean(theirs))
    assert got["seeds"]["difference"] == pytest.approx(got["difference"])
    assert got["bootstrap"]["low"] > 0.2  # 0.9 against 0.6 on 300 examples: clearly apart
    assert got["distinguishable"] is True and got["method"] == "lorma-plus" and got["reference"] == "lora"
