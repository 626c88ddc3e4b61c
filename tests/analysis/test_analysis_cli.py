"""``lorma analyze`` on tiny saved adapters + a tiny base model, checked against independent computations."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from lorma import LormaConfig
from lorma.analysis.matrices import compare_matrices
from lorma.analysis.runs import read_loss_curve, read_run
from lorma.cli import main

R = 2
HIDDEN = 32
MODULE = "bert.encoder.layer.0.attention.self.query"


def _base() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        max_position_embeddings=16,
    )
    return BertForSequenceClassification(cfg)


def _perturb(model: torch.nn.Module, seed: int, marker: str) -> None:
    """Move the adapter away from its initialisation as training would (B = 0 would give delta W = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _write_loss_log(run: Path, losses: list[float]) -> None:
    """A Trainer-style log_history with eval and summary records that must be skipped."""
    history = [{"step": i + 1, "loss": v, "epoch": 0.1} for i, v in enumerate(losses)]
    history.append({"step": len(losses), "eval_loss": 0.1})
    history.append({"step": len(losses), "train_runtime": 1.0, "train_loss": 9.0})
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analyze")
    _base().save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for name, cfg, marker, seed in (
        (
            "plus",
            LormaConfig(r=R, alpha=4, inflation="plus", target_modules=["query", "value"], task_type="SEQ_CLS"),
            "lorma_",
            1,
        ),
        (
            "pi",
            LormaConfig(r=R, alpha=4, inflation="pi", target_modules=["query", "value"], task_type="SEQ_CLS"),
            "lorma_",
            2,
        ),
        (
            "lora",
            peft.LoraConfig(r=R, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
            "lora_",
            3,
        ),
    ):
        model = peft.get_peft_model(_base(), cfg)
        _perturb(model, seed, marker)
        model.save_pretrained(root / name)
        paths[name] = root / name
    _write_loss_log(paths["plus"], [1.0, 0.7, 0.5, 0.4, 0.35, 0.3])
    _write_loss_log(paths["lora"], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    return paths


def _w0(base: Path, module: str) -> np.ndarray:
    return load_file(str(base / "model.safetensors"))[f"{module}.weight"].double().numpy()


def _saved(run: Path, module: str, name: str) -> np.ndarray:
    tensors = load_file(str(run / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.startswith(f"base_model.model.{module}.{name}"))
    return tensors[key].double().numpy()


def _delta_plus(runs: dict[str, Path], module: str) -> np.ndarray:
    """Independent: (I + s B A) W0 - W0 = s B A W0, from the saved tensors."""
    a, b = _saved(runs["plus"], module, "lorma_A"), _saved(runs["plus"], module, "lorma_B")
    return (4 / R) * b @ a @ _w0(runs["base"], module)


def _delta_lora(runs: dict[str, Path], module: str) -> np.ndarray:
    a, b = _saved(runs["lora"], module, "lora_A"), _saved(runs["lora"], module, "lora_B")
    return (4 / R) * b @ a


def _delta_pi(runs: dict[str, Path], module: str) -> np.ndarray:
    """Independent: (s pi(BA) - I) W0 with pi rotating row i right by i (NOTES.md)."""
    a, b = _saved(runs["pi"], module, "lorma_A"), _saved(runs["pi"], module, "lorma_B")
    m = b @ a
    rotated = np.stack([np.roll(m[i], i) for i in range(m.shape[0])])
    return ((4 / R) * rotated - np.eye(m.shape[0])) @ _w0(runs["base"], module)


def test_analyze_against_lora(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    rc = main(
        [
            "analyze",
            str(runs["plus"]),
            "--against",
            str(runs["lora"]),
            "--base-model",
            str(runs["base"]),
            "--out",
            str(out),
            "--smoothing",
            "none",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert MODULE in printed and "random control" in printed and "Summary over modules" in printed
    result = json.loads((out / "analysis.json").read_text())
    assert set(result["modules"]) == {
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    }
    expected_plus = _delta_plus(runs, MODULE)
    expected_lora = _delta_lora(runs, MODULE)
    mod = result["modules"][MODULE]
    assert mod["method"] == "lorma" and mod["inflation"] == "plus"
    assert mod["delta_rank"] == np.linalg.matrix_rank(expected_plus) == R  # plus: rank <= r
    assert mod["delta_norm"] == pytest.approx(np.linalg.norm(expected_plus), rel=1e-5)
    assert result["against"]["modules"][MODULE]["delta_rank"] == R
    # the final I(BA) of plus is near identity here: full rank
    assert next(iter(mod["transform"].values()))["rank"] == HIDDEN
    comp = result["comparison"][MODULE]
    direct = compare_matrices(expected_plus, expected_lora, r=R)
    assert comp["run"]["frobenius_distance"] == pytest.approx(direct.frobenius_distance, rel=1e-5)
    assert comp["run"]["cosine"] == pytest.approx(direct.cosine, rel=1e-4, abs=1e-6)
    assert comp["run"]["sv_sq_diff"] == pytest.approx(direct.sv_sq_diff, rel=1e-4, abs=1e-10)
    assert comp["run"]["eig_sq_diff"] == pytest.approx(direct.eig_sq_diff, rel=1e-4, abs=1e-10)
    assert comp["run"]["angle_first"] == pytest.approx(direct.angle_first, abs=1e-4)
    # the control: a random matrix of the run's norm against the same reference
    assert comp["control"]["norm_x"] == pytest.approx(np.linalg.norm(expected_plus), rel=1e-5)
    assert comp["control"]["norm_y"] == pytest.approx(np.linalg.norm(expected_lora), rel=1e-5)
    # convergence: AUC by the trapezoid over steps 1..6 (no smoothing), reference = LoRA
    conv = result["convergence"]
    auc_plus, auc_lora = np.trapezoid([1.0, 0.7, 0.5, 0.4, 0.35, 0.3]), np.trapezoid([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert conv["lora"]["auc"] == pytest.approx(auc_lora)
    assert conv["lorma-plus"]["auc"] == pytest.approx(auc_plus)
    assert conv["lorma-plus"]["auc_decrease_pct"] == pytest.approx(100 * (auc_lora - auc_plus) / auc_lora)
    assert conv["lorma-plus"]["steps_to_ref_min"] == 3.0  # first step with loss <= 0.5
    assert conv["lorma-plus"]["speedup"] == pytest.approx(6 / 3)
    for png in ("delta_rank.png", "delta_spectra.png", "loss_curves.png", "comparison_cosine.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "analysis.txt").read_text().startswith("run: ")

    # an existing report is not overwritten unless asked
    rc = main(["analyze", str(runs["plus"]), "--base-model", str(runs["base"]), "--out", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err


def test_analyze_pi_delta_is_full_rank(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pi"
    assert main(["analyze", str(runs["pi"]), "--base-model", str(runs["base"]), "--out", str(out), "--no-plots"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    expected = _delta_pi(runs, MODULE)
    mod = result["modules"][MODULE]
    assert mod["delta_norm"] == pytest.approx(np.linalg.norm(expected), rel=1e-5)
    s = np.linalg.svd(expected, compute_uv=False)
    assert mod["delta_rank"] == int((s > HIDDEN * np.finfo(np.float32).eps * s[0]).sum())
    assert mod["delta_rank"] > R  # not bounded by r, unlike plus and LoRA
    # a given tolerance changes the count as the singular values say
    out2 = tmp_path / "pi_tol"
    assert (
        main(
            [
                "analyze",
                str(runs["pi"]),
                "--base-model",
                str(runs["base"]),
                "--out",
                str(out2),
                "--no-plots",
                "--tol",
                "0.3",
            ]
        )
        == 0
    )
    assert json.loads((out2 / "analysis.json").read_text())["modules"][MODULE]["delta_rank"] == int(
        (s > 0.3 * s[0]).sum()
    )


def test_analyze_errors_are_one_line(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # the adapter records no base model and none is given
    assert main(["analyze", str(runs["plus"]), "--out", str(tmp_path / "a")]) == 2
    assert "--base-model" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["analyze", str(empty)]) == 2
    assert "nothing to analyze" in capsys.readouterr().err
    # a base model the adapter does not fit: the saved tensors do not all load
    other = tmp_path / "other_base"
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
    )
    BertForSequenceClassification(cfg).save_pretrained(other)
    assert main(["analyze", str(runs["plus"]), "--base-model", str(other), "--out", str(tmp_path / "b")]) == 2
    assert "lorma analyze: error:" in capsys.readouterr().err


def test_loss_readers(tmp_path: Path) -> None:
    (tmp_path / "train_loss.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 1, "loss": 2.0},
                {"step": 2, "loss": 1.0},
                {"step": 2, "eval_loss": 5.0},
                {"step": 3, "loss": 0.5},
            ]
        )
        + "\n"
    )
    (curve, source) = read_loss_curve(tmp_path)
    assert curve == ([1.0, 2.0, 3.0], [2.0, 1.0, 0.5]) and source.name == "train_loss.jsonl"
    (tmp_path / "train_loss.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="train_loss.jsonl:2"):
        read_loss_curve(tmp_path)
    (tmp_path / "train_loss.jsonl").unlink()
    assert read_loss_curve(tmp_path) is None
    (tmp_path / "config.yaml").write_text("method: lorma-pi\nside: post\nmodel: a: b\n")
    with pytest.raises(ValueError, match="config.yaml:3: invalid YAML"):
        read_run(tmp_path)
    (tmp_path / "config.yaml").write_text("method: lorma-plus\nside: post\nmodel: /some/base\n")
    info = read_run(tmp_path)
    assert info.label == "lorma-plus-post" and info.base_model_hint == "/some/base" and info.adapter_dir is None


def test_untrained_lora_adapter_gives_zero_rank_and_strict_json(runs: dict[str, Path], tmp_path: Path) -> None:
    """LoRA at initialisation (B = 0): delta W = 0, rank 0, infinite condition number written as a string."""
    adapter = tmp_path / "lora0"
    peft.get_peft_model(_base(), peft.LoraConfig(r=R, target_modules=["query"], task_type="SEQ_CLS")).save_pretrained(
        adapter
    )
    out = tmp_path / "report"
    assert main(["analyze", str(adapter), "--base-model", str(runs["base"]), "--out", str(out), "--no-plots"]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    result = json.loads((out / "analysis.json").read_text(), parse_constant=refuse)
    mod = result["modules"][MODULE]
    assert mod["delta_rank"] == 0 and mod["delta_norm"] == 0.0
    assert mod["delta_sv"]["cond"] == "inf"
