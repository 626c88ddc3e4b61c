"""extract_deltas gives W - W0 in nn.Linear layout: checked against merge_and_unload on a tiny GPT-2 (Conv1D)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lorma import LormaConfig
from lorma.analysis.deltas import extract_deltas

EMBD = 16


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=EMBD, n_layer=1, n_head=2))


def _perturb(model: torch.nn.Module, marker: str) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _conv1d_weights_linear(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """c_attn weights of a plain GPT-2 in nn.Linear layout (Conv1D stores (d_in, d_out))."""
    return {n: m.weight.detach().T.clone() for n, m in model.named_modules() if n.endswith("attn.c_attn")}


@pytest.mark.parametrize(
    "config, marker",
    [
        (peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True), "lora_"),
        (
            LormaConfig(
                r=2,
                alpha=4,
                inflation="plus",
                target_modules=["c_attn"],
                fused_parts={"c_attn": {"num_parts": 3, "parts": [0, 2]}},
            ),
            "lorma_",
        ),
        (
            LormaConfig(
                r=2,
                alpha=4,
                inflation="pi",
                target_modules=["c_attn"],
                fused_parts={"c_attn": {"num_parts": 3, "parts": [0, 2]}},
            ),
            "lorma_",
        ),
    ],
    ids=["lora", "lorma-plus-fused", "lorma-pi-fused"],
)
def test_delta_is_merged_minus_base_in_linear_layout(config: peft.PeftConfig, marker: str) -> None:
    base = _gpt2()
    w0 = _conv1d_weights_linear(base)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    _perturb(model, marker)
    deltas = extract_deltas(model)
    assert set(deltas) == {"transformer.h.0.attn.c_attn"}
    merged = _conv1d_weights_linear(model.merge_and_unload())
    for name, md in deltas.items():
        assert md.delta.shape == (3 * EMBD, EMBD)  # (d_out, d_in) with d_out = q|k|v
        torch.testing.assert_close(md.delta, merged[name] - w0[name], atol=1e-5, rtol=1e-4)
        assert md.delta.abs().max() > 1e-3
        if md.method == "lorma":  # k (part 1) is not adapted: its rows of delta W are zero
            assert torch.count_nonzero(md.delta[EMBD : 2 * EMBD]) == 0


def test_no_adapter_is_an_error() -> None:
    with pytest.raises(ValueError, match="no LoRMA or LoRA layers"):
        extract_deltas(_gpt2())
    model = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="adapter named 'other'"):
        extract_deltas(model, adapter="other")


def test_rank_records_of_a_fused_layer_are_per_part() -> None:
    from lorma.runs.rank_log import rank_records

    model = peft.get_peft_model(
        _gpt2(),
        LormaConfig(
            r=2,
            alpha=4,
            inflation="none",
            target_modules=["c_attn"],
            fused_parts={"c_attn": {"num_parts": 3, "parts": [0, 2]}},
        ),
    )
    records = rank_records(model)
    assert [(r["module"], r["part"], r["d"]) for r in records] == [
        ("transformer.h.0.attn.c_attn", 0, EMBD),
        ("transformer.h.0.attn.c_attn", 2, EMBD),
    ]
    # inflation "none": I(BA) = s BA has rank <= r (the bottleneck of Table 6)
    assert all(r["rank"] <= 2 for r in records)
