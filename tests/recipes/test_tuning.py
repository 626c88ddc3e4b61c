"""``--tune`` / ``--grid``: the validation split and the k-fold cross-validation (k from the data size, the same
folds for every method), the eval data never read while tuning, the choice, the widened and extended grids, the
records, the cache (per fold), per-family defaults, and bad grids."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from lorma.cli import main
from lorma.plumbing.errors import InputError
from lorma.recipes import tuning
from lorma.recipes.config import DEFAULT_LEARNING_RATES, build_config
from lorma.recipes.tuning import (
    DEFAULT_GRIDS,
    EXTEND_ROUNDS,
    auto_folds,
    candidate_label,
    grid_edges,
    plan_tuning,
    resolve_folds,
    tune,
    tuning_rows,
)
from lorma.tasks import classification_data
from lorma.tasks.base import get_task
from recipe_support import make_tiny_bert, sentiment_rows, snapshot, write_csv


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tuning")
    # 3:1 imbalanced training data, so that stratification shows
    rows = [r for r in sentiment_rows(200, seed=4) if r[1] == "pos"][:60] + \
        [r for r in sentiment_rows(200, seed=5) if r[1] == "neg"][:20]
    return {
        "model": make_tiny_bert(root / "model"),
        "train": write_csv(root / "train.csv", ["text", "label"], rows),
        "eval": write_csv(root / "eval.csv", ["text", "label"], sentiment_rows(24, seed=9)),
        "root": root,
    }


def _cfg(data: dict[str, Path], **values: object):
    base = {"model": str(data["model"]), "train_file": str(data["train"]), "eval_file": str(data["eval"]),
            "max_steps": 3, "per_device_train_batch_size": 8, "save_strategy": "no", "report_to": "none"}
    base.update(values)
    return build_config(base, {})


@contextlib.contextmanager
def _recorded_reads():
    """Every data file the classification task reads, in order."""
    reads: list[str] = []
    real = classification_data.read_examples

    def recording(path, *args, **kwargs):
        reads.append(str(Path(path).resolve()))
        return real(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classification_data, "read_examples", recording)  # where the task's data is read
        yield reads


def test_validation_split_is_stratified_carved_from_the_training_rows_and_the_same_for_every_method(
    data: dict[str, Path],
) -> None:
    final = get_task(_cfg(data))
    final.check_inputs()
    assert final._train is not None
    final_lines = set(final._train.lines)
    splits = []
    for method, lr in (("lora", 1e-3), ("full", 5e-5), ("lorma-pi", 3e-3)):
        with _recorded_reads() as reads:
            task = get_task(_cfg(data, method=method, learning_rate=lr, eval_on="validation"))
            task.check_inputs()
        assert reads == [str(data["train"].resolve())]  # the eval file is not even opened
        assert task._train is not None and task._eval is not None
        validation = task._eval[""]
        splits.append((tuple(task._train.lines), tuple(validation.lines)))
        assert len(validation) == math.ceil(0.2 * 80)
        assert not set(validation.lines) & set(task._train.lines)
        assert set(validation.lines) | set(task._train.lines) == final_lines
        assert Counter(validation.labels) == {"pos": 12, "neg": 4}  # 3:1, as the training data
    assert len(set(splits)) == 1
    other_seed = get_task(_cfg(data, eval_on="validation", split_seed=1))
    other_seed.check_inputs()
    assert other_seed._eval is not None and tuple(other_seed._eval[""].lines) != splits[0][1]


def test_without_eval_file_validation_never_overlaps_the_held_out_eval_rows(data: dict[str, Path]) -> None:
    final = get_task(_cfg(data, eval_file=None, eval_split=0.25))
    final.check_inputs()
    tuning = get_task(_cfg(data, eval_file=None, eval_split=0.25, eval_on="validation"))
    tuning.check_inputs()
    assert final._eval is not None and tuning._eval is not None and tuning._train is not None
    held_out = set(final._eval[""].lines)
    assert len(held_out) == 20
    assert not held_out & (set(tuning._eval[""].lines) | set(tuning._train.lines))


def test_tuning_loop_never_reads_the_eval_file(data: dict[str, Path], tmp_path: Path) -> None:
    eval_file = tmp_path / "eval.csv"
    eval_file.write_bytes(data["eval"].read_bytes())
    cfg = _cfg(data, eval_file=str(eval_file), grid={"learning_rate": [1e-3, 3e-2]}, tune_folds=2)
    task = get_task(cfg)
    task.check_inputs()  # loads (and checks) the eval data, as lorma compare does first
    eval_file.unlink()  # from here on, reading it would fail
    record = tune(cfg, ["lora"], tmp_path / "tuning", task, quiet=True)
    candidates = record["methods"]["lora"]["candidates"]
    assert [c["values"] for c in candidates] == [{"learning_rate": 1e-3}, {"learning_rate": 3e-2}]
    assert all(isinstance(c["score"], float) and len(c["folds"]) == 2 for c in candidates)
    assert record["main_metric"] == "eval_macro_f1" and record["runs"] == 4
    # the final runs do need it: the same settings without eval_on=validation fail on the missing file
    from lorma.recipes.train import run_training

    with pytest.raises(InputError, match="data file not found"):
        run_training(dataclasses.replace(cfg, grid={}, output_dir=str(tmp_path / "final")))


@pytest.fixture(scope="module")
def tuned_compare(data: dict[str, Path]) -> dict[str, object]:
    out = data["root"] / "compare"
    args = ["compare", "--model", str(data["model"]), "--train-file", str(data["train"]), "--eval-file",
            str(data["eval"]), "--methods", "lora,full", "--seeds", "2", "--max-steps", "3",
            "--per-device-train-batch-size", "8", "--save-strategy", "no", "--report-to", "none",
            "--tune", "learning_rate", "--grid", "adapter:learning_rate=1e-3,3e-2",
            "--grid", "full:learning_rate=1e-4,1e-3", "--tune-folds", "2", "--output-dir", str(out)]
    buffer = io.StringIO()
    with _recorded_reads() as reads, contextlib.redirect_stdout(buffer):
        code = main(args)
    return {"code": code, "out": out, "stdout": buffer.getvalue(), "args": args, "reads": list(reads)}


def test_compare_tunes_each_method_and_keeps_every_candidate(tuned_compare: dict, data: dict[str, Path]) -> None:
    assert tuned_compare["code"] == 0
    out: Path = tuned_compare["out"]
    results = json.loads((out / "results.json").read_text())
    tuning = results["tuning"]
    assert tuning["main_metric"] == "eval_macro_f1" and tuning["folds"] == 2
    assert tuning["cross_validation"] == {"folds": 2, "reason": "--tune-folds 2", "rows": 80, "fold_rows": [40, 40],
                                          "stratified": True}
    assert tuning["planned_runs"] == tuning["runs"] == 2 * 4  # folds x candidates: given grids are not extended
    assert "tune: 2 folds x 4 candidates of 2 methods = 8 candidate runs" in tuned_compare["stdout"]
    grids = {"lora": [1e-3, 3e-2], "full": [1e-4, 1e-3]}
    fold_labels: dict[int, set[tuple[str, ...]]] = {1: set(), 2: set()}
    for method, info in tuning["methods"].items():
        assert info["grid"] == {"learning_rate": grids[method]} and "extended" not in info
        scores = []
        for candidate in info["candidates"]:
            assert Path(candidate["run_dir"]) == out / "tuning" / method / candidate_label(candidate["values"])
            fold_scores = []
            for fold, record in enumerate(candidate["folds"], start=1):
                run_dir = Path(candidate["run_dir"]) / f"fold-{fold}-of-2"
                assert Path(record["run_dir"]) == run_dir and record["fold"] == fold
                run = json.loads((run_dir / "metrics.json").read_text())
                assert record["score"] == run["eval"]["eval_macro_f1"]  # each fold's validation score, kept
                assert run["data"]["eval_rows"] == {"eval": 40} and run["data"]["train_rows"] == 40
                saved = yaml.safe_load((run_dir / "config.yaml").read_text())
                assert saved["eval_on"] == "validation" and saved["seed"] == 42
                assert (saved["tune_folds"], saved["validation_fold"]) == (2, fold)
                labels = json.loads((run_dir / "eval_predictions.json").read_text())[""]["labels"]
                fold_labels[fold].add(tuple(labels))
                fold_scores.append(run["eval"]["eval_macro_f1"])
            assert candidate["fold_scores"] == fold_scores
            assert candidate["score"] == pytest.approx(sum(fold_scores) / 2)  # the mean of the folds
            assert candidate["score_std"] == pytest.approx(abs(fold_scores[0] - fold_scores[1]) / math.sqrt(2))
            assert candidate["validation_rows"] == 80 and candidate["train_rows"] == [40, 40]
            scores.append(candidate["score"])
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        assert info["chosen"] == info["candidates"][best]["values"]
        for seed in (42, 43):  # the final runs use the chosen value, on the whole training data
            final = yaml.safe_load((out / method / f"seed-{seed}" / "config.yaml").read_text())
            assert final["training"]["learning_rate"] == info["chosen"]["learning_rate"]
            assert final["eval_on"] == "eval" and final["tune"] is None
            metrics = json.loads((out / method / f"seed-{seed}" / "metrics.json").read_text())
            assert metrics["data"]["train_rows"] == 80 and metrics["data"]["eval_rows"] == {"eval": 24}
    # every method and candidate was scored on the same rows in each fold (their labels in the same order)
    assert all(len(labels) == 1 for labels in fold_labels.values())
    # the eval file: read by the first check and by the 4 final runs, never by the 8 fold runs
    reads = Counter(tuned_compare["reads"])
    assert reads[str(data["eval"].resolve())] == 1 + 4
    assert reads[str(data["train"].resolve())] == 1 + 8 + 4


def test_compare_tables_show_chosen_values_collapse_and_verdicts(tuned_compare: dict) -> None:
    out: Path = tuned_compare["out"]
    stdout: str = tuned_compare["stdout"]
    results = json.loads((out / "results.json").read_text())
    chosen = {m: candidate_label(i["chosen"]) for m, i in results["tuning"]["methods"].items()}
    markdown = (out / "results.md").read_text()
    for text in (stdout, markdown):
        assert "validation macro_f1 (mean ± std, 2 folds)" in text and "<- chosen" in text
        assert "2-fold cross-validation of the 80 training rows (--tune-folds 2; stratified" in text
        assert "tuned" in text and "macro_f1 (main)" in text and "collapsed" in text
        for label in chosen.values():
            assert label in text
        assert "full - lora on macro_f1 (main metric)" in text
        assert "Main metric: macro_f1" in text
    (verdict,) = results["verdicts"]
    assert verdict["method"] == "full" and verdict["reference"] == "lora" and verdict["metric"] == "eval_macro_f1"
    means = {m: results["methods"][m]["metrics"]["eval_macro_f1"]["mean"] for m in ("lora", "full")}
    assert verdict["difference"] == pytest.approx(means["full"] - means["lora"])
    assert verdict["seeds"]["seeds"] == 2 and verdict["bootstrap"]["examples"] == 24
    for info in results["methods"].values():
        flags = [json.loads((Path(d) / "metrics.json").read_text())["collapsed"] for d in info["run_dirs"]]
        assert info["collapsed_seeds"] == [s for s, f in zip(info["seeds"], flags) if f]


def test_rerun_reuses_every_finished_fold(tuned_compare: dict) -> None:
    """A rerun trains only the fold run that is missing (as after a stop), and rewrites no finished one."""
    out: Path = tuned_compare["out"]
    missing = out / "tuning" / "lora" / "learning_rate=0.03" / "fold-2-of-2"
    before = snapshot(out / "tuning")
    shutil.rmtree(missing)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main([*tuned_compare["args"], "--overwrite"]) == 0
    after = snapshot(out / "tuning")
    unchanged = {k: v for k, v in before.items() if not k.startswith("lora/learning_rate=0.03/fold-2-of-2/")}
    assert {k: after[k] for k in unchanged} == unchanged  # the 7 finished fold runs: not retrained, not rewritten
    assert (missing / "candidate.json").is_file()
    results = json.loads((out / "results.json").read_text())
    folds = {(m, candidate_label(c["values"]), f["fold"]): f["cached"]
             for m, info in results["tuning"]["methods"].items() for c in info["candidates"] for f in c["folds"]}
    assert [key for key, cached in folds.items() if not cached] == [("lora", "learning_rate=0.03", 2)]
    assert len(folds) == 8 and results["tuning"]["cached_runs"] == 7


def test_train_tune_records_the_candidates_and_uses_the_choice(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["train", "--model", str(data["model"]), "--train-file", str(data["train"]), "--eval-file",
                     str(data["eval"]), "--method", "lorma-plus", "--max-steps", "3", "--save-strategy", "no",
                     "--report-to", "none", "--grid", "learning_rate=2e-3,4e-2", "--tune-folds", "1",
                     "--output-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    info = metrics["tuning"]["methods"]["lorma-plus"]
    assert [c["values"]["learning_rate"] for c in info["candidates"]] == [2e-3, 4e-2]
    assert metrics["tuning"]["folds"] == 1 and "folds" not in info["candidates"][0]
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["learning_rate"] == \
        info["chosen"]["learning_rate"]
    assert (out / "tuning" / "lorma-plus" / "learning_rate=0.002" / "candidate.json").is_file()
    assert f"tuned on the training data: {candidate_label(info['chosen'])}" in buffer.getvalue()
    assert "validation macro_f1" in buffer.getvalue()
    # again: refused without --overwrite before any candidate; with it, the new run (written beside the old one and
    # swapped in) keeps the candidates, which are not trained again
    args = ["train", "--model", str(data["model"]), "--train-file", str(data["train"]), "--eval-file",
            str(data["eval"]), "--method", "lorma-plus", "--max-steps", "3", "--save-strategy", "no", "--report-to",
            "none", "--grid", "learning_rate=2e-3,4e-2", "--tune-folds", "1", "--output-dir", str(out)]
    candidates = snapshot(out / "tuning")
    assert main(args) == 2
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--overwrite"]) == 0
    assert snapshot(out / "tuning") == candidates
    again = json.loads((out / "metrics.json").read_text())["tuning"]["methods"]["lorma-plus"]
    assert all(c["cached"] for c in again["candidates"]) and again["chosen"] == info["chosen"]
    assert not list(tmp_path.glob(".run.*"))  # no staging folder or lock left behind


def test_bad_tuning_requests_fail_before_any_work(data: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base = ["compare", "--model", str(data["model"]), "--train-file", str(data["train"]), "--methods", "lora,full",
            "--output-dir", str(tmp_path / "o")]
    cases = [
        (["--tune", "learnig_rate"], "unknown setting 'learnig_rate'"),
        (["--tune", "train_file"], "'train_file' cannot be tuned"),
        (["--tune", "adam_beta2"], "no default grid for lora"),
        (["--grid", "dora:learning_rate=1e-3"], "method 'dora' is not among the methods"),
        (["--grid", "fast:learning_rate=1e-3"], "'fast' is neither a method"),
        (["--grid", "r=4,four"], "'r' must be of type int"),
        (["--grid", "learning_rate=1e-3,1e-3"], "listed twice"),
        (["--tune", "learning_rate", "--tune-folds", "0"], "tune_folds must be from 1"),
        (["--tune", "learning_rate", "--validation-fold", "2"], "validation_fold 2 needs tune_folds of 2 or more"),
        (["--tune", "learning_rate", "--tune-folds", "3", "--validation-fold", "4"],
         "validation_fold must be from 1 to tune_folds (3)"),
        (["--tune", "learning_rate", "--tune-folds", "20", "--max-train-samples", "30"],
         "30 training rows are too few for 20 folds"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="validation_split must be in"):
        build_config({"validation_split": 1.0}, {})
    # r applies to adapters only: full fine-tuning gets no candidates for it, and trains nothing while tuning
    plan = plan_tuning(_cfg(data, tune=["r"]), ["lora", "full"])
    assert plan["lora"]["grid"] == {"r": list(DEFAULT_GRIDS["r"]["adapter"])} and plan["full"]["candidates"] == []


def test_default_learning_rate_per_method_family_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    for method, family in (("lorma-plus", "adapter"), ("lora", "adapter"), ("full", "full"), ("bitfit", "partial")):
        assert build_config({"method": method}, {}).training_arguments()["learning_rate"] == \
            DEFAULT_LEARNING_RATES[family]
    assert build_config({"method": "full", "learning_rate": 0.1}, {}).training_arguments()["learning_rate"] == 0.1
    assert DEFAULT_LEARNING_RATES["adapter"] > 5 * DEFAULT_LEARNING_RATES["full"]
    for command in ("compare", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "Default grids: learning_rate: adapter " + ",".join(f"{v:g}" for v in DEFAULT_GRIDS[
            "learning_rate"]["adapter"]) in text
        assert "--grid [METHOD:]KEY=V1,V2,..." in text and "--class-weights" in text
        # the defaults table, one row per family, read from the same dicts the runs use
        from lorma.recipes.config import DEFAULT_CLASS_WEIGHTS, DEFAULT_HEAD_LEARNING_RATES

        for family, methods in (("adapter", "lorma-plus, lorma-pi, lorma-none, lora, dora"), ("full", "full"),
                                ("partial", "bitfit, head-only")):
            head = DEFAULT_HEAD_LEARNING_RATES[family]
            row = f"{family} {DEFAULT_LEARNING_RATES[family]:g} " \
                  f"{head if isinstance(head, str) else format(head, 'g')} {DEFAULT_CLASS_WEIGHTS}"
            assert row in text
            assert f"{family}: {methods}" in text  # the members, from the method registry


def test_a_choice_at_the_edge_of_the_grid_is_flagged() -> None:
    grid = {"learning_rate": [1e-4, 1e-3, 1e-2], "side": ["pre", "post", "pre2"]}
    assert grid_edges(grid, {"learning_rate": 1e-2, "side": "pre"}) == [
        "learning_rate=0.01 is the largest value of its grid"]
    assert grid_edges(grid, {"learning_rate": 1e-3, "side": "post"}) == []
    assert grid_edges({"learning_rate": [1e-3, 3e-3]}, {"learning_rate": 1e-3}) == []  # two values: no middle
    record = {"main_metric": "eval_macro_f1", "methods": {"lora": {
        "chosen": {"learning_rate": 1e-4}, "at_grid_edge": grid_edges(grid, {"learning_rate": 1e-4}),
        "candidates": [{"values": {"learning_rate": v}, "score": s, "collapsed": False}
                       for v, s in ((1e-4, 0.6), (1e-3, 0.5), (1e-2, 0.4))]}}}
    _, rows = tuning_rows(record)
    assert rows[0][-1] == ("<- chosen (learning_rate=0.0001 is the smallest value of its grid: a wider grid may "
                           "do better)")
    assert rows[1][-1] == rows[2][-1] == ""


def test_a_default_grid_whose_candidates_all_collapse_is_widened_once(data: dict[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """3 steps of a tiny model learn nothing whatever the rate: the default grid gets one value beyond each end,
    once (stated in the record and the table); a grid given with --grid is kept as given."""

    monkeypatch.setitem(tuning.DEFAULT_GRIDS, "learning_rate", {**DEFAULT_GRIDS["learning_rate"],
                                                                "adapter": (1e-3, 1e-2)})
    cfg = _cfg(data, tune=["learning_rate"], tune_folds=1)
    task = get_task(cfg)
    task.check_inputs()
    record = tune(cfg, ["lora"], tmp_path / "tuning", task, quiet=True)
    info = record["methods"]["lora"]
    assert [c["values"]["learning_rate"] for c in info["candidates"]] == pytest.approx([1e-3, 1e-2, 1e-4, 1e-1])
    assert "extended" not in info  # a collapsed choice is never extended
    assert all(c["collapsed"] for c in info["candidates"])  # else this test shows nothing
    assert info["widened"]["added"] == ["learning_rate=0.0001", "learning_rate=0.1"]
    assert info["grid"]["learning_rate"] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1]) and info["all_collapsed"]
    _, rows = tuning_rows(record)
    assert sum("widened by learning_rate=0.0001, learning_rate=0.1" in row[-1] for row in rows) == 1
    given = tune(_cfg(data, grid={"learning_rate": [1e-3, 1e-2]}, tune_folds=1), ["lora"], tmp_path / "given", task,
                 quiet=True)
    assert len(given["methods"]["lora"]["candidates"]) == 2 and "widened" not in given["methods"]["lora"]


def test_folds_partition_the_training_rows_stratified_and_the_same_for_every_method(data: dict[str, Path]) -> None:
    """Fold i of k (``validation_fold``) holds out a fifth of the final runs' training rows, each row in exactly one
    fold, with the labels' 3:1 proportions, whatever the method; the eval file is not read."""
    final = get_task(_cfg(data))
    final.check_inputs()
    assert final._train is not None
    final_lines = set(final._train.lines)
    by_method = {}
    for method, lr in (("lora", 1e-3), ("full", 5e-5)):
        held: list[tuple[str, ...]] = []
        for fold in range(1, 6):
            with _recorded_reads() as reads:
                task = get_task(_cfg(data, method=method, learning_rate=lr, eval_on="validation", tune_folds=5,
                                     validation_fold=fold))
                task.check_inputs()
            assert reads == [str(data["train"].resolve())]
            assert task._train is not None and task._eval is not None
            validation = task._eval[""]
            assert Counter(validation.labels) == {"pos": 12, "neg": 4}
            assert set(task._train.lines) == final_lines - set(validation.lines)
            held.append(tuple(validation.lines))
        assert sorted(line for lines in held for line in lines) == sorted(final_lines)  # a partition
        by_method[method] = held
    assert by_method["lora"] == by_method["full"]
    assert final.cross_validation_folds(5) == {"rows": 80, "fold_rows": [16] * 5, "stratified": True}
    other = get_task(_cfg(data, eval_on="validation", tune_folds=5, validation_fold=1, split_seed=1))
    other.check_inputs()
    assert other._eval is not None and tuple(other._eval[""].lines) != by_method["lora"][0]


