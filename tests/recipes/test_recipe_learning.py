"""The training recipe's pieces (issue 22): the head's own learning rate, the learning-rate range test,
class balance when the labels are skewed, and tuning that neither chooses a collapsed candidate nor stops at a
grid where every candidate collapsed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lorma.cli import main
from lorma.recipes.learning_rates import (
    RANGE_TEST_HIGH,
    RANGE_TEST_LOW,
    choose_rate,
    is_head_parameter,
    smooth,
    split_head_groups,
    sweep_rates,
)
from lorma.recipes.tuning import choose, widened_candidates, widened_values
from recipe_support import make_tiny_bert, sentiment_rows, write_csv


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    rows = sentiment_rows(60, seed=1)
    skewed = [r for r in sentiment_rows(80, seed=3) if r[1] == "pos"][:36] + [
        r for r in sentiment_rows(80, seed=4) if r[1] == "neg"][:12]
    return {"model": make_tiny_bert(root / "model"), "data": write_csv(root / "data.csv", ["text", "label"], rows),
            "skewed": write_csv(root / "skewed.csv", ["text", "label"], skewed), "root": root}


def _train(setup: dict[str, Path], out: Path, *extra: str, data: str = "data") -> dict:
    argv = ["train", "--model", str(setup["model"]), "--train-file", str(setup[data]), "--output-dir", str(out),
            "--per-device-train-batch-size", "8", "--report-to", "none", "--save-strategy", "no", *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


# --- the head's learning rate ------------------------------------------------------------------------------------

def test_head_parameters_are_found_under_peft_and_in_a_plain_model() -> None:
    heads = ["classifier"]
    assert is_head_parameter("base_model.model.classifier.modules_to_save.default.weight", heads)
    assert not is_head_parameter("base_model.model.classifier.original_module.weight", heads)
    assert is_head_parameter("classifier.weight", heads)  # full fine-tuning: the model itself
    assert is_head_parameter("base_model.model.classifier.bias", heads)
    assert not is_head_parameter("bert.encoder.layer.0.attention.self.query.weight", heads)
    assert not is_head_parameter("bert.classifier_norm.weight", heads)  # a prefix of a name is not the head
    assert not is_head_parameter("bert.pooler.classifier.weight", heads)  # deeper than the top: not the head


def test_split_head_groups_gives_the_head_its_rate_and_the_scheduler_scales_both() -> None:
    body, head = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [body, head], "weight_decay": 0.0}], lr=1e-3)
    split_head_groups(optimizer, {id(head)}, 4e-2)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rates == {id(body): 1e-3, id(head): 4e-2}
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert sorted(scheduler.get_last_lr()) == [5e-4, 2e-2]


def test_the_head_moves_at_its_own_rate_in_a_run(setup: dict[str, Path], tmp_path: Path) -> None:
    """AdamW's first step moves every weight by its learning rate (times the sign of the gradient): after one
    step of constant rates, the head's weights have moved by the head's rate and the adapter's by the body's."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    metrics = _train(setup, out, "--method", "lora", "--max-steps", "1", "--learning-rate", "1e-3",
                     "--head-learning-rate", "2e-2", "--warmup-steps", "0", "--lr-scheduler-type", "constant",
                     "--class-weights", "none")
    assert metrics["learning_rate"] == {"body": 1e-3, "head": 2e-2}
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(42)  # the run's seed: the same initial head and adapter
    base = AutoModelForSequenceClassification.from_pretrained(setup["model"], num_labels=2)
    head_moves = (tensors["base_model.model.classifier.weight"] - base.classifier.weight).abs()
    assert torch.allclose(head_moves.max(), torch.tensor(2e-2), rtol=1e-3)
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]  # B starts at 0: it moved by exactly the body's rate
    # (|g| / (|g| + eps) of AdamW is a little under 1 for the smallest gradients)
    assert lora_b and all(torch.allclose(v.abs().max(), torch.tensor(1e-3), rtol=0.05) for v in lora_b)


# --- the range test ------------------------------------------------------------------------------------------------

def test_smooth_is_an_exponential_average_without_the_pull_towards_zero() -> None:
    values = [4.0, 2.0, 3.0]
    beta = 0.5
    expected, average = [], 0.0
    for i, v in enumerate(values, 1):
        average = beta * average + (1 - beta) * v
        expected.append(average / (1 - beta**i))
    assert smooth(values, beta) == pytest.approx(expected)
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])


