"""Bad input that used to pass silently or end in a traceback: a one-line error naming the problem, before any
model is loaded (torch, transformers and peft are not even imported: a fresh process answers at once), and
nothing written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lorma.cli import main
from lorma.plumbing.errors import InputError
from lorma.recipes.config import build_config
from recipe_support import make_tiny_bert, sentiment_rows, write_csv


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    model = make_tiny_bert(root / "model")
    good = write_csv(root / "good.csv", ["text", "label"], sentiment_rows(40))
    (root / "comma.csv").write_text("text,label\ngood great,pos\nhello, world,pos\nbad sad,neg\n")
    (root / "short.csv").write_text("text,label\ngood great,pos\nbad sad\n")
    scores = [(f"sentence {i}", f"{(i % 5) * 0.5:g}") for i in range(40)]  # 0, 0.5, ..., 2: scores
    write_csv(root / "scores.csv", ["text", "label"], scores)
    many = [(f"sentence {i}", str(i % 99)) for i in range(200)]  # 99 distinct integer scores
    write_csv(root / "many.csv", ["text", "label"], many)
    (root / "file").write_text("not a directory")
    return {"root": root, "model": model, "good": good, "comma": root / "comma.csv", "short": root / "short.csv",
            "scores": root / "scores.csv", "many": root / "many.csv", "file": root / "file"}


def _train(files: dict[str, Path], out: Path, *extra: str, data: str = "good") -> list[str]:
    return ["train", "--model", str(files["model"]), "--train-file", str(files[data]), "--output-dir", str(out),
            "--max-steps", "2", "--per-device-train-batch-size", "8", "--report-to", "none", *extra]


CASES = [
    # (extra flags, data file, expected message)
    (("--alpha", "nan"), "good", "alpha must be a positive finite number, got nan"),
    (("--alpha", "inf"), "good", "alpha must be a positive finite number, got inf"),
    (("--alpha=-inf",), "good", "alpha must be a positive finite number, got -inf"),
    (("--max-steps", "0"), "good", "max_steps must be >= 1, got 0 (leave it out to train --num-train-epochs"),
    (("--max-steps", "-5"), "good", "max_steps must be >= 1, got -5"),
    (("--max-steps", "2.5"), "good", "max_steps must be a whole number, got 2.5"),
    (("--learning-rate", "nan"), "good", "learning_rate must be a finite number, got nan"),
    (("--learning-rate", "0"), "good", "learning_rate must be > 0, got 0"),
    (("--per-device-train-batch-size", "0"), "good", "per_device_train_batch_size must be >= 1, got 0"),
    (("--num-train-epochs", "abc"), "good", "num_train_epochs must be a number, got 'abc'"),
    (("--label-smoothing-factor", "1"), "good", "label_smoothing_factor must be >= 0 and < 1, got 1"),
    ((), "comma", "comma.csv:3: row has 3 fields, the header has 2 (a text containing a comma must be in double "
                  "quotes)"),
    ((), "short", "short.csv:3: row has 1 fields, the header has 2"),
    ((), "scores", "scores.csv: the labels look like scores (5 distinct numbers, e.g. 0.5, 1.5): give "
                   "--problem-type regression"),
    ((), "many", "many.csv: the labels look like scores (99 distinct numbers"),
]


@pytest.mark.parametrize(("extra", "data", "message"), CASES)
def test_bad_training_input_is_one_line_and_writes_nothing(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], data: str,
    message: str,
) -> None:
    out = tmp_path / "run"
    assert main(_train(files, out, *extra, data=data)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lorma train: error:"), err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


def test_score_like_labels_train_when_the_problem_type_is_given(files: dict[str, Path], tmp_path: Path) -> None:
    assert main(_train(files, tmp_path / "reg", "--problem-type", "regression", data="scores")) == 0
    metrics = json.loads((tmp_path / "reg" / "metrics.json").read_text())
    assert {"eval_pearson", "eval_mse"} <= set(metrics["eval"])
    assert main(_train(files, tmp_path / "cls", "--problem-type", "classification", data="scores")) == 0
    assert json.loads((tmp_path / "cls" / "metrics.json").read_text())["data"]["labels"] == ["0", "0.5", "1", "1.5",
                                                                                            "2"]


def test_output_directory_below_a_file_or_in_proc(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train(files, files["file"] / "run")) == 2
    expected = f"--output-dir {files['file'] / 'run'}: {files['file']} is a file, not a directory"
    assert expected in capsys.readouterr().err
    assert main(_train(files, Path("/proc/lorma-test/run"))) == 2
    assert "cannot create directories in /proc" in capsys.readouterr().err


def test_output_directory_may_not_hold_or_be_the_input(files: dict[str, Path], capsys) -> None:
    assert main(_train(files, files["model"])) == 2  # the model directory holds no run, so only this can stop it
    assert "is the input --model" in capsys.readouterr().err
    assert main(_train(files, files["root"], "--overwrite")) == 2
    assert "contains the input --model" in capsys.readouterr().err


def test_a_cell_over_128_kb_is_read_and_a_broken_row_names_its_line(tmp_path: Path) -> None:
    from lorma.tasks.classification import read_examples

    long_text = "word " * 40_000  # 200 KB in one cell: Python's csv refuses it by default
    path = write_csv(tmp_path / "long.csv", ["text", "label"], [(long_text, "pos"), ("short", "neg")])
    examples = read_examples(path, "text", None, "label")
    assert examples.texts[0] == long_text and examples.lines == [2, 3]
    unclosed = tmp_path / "unclosed.csv"  # an unclosed quote swallows the rest of the file into one field
    unclosed.write_text('text,label\nfine,pos\n"unclosed,neg\nmore,pos\n')
    with pytest.raises(InputError, match=r"unclosed\.csv:3: row has 1 fields, the header has 2"):
        read_examples(unclosed, "text", None, "label")
    multi = tmp_path / "multi.csv"
    multi.write_text('text,label\n"two\nlines",pos\nhello, world,neg\n')
    with pytest.raises(InputError, match=r"multi\.csv:4: row has 3 fields"):  # the line the row starts on
        read_examples(multi, "text", None, "label")


def test_lorma_config_refuses_nan_and_inf_alpha() -> None:
    from lorma import LormaConfig

    for bad in (math.nan, math.inf, -math.inf, True):
        with pytest.raises(ValueError, match="alpha must be a positive finite number"):
            LormaConfig(alpha=bad)
    with pytest.raises(ValueError, match=r"alpha_pattern\['query'\] must be a positive finite number"):
        LormaConfig(alpha_pattern={"query": math.nan})


def test_common_training_arguments_are_real_fields() -> None:
    """The names checked without importing transformers must all be TrainingArguments fields."""
    from lorma.recipes.config import COMMON_TRAINING_ARGUMENTS, training_argument_names

    assert training_argument_names() >= COMMON_TRAINING_ARGUMENTS
    with pytest.raises(InputError, match="unknown key 'learnign_rate'"):
        build_config({"learnign_rate": 1e-3}, {})


# --------------------------------------------------------------------------------------------------
# lorma evaluate: references in a format the task cannot take
# --------------------------------------------------------------------------------------------------


def _evaluate(tmp_path: Path, task: str, references: Path, predictions: list[str]) -> list[str]:
    preds = tmp_path / "preds.txt"
    preds.write_text("\n".join(predictions) + "\n")
    return ["evaluate", "--task", task, "--predictions", str(preds), "--references", str(references)]


def test_evaluate_refuses_data_of_another_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e2e = tmp_path / "test.csv"
    e2e.write_text('mr,ref\n"name[A]","A is a pub."\n"name[B]","B is cheap."\n')
    assert main(_evaluate(tmp_path, "gsm8k", e2e, ["1", "2"])) == 2
    assert "test.csv:1: this looks like a table or E2E data (e2e-csv), but gsm8k references are JSON" in \
        capsys.readouterr().err
    dart = tmp_path / "dart.json"
    dart.write_text(json.dumps([{"tripleset": [["A", "type", "pub"]], "annotations": [{"text": "A is a pub."}]}]))
    assert main(_evaluate(tmp_path, "e2e", dart, ["A is a pub."])) == 2
    assert "dart.json: this is JSON, but e2e references are the official CSV" in capsys.readouterr().err
    assert main(_evaluate(tmp_path, "dart", e2e, ["A is a pub.", "B is cheap."])) == 2
    assert "this is E2E data (e2e-csv); dart references are its JSON file" in capsys.readouterr().err


def test_json_references_are_read_as_json_whatever_their_name(tmp_path: Path, capsys) -> None:
    dart = [{"tripleset": [["A", "type", "pub"]], "annotations": [{"text": "A is a pub near the river ."}]},
            {"tripleset": [["B", "food", "cheap"]], "annotations": [{"text": "B serves cheap food ."}]}]
    named_txt = tmp_path / "refs.txt"
    named_txt.write_text(json.dumps(dart, indent=2))
    named_json = tmp_path / "refs.json"
    named_json.write_text(json.dumps(dart))
    preds = ["A is a pub near the river .", "B serves cheap food ."]
    assert main([*_evaluate(tmp_path, "dart", named_txt, preds), "--metrics", "bleu"]) == 0
    as_txt = capsys.readouterr().out
    assert main([*_evaluate(tmp_path, "dart", named_json, preds), "--metrics", "bleu"]) == 0
    assert as_txt == capsys.readouterr().out and "100.0000" in as_txt
    gold = tmp_path / "gold.txt"  # GSM8K records saved under another name
    gold.write_text("".join(json.dumps({"question": "q", "answer": f"so #### {n}"}) + "\n" for n in (3, 4)))
    assert main(_evaluate(tmp_path, "gsm8k", gold, ["The answer is 3", "The answer is 5"])) == 0
    assert "accuracy  50.0000" in capsys.readouterr().out  # percent


def test_evaluate_never_writes_over_its_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = tmp_path / "refs.txt"
    refs.write_text("A is a pub.\n")
    argv = _evaluate(tmp_path, "dart", refs, ["A is a pub."])
    before = refs.read_text()
    assert main([*argv, "--output", str(refs), "--overwrite"]) == 2
    assert "is the input --references" in capsys.readouterr().err and refs.read_text() == before


# --------------------------------------------------------------------------------------------------
# Validate first, import the heavy stack after: a fresh process answers without importing it
# --------------------------------------------------------------------------------------------------

FRESH = """
import json, sys, time
from lorma.cli import main
cases = json.loads(sys.argv[1])
results = []
for argv in cases:
    started = time.perf_counter()
    code = main(argv)
    results.append((code, round(time.perf_counter() - started, 3)))