def test_the_number_of_folds_comes_from_the_data_size_or_the_setting(data: dict[str, Path]) -> None:
    assert auto_folds(80) == (5, "80 training rows, fewer than 1,000: 5 folds")
    assert [auto_folds(n)[0] for n in (999, 1000, 4999, 5000, 100_000)] == [5, 3, 3, 1, 1]
    assert auto_folds(5000)[1] == "5,000 training rows, 5,000 or more: one validation split"
    task = get_task(_cfg(data))
    task.check_inputs()
    assert resolve_folds(_cfg(data), task) == {"folds": 5, "reason": "80 training rows, fewer than 1,000: 5 folds",
                                               "rows": 80, "fold_rows": [16] * 5, "stratified": True}
    assert resolve_folds(_cfg(data, tune_folds=1), task) == {"folds": 1, "reason": "--tune-folds 1"}
    # a label with fewer rows than folds cannot be in every fold: unstratified folds, said in the record
    small = get_task(_cfg(data, max_train_samples=24))
    small.check_inputs()
    assert small._train is not None
    smallest = min(Counter(small._train.labels).values())
    assert smallest < 8 and resolve_folds(_cfg(data, max_train_samples=24, tune_folds=8), small) == {
        "folds": 8, "reason": "--tune-folds 8", "rows": 24, "fold_rows": [3] * 8, "stratified": False}