def test_choose_rate_takes_a_tenth_of_the_lowest_point() -> None:
    rates = sweep_rates(1e-3, 40)
    assert rates[0] == pytest.approx(1e-3 * RANGE_TEST_LOW) and rates[-1] == pytest.approx(1e-3 * RANGE_TEST_HIGH)
    assert np.allclose(np.diff(np.log(rates)), np.log(rates[1] / rates[0]))
    # a loss falling until 1e-2 and diverging after it
    losses = [1.0 + (math.log10(r) + 2) ** 2 for r in rates]
    chosen, lowest = choose_rate(rates, losses, floor=rates[0])
    assert lowest == pytest.approx(1e-2, rel=0.2)  # centred smoothing: no lag
    assert chosen == pytest.approx(lowest / 10)
    # the curve ends at a diverged (NaN / inf) step: the minimum stays where it was (within two steps of the sweep)
    chosen_nan, _ = choose_rate(rates, losses[:30] + [math.nan] * 10, floor=rates[0])
    assert chosen / 2 <= chosen_nan <= chosen * 2
    assert choose_rate(rates, [math.nan] * 40, floor=1e-5) == (1e-5, pytest.approx(math.nan, nan_ok=True))
    # the floor holds when the loss is lowest at the very start
    assert choose_rate(rates, sorted(losses), floor=rates[0])[0] == rates[0]


def test_learning_rate_auto_runs_the_test_restores_the_model_and_trains_as_with_the_rate_given(
        setup: dict[str, Path], tmp_path: Path) -> None:
    auto = _train(setup, tmp_path / "auto", "--method", "lorma-plus", "--max-steps", "4", "--learning-rate", "auto",
                  "--class-weights", "none")
    record = json.loads((tmp_path / "auto" / "lr_range.json").read_text())
    assert (tmp_path / "auto" / "lr_range.png").stat().st_size > 1000
    assert record == auto["lr_range_test"] and record["chosen"] == auto["learning_rate"]["body"]
    assert 3 <= len(record["rates"]) == len(record["losses"]) <= 60
    assert record["rates"][0] == pytest.approx(1e-3 * RANGE_TEST_LOW)
    # the run after the test is the run with that rate given by hand: same weights, bit for bit
    given = _train(setup, tmp_path / "given", "--method", "lorma-plus", "--max-steps", "4", "--learning-rate",
                   repr(record["chosen"]), "--head-learning-rate", repr(auto["learning_rate"]["head"]),
                   "--class-weights", "none")
    assert given["weights_sha256"] == auto["weights_sha256"]
    config = (tmp_path / "auto" / "config.yaml").read_text()
    assert "learning_rate: auto" in config  # --resume tests again only without lr_range.json


