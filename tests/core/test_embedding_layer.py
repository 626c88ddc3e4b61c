"""LoRMA on nn.Embedding (docs/conv-and-embeddings.md): every looked-up row E0[i] becomes I(BA) E0[i], so the merged
table is E0 I(BA)^T; and tied embeddings, whose output layer computes E0 I(BA)^T h through the tie
(ensure_weight_tying=True) or refuses to merge (without it). References are built densely in float64."""

from __future__ import annotations

import copy
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from torch.func import functional_call

import fresh_python
from conftest import reference_inflation
from lorma import LormaConfig
from lorma.layers.embedding import Embedding, TiedLinear

INFLATIONS = ["plus", "pi", "none"]


class Lookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=3)
        self.head = nn.Linear(6, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def transform(layer: Embedding, adapter: str = "default") -> torch.Tensor:
    """I(BA) of an adapter from the paper's definitions, float64 (differentiable in A and B)."""
    return reference_inflation(layer.lorma_A[adapter], layer.lorma_B[adapter], layer.inflation[adapter],
                               layer.scaling[adapter])


def quiet_peft_model(model: nn.Module, config: LormaConfig) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


@pytest.mark.parametrize("inflation", INFLATIONS)
def test_lookup_merge_unmerge_match_the_row_transform(inflation: str) -> None:
    model = quiet_peft_model(Lookup(), LormaConfig(target_modules=["emb"], r=2, alpha=3.0, inflation=inflation,
                                                   init_weights=False)).double()
    layer = model.base_model.model.emb
    base = layer.get_base_layer()
    E0 = base.weight.detach().clone()
    ids = torch.tensor([[0, 3, 19, 7], [3, 3, 11, 0]])
    M = transform(layer)
    expected_table = E0 @ M.T  # row i: M E0[i]
    expected = model.base_model.model.head(torch.tanh(F.embedding(ids, expected_table)))

    assert rel_err(layer(ids), F.embedding(ids, expected_table)) < 1e-12
    assert rel_err(layer(ids), F.embedding(ids, E0)) > 1e-3
    assert rel_err(model(ids), expected) < 1e-12

    model.merge_adapter()
    assert rel_err(base.weight, expected_table) < 1e-12
    assert torch.equal(base.weight[3], torch.zeros(6, dtype=torch.float64))  # the padding row stays zero
    assert rel_err(model(ids), expected) < 1e-12
    model.unmerge_adapter()
    if inflation == "plus":
        assert (base.weight - E0).abs().max().item() < 1e-12
    else:
        assert torch.equal(base.weight, E0)


def test_gradients_match_autograd_through_the_dense_table() -> None:
    model = quiet_peft_model(Lookup(), LormaConfig(target_modules=["emb"], r=3, inflation="pi",
                                                   init_weights=False)).double()
    layer = model.base_model.model.emb
    ids = torch.randint(0, 20, (3, 5))
    model(ids).square().sum().backward()
    A = layer.lorma_A["default"].detach().clone().requires_grad_(True)
    B = layer.lorma_B["default"].detach().clone().requires_grad_(True)
    table = layer.get_base_layer().weight.detach() @ reference_inflation(A, B, "pi", layer.scaling["default"]).T
    model.base_model.model.head(torch.tanh(F.embedding(ids, table))).square().sum().backward()
    assert rel_err(layer.lorma_A["default"].grad, A.grad) < 1e-10
    assert rel_err(layer.lorma_B["default"].grad, B.grad) < 1e-10


def test_only_the_pre_side_and_no_max_norm() -> None:
    with pytest.raises(ValueError, match=r"'emb' is an nn.Embedding: LoRMA adapts it on the pre side only"):
        get_peft_model(Lookup(), LormaConfig(target_modules=["emb"], r=2, side="post"))
    net = Lookup()
    net.emb = nn.Embedding(5, 6)  # a vocabulary smaller than the dimension: "auto" would pick post for a Linear
    net.head = nn.Linear(6, 12)
    model = get_peft_model(net, LormaConfig(target_modules=["emb", "head"], r=2, side="auto"))
    assert model.base_model.model.emb.side["default"] == "pre"
    assert model.peft_config["default"].side_pattern == {"emb": "pre", "head": "post"}
    net = Lookup()
    net.emb = nn.Embedding(20, 6, max_norm=1.0)
    with pytest.raises(ValueError, match=r"'emb' is an nn.Embedding with max_norm=1.0"):
        get_peft_model(net, LormaConfig(target_modules=["emb"], r=2))


LOOKUP_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6, padding_idx=3)
            self.head = nn.Linear(6, 4)

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)))
    """
)

LOAD_LOOKUP = LOOKUP_SOURCE + textwrap.dedent(
    """
    import sys
    from peft import PeftModel
    import lorma  # registers LoRMA with peft

    torch.manual_seed(0)
    saved = torch.load(sys.argv[2])
    model = PeftModel.from_pretrained(Lookup(), sys.argv[1]).eval()
    assert (model(saved["ids"]) - saved["y"]).abs().max().item() < 1e-6
    merged = model.merge_and_unload()
    assert type(merged.emb) is nn.Embedding
    assert (merged(saved["ids"]) - saved["y"]).abs().max().item() < 1e-6
    print("ok")
    """
)


def test_save_and_load_in_a_fresh_process(tmp_path: Path) -> None:
    namespace: dict = {}
    exec(LOOKUP_SOURCE, namespace)
    torch.manual_seed(0)
    model = get_peft_model(namespace["Lookup"](), LormaConfig(target_modules=["emb"], r=2, inflation="plus",
                                                              init_weights=False)).eval()
    ids = torch.randint(0, 20, (2, 6))
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"ids": ids, "y": model(ids).detach()}, tmp_path / "io.pt")
    (tmp_path / "load.py").write_text(LOAD_LOOKUP)
    result = fresh_python.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "adapter"),
                               str(tmp_path / "io.pt")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------------- tied embeddings
def tiny_tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=120, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def tied_reference(model: nn.Module, table: torch.Tensor, ids: torch.Tensor, tied: bool = True) -> torch.Tensor:
    """Logits of the base model with embedding table ``table`` (and, if ``tied``, the same table as lm_head)."""
    params = {"model.embed_tokens.weight": table}
    if tied:
        params["lm_head.weight"] = table
    return functional_call(model, params, (ids,), tie_weights=False).logits


@pytest.mark.parametrize("inflation", INFLATIONS)
def test_ensure_weight_tying_adapts_the_output_layer_through_the_tie(inflation: str) -> None:
    """lm_head computes E0 I(BA)^T h: unmerged = merged = the model with the merged table in both places, the
    gradients of A, B are those of that model, and merge_and_unload keeps one tied weight."""
    base = tiny_tied_llama().double()
    reference_model = copy.deepcopy(base)
    model = quiet_peft_model(base, LormaConfig(target_modules=["embed_tokens", "lm_head"], r=2, alpha=2.0,
                                               inflation=inflation, init_weights=False, ensure_weight_tying=True))
    model.double()
    emb, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    assert isinstance(emb, Embedding) and isinstance(head, TiedLinear)  # lm_head: through the tie, no own adapter
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "base_model.model.model.embed_tokens.lorma_A.default", "base_model.model.model.embed_tokens.lorma_B.default"]
    ids = torch.randint(0, 120, (2, 7))
    E0 = emb.get_base_layer().weight.detach().clone()

    A = emb.lorma_A["default"].detach().clone().requires_grad_(True)
    B = emb.lorma_B["default"].detach().clone().requires_grad_(True)
    table = E0 @ reference_inflation(A, B, inflation, emb.scaling["default"]).T
    expected = tied_reference(reference_model, table, ids)
    expected.square().mean().backward()

    logits = model(ids).logits
    assert rel_err(logits, expected) < 1e-10
    assert rel_err(logits, tied_reference(reference_model, table, ids, tied=False)) > 1e-4  # the head is adapted
    logits.square().mean().backward()
    assert rel_err(emb.lorma_A["default"].grad, A.grad) < 1e-9
    assert rel_err(emb.lorma_B["default"].grad, B.grad) < 1e-9

    with model.disable_adapter():
        assert rel_err(model(ids).logits, tied_reference(reference_model, E0, ids)) < 1e-12
    model.merge_adapter()
    assert head.merged and rel_err(emb.get_base_layer().weight, table) < 1e-12
    assert rel_err(model(ids).logits, expected) < 1e-10
    model.unmerge_adapter()
    assert rel_err(emb.get_base_layer().weight, E0) < 1e-12
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and merged.config.tie_word_embeddings
    assert type(merged.lm_head) is nn.Linear
    assert rel_err(merged(ids).logits, expected) < 1e-10


def test_tied_gpt2_is_found_by_the_weight_not_the_name() -> None:
    """GPT-2's wte is not one of peft's embedding names (embed_tokens, lm_head); the tie is found all the same."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).eval()
    reference_model = copy.deepcopy(base)
    model = quiet_peft_model(base, LormaConfig(target_modules=["wte"], r=2, init_weights=False,
                                               ensure_weight_tying=True))
    emb = model.base_model.model.transformer.wte
    assert isinstance(model.base_model.model.lm_head, TiedLinear)
    ids = torch.randint(0, 50, (2, 5))
    table = emb.get_base_layer().weight.detach().double() @ transform(emb).T
    expected = functional_call(reference_model, {"transformer.wte.weight": table.float(),
                                                 "lm_head.weight": table.float()}, (ids,), tie_weights=False).logits
    assert rel_err(model(ids).logits, expected) < 1e-5
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.transformer.wte.weight
    assert rel_err(merged(ids).logits, expected) < 1e-5


