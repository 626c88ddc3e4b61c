"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def reference_inflation(A: torch.Tensor, B: torch.Tensor, inflation: str, s: float) -> torch.Tensor:
    """I(BA) straight from the paper's definitions, in float64, by explicit indexing (independent of lorma)."""
    ba = B.double() @ A.double()
    d = ba.shape[0]
    if inflation == "plus":
        return torch.eye(d, dtype=torch.float64) + s * ba
    if inflation == "none":
        return s * ba
    rows = torch.arange(d).unsqueeze(1)
    cols = (torch.arange(d).unsqueeze(0) - rows) % d  # pi(M)[i, j] = M[i, (j - i) mod d]
    return s * ba[rows, cols]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=120
    )
    return BertModel(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=120, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()