def test_bad_head_learning_rate_is_refused_before_any_work(setup: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bad"
    code = main(["train", "--model", str(setup["model"]), "--train-file", str(setup["data"]), "--output-dir",
                 str(out), "--head-learning-rate", "fast"])
    assert code == 2 and "head_learning_rate" in capsys.readouterr().err and not out.exists()


# --- class balance ----------------------------------------------------------------------------------------------

def test_class_weights_auto_balances_skewed_labels_only(setup: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    skewed = _train(setup, tmp_path / "skewed", "--max-steps", "1", "--class-weights", "auto", data="skewed")
    # 36 'pos' and 12 'neg' rows of which 10% are held out for eval (stratified): n / (K n_c) on the rest
    rows = skewed["data"]["train_rows"]
    pos = round(rows * 0.75)
    assert skewed["class_weights"] == pytest.approx({"pos": rows / (2 * pos), "neg": rows / (2 * (rows - pos))})
    assert f"'pos' is {pos / rows:.0%} of the {rows} training rows" in skewed["class_weights_reason"]
    assert "class weights balanced" in capsys.readouterr().out
    even = _train(setup, tmp_path / "even", "--max-steps", "1", "--class-weights", "auto")
    assert "class_weights" not in even


# --- tuning --------------------------------------------------------------------------------------------------------

def test_choose_never_prefers_a_collapsed_candidate() -> None:
    candidates = [{"score": 0.40, "collapsed": True}, {"score": 0.35, "collapsed": False},
                  {"score": 0.38, "collapsed": False}]
    assert choose(candidates, greater_is_better=True) == 2
    assert choose([{"score": 0.3, "collapsed": True}, {"score": 0.4, "collapsed": True}], True) == 1
    assert choose([{"score": 0.2, "collapsed": False}, {"score": 0.1, "collapsed": False}], False) == 1


def test_widening_adds_one_value_beyond_each_end_at_the_grids_spacing() -> None:
    assert widened_values([3e-4, 1e-3, 3e-3, 1e-2]) == pytest.approx([9.32e-5, 3.22e-2], rel=1e-2)
    assert widened_values([4, 8, 16]) == [2, 32]
    assert widened_values([0.0, 0.01, 0.1]) == [-0.05, 0.15]  # not all positive: the mean step
    assert widened_values([None, "balanced"]) == [] and widened_values([1e-3]) == []
    grid, extra = widened_candidates({"learning_rate": [1e-3, 1e-2], "class_weights": [None, "balanced"]},
                                     [{"learning_rate": 1e-3, "class_weights": None}])
    assert grid["learning_rate"] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert {"learning_rate": 1e-3, "class_weights": None} not in extra and len(extra) == 7


def test_compare_runs_one_range_test_per_method_and_the_other_seeds_reuse_its_rate(
        setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(setup["model"]), "--train-file", str(setup["data"]), "--methods",
                 "lora", "--seeds", "2", "--max-steps", "2", "--learning-rate", "auto", "--head-learning-rate",
                 "3e-3", "--per-device-train-batch-size", "8", "--report-to", "none", "--save-strategy", "no",
                 "--output-dir", str(out)]) == 0
    first, second = (json.loads((out / "lora" / f"seed-{s}" / "metrics.json").read_text()) for s in (42, 43))
    assert (out / "lora" / "seed-42" / "lr_range.json").is_file()
    assert not (out / "lora" / "seed-43" / "lr_range.json").exists() and "lr_range_test" not in second
    assert second["learning_rate"] == first["learning_rate"]
    # the head keeps its ratio to the body (3e-3 : 1e-3, the family default the sweep is centred on)
    assert first["learning_rate"]["head"] == pytest.approx(3 * first["learning_rate"]["body"])
    results = json.loads((out / "results.json").read_text())
    assert results["learning_rate_auto"]["lora"]["from"] == "the range test of seed 42"
    printed = capsys.readouterr().out
    assert "Learning rates: chosen per method by a learning-rate range test" in printed
    assert f"{first['learning_rate']['body']:.2g}, head {first['learning_rate']['head']:.2g}" in printed


# --- the budget ----------------------------------------------------------------------------------------------------

def test_default_epochs_give_small_data_enough_steps() -> None:
    from lorma.recipes.config import MAX_DEFAULT_EPOCHS, MIN_DEFAULT_STEPS, default_epochs

    assert default_epochs(1000, 3.0) == 3.0  # large data: the usual 3 epochs
    assert default_epochs(MIN_DEFAULT_STEPS // 4, 3.0) == 4.0
    assert default_epochs(7, 3.0) == MAX_DEFAULT_EPOCHS  # tiny data: bounded


def test_a_run_without_a_budget_trains_more_epochs_on_small_data(setup: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lorma.recipes import config

    monkeypatch.setattr(config, "MIN_DEFAULT_STEPS", 40)
    metrics = _train(setup, tmp_path / "epochs", "--method", "lora", "--eval-strategy", "no")
    rows = metrics["data"]["train_rows"]  # 60 rows less the 10% held out
    per_epoch = math.ceil(rows / 8)
    assert metrics["budget"]["steps_per_epoch"] == per_epoch
    assert metrics["budget"]["epochs"] == math.ceil(40 / per_epoch) > 3
    assert metrics["global_step"] == metrics["budget"]["epochs"] * per_epoch
    given = _train(setup, tmp_path / "given", "--method", "lora", "--num-train-epochs", "1", "--eval-strategy", "no")
    assert "budget" not in given and given["global_step"] == per_epoch


def test_separation_says_when_the_validation_rows_cannot_tell_the_choice_from_the_runner_up(tmp_path: Path) -> None:
    from lorma.plumbing.fileio import atomic_write_json
    from lorma.recipes.tuning import separation

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)

    def candidate(name: str, accuracy: float, score: float, collapsed: bool = False) -> dict:
        right = rng.random(120) < accuracy
        predictions = np.where(right, labels, (labels + 1) % 3)
        folder = tmp_path / name
        folder.mkdir()
        atomic_write_json(folder / "eval_predictions.json",
                          {"": {"predictions": predictions.tolist(), "labels": labels.tolist()}})
        return {"values": {"learning_rate": float(name)}, "score": score, "collapsed": collapsed,
                "run_dir": str(folder)}

    close = [candidate("0.001", 0.62, 0.60), candidate("0.003", 0.60, 0.58), candidate("0.01", 0.9, 0.9, True)]
    result = separation(close, 0, "eval_macro_f1")
    assert result["runner_up"] == "learning_rate=0.003"  # the collapsed one is no runner-up, whatever its score
    assert result["examples"] == 120 and result["low"] < 0 < result["high"] and not result["tells_apart"]
    far = [candidate("0.03", 0.95, 0.95), candidate("0.0003", 0.35, 0.3)]
    assert separation(far, 0, "eval_macro_f1")["tells_apart"]
    assert separation(far[:1], 0, "eval_macro_f1") is None  # no runner-up