heavy = sorted(m for m in ("torch", "transformers", "peft", "datasets", "sklearn") if m in sys.modules)
print(json.dumps({"results": results, "heavy": heavy}))
"""


def test_bad_input_is_refused_before_the_heavy_stack_is_imported(files: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: lora\n")
    (run / "metrics.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORMA", "r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    e2e = tmp_path / "e2e.csv"
    e2e.write_text('mr,ref\n"name[A]","A."\n')
    preds = tmp_path / "p.txt"
    preds.write_text("1\n")
    cases = [
        _train(files, tmp_path / "o", "--method", "nope"),
        _train(files, tmp_path / "o", "--alpha", "nan"),
        _train(files, tmp_path / "o", "--max-steps", "0"),
        _train(files, tmp_path / "o", "--label-column", "sentiment"),
        _train(files, tmp_path / "o", data="comma"),
        _train(files, tmp_path / "o", data="scores"),
        _train(files, files["file"] / "o"),
        _train(files, run),
        ["train", "--model", str(files["model"]), "--train-file", str(tmp_path / "missing.csv"), "--output-dir",
         str(tmp_path / "o")],
        ["merge", str(adapter), str(tmp_path / "merged")],
        ["merge", str(tmp_path / "nothing"), str(tmp_path / "merged")],
        ["analyze", str(adapter)],
        ["evaluate", "--task", "gsm8k", "--predictions", str(preds), "--references", str(e2e)],
    ]
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(cases)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [code for code, _ in report["results"]] == [2] * len(cases), proc.stderr
    assert report["heavy"] == [], f"imported before the input was checked: {report['heavy']}"
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("lorma ")]) == len(cases), proc.stderr