def _stub_training(monkeypatch: pytest.MonkeyPatch, score, collapsed=lambda values: False) -> list[tuple]:
    """Replace the training of a fold run by ``score(values, fold)`` (the selection logic is under test, not the
    training); returns the list of (method, values, tune_folds, validation_fold) of every fold run."""
    calls: list[tuple] = []

    def run_training(cfg, overwrite=False, **kwargs):
        values = {"learning_rate": cfg.training.get("learning_rate"), "dropout": cfg.dropout}
        assert cfg.eval_on == "validation" and cfg.tune is None
        calls.append((cfg.method, values["learning_rate"], cfg.tune_folds, cfg.validation_fold))
        return {"eval": {"eval_macro_f1": score(values, cfg.validation_fold)}, "collapsed": collapsed(values),
                "data": {"eval_rows": {"eval": 16}, "train_rows": 64}}

    monkeypatch.setattr("lorma.recipes.train.run_training", run_training)
    return calls


def _peak(at: float):
    """A validation score that is highest at learning rate ``at`` (and differs a little per fold)."""
    return lambda values, fold: 0.9 - 0.2 * abs(math.log10(values["learning_rate"] / at)) + 0.01 * (fold or 0)


def test_a_choice_at_the_grid_edge_is_extended_until_it_turns(data: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Default grid 3e-4 ... 1e-2, the best rate 1.5e-2: 1e-2 wins at the edge, 3.22e-2 is tried past it, does
    worse, and the choice 1e-2 is then inside the grid: one extension, 5 candidates x 5 folds (80 rows)."""
    calls = _stub_training(monkeypatch, _peak(1.5e-2))
    cfg = _cfg(data, tune=["learning_rate"])
    task = get_task(cfg)
    task.check_inputs()
    record = tune(cfg, ["lora"], tmp_path / "t", task)
    assert "tune: 5 folds x 4 candidates of 1 method = 20 candidate runs (80 training rows, fewer than 1,000: 5 " \
        "folds)" in \
        capsys.readouterr().out
    info = record["methods"]["lora"]
    rates = [c["values"]["learning_rate"] for c in info["candidates"]]
    assert rates == pytest.approx([3e-4, 1e-3, 3e-3, 1e-2, 3.22e-2])
    assert info["extended"] == [{"round": 1, "from": "learning_rate=0.01", "added": ["learning_rate=0.0322"],
                                 "edges": ["learning_rate=0.01 is the largest value of its grid"]}]
    assert info["chosen"] == {"learning_rate": 1e-2} and info["at_grid_edge"] == []
    assert info["grid"]["learning_rate"] == pytest.approx([3e-4, 1e-3, 3e-3, 1e-2, 3.22e-2])
    # every candidate on the same 5 folds, each fold once; the score is the mean of the fold scores
    assert Counter((lr, k, fold) for _, lr, k, fold in calls) == {(lr, 5, f): 1 for lr in rates for f in range(1, 6)}
    best = info["candidates"][3]
    assert best["fold_scores"] == pytest.approx([0.9 - 0.2 * math.log10(1.5) + 0.01 * f for f in range(1, 6)])
    assert best["score"] == pytest.approx(sum(best["fold_scores"]) / 5)
    assert best["score_std"] == pytest.approx(float(np.std(best["fold_scores"], ddof=1)))
    assert record["planned_runs"] == 20 and record["runs"] == 25
    _, rows = tuning_rows(record)
    assert "learning_rate=0.01 was at the grid's edge: extended by learning_rate=0.0322" in rows[3][-1]
    assert rows[3][3] == " ".join(f"{v:.3f}" for v in best["fold_scores"])  # each fold's score


def test_extension_stops_after_its_rounds_and_never_chooses_a_collapsed_candidate(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(data, tune=["learning_rate"], tune_folds=2)
    task = get_task(cfg)
    task.check_inputs()
    # the best rate far above the grid: extended EXTEND_ROUNDS times, then flagged as still at the edge
    _stub_training(monkeypatch, _peak(10.0))
    record = tune(cfg, ["lora"], tmp_path / "far", task, quiet=True)
    info = record["methods"]["lora"]
    assert ("learning_rate=0.01 was at the grid's edge: extended by learning_rate=0.0322, then learning_rate=0.104"
            in tuning_rows(record)[1][-1][-1])
    assert EXTEND_ROUNDS == 2 and [e["added"] for e in info["extended"]] == [["learning_rate=0.0322"],
                                                                             ["learning_rate=0.104"]]
    assert info["chosen"] == {"learning_rate": 0.104}
    assert info["at_grid_edge"] == ["learning_rate=0.104 is the largest value of its grid"]
    # the rate past the edge scores best but collapsed on both folds: never chosen, and the choice is now inside
    _stub_training(monkeypatch, _peak(10.0), collapsed=lambda v: v["learning_rate"] > 0.02)
    info = tune(cfg, ["lora"], tmp_path / "collapsing", task, quiet=True)["methods"]["lora"]
    assert [c["values"]["learning_rate"] for c in info["candidates"]][-1] == pytest.approx(3.22e-2)
    assert info["candidates"][-1]["collapsed"] and info["candidates"][-1]["collapsed_folds"] == 2
    assert info["chosen"] == {"learning_rate": 1e-2} and len(info["extended"]) == 1 and not info["at_grid_edge"]
    # every candidate collapsed, the widened ones too: the (collapsed) best at the edge is not extended
    _stub_training(monkeypatch, _peak(10.0), collapsed=lambda v: True)
    info = tune(cfg, ["lora"], tmp_path / "all-collapsed", task, quiet=True)["methods"]["lora"]
    assert info["widened"] and info["all_collapsed"] and info["chosen"] == {"learning_rate": 3.22e-2}
    assert "extended" not in info and len(info["candidates"]) == 6
    # a grid given with --grid is the user's: not extended
    _stub_training(monkeypatch, _peak(10.0))
    given = tune(_cfg(data, grid={"learning_rate": [1e-3, 1e-2]}, tune_folds=2), ["lora"], tmp_path / "given", task,
                 quiet=True)["methods"]["lora"]
    assert len(given["candidates"]) == 2 and "extended" not in given
    # a value past the edge that is out of the setting's range is a bound: dropout 0 is not extended to -0.1
    _stub_training(monkeypatch, lambda values, fold: 0.8 - values["dropout"])
    dropout = tune(_cfg(data, tune=["dropout"], tune_folds=2), ["lora"], tmp_path / "dropout", task,
                   quiet=True)["methods"]["lora"]
    assert [c["values"] for c in dropout["candidates"]] == [{"dropout": 0.0}, {"dropout": 0.1}]
    assert dropout["chosen"] == {"dropout": 0.0} and "extended" not in dropout


def test_a_widened_grid_is_then_extended_past_its_new_edge(data: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every default candidate collapses; widening adds 9.32e-5 and 3.22e-2, the latter learns and is the best at the
    new edge, so the grid is extended past it: the two rules compose."""
    _stub_training(monkeypatch, _peak(10.0), collapsed=lambda v: v["learning_rate"] < 0.02)
    cfg = _cfg(data, tune=["learning_rate"], tune_folds=2)
    task = get_task(cfg)
    task.check_inputs()
    info = tune(cfg, ["lora"], tmp_path / "t", task, quiet=True)["methods"]["lora"]
    assert info["widened"]["added"] == ["learning_rate=9.32e-05", "learning_rate=0.0322"]
    assert [e["added"] for e in info["extended"]] == [["learning_rate=0.104"], ["learning_rate=0.335"]]
    assert info["chosen"] == {"learning_rate": 0.335} and not info["all_collapsed"]


def test_separation_over_folds_is_the_mean_of_the_fold_differences(tmp_path: Path) -> None:
    """With folds, the chosen candidate and the runner-up are compared fold by fold on the same rows: the
    difference is the mean of the per-fold macro-F1 differences (scikit-learn's, computed here independently)."""
    from sklearn.metrics import f1_score

    from lorma.plumbing.fileio import atomic_write_json
    from lorma.recipes.tuning import separation

    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 3, 40) for _ in range(3)]

    def candidate(name: str, accuracy: float) -> dict:
        folds, predictions = [], []
        for fold, y in enumerate(labels, start=1):
            right = rng.random(y.size) < accuracy
            p = np.where(right, y, (y + 1) % 3)
            folder = tmp_path / name / f"fold-{fold}-of-3"
            atomic_write_json(folder / "eval_predictions.json", {"": {"predictions": p.tolist(), "labels": y.tolist()}})
            folds.append({"fold": fold, "run_dir": str(folder)})
            predictions.append(p)
        scores = [f1_score(y, p, average="macro") for y, p in zip(labels, predictions)]
        return {"values": {"learning_rate": float(name)}, "score": sum(scores) / 3, "collapsed": False,
                "run_dir": str(tmp_path / name), "folds": folds, "per_fold": scores}

    close = [candidate("0.001", 0.62), candidate("0.003", 0.6)]
    result = separation(close, 0, "eval_macro_f1")
    expected = [a - b for a, b in zip(close[0]["per_fold"], close[1]["per_fold"])]
    assert result["fold_differences"] == pytest.approx(expected)
    assert result["difference"] == pytest.approx(sum(expected) / 3)
    assert result["examples"] == 120 and result["folds"] == 3 and result["folds_won"] == sum(d > 0 for d in expected)
    assert result["low"] < 0 < result["high"] and not result["tells_apart"]
    far = [candidate("0.03", 0.95), candidate("0.0003", 0.35)]
    assert separation(far, 0, "eval_macro_f1")["tells_apart"]
    record = {"main_metric": "eval_macro_f1", "folds": 3, "methods": {"lora": {
        "chosen": close[0]["values"], "separation": result,
        "candidates": [{**c, "fold_scores": c["per_fold"], "score_std": 0.01} for c in close]}}}
    _, rows = tuning_rows(record)
    assert "the 120 validation rows (3 folds) cannot tell it from learning_rate=0.003" in rows[0][-1]
    assert f"better on {result['folds_won']} of 3 folds" in rows[0][-1]
