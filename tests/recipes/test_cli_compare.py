"""``lorma compare``: per-run results aggregated correctly, table / md / json / png, and refusals."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from lorma.cli import main
from recipe_support import make_tiny_bert, sentiment_rows, snapshot, write_csv


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("compare")
    model = make_tiny_bert(root / "model")
    data = write_csv(root / "data.csv", ["text", "label"], sentiment_rows(60))
    config = root / "c.yaml"
    config.write_text(f"model: {model}\ntrain_file: {data}\nmax_steps: 4\nper_device_train_batch_size: 8\n"
                      "learning_rate: 5.0e-3\nseed: 3\n")
    out = root / "out"
    args = ["compare", str(config), "--methods", "lora,lorma-plus", "--seeds", "2", "--output-dir", str(out)]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(args)
    return {"code": code, "out": out, "stdout": buffer.getvalue(), "args": args}


def test_results_aggregate_the_runs(compared: dict) -> None:
    assert compared["code"] == 0
    out: Path = compared["out"]
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [3, 4]
    assert list(results["methods"]) == ["lora", "lorma-plus"]
    for method, info in results["methods"].items():
        runs = [json.loads((out / method / f"seed-{s}" / "metrics.json").read_text()) for s in (3, 4)]
        assert info["run_dirs"] == [str(out / method / f"seed-{s}") for s in (3, 4)]
        assert [r["seed"] for r in runs] == [3, 4]
        for key in ("eval_accuracy", "eval_macro_f1"):
            values = [r["eval"][key] for r in runs]
            assert info["metrics"][key]["mean"] == pytest.approx(statistics.mean(values))
            assert info["metrics"][key]["std"] == pytest.approx(statistics.stdev(values))
        assert "eval_runtime" not in info["metrics"] and "eval_loss" not in info["metrics"]
        assert info["trainable_params"] == runs[0]["trainable_params"]
        aucs = []
        for s in (3, 4):
            log = [json.loads(x) for x in (out / method / f"seed-{s}" / "train_log.jsonl").read_text().splitlines()]
            steps = np.array([r["step"] for r in log], dtype=float)
            losses = np.array([r["loss"] for r in log])
            aucs.append(float(np.sum((losses[1:] + losses[:-1]) / 2 * np.diff(steps))))  # trapezoid by hand
        assert info["loss_auc"]["mean"] == pytest.approx(statistics.mean(aucs))
        spp = [r["seconds_per_step"] for r in runs]
        assert info["seconds_per_step"]["mean"] == pytest.approx(statistics.mean(spp))
    # two seeds of one method differ (the seed is really used)
    lora = [json.loads((out / "lora" / f"seed-{s}" / "metrics.json").read_text()) for s in (3, 4)]
    assert lora[0]["weights_sha256"] != lora[1]["weights_sha256"]
    assert results["baseline"]["eval_accuracy"] > 0


def test_table_markdown_and_plot(compared: dict) -> None:
    out: Path = compared["out"]
    stdout: str = compared["stdout"]
    for text in (stdout, (out / "results.md").read_text()):
        assert "trainable params" in text and "loss AUC" in text and "s/step" in text
        assert "majority baseline" in text and "lorma-plus" in text and " ± " in text
    assert str(out / "loss_curves.png") in stdout
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100


def test_rerun_is_refused_and_unknown_methods_fail_first(
    compared: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out: Path = compared["out"]
    before = snapshot(out)
    capsys.readouterr()
    assert main(compared["args"]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert snapshot(out) == before
    args = list(compared["args"])
    args[args.index("--methods") + 1] = "lora,lorma-fast"
    args[args.index("--output-dir") + 1] = str(tmp_path / "new")
    assert main(args) == 2
    assert "unknown method 'lorma-fast'" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
