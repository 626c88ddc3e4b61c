"""peft's protocol for LoRMA: merge/unmerge, multiple adapters, dtypes, save/load, bad input."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import fresh_python
from conftest import reference_inflation
from lorma import LormaConfig
from lorma.layers.base import LormaLayer
from test_adapter_formula import INFLATIONS, SIDES, TwoLayer, dense_forward, linear_weight, rel_err


def lorma_layers(model) -> list[LormaLayer]:
    return [m for m in model.modules() if isinstance(m, LormaLayer)]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", INFLATIONS)
def test_merge_unmerge(tiny_gpt2, inflation: str, side: str) -> None:
    originals = {n: p.detach().clone() for n, p in tiny_gpt2.named_parameters()}
    model = get_peft_model(tiny_gpt2, LormaConfig(r=4, alpha=8, inflation=inflation, side=side, init_weights=False))
    ids = torch.randint(0, 120, (2, 7))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        assert all(layer.merged for layer in lorma_layers(model))
        merged = model(input_ids=ids).logits
    assert rel_err(merged, unmerged) < 1e-5
    layer = lorma_layers(model)[0]
    kept_copy = bool(layer._weights_before_merge)
    assert kept_copy == (inflation != "plus")  # plus unmerges by Woodbury, no copy of W0 kept
    model.unmerge_adapter()
    for layer in lorma_layers(model):
        name = next(n for n, p in tiny_gpt2.named_parameters() if p is layer.get_base_layer().weight)
        name = name.replace(".base_layer", "")
        w = layer.get_base_layer().weight
        if inflation == "plus":
            assert rel_err(w, originals[name]) < 1e-5
        else:
            assert torch.equal(w, originals[name])


def test_woodbury_unmerge_is_exact_to_rounding() -> None:
    model = get_peft_model(TwoLayer(d_hidden=40), LormaConfig(r=6, alpha=12, target_modules=["proj"],
                                                              init_weights=False))
    layer = model.base_model.model.proj
    w0 = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    assert rel_err(layer.get_base_layer().weight, w0) > 1e-2  # the merge did change W
    layer.unmerge()
    assert rel_err(layer.get_base_layer().weight, w0) < 1e-6


def test_ill_conditioned_plus_keeps_a_copy() -> None:
    """If I + sBA is (nearly) singular, W0 cannot come back from the merged weight: keep it instead."""
    model = get_peft_model(TwoLayer(), LormaConfig(r=1, alpha=1, target_modules=["proj"], init_weights=False))
    layer = model.base_model.model.proj
    with torch.no_grad():
        a = torch.randn(20)
        layer.lorma_A["default"].copy_(a.unsqueeze(0))
        layer.lorma_B["default"].copy_((-a / a.dot(a)).unsqueeze(1))  # 1 + s A B = 0: I + sBA singular
    w0 = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight, w0)


def test_safe_merge_refuses_non_finite() -> None:
    model = get_peft_model(TwoLayer(), LormaConfig(r=2, target_modules=["proj"], init_weights=False))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lorma_B["default"][0, 0] = float("inf")
    w0 = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=r"proj.*default.*non-finite"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, w0)
    assert not layer.merged


@pytest.mark.parametrize("inflation", INFLATIONS)
def test_merge_and_unload_gives_plain_model(tiny_bert, inflation: str) -> None:
    ids = torch.randint(0, 120, (2, 8))
    model = get_peft_model(tiny_bert, LormaConfig(r=4, inflation=inflation, side="post", init_weights=False))
    with torch.no_grad():
        adapted = model(input_ids=ids).last_hidden_state
    merged = model.merge_and_unload()
    assert not lorma_layers(merged)
    assert type(merged.encoder.layer[0].attention.self.query) is torch.nn.Linear
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids).last_hidden_state, adapted) < 1e-5


def test_multiple_adapters(tiny_bert) -> None:
    ids = torch.randint(0, 120, (2, 8))
    with torch.no_grad():
        base_out = tiny_bert(input_ids=ids).last_hidden_state
    model = get_peft_model(tiny_bert, LormaConfig(r=4, inflation="plus", init_weights=False), adapter_name="one")
    model.add_adapter("two", LormaConfig(r=2, inflation="pi", side="post", init_weights=False))
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    assert set(layer.lorma_A) == {"one", "two"}
    assert layer.lorma_A["two"].shape == (2, 32)
    # only the active adapter trains
    assert layer.lorma_A["one"].requires_grad and not layer.lorma_A["two"].requires_grad

    x = torch.randn(3, 32)
    model.set_adapter("two")
    assert layer.lorma_A["two"].requires_grad and not layer.lorma_A["one"].requires_grad
    assert rel_err(layer(x), dense_forward(layer, "two", x)) < 1e-5
    with torch.no_grad():
        out_b = model(input_ids=ids).last_hidden_state
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, base_out)

    # both active compose as merging them in order does: W = W0 I_two applied after I_one W0, i.e. I_one W0 I_two
    model.base_model.set_adapter(["one", "two"])
    W0 = linear_weight(layer).double()
    Ma = reference_inflation(layer.lorma_A["one"].detach(), layer.lorma_B["one"].detach(), "plus", layer.scaling["one"])
    Mb = reference_inflation(layer.lorma_A["two"].detach(), layer.lorma_B["two"].detach(), "pi", layer.scaling["two"])
    expected = x.double() @ (Ma @ W0 @ Mb).T + layer.get_base_layer().bias.detach().double()
    assert rel_err(layer(x), expected) < 1e-5
    with torch.no_grad():
        both = model(input_ids=ids).last_hidden_state
        model.base_model.merge_adapter(["one", "two"])
        assert rel_err(model(input_ids=ids).last_hidden_state, both) < 1e-5
        model.base_model.unmerge_adapter()

    model.delete_adapter("one")
    assert set(layer.lorma_A) == {"two"} and "one" not in layer.scaling
    model.set_adapter("two")
    with torch.no_grad():
        assert rel_err(model(input_ids=ids).last_hidden_state, out_b) < 1e-6
    plain = model.unload()
    with torch.no_grad():  # "one" (plus) went through a Woodbury unmerge above: W0 back to rounding
        assert rel_err(plain(input_ids=ids).last_hidden_state, base_out) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inflation", INFLATIONS)
def test_low_precision_bases(tiny_llama, dtype: torch.dtype, inflation: str) -> None:
    ids = torch.randint(0, 120, (2, 6))
    ref_model = get_peft_model(copy.deepcopy(tiny_llama), LormaConfig(r=4, inflation=inflation, init_weights=False))
    low = copy.deepcopy(ref_model).to(dtype)
    for layer in lorma_layers(low):  # peft's default: adapters in float32 on a low-precision base
        for name in layer.lorma_A:
            layer.lorma_A[name] = layer.lorma_A[name].float()
            layer.lorma_B[name] = layer.lorma_B[name].float()
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
        out = low(input_ids=ids).logits
    assert out.dtype == dtype
    assert rel_err(out.float(), ref) < 5e-2
    # training step in low precision: finite grads on adapter weights only
    loss = low(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in low.named_parameters() if "lorma_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    # merge keeps the base dtype
    merged = low.merge_and_unload()
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == dtype


def test_get_peft_model_on_bf16_base_and_autocast(tiny_bert) -> None:
    fp32 = get_peft_model(copy.deepcopy(tiny_bert), LormaConfig(r=4, init_weights=False))
    base = tiny_bert.to(torch.bfloat16)
    model = get_peft_model(base, LormaConfig(r=4, inflation="pi"))
    layer = lorma_layers(model)[0]
    assert layer.lorma_A["default"].dtype == torch.float32
    ids = torch.randint(0, 120, (2, 6))
    with torch.no_grad():
        ref = base(input_ids=ids).last_hidden_state  # adapted model at init = base
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).last_hidden_state.float(), ref.float(), atol=2e-2)
    query = fp32.base_model.model.encoder.layer[0].attention.self.query
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert query(torch.randn(3, 32)).dtype == torch.bfloat16
        out = fp32(input_ids=ids).last_hidden_state
        out.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in fp32.named_parameters() if p.requires_grad)


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import lorma  # registers LORMA with peft
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    ids = torch.load(sys.argv[3])
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[4])
    """
)


