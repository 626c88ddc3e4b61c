"""A run records fingerprints of its inputs (``inputs.json``); ``--resume`` refuses changed ones, names the file and
touches nothing, unless ``--allow-changed-inputs`` (then the change is recorded); ``--tune`` reuses a candidate
only on unchanged inputs. Real runs of a tiny BERT, stopped the way a kill leaves them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorma.cli import main
from lorma.runs.fingerprints import compare_inputs, file_fingerprint, fingerprint_inputs, input_fingerprint
from recipe_support import make_tiny_bert, sentiment_rows, snapshot, write_csv


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fingerprints")
    model = make_tiny_bert(root / "model")
    data = write_csv(root / "data.csv", ["text", "label"], sentiment_rows(80))
    return {"root": root, "model": model, "data": data}


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(out), "--method",
            "lorma-plus", "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "5",
            "--per-device-train-batch-size", "8", "--learning-rate", "5e-3", "--report-to", "none", *extra]


def _stop(out: Path, steps: int = 4) -> None:
    """What a kill after step ``steps - 1`` leaves of a finished run that checkpointed every ``steps / 2`` steps:
    the checkpoint before the last, the loss log to that step, no final outputs."""
    shutil.rmtree(out / "checkpoints" / f"checkpoint-{steps}")
    shutil.rmtree(out / "adapter")
    (out / "metrics.json").unlink()
    (out / "eval_predictions.json").unlink(missing_ok=True)
    lines = (out / "train_log.jsonl").read_text().splitlines()
    (out / "train_log.jsonl").write_text("\n".join(lines[: steps - 1]) + "\n")


def _stopped_run(setup: dict[str, Path], tmp_path: Path, model: Path | None = None) -> tuple[Path, Path, dict]:
    """A stopped run on its own copy of the training file: ``(run, training file, metrics of the whole run)``."""
    data = Path(shutil.copy(setup["data"], tmp_path / "train.csv"))
    out = tmp_path / "run"
    assert main(_args(model or setup["model"], data, out)) == 0
    finished = json.loads((out / "metrics.json").read_text())
    _stop(out)
    return out, data, finished


def _resume(out: Path, *extra: str) -> int:
    return main(["train", "--resume", "--output-dir", str(out), *extra])


def _drop_rows(path: Path, keep: int) -> None:
    """Keep the header and the first ``keep`` rows (the user deleting rows of the training file)."""
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[: keep + 1]))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# The fingerprints themselves
# --------------------------------------------------------------------------------------------------


def test_a_file_fingerprint_is_its_size_mtime_and_sha256(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # larger than any read buffer: hashed in pieces
    print_ = file_fingerprint(big)
    assert print_["size"] == big.stat().st_size == 3 * 1024 * 1024 + 17
    assert print_["sha256"] == _sha256(big)
    assert print_["mtime_ns"] == big.stat().st_mtime_ns


def test_what_is_fingerprinted(tmp_path: Path, setup: dict[str, Path]) -> None:
    from lorma.recipes.config import RunConfig

    model = Path(shutil.copytree(setup["model"], tmp_path / "model"))
    (model / "README.md").write_text("notes")
    entry = input_fingerprint("model", str(model))
    # config, tokenizer and weights; not the README
    assert entry["kind"] == "directory" and sorted(entry["files"]) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert entry["files"]["model.safetensors"]["sha256"] == _sha256(model / "model.safetensors")
    assert input_fingerprint("model", "org/some-model") == {"kind": "hub", "name": "org/some-model"}

    glue = tmp_path / "glue"
    (glue / "extra").mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv", "extra/notes.txt", "cache-0123.arrow"):
        (glue / name).write_text(name)
    assert sorted(input_fingerprint("data", str(glue))["files"]) == ["dev.tsv", "extra/notes.txt", "train.tsv"]

    cfg = RunConfig(model="org/m", train_file=str(setup["data"]), eval_file=str(setup["data"]), data=str(glue))
    assert sorted(fingerprint_inputs(cfg)) == ["eval_file", "model", "train_file"]  # --data is unread beside a file
    cfg = RunConfig(model="org/m", data=str(glue), eval_file=str(setup["data"]), eval_on="validation")
    assert sorted(fingerprint_inputs(cfg)) == ["data", "model"]  # the eval file is never read on validation


def test_comparison_content_decides(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.tsv").write_text("a\tb\n")
    (folder / "dev.tsv").write_text("c\td\n")
    before = {"data": input_fingerprint("data", str(folder)), "model": input_fingerprint("model", "org/a")}
    os.utime(folder / "dev.tsv", ns=(1, 1))  # the modification time alone
    changes, notes = compare_inputs(before, {**before, "data": input_fingerprint("data", str(folder))})
    assert changes == [] and len(notes) == 1 and f"{folder / 'dev.tsv'} was modified" in notes[0]
    assert "content is the same" in notes[0]

    (folder / "train.tsv").write_text("a\tc\n")  # same size, other bytes
    (folder / "new.tsv").write_text("x")
    (folder / "dev.tsv").unlink()
    after = {"data": input_fingerprint("data", str(folder)), "model": input_fingerprint("model", "org/b")}
    changes, _ = compare_inputs(before, after)
    assert changes == [
        "base model was the hub name org/a, now the hub name org/b",
        f"data folder file {folder / 'dev.tsv'} was removed",
        f"data folder file {folder / 'new.tsv'} is new",
        f"data folder {folder / 'train.tsv'}: content changed (same size, 4 bytes)",
    ]
    changes, _ = compare_inputs(before, {"model": before["model"]})
    assert changes == [f"data folder the directory {folder} is no longer given"]

    # one file: the same content from another path is the same input; other content is named by its new path
    (tmp_path / "a.csv").write_text("text,label\nx,1\n")
    shutil.copy2(tmp_path / "a.csv", tmp_path / "b.csv")  # with its modification time
    a, b = ({"train_file": input_fingerprint("train_file", str(tmp_path / n))} for n in ("a.csv", "b.csv"))
    assert compare_inputs(a, b) == ([], [f"training file is now read from {tmp_path / 'b.csv'} (was "
                                         f"{tmp_path / 'a.csv'}), with the same content"])
    (tmp_path / "b.csv").write_text("text,label\nx,0\n")
    b = {"train_file": input_fingerprint("train_file", str(tmp_path / "b.csv"))}
    assert compare_inputs(a, b)[0] == [f"training file {tmp_path / 'b.csv'}: content changed (same size, 15 bytes)"]


# --------------------------------------------------------------------------------------------------
# --resume
# --------------------------------------------------------------------------------------------------


def test_resume_refuses_an_edited_training_file_and_touches_nothing(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data, _ = _stopped_run(setup, tmp_path)
    recorded = json.loads((out / "inputs.json").read_text())
    assert recorded["inputs"]["train_file"]["files"]["train.csv"]["sha256"] == _sha256(data)
    assert recorded["inputs"]["model"]["files"]["model.safetensors"]["sha256"] == _sha256(
        setup["model"] / "model.safetensors")
    assert recorded["history"] == []
    size = data.stat().st_size
    _drop_rows(data, 40)
    before = snapshot(out)
    capsys.readouterr()
    assert _resume(out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lorma train: error: --resume: the inputs of")
    assert f"training file {data}: size {size:,} -> {data.stat().st_size:,} bytes" in err
    assert "--allow-changed-inputs" in err
    assert snapshot(out) == before  # no checkpoint removed, no log trimmed, no config rewritten
    assert not (out.parent / ".run.lock").exists()

    # an edit that keeps the size: the content decides
    shutil.copy(setup["data"], data)
    lines = data.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b",pos", b",neg") if b",pos" in lines[1] else lines[1].replace(b",neg", b",pos")
    data.write_bytes(b"".join(lines))
    assert data.stat().st_size == size
    assert _resume(out) == 2
    err = capsys.readouterr().err.strip()
    assert f"training file {data}: content changed (same size, {size:,} bytes)" in err and len(err.splitlines()) == 1
    assert snapshot(out) == before


def test_allow_changed_inputs_continues_and_records_old_and_new(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data, _ = _stopped_run(setup, tmp_path)
    old_size, old_sha = data.stat().st_size, _sha256(data)
    _drop_rows(data, 40)
    capsys.readouterr()
    assert _resume(out, "--allow-changed-inputs") == 0
    err = capsys.readouterr().err
    assert f"continuing {out} on changed inputs (--allow-changed-inputs" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["resumed"] is True
    [change] = metrics["input_changes"]
    assert change["allowed_by_user"] is True and change["resumed_from_step"] == 2
    assert change["changes"] == [f"training file {data}: size {old_size:,} -> {data.stat().st_size:,} bytes"]
    previous, current = (change[k]["train_file"]["files"]["train.csv"] for k in ("previous", "current"))
    assert (previous["size"], previous["sha256"]) == (old_size, old_sha)
    assert (current["size"], current["sha256"]) == (data.stat().st_size, _sha256(data))
    assert change["previous"]["model"] == change["current"]["model"]
    inputs = json.loads((out / "inputs.json").read_text())
    assert inputs["history"] == metrics["input_changes"]
    assert inputs["inputs"] == change["current"]  # a later resume compares with the new inputs
    _stop(out)
    assert _resume(out) == 0  # the same changed inputs again: nothing new to allow
    assert json.loads((out / "metrics.json").read_text())["input_changes"] == metrics["input_changes"]


def test_unchanged_inputs_resume_to_the_same_weights_and_a_touched_file_is_only_noted(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data, finished = _stopped_run(setup, tmp_path)
    recorded = (out / "inputs.json").read_bytes()
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # saved again, unchanged
    capsys.readouterr()
    assert _resume(out) == 0
    err = capsys.readouterr().err
    assert f"note: training file {data} was modified" in err and "content is the same" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_sha256"] == finished["weights_sha256"] and "input_changes" not in metrics
    assert (out / "inputs.json").read_bytes() == recorded


def test_a_changed_model_directory_is_detected(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Path(shutil.copytree(setup["model"], tmp_path / "model"))
    out, _, _ = _stopped_run(setup, tmp_path, model=model)
    before = snapshot(out)
    make_tiny_bert(model, seed=1)  # other weights, the same shapes (and file size)
    capsys.readouterr()
    assert _resume(out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    size = (model / "model.safetensors").stat().st_size
    assert f"base model {model / 'model.safetensors'}: content changed (same size, {size:,} bytes)" in err
    assert "config.json" not in err and "tokenizer" not in err  # only what changed is named
    assert snapshot(out) == before


def test_a_run_from_before_fingerprints_resumes_with_a_warning(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, _, finished = _stopped_run(setup, tmp_path)
    (out / "inputs.json").unlink()
    capsys.readouterr()
    assert _resume(out) == 0
    err = capsys.readouterr().err
    assert "has no inputs.json" in err and "cannot check" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["weights_sha256"] == finished["weights_sha256"]
    assert [c["event"] for c in metrics["input_changes"]] == ["inputs not recorded before"]
    assert json.loads((out / "inputs.json").read_text())["inputs"] == fingerprint_inputs(_config_of(out))


def _config_of(run: Path) -> Any:
    from lorma.recipes.config import build_config, load_yaml

    values = load_yaml(run / "config.yaml")
    values.pop("training")
    return build_config(values)


def test_allow_changed_inputs_needs_resume(setup: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(setup["model"], setup["data"], tmp_path / "run", "--allow-changed-inputs")) == 2
    assert "--allow-changed-inputs applies to --resume only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# lorma compare and --tune
# --------------------------------------------------------------------------------------------------


def test_a_stopped_compare_run_resumes_under_the_same_check(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = Path(shutil.copy(setup["data"], tmp_path / "train.csv"))
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(setup["model"]), "--train-file", str(data), "--output-dir", str(out),
                 "--methods", "lora", "--seeds", "1", "--max-steps", "2", "--save-steps", "1", "--max-seq-length", "16",
                 "--per-device-train-batch-size", "8", "--report-to", "none"]) == 0
    run = out / "lora" / "seed-42"  # an ordinary run directory, with its inputs recorded
    assert json.loads((run / "inputs.json").read_text())["inputs"]["train_file"]["files"]["train.csv"]["sha256"] \
        == _sha256(data)
    _stop(run, steps=2)
    before = snapshot(out)
    size = data.stat().st_size
    _drop_rows(data, 40)
    capsys.readouterr()
    assert _resume(run) == 2
    err = capsys.readouterr().err.strip()
    assert f"training file {data}: size {size:,} -> {data.stat().st_size:,} bytes" in err and len(err.splitlines()) == 1
    assert snapshot(out) == before


def test_tune_reuses_a_candidate_only_on_unchanged_inputs(setup: dict[str, Path], tmp_path: Path) -> None:
    from lorma.recipes.config import build_config
    from lorma.recipes.tuning import tune
    from lorma.tasks.base import get_task

    data = Path(shutil.copy(setup["data"], tmp_path / "train.csv"))
    cfg = build_config({"model": str(setup["model"]), "train_file": str(data), "method": "lora", "max_steps": 1,
                        "max_seq_length": 16, "per_device_train_batch_size": 8, "report_to": "none",
                        "grid": {"learning_rate": "1e-3,1e-2"}, "tune_folds": 1})  # one split: 2 runs, not 10

    def cached() -> list[bool]:
        task = get_task(cfg)
        task.check_inputs()
        record = tune(cfg, ["lora"], tmp_path / "tuning", task, quiet=True)
        return [c["cached"] for c in record["methods"]["lora"]["candidates"]]

    assert cached() == [False, False]
    assert cached() == [True, True]  # the same settings on the same data
    _drop_rows(data, 60)
    assert cached() == [False, False]  # the same settings on other data: trained again
