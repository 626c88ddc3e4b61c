"""``--tune`` / ``--grid``: the validation split, the eval data never read while tuning, the choice, the records,
the cache, per-family defaults, and bad grids."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lorma.cli import main
from lorma.plumbing.errors import InputError
from lorma.recipes.config import DEFAULT_LEARNING_RATES, build_config
from lorma.recipes.tuning import DEFAULT_GRIDS, candidate_label, grid_edges, plan_tuning, tune, tuning_rows
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
    cfg = _cfg(data, eval_file=str(eval_file), grid={"learning_rate": [1e-3, 3e-2]})
    task = get_task(cfg)
    task.check_inputs()  # loads (and checks) the eval data, as lorma compare does first
    eval_file.unlink()  # from here on, reading it would fail
    record = tune(cfg, ["lora"], tmp_path / "tuning", task, quiet=True)
    candidates = record["methods"]["lora"]["candidates"]
    assert [c["values"] for c in candidates] == [{"learning_rate": 1e-3}, {"learning_rate": 3e-2}]
    assert all(isinstance(c["score"], float) for c in candidates)
    assert record["main_metric"] == "eval_macro_f1"
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
            "--grid", "full:learning_rate=1e-4,1e-3", "--output-dir", str(out)]
    buffer = io.StringIO()
    with _recorded_reads() as reads, contextlib.redirect_stdout(buffer):
        code = main(args)
    return {"code": code, "out": out, "stdout": buffer.getvalue(), "args": args, "reads": list(reads)}


def test_compare_tunes_each_method_and_keeps_every_candidate(tuned_compare: dict, data: dict[str, Path]) -> None:
    assert tuned_compare["code"] == 0
    out: Path = tuned_compare["out"]
    results = json.loads((out / "results.json").read_text())
    tuning = results["tuning"]
    assert tuning["main_metric"] == "eval_macro_f1" and tuning["validation_split"] == 0.2
    grids = {"lora": [1e-3, 3e-2], "full": [1e-4, 1e-3]}
    for method, info in tuning["methods"].items():
        assert info["grid"] == {"learning_rate": grids[method]}
        scores = []
        for candidate in info["candidates"]:
            run = json.loads((Path(candidate["run_dir"]) / "metrics.json").read_text())
            assert Path(candidate["run_dir"]) == out / "tuning" / method / candidate_label(candidate["values"])
            assert candidate["score"] == run["eval"]["eval_macro_f1"]  # the validation score, kept
            assert candidate["validation"]["eval_accuracy"] == run["eval"]["eval_accuracy"]
            assert run["data"]["eval_rows"] == {"eval": 16} and run["data"]["train_rows"] == 64
            saved = yaml.safe_load((Path(candidate["run_dir"]) / "config.yaml").read_text())
            assert saved["eval_on"] == "validation" and saved["seed"] == 42
            scores.append(candidate["score"])
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        assert info["chosen"] == info["candidates"][best]["values"]
        for seed in (42, 43):  # the final runs use the chosen value, on the whole training data
            final = yaml.safe_load((out / method / f"seed-{seed}" / "config.yaml").read_text())
            assert final["training"]["learning_rate"] == info["chosen"]["learning_rate"]
            assert final["eval_on"] == "eval" and final["tune"] is None
            metrics = json.loads((out / method / f"seed-{seed}" / "metrics.json").read_text())
            assert metrics["data"]["train_rows"] == 80 and metrics["data"]["eval_rows"] == {"eval": 24}
    # the eval file: read by the first check and by the 4 final runs, never by the 4 candidates
    reads = Counter(tuned_compare["reads"])
    assert reads[str(data["eval"].resolve())] == 1 + 4
    assert reads[str(data["train"].resolve())] == 1 + 4 + 4


def test_compare_tables_show_chosen_values_collapse_and_verdicts(tuned_compare: dict) -> None:
    out: Path = tuned_compare["out"]
    stdout: str = tuned_compare["stdout"]
    results = json.loads((out / "results.json").read_text())
    chosen = {m: candidate_label(i["chosen"]) for m, i in results["tuning"]["methods"].items()}
    markdown = (out / "results.md").read_text()
    for text in (stdout, markdown):
        assert "validation macro_f1" in text and "<- chosen" in text
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


def test_rerun_reuses_the_cached_candidates(tuned_compare: dict) -> None:
    out: Path = tuned_compare["out"]
    before = snapshot(out / "tuning")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main([*tuned_compare["args"], "--overwrite"]) == 0
    assert snapshot(out / "tuning") == before  # nothing retrained, nothing rewritten
    results = json.loads((out / "results.json").read_text())
    assert all(c["cached"] for info in results["tuning"]["methods"].values() for c in info["candidates"])


def test_train_tune_records_the_candidates_and_uses_the_choice(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["train", "--model", str(data["model"]), "--train-file", str(data["train"]), "--eval-file",
                     str(data["eval"]), "--method", "lorma-plus", "--max-steps", "3", "--save-strategy", "no",
                     "--report-to", "none", "--grid", "learning_rate=2e-3,4e-2", "--output-dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    info = metrics["tuning"]["methods"]["lorma-plus"]
    assert [c["values"]["learning_rate"] for c in info["candidates"]] == [2e-3, 4e-2]
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["learning_rate"] == \
        info["chosen"]["learning_rate"]
    assert (out / "tuning" / "lorma-plus" / "learning_rate=0.002" / "candidate.json").is_file()
    assert f"tuned on the validation split: {candidate_label(info['chosen'])}" in buffer.getvalue()
    assert "validation macro_f1" in buffer.getvalue()
    # again: refused without --overwrite before any candidate; with it, the new run (written beside the old one and
    # swapped in) keeps the candidates, which are not trained again
    args = ["train", "--model", str(data["model"]), "--train-file", str(data["train"]), "--eval-file",
            str(data["eval"]), "--method", "lorma-plus", "--max-steps", "3", "--save-strategy", "no", "--report-to",
            "none", "--grid", "learning_rate=2e-3,4e-2", "--output-dir", str(out)]
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
    from lorma.recipes import tuning

    monkeypatch.setitem(tuning.DEFAULT_GRIDS, "learning_rate", {**DEFAULT_GRIDS["learning_rate"],
                                                                "adapter": (1e-3, 1e-2)})
    cfg = _cfg(data, tune=["learning_rate"])
    task = get_task(cfg)
    task.check_inputs()
    record = tune(cfg, ["lora"], tmp_path / "tuning", task, quiet=True)
    info = record["methods"]["lora"]
    assert [c["values"]["learning_rate"] for c in info["candidates"]] == pytest.approx([1e-3, 1e-2, 1e-4, 1e-1])
    assert all(c["collapsed"] for c in info["candidates"])  # else this test shows nothing
    assert info["widened"]["added"] == ["learning_rate=0.0001", "learning_rate=0.1"]
    assert info["grid"]["learning_rate"] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1]) and info["all_collapsed"]
    _, rows = tuning_rows(record)
    assert sum("widened by learning_rate=0.0001, learning_rate=0.1" in row[-1] for row in rows) == 1
    given = tune(_cfg(data, grid={"learning_rate": [1e-3, 1e-2]}), ["lora"], tmp_path / "given", task, quiet=True)
    assert len(given["methods"]["lora"]["candidates"]) == 2 and "widened" not in given["methods"]["lora"]
