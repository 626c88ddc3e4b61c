"""``lorma export --format gguf``: llama.cpp's LoRA GGUF file, written with the ``gguf`` package.

llama.cpp itself does not run here (``make serving-check`` runs it, and compares this writer's file with what
llama.cpp's ``convert_lora_to_gguf.py`` writes). These tests read the file back with gguf's own reader and check it
against what llama.cpp needs: every adapted module's pair under the name gguf's tensor map gives, the shapes its
adapter loader checks, the keys it reads, and, computed from the file alone with llama.cpp's arithmetic (alpha over
each pair's rank, q / k rows in the converter's rotary order), the LoRMA+ model's logits.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import get_peft_model

from lorma import LormaConfig
from lorma.cli import main
from lorma.export.gguf import GGUF_FILE, rope_permute
from lorma.export.lora import EXPORT_REPORT_FILE
from recipe_support import snapshot
from test_adapter_formula import rel_err
from test_export import IDS, far_from_identity

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' row order of a q / k projection stored in llama.cpp's: row ``h*hd + 2i + j`` of the file is
    row ``h*hd + j*hd/2 + i`` of the Hugging Face weight (rotary pairs interleaved, not in halves)."""
    head_dim = rows.shape[0] // n_head
    out = np.empty_like(rows)
    for h in range(n_head):
        for i in range(head_dim // 2):
            for j in range(2):
                out[h * head_dim + j * head_dim // 2 + i] = rows[h * head_dim + 2 * i + j]
    return out


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    """``({key: value}, {tensor name: tensor})`` of a GGUF file, through gguf's reader."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def logits_from_gguf(base: torch.nn.Module, path: Path, config: dict) -> torch.Tensor:
    """float64 logits of ``base`` with each weight updated as llama.cpp computes it from the file alone:
    ``W + alpha / rank * lora_b @ lora_a`` (llama-adapter.h ``get_scale``), the q / k rows put back in
    transformers' order; the GGUF names are turned back into modules by inverting gguf's tensor map."""
    fields, tensors = read_gguf(path)
    alpha = float(fields["adapter.lora.alpha"])
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    modules = {tensor_map.get_name(name + ".weight", try_suffixes=(".weight",)): name
               for name, _ in base.named_modules() if isinstance(_, torch.nn.Linear)}
    model = copy.deepcopy(base).double().eval()
    with torch.no_grad():
        for name, tensor in tensors.items():
            if not name.endswith(".lora_a"):
                continue
            a = np.asarray(tensor.data, dtype=np.float64)
            b = np.asarray(tensors[name.removesuffix("_a") + "_b"].data, dtype=np.float64)
            module = modules[name.removesuffix(".lora_a")]
            if module.endswith("q_proj"):
                b = unpermute_rows(b, config["num_attention_heads"])
            elif module.endswith("k_proj"):
                b = unpermute_rows(b, config["num_key_value_heads"])
            model.get_submodule(module).weight += alpha / a.shape[0] * torch.from_numpy(b @ a)
        return model(input_ids=IDS).logits


def save_adapter(base: torch.nn.Module, tmp_path: Path, **lorma) -> tuple[Path, torch.nn.Module]:
    """``base`` saved to ``tmp_path/base`` and a LoRMA adapter on it (made far from the identity) to ``adapter``."""
    from transformers import AutoModelForCausalLM

    base.save_pretrained(tmp_path / "base")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()  # records the base's path
    model = far_from_identity(get_peft_model(loaded, LormaConfig(task_type="CAUSAL_LM", **lorma)))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model


@pytest.mark.parametrize("side", ["pre", "post"])
def test_gguf_export_reads_back_with_the_tensor_maps_names_and_shapes(tiny_llama, tmp_path: Path, side: str,
                                                                      capsys) -> None:
    """Every Llama projection and the untied lm_head, ranks 2 and 4 (padded to one r): the file's tensors are the
    tensor map's names with the shapes llama.cpp's loader checks, its keys are an adapter's, and llama.cpp's
    arithmetic on the file gives the LoRMA+ logits in float64."""
    adapter, model = save_adapter(tiny_llama, tmp_path, r=4, alpha=8, side=side, target_modules=TARGETS,
                                  rank_pattern={"v_proj": 2})
    out = tmp_path / "lorma-pre-gguf"
    assert main(["export", str(adapter), str(out), "--format", "gguf"]) == 0
    printed = capsys.readouterr().out
    assert "llama.cpp LoRA GGUF (adapter.gguf)" in printed and f"--lora {out / GGUF_FILE}" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted([GGUF_FILE, EXPORT_REPORT_FILE])
    report = json.loads((out / EXPORT_REPORT_FILE).read_text())
    assert report["format"] == "gguf" and report["files"] == [GGUF_FILE] and report["serving"] == "llamacpp"

    config = json.loads((tmp_path / "base" / "config.json").read_text())
    fields, tensors = read_gguf(out / GGUF_FILE)
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    expected = {}
    for name, module in tiny_llama.named_modules():
        if name.rpartition(".")[2] in TARGETS:
            gguf_name = tensor_map.get_name(name + ".weight", try_suffixes=(".weight",))
            d_out, d_in = module.weight.shape
            expected[gguf_name + ".lora_a"] = [d_in, 4]  # ggml order: ne0 = the row length
            expected[gguf_name + ".lora_b"] = [4, d_out]
    assert len(expected) == 2 * (7 * 2 + 1) and "output.weight.lora_a" in expected
    assert {name: t.shape.tolist() for name, t in tensors.items()} == expected
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 4.0
    assert fields["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert fields["general.name"]

    with torch.no_grad():
        expected_logits = model.double()(input_ids=IDS).logits
    assert rel_err(logits_from_gguf(tiny_llama, out / GGUF_FILE, config), expected_logits) < 1e-6


def test_rope_permute_is_the_converters_row_order() -> None:
    """The writer's permutation is the inverse of the element-by-element definition above (a 2-head, head_dim 6
    weight), and differs from the identity (so a missing permutation would show in the logits test)."""
    rows = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    permuted = rope_permute(rows, 2)
    assert not np.array_equal(permuted, rows)
    assert np.array_equal(unpermute_rows(permuted, 2), rows)
    assert permuted[:, 0].tolist() == [0, 9, 3, 12, 6, 15, 18, 27, 21, 30, 24, 33]


def test_gguf_export_refusals_are_one_line_and_write_nothing(tiny_llama, tiny_gpt2, tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    adapter, _ = save_adapter(tiny_llama, tmp_path, r=4, alpha=8, target_modules=["q_proj"])
    out = tmp_path / "out"

    def refused(*argv: str) -> str:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert not out.exists()
        return err

    assert "--serving vllm does not apply" in refused(str(adapter), str(out), "--format", "gguf", "--serving", "vllm")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    assert "pip install gguf" in refused(str(adapter), str(out), "--format", "gguf")
    monkeypatch.undo()

    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    gpt2_adapter, _ = save_adapter(tiny_gpt2, gpt2_dir, r=4, alpha=8, target_modules=["c_fc"])
    assert "GPT2LMHeadModel" in refused(str(gpt2_adapter), str(out), "--format", "gguf")

    pi_dir = tmp_path / "pi"
    pi_dir.mkdir()
    pi_adapter, _ = save_adapter(tiny_llama, pi_dir, r=4, alpha=8, inflation="pi", target_modules=["q_proj"])
    assert "lorma merge" in refused(str(pi_adapter), str(out), "--format", "gguf")

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    assert main(["export", str(adapter), str(out), "--format", "gguf"]) == 2
    assert "give --overwrite" in capsys.readouterr().err and snapshot(out) == before
