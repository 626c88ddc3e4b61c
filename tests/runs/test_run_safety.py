"""Real runs on a tiny model: nothing lost (merge onto its input, a crashed --overwrite, a half-written
checkpoint), nothing silently wrong (a run directory mixing two runs, an adapter too big for memory, a merge
onto a base with another head, analyze against a merged model), and broken adapter files named."""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorma.cli import main
from recipe_support import make_tiny_bert, sentiment_rows, snapshot, write_csv


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    model = make_tiny_bert(root / "model")
    data = write_csv(root / "data.csv", ["text", "label"], sentiment_rows(60, labels=("up", "down")))
    info = {"root": root, "model": model, "data": data}
    for name, extra in (("run", ()), ("straight", ("--max-steps", "6", "--save-steps", "2", "--save-total-limit",
                                                    "5"))):
        out = root / name
        assert main(_args(info, out, *extra)) == 0
        info[name] = out
    return info


def _args(info: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(info["model"]), "--train-file", str(info["data"]), "--output-dir", str(out),
            "--method", "lorma-plus", "--max-steps", "3", "--per-device-train-batch-size", "8", "--learning-rate",
            "2e-2", "--r", "4", "--report-to", "none", *extra]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_merge_and_export_never_write_over_their_input(trained: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = _copy(trained["run"], tmp_path / "run")
    before = snapshot(run)
    model_before = snapshot(trained["model"])
    for out, expected in ((run, "contains the input ADAPTER_DIR"), (run / "adapter", "is the input ADAPTER_DIR"),
                          (trained["model"], "is the input (the base model)")):
        assert main(["merge", str(run), str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert main(["merge", str(run / "adapter"), str(run), "--overwrite"]) == 2
    assert "contains the input ADAPTER_DIR" in capsys.readouterr().err
    for out in (run, run / "adapter"):  # lorma export (a LoRA adapter of it) neither
        assert main(["export", str(run), str(out), "--overwrite"]) == 2
        assert "OUT_DIR" in capsys.readouterr().err
    assert snapshot(run) == before and snapshot(trained["model"]) == model_before
    assert main(["merge", str(run), str(run / "merged")]) == 0  # beside the adapter, inside the run: fine
    assert (run / "merged" / "model.safetensors").is_file()


def test_a_crashed_overwrite_leaves_the_old_run_whole_and_merge_refuses_a_mixture(
    trained: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import transformers

    run = _copy(trained["run"], tmp_path / "run")
    before = snapshot(run)
    calls = {"n": 0}
    real_step = transformers.Trainer.training_step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 14.00 GiB")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(_args(trained, run, "--overwrite", "--r", "8"))
    monkeypatch.undo()
    assert snapshot(run) == before  # the old run, whole: its config still says r = 4, its adapter is r = 4
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    # an older lorma could leave a new config beside an old adapter: such a mixture is refused, never merged
    config = (run / "config.yaml").read_text().replace("r: 4", "r: 100000")
    (run / "config.yaml").write_text(config)
    assert main(["merge", str(run), str(tmp_path / "merged2")]) == 2
    err = capsys.readouterr().err
    assert "adapter/ does not belong to the run that config.yaml describes (r 4 vs 100000)" in err
    assert not (tmp_path / "merged2").exists()


def test_resume_skips_a_half_written_checkpoint_and_says_so(trained: dict[str, Path], tmp_path: Path, capsys) -> None:
    killed = _copy(trained["straight"], tmp_path / "killed")
    # a kill while checkpoint-6 was written leaves only peft's model card in it; the final outputs are not there
    last = killed / "checkpoints" / "checkpoint-6"
    for item in last.iterdir():
        if item.name != "README.md":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.rmtree(killed / "adapter")
    (killed / "metrics.json").unlink()
    assert main(["train", "--resume", "--output-dir", str(killed)]) == 0
    err = capsys.readouterr().err
    assert f"skipped incomplete checkpoint {last} (no trainer_state.json" in err
    a = json.loads((trained["straight"] / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["global_step"] == 6 and b["weights_sha256"] == a["weights_sha256"]


def test_a_run_stopped_after_its_last_checkpoint_is_finished_without_an_extra_step(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """Killed while saving its final outputs, a run resumes from a checkpoint at its last step. Trainer would
    train one batch more there (a step 4 of 3, with a constant learning rate: other weights); lorma trains
    nothing more and finishes the run."""
    extra = ("--save-steps", "3", "--lr-scheduler-type", "constant", "--warmup-steps", "0")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(_args(trained, straight, *extra)) == 0
    assert main(_args(trained, killed, *extra)) == 0
    shutil.rmtree(killed / "adapter")
    (killed / "metrics.json").unlink()
    assert main(["train", "--resume", "--output-dir", str(killed)]) == 0
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert b["global_step"] == 3 and b["weights_sha256"] == a["weights_sha256"]
    assert b["eval"]["eval_accuracy"] == a["eval"]["eval_accuracy"]
    assert [json.loads(x)["step"] for x in (killed / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-3"]


def test_an_adapter_too_big_for_memory_is_refused_before_it_is_built(trained: dict[str, Path], tmp_path: Path,
                                                                      capsys) -> None:
    out = tmp_path / "run"
    with _no_layer_warnings():  # r > d warnings from the layers would mean the adapter was built
        assert main(_args(trained, out, "--r", str(10**9))) == 2
    err = capsys.readouterr().err.strip()
    assert "the lorma-plus adapter at r=1000000000 would have 256,000,000,000 trainable parameters in 4 modules" in err
    assert "GB to train in float32" in err and "lower --r" in err and len(err.splitlines()) == 1
    assert not out.exists()


@contextlib.contextmanager
def _no_layer_warnings() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield
    built = [str(w.message) for w in records if "is larger than the transform size" in str(w.message)]
    assert not built, built


@pytest.mark.parametrize(
    ("method", "side", "model"),
    [("lorma-plus", "pre", "bert"), ("lorma-pi", "post", "bert"), ("lora", "pre", "bert"), ("dora", "pre", "bert"),
     ("lorma-plus", "pre", "gpt2"), ("lorma-plus", "post", "gpt2")],
)
def test_the_size_estimate_is_the_size_peft_builds(method: str, side: str, model: str, tiny_bert, tiny_gpt2) -> None:
    from lorma.recipes.config import build_config
    from lorma.recipes.methods import adapter_parameter_count, build_method_model, count_parameters

    base = tiny_bert if model == "bert" else tiny_gpt2
    cfg = build_config({"method": method, "side": side, "r": 3, "modules_to_save": []}, {})
    estimated, modules = adapter_parameter_count(base, cfg)
    built = build_method_model(base, cfg, [], None)
    trainable, _ = count_parameters(built)
    assert estimated == trainable and modules == (4 if model == "bert" else 2)


def test_merge_onto_a_base_with_another_head_names_the_shapes(trained: dict[str, Path], tmp_path: Path,
                                                              capsys) -> None:
    other = make_tiny_bert(tmp_path / "three-labels", id2label={0: "a", 1: "b", 2: "c"})
    assert main(["merge", str(trained["run"]), str(tmp_path / "merged"), "--base-model", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"base model '{other}' has a task head of another size than the adapter's, made for 2 labels" in err
    assert "classifier.weight is (3, 32) there but (2, 32) here" in err and "look at the above report" not in err


DAMAGES = {
    "truncated": "adapter_model.safetensors: not a complete safetensors file",
    "empty": "adapter_model.safetensors: not a complete safetensors file",
    "random": "adapter_model.safetensors: not a complete safetensors file",
    "config-truncated": "adapter_config.json:1: invalid JSON",
    "config-no-type": "adapter_config.json: no 'peft_type'",
}
# peft parses adapter_config.json itself before any lorma code runs (the README says so): PeftModel is checked on
# the weights file only
BROKEN = [(c, d, m) for c in ("merge", "analyze", "peft") for d, m in DAMAGES.items()
          if not (c == "peft" and d.startswith("config"))]


@pytest.mark.parametrize(("command", "damage", "message"), BROKEN)
def test_broken_adapter_files_are_named(trained: dict[str, Path], tmp_path: Path, capsys, command: str, damage: str,
                                        message: str) -> None:
    adapter = _copy(trained["run"] / "adapter", tmp_path / "adapter")
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "random":
        weights.write_bytes(bytes((i * 7919) % 256 for i in range(4096)))
    elif damage == "config-truncated":
        config.write_text(config.read_text()[:40].replace("\n", " "))
    else:
        data = json.loads(config.read_text())
        del data["peft_type"]
        config.write_text(json.dumps(data))
    if command == "peft":
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        import lorma  # noqa: F401

        base = AutoModelForSequenceClassification.from_pretrained(trained["model"], num_labels=2)
        with pytest.raises(ValueError, match=str(weights).replace(".", r"\.") + ": not a complete safetensors"):
            PeftModel.from_pretrained(base, adapter)
        return
    argv = ["merge", str(adapter), str(tmp_path / "out")] if command == "merge" else \
        ["analyze", str(adapter), "--base-model", str(trained["model"]), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(adapter) in err, err
    assert not (tmp_path / "out").exists()


def test_analyze_against_a_merged_model_says_why_nothing_compares(trained: dict[str, Path], tmp_path: Path,
                                                                   capsys) -> None:
    merged = tmp_path / "merged"
    assert main(["merge", str(trained["run"]), str(merged)]) == 0
    assert main(["analyze", str(trained["run"]), "--against", str(merged), "--out", str(tmp_path / "a"),
                 "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--against {merged}: nothing to compare with: it is a plain transformers model" in err
    # a reference with a loss log but no adapter (full fine-tuning) is compared on convergence, and says so
    full = tmp_path / "full"
    assert main(_args(trained, full, "--method", "full")) == 0
    assert main(["analyze", str(trained["run"]), "--against", str(full), "--out", str(tmp_path / "b"),
                 "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "note (against): delta W is not compared (no adapter); convergence is" in out
    assert "rank dW (against)" not in out and "% AUC decrease" in out


def test_the_saved_adapter_says_to_import_lorma(trained: dict[str, Path]) -> None:
    card = (trained["run"] / "adapter" / "README.md").read_text()
    assert "import lorma" in card and "KeyError: 'LORMA'" in card