@pytest.mark.parametrize("inflation", INFLATIONS)
def test_save_and_load_in_fresh_process_bit_for_bit(tiny_gpt2, tmp_path, inflation: str) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_gpt2.save_pretrained(base_dir)
    model = get_peft_model(tiny_gpt2, LormaConfig(r=4, inflation=inflation, side="post", init_weights=False)).eval()
    model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").exists()
    from safetensors.torch import load_file

    keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    assert keys and all(".lorma_A" in k or ".lorma_B" in k for k in keys)
    assert not any(k.endswith(".default") for k in keys)
    ids = torch.randint(0, 120, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = tmp_path / "load.py"
    script.write_text(SCRIPT)
    fresh_python.run(
        [sys.executable, str(script), base_dir, adapter_dir, tmp_path / "ids.pt", tmp_path / "o.pt"],
        check=True,
    )
    assert torch.equal(torch.load(tmp_path / "o.pt"), expected)


def test_load_into_other_base_model_is_refused(tiny_bert, tmp_path) -> None:
    from transformers import BertConfig, BertModel

    get_peft_model(tiny_bert, LormaConfig(r=4)).save_pretrained(tmp_path / "adapter")
    other = BertModel(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=48, vocab_size=120))
    with pytest.raises(ValueError, match=r"does not fit.*query.*shape"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    deeper = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=48, vocab_size=120))
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        PeftModel.from_pretrained(deeper, tmp_path / "adapter")


