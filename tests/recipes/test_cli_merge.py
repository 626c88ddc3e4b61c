"""``lorma merge``: the merged model reloads with plain transformers and gives the adapter model's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorma.cli import main
from recipe_support import make_tiny_bert, sentiment_rows, snapshot, write_csv


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    model = make_tiny_bert(root / "model")
    data = write_csv(root / "data.csv", ["text", "label"], sentiment_rows(60, labels=("up", "down")))
    out = {"root": root, "model": model}
    for method in ("lorma-plus", "lorma-pi", "lora"):
        run = root / method
        # a large learning rate so that the adapter is far from the identity / zero
        assert main(["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(run),
                     "--method", method, "--max-steps", "3", "--learning-rate", "0.05", "--r", "4"]) == 0
        out[method] = run
    return out


def _inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(["good great fine nice", "bad awful poor sad and more words"], padding=True, return_tensors="pt")


@pytest.mark.parametrize("method", ["lorma-plus", "lorma-pi", "lora"])
def test_merged_model_matches_the_adapter_model(runs: dict[str, Path], method: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import lorma  # noqa: F401

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(runs[method]), str(merged_dir)]) == 0  # a run directory is accepted
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert not any("lorma" in k or "lora" in k for k in merged.state_dict())
    assert merged.config.id2label == {0: "down", 1: "up"}

    base = AutoModelForSequenceClassification.from_pretrained(
        runs["model"], num_labels=2, id2label={0: "down", 1: "up"}, label2id={"down": 0, "up": 1}
    )
    adapted = PeftModel.from_pretrained(base, runs[method] / "adapter").eval()
    inputs = _inputs(merged_dir)  # the tokenizer was saved with the merged model
    with torch.no_grad():
        expected = adapted(**inputs).logits
        got = merged(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # the adapter moved the model: the merged weights are not the base weights
    plain = AutoModelForSequenceClassification.from_pretrained(runs["model"], num_labels=2).eval()
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(merged.state_dict()[q], plain.state_dict()[q])


def test_adapter_for_another_base_model(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = make_tiny_bert(tmp_path / "other", hidden=48)
    out = tmp_path / "merged"
    assert main(["merge", str(runs["lorma-plus"] / "adapter"), str(out), "--base-model", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on another base model" in err and "hidden_size 32 vs 48" in err
    assert not out.exists()


def test_existing_output_and_bad_adapter_dirs(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    assert main(["merge", str(runs["lora"]), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert snapshot(out) == before
    assert main(["merge", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
    assert "adapter directory not found" in capsys.readouterr().err
    assert main(["merge", str(runs["model"]), str(tmp_path / "o3")]) == 2
    assert "not a peft adapter directory" in capsys.readouterr().err
