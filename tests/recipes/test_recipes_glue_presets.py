"""configs/glue: the paper's Table 14 as presets that load, match their names, and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorma.cli import main
from lorma.recipes.config import build_config, load_yaml
from lorma.recipes.config import normalise_yaml as _normalise_yaml
from recipe_support import make_tiny_bert

GLUE = Path(__file__).resolve().parents[2] / "configs" / "glue"
TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")
METHODS = ("lora", "lorma-plus", "lorma-pi")


def _load(path: Path):
    return build_config(_normalise_yaml(load_yaml(path)), {}, str(path))


def test_every_row_of_table_14_has_a_preset() -> None:
    files = sorted(GLUE.glob("*/*.yaml"))
    expected = {f"{m}/{t}-{meth}.yaml" for m in ("roberta-base", "roberta-large") for t in TASKS for meth in METHODS}
    assert {f"{p.parent.name}/{p.name}" for p in files} == expected


@pytest.mark.parametrize("path", sorted(GLUE.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_loads_and_matches_its_name(path: Path) -> None:
    cfg = _load(path)
    task, method = path.stem.split("-", 1)
    assert cfg.task == task and cfg.method == method and cfg.model == path.parent.name
    assert cfg.target_modules == ["query", "value"]
    training = cfg.training
    assert isinstance(training["learning_rate"], float) and 1e-4 <= training["learning_rate"] <= 5e-4
    assert training["warmup_steps"] == 0.06 and training["lr_scheduler_type"] == "linear"
    header = path.read_text().split("\nmodel:")[0]
    assert "Table 14" in header and "Unclear" in header


@pytest.mark.parametrize(
    ("name", "batch", "epochs", "lr", "seq", "r", "alpha", "wd"),
    [  # values read off Table 14
        ("roberta-base/cola-lorma-plus", 64, 100, 4e-4, 512, 8, 4, 0.2),
        ("roberta-base/qqp-lorma-pi", 16, 25, 5e-4, 512, 8, 8, 0.1),
        ("roberta-base/rte-lora", 32, 80, 5e-4, 512, 8, 8, 0.1),
        ("roberta-large/qnli-lorma-plus", 4, 20, 2e-4, 512, 4, 4, 0.1),
        ("roberta-large/mnli-lorma-plus", 8, 10, 3e-4, 128, 8, 8, 0.1),
        ("roberta-large/stsb-lora", 4, 10, 3e-4, 128, 8, 16, 0.1),
    ],
)
def test_preset_values(name: str, batch: int, epochs: int, lr: float, seq: int, r: int, alpha: float,
                       wd: float) -> None:
    cfg = _load(GLUE / f"{name}.yaml")
    t = cfg.training
    assert (t["per_device_train_batch_size"], t["num_train_epochs"], cfg.max_seq_length) == (batch, epochs, seq)
    assert t["learning_rate"] == pytest.approx(lr) and t["weight_decay"] == pytest.approx(wd)
    assert (cfg.r, cfg.alpha) == (r, alpha)


def _glue_folder(root: Path, task: str) -> Path:
    folder = root / task
    folder.mkdir()
    if task == "stsb":
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        rows = [header] + [f"{i}\tg\tf\ty\to\ts\ts\tone {i}\ttwo {i % 5}\t{i % 6:.1f}" for i in range(24)]
        (folder / "train.tsv").write_text("\n".join(rows) + "\n")
        (folder / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    elif task == "cola":
        lines = [f"src\t{i % 2}\t\t{'good fine nice' if i % 2 else 'bad sad poor'} {i}" for i in range(24)]
        (folder / "train.tsv").write_text("\n".join(lines) + "\n")
        (folder / "dev.tsv").write_text("\n".join(lines[:8]) + "\n")
    else:  # mnli
        labels = ["entailment", "neutral", "contradiction"]
        header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label"
        rows = [header] + [f"{i}\tp\tq\tg\tpremise {i}\thypothesis {i}\t{labels[i % 3]}" for i in range(24)]
        for name, count in (("train.tsv", 25), ("dev_matched.tsv", 7), ("dev_mismatched.tsv", 5)):
            (folder / name).write_text("\n".join(rows[:count]) + "\n")
    return folder


@pytest.mark.parametrize(
    "preset", ["roberta-base/cola-lorma-plus", "roberta-large/mnli-lorma-pi", "roberta-base/stsb-lora"]
)
def test_a_preset_runs_on_a_glue_folder(preset: str, tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    task = preset.split("/")[1].split("-")[0]
    data = _glue_folder(tmp_path, task)
    out = tmp_path / "run"
    code = main(["train", str(GLUE / f"{preset}.yaml"), "--model", str(model), "--data", str(data),
                 "--output-dir", str(out), "--max-steps", "2", "--per-device-train-batch-size", "4",
                 "--max-seq-length", "32", "--save-strategy", "no", "--eval-strategy", "no"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    if task == "cola":
        assert "eval_matthews_correlation" in metrics["eval"]
    elif task == "stsb":
        assert {"eval_pearson", "eval_spearmanr"} <= set(metrics["eval"])
        assert metrics["baseline"] is None  # no majority class in regression
    else:
        assert {"eval_matched_accuracy", "eval_mismatched_accuracy"} <= set(metrics["eval"])