def test_without_ensure_weight_tying_merging_a_tied_layer_is_refused() -> None:
    """The unmerged model adapts the embedding alone (lm_head keeps E0); merging would change lm_head: refused,
    before any weight changes. The same for an adapted lm_head, whose weight is the embedding's."""
    base = tiny_tied_llama().double()
    reference_model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"'model.embed_tokens' shares its weight with \['lm_head'\]"):
        model = get_peft_model(base, LormaConfig(target_modules=["embed_tokens"], r=2, init_weights=False))
    model.double()
    emb = model.base_model.model.model.embed_tokens
    E0 = emb.get_base_layer().weight.detach().clone()
    ids = torch.randint(0, 120, (2, 7))
    untied = tied_reference(reference_model, E0 @ transform(emb).T, ids, tied=False)
    assert rel_err(model(ids).logits, untied) < 1e-10
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"cannot merge: module 'model.embed_tokens' shares its weight with "
                                             r"\['lm_head'\].*ensure_weight_tying=True"):
            merge()
        assert torch.equal(emb.get_base_layer().weight, E0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head_only = get_peft_model(tiny_tied_llama(), LormaConfig(target_modules=["lm_head"], r=2))
    with pytest.raises(ValueError, match=r"module 'lm_head' shares its weight with \['model.embed_tokens'\]"):
        head_only.merge_adapter()


TIED_LOAD = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM
    import lorma  # registers LoRMA with peft
    from lorma.layers.embedding import TiedLinear

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=120, tie_word_embeddings=True)
    saved = torch.load(sys.argv[2])
    model = PeftModel.from_pretrained(LlamaForCausalLM(config).eval(), sys.argv[1])
    assert isinstance(model.base_model.model.lm_head, TiedLinear)
    assert (model(saved["ids"]).logits - saved["logits"]).abs().max().item() < 1e-5
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert (merged(saved["ids"]).logits - saved["logits"]).abs().max().item() < 1e-5
    print("ok")
    """
)


def test_tied_adapter_saves_and_loads_in_a_fresh_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = quiet_peft_model(tiny_tied_llama(), LormaConfig(target_modules=["embed_tokens", "q_proj"], r=2,
                                                            inflation="pi", init_weights=False,
                                                            ensure_weight_tying=True))
    ids = torch.randint(0, 120, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "io.pt")
    (tmp_path / "load.py").write_text(TIED_LOAD)
    result = fresh_python.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "adapter"),
                               str(tmp_path / "io.pt")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_deleting_the_adapter_unties_the_output_layer() -> None:
    model = quiet_peft_model(tiny_tied_llama(), LormaConfig(target_modules=["embed_tokens"], r=2,
                                                            init_weights=False, ensure_weight_tying=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", LormaConfig(target_modules=["embed_tokens"], r=2, init_weights=False,
                                               ensure_weight_tying=True))
    head = model.base_model.model.lm_head
    assert sorted(head.tied_adapters) == ["default", "other"]
    model.base_model.delete_adapter("default")
    assert sorted(head.tied_adapters) == ["other"]


def test_tied_adapter_loads_with_low_cpu_mem_usage_and_deep_copies(tmp_path: Path) -> None:
    """The tie is rebuilt when peft injects from the checkpoint's keys (low_cpu_mem_usage), and a deep copy's output
    layer follows the copy's embedding, not the original's."""
    from peft import PeftModel

    torch.manual_seed(0)
    base_state = tiny_tied_llama().state_dict()

    def fresh() -> nn.Module:
        model = tiny_tied_llama()
        model.load_state_dict(base_state)
        return model

    model = quiet_peft_model(fresh(), LormaConfig(target_modules=["embed_tokens"], r=2, init_weights=False,
                                                  ensure_weight_tying=True))
    ids = torch.randint(0, 120, (2, 5))
    expected = model(ids).logits.detach()
    model.save_pretrained(tmp_path, save_embedding_layers=False)
    loaded = PeftModel.from_pretrained(fresh(), tmp_path, low_cpu_mem_usage=True)
    assert isinstance(loaded.base_model.model.lm_head, TiedLinear)
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-6)
    clone = copy.deepcopy(model)
    assert clone.base_model.model.lm_head.source is clone.base_model.model.model.embed_tokens
    with torch.no_grad():
        model.base_model.model.model.embed_tokens.lorma_B["default"].zero_()  # changes the original only
    assert torch.allclose(clone(ids).logits, expected, atol=1e-6)