def test_lora_config_is_not_a_lorma_config(tiny_bert, tmp_path) -> None:
    get_peft_model(tiny_bert, LoraConfig(r=2, target_modules=["query"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LORA.*not 'LORMA'"):
        LormaConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"inflation": "times"}, "unknown inflation 'times'"),
        ({"side": "middle"}, "unknown side 'middle'"),
        ({"dropout": 1.5}, "dropout"),
        ({"alpha": 0}, "alpha"),
        ({"rank_pattern": {"query": 0}}, r"rank_pattern\['query'\]"),
        ({"fused_parts": {"c_attn": {"num_parts": 3, "parts": [3]}}}, r"fused_parts\['c_attn'\]"),
        ({"fused_parts": {"c_attn": {"parts": [0]}}}, r"fused_parts\['c_attn'\]"),
    ],
)
def test_bad_config_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LormaConfig(**kwargs)


def test_bad_targets(tiny_bert, tiny_gpt2) -> None:
    with pytest.raises(ValueError, match="not_a_module"):
        get_peft_model(tiny_bert, LormaConfig(target_modules=["not_a_module"]))
    with pytest.raises(ValueError, match=r"embeddings.LayerNorm' is a LayerNorm: LoRMA adapts"):
        get_peft_model(copy.deepcopy(tiny_bert), LormaConfig(target_modules=["embeddings.LayerNorm"]))
    weights_before = {n: p.clone() for n, p in tiny_gpt2.named_parameters()}
    with pytest.raises(ValueError, match=r"c_attn.*96.*5 equal fused parts"):
        get_peft_model(tiny_gpt2, LormaConfig(target_modules=["c_attn"],
                                              fused_parts={"c_attn": {"num_parts": 5, "parts": [0]}}))
    assert all(torch.equal(p, weights_before[n]) for n, p in tiny_gpt2.named_parameters())
