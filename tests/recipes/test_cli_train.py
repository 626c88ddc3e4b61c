"""``lorma train``: the output directory, the adapter round trip, --resume, --overwrite, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorma.cli import main
from recipe_support import make_tiny_bert, sentiment_rows, snapshot, write_csv

LORMA = str(Path(sys.executable).parent / "lorma")  # the installed console script, as users run it


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    model = make_tiny_bert(root / "model")
    data = write_csv(root / "data.csv", ["text", "label"], sentiment_rows(80))
    return {"root": root, "model": model, "data": data}


def _args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(setup["model"]), "--train-file", str(setup["data"]), "--output-dir", str(out),
            "--per-device-train-batch-size", "8", "--learning-rate", "5e-3", *extra]


def test_train_writes_the_run_and_the_adapter_round_trips(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_args(setup, out, "--method", "lorma-plus", "--max-steps", "4", "--save-steps", "2")) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == "lorma-plus" and config["training"]["max_steps"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["world_size"] == 1
    assert metrics["trainable_params"] == 2 * 2 * (8 * 32 + 32 * 8) + 32 * 2 + 2
    assert {"eval_accuracy", "eval_macro_f1"} <= set(metrics["eval"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    from safetensors.torch import load_file

    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in tensors), "the trained head must be saved with the adapter"
    assert any("lorma_A" in k for k in tensors) and any("lorma_B" in k for k in tensors)

    # reload: the trainable weights are bit-identical to those at the end of training
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import lorma  # noqa: F401
    from lorma.recipes.train import weights_digest

    base = AutoModelForSequenceClassification.from_pretrained(setup["model"], num_labels=2)
    reloaded = PeftModel.from_pretrained(base, out / "adapter", is_trainable=True)
    assert weights_digest(reloaded) == metrics["weights_sha256"]


def test_existing_run_is_not_overwritten_without_overwrite(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_args(setup, out, "--method", "lora", "--max-steps", "2")) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(_args(setup, out, "--method", "lora", "--max-steps", "3")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--overwrite" in err
    assert snapshot(out) == before
    assert main(_args(setup, out, "--method", "lora", "--max-steps", "3", "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3


def test_resume_continues_a_killed_run_to_the_same_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    common = ("--method", "lorma-pi", "--max-steps", "6", "--save-steps", "3", "--save-total-limit", "5")
    straight = tmp_path / "straight"
    assert main(_args(setup, straight, *common)) == 0
    killed = tmp_path / "killed"
    assert main(_args(setup, killed, *common)) == 0
    # what a kill after step 5 leaves: checkpoint-3, loss lines up to 5, no final outputs
    import shutil

    shutil.rmtree(killed / "checkpoints" / "checkpoint-6")
    shutil.rmtree(killed / "adapter")
    (killed / "metrics.json").unlink()
    lines = (killed / "train_log.jsonl").read_text().splitlines()
    (killed / "train_log.jsonl").write_text("\n".join(lines[:5]) + "\n")

    assert main(["train", "--resume", "--output-dir", str(killed)]) == 0  # settings from its config.yaml
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["global_step"] == 6 and b["resumed"] is True
    assert b["weights_sha256"] == a["weights_sha256"]
    log_a = [json.loads(x) for x in (straight / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_b] == pytest.approx([r["loss"] for r in log_a], rel=1e-5)


def test_resume_without_checkpoint_is_an_error(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--resume", "--output-dir", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--method", "lorma-plux"), "unknown method 'lorma-plux'"),
        (("--task", "glue-nope"), "unknown task 'glue-nope'"),
        (("--label-column", "sentiment"), "no column 'sentiment'"),
        (("--train-file", "/nonexistent/x.csv"), "data file not found: /nonexistent/x.csv"),
        (("--model", "/nonexistent/model"), "/nonexistent/model"),
        (("--target-modules", "nosuch"), "target module 'nosuch' matches no module"),
        (("--bogus-flag", "1"), None),
    ],
)
def test_bad_input_is_one_line_and_touches_nothing(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...],
    message: str | None,
) -> None:
    out = tmp_path / "run"
    if message is None:  # argparse's own error for an unknown flag
        with pytest.raises(SystemExit) as exc:
            main(_args(setup, out, "--max-steps", "2", *extra))
        assert exc.value.code == 2
    else:
        assert main(_args(setup, out, "--max-steps", "2", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("lorma train: error:") and message in err
    assert not out.exists()


def test_label_mismatch_with_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_bert(tmp_path / "m", id2label={0: "negative", 1: "positive"})
    data = write_csv(tmp_path / "d.csv", ["text", "label"], sentiment_rows(20))
    assert main(["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    assert "do not fit the labels of model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_track_rank_writes_the_rank_log(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_args(setup, out, "--method", "lorma-plus", "--max-steps", "4", "--track-rank", "2")) == 0
    records = [json.loads(x) for x in (out / "rank" / "rank_log.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records} == {0, 2, 4}


def test_non_adapter_method_saves_the_whole_model(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_args(setup, out, "--method", "bitfit", "--max-steps", "2")) == 0
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.num_labels == 2 and not (out / "adapter").exists()


def test_help_explains_the_options_in_a_fresh_process() -> None:
    result = subprocess.run([LORMA, "train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    for flag in ("--train-file", "--eval-file", "--text-column", "--text-pair-column", "--label-column", "--method",
                 "--r", "--alpha", "--side", "--max-steps", "--output-dir", "--resume", "--overwrite",
                 "--training-arg", "--track-rank"):
        assert flag in result.stdout, flag


def test_unknown_method_exit_code_in_a_fresh_process(setup: dict[str, Path], tmp_path: Path) -> None:
    result = subprocess.run(
        [LORMA, *_args(setup, tmp_path / "o", "--method", "nope")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("lorma train:")]
    from lorma.runs.method_registry import method_names

    METHODS = method_names()

    assert lines == [f"lorma train: error: unknown method 'nope'; expected one of: {', '.join(METHODS)}"]
    assert {"lorma-plus", "lorma-pi", "lora", "full", "dorma-plus", "adalorma", "dylorma"} <= set(METHODS)
