"""QLoRMA: LoRMA on bitsandbytes 4-bit (nf4) and 8-bit bases, on the CPU.

The forward must equal the LoRMA formula applied around the quantized layer (computed here independently),
never dequantize W0, train only the adapter, and merge both ways (re-quantized, or float on request).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

from conftest import reference_inflation
from lorma import LormaConfig

bnb = pytest.importorskip("bitsandbytes")

import lorma.layers.bnb as LB  # noqa: E402

KINDS = ["4bit", "8bit"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def quantized_linear(kind: str, d_in: int, d_out: int) -> nn.Module:
    lin = nn.Linear(d_in, d_out)
    if kind == "4bit":
        q = bnb.nn.Linear4bit(d_in, d_out, bias=True, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(d_in, d_out, bias=True, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # moving to a device quantizes


def adapted(kind: str, inflation: str, side: str, d_in: int = 48, d_out: int = 40) -> nn.Module:
    model = nn.Sequential(quantized_linear(kind, d_in, d_out))
    cfg = LormaConfig(r=4, alpha=8, inflation=inflation, side=side, target_modules=["0"], init_weights=False)
    return get_peft_model(model, cfg)


def expected_output(layer, x: torch.Tensor) -> torch.Tensor:
    """The formula around the quantized layer: I(BA) (Q(x) - b) + b (pre) or Q(I(BA) x) (post)."""
    base = layer.get_base_layer()
    M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(),
                            layer.inflation["default"], layer.scaling["default"]).float()
    with torch.no_grad():
        if layer.side["default"] == "pre":
            b = base.bias.detach()
            return (base(x) - b) @ M.T + b
        return base(x @ M.T)


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("inflation", ["plus", "pi", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_the_formula_around_the_quantized_layer(monkeypatch, kind: str, inflation: str, side: str) -> None:
    model = adapted(kind, inflation, side)
    layer = model.base_model.model[0]
    assert isinstance(layer, LB.QuantLinear) and layer.quant_kind == kind

    def refuse(*args, **kwargs):
        raise AssertionError("W0 was dequantized in forward")

    # many tokens: the float layer would fold the dense transform into W0 here; the quantized one must not
    x = torch.randn(4, 300, 48)
    monkeypatch.setattr(LB, "dequantized_weight", refuse)
    out = layer(x)
    out.square().mean().backward()
    monkeypatch.undo()
    assert rel_err(out.detach(), expected_output(layer, x)) < (2e-3 if kind == "8bit" else 1e-5)
    assert layer.lorma_A["default"].grad is not None and layer.lorma_B["default"].grad is not None
    if kind == "4bit":  # and it is LoRMA of the dequantized weight
        W0 = LB.dequantized_weight(layer.get_base_layer()).double()
        M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(),
                                inflation, layer.scaling["default"])
        W = M @ W0 if side == "pre" else W0 @ M
        b = layer.get_base_layer().bias.detach().double()
        assert rel_err(out.detach(), x.double() @ W.T + b) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_training_changes_only_the_adapter(kind: str) -> None:
    model = adapted(kind, "pi", "pre")
    layer = model.base_model.model[0]
    packed = layer.get_base_layer().weight.data.clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(n for n, _ in model.named_parameters() if "lorma_" in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, 48), torch.randn(16, 40)
    losses = []
    for _ in range(5):
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.get_base_layer().weight.data, packed)


@pytest.mark.parametrize("inflation", ["plus", "pi"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_and_unmerge_restores_exactly(kind: str, inflation: str) -> None:
    model = adapted(kind, inflation, "pre")
    layer = model.base_model.model[0]
    x = torch.randn(10, 48)
    with torch.no_grad():
        adapter_out = model(x)
        original = layer.get_base_layer().weight
        original_bytes = original.data.clone()
        W0 = LB.dequantized_weight(layer.get_base_layer())
        delta = layer.get_delta_weight("default")
        M = reference_inflation(layer.lorma_A["default"], layer.lorma_B["default"], inflation,
                                layer.scaling["default"])
        assert rel_err(delta, (M - torch.eye(40, dtype=torch.float64)) @ W0.double()) < 1e-5
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.merge()
        assert LB.quantized_kind(layer.get_base_layer()) == kind  # still quantized
        merged_out = model(x)
        merged_float = W0 + delta
        requantized = LB.dequantized_weight(layer.get_base_layer())
        if kind == "4bit":
            # the merge loses exactly one nf4 rounding of the merged float weight, nothing more: the same error
            # as bitsandbytes quantizing that weight afresh (nf4 is coarse: tens of percent for such blocks)
            settings = layer.get_base_layer().weight
            q, state = bnb.functional.quantize_4bit(
                merged_float.contiguous(), quant_type=settings.quant_type, blocksize=settings.blocksize,
                compress_statistics=settings.compress_statistics,
            )
            fresh = bnb.functional.dequantize_4bit(q, state)
            assert rel_err(requantized, merged_float) <= rel_err(fresh, merged_float) * 1.001 + 1e-7
            b = layer.get_base_layer().bias
            assert rel_err(merged_out, x @ requantized.T + b) < 1e-6
        else:  # int8 rows: close to the adapter's output, not equal
            assert rel_err(requantized, merged_float) < 0.01
            assert rel_err(merged_out, adapter_out) < 0.02
        layer.unmerge()
        assert layer.get_base_layer().weight is original
        assert torch.equal(layer.get_base_layer().weight.data, original_bytes)
        assert rel_err(model(x), adapter_out) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_dequantize_gives_float_model(kind: str) -> None:
    model = adapted(kind, "pi", "post")
    layer = model.base_model.model[0]
    x = torch.randn(10, 48)
    with torch.no_grad():
        W0 = LB.dequantized_weight(layer.get_base_layer()).double()
        M = reference_inflation(layer.lorma_A["default"], layer.lorma_B["default"], "pi", layer.scaling["default"])
        bias = layer.get_base_layer().bias.detach().clone()
        plain = model.merge_and_unload(dequantize=True)
    merged = plain[0]
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert rel_err(merged.weight.detach(), W0 @ M) < 1e-6
    assert torch.equal(merged.bias.detach(), bias)
    with torch.no_grad():
        assert rel_err(plain(x), x.double() @ (W0 @ M).T + bias.double()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_base_is_the_float_layer(kind: str) -> None:
    """The quantized layer differs from the float one in its weight object only: once the base is dequantized,
    the same layer folds a dense transform into W0 when that is cheaper, and merges and unmerges as a float layer."""
    model = adapted(kind, "pi", "pre")
    layer = model.base_model.model[0]
    variant = layer.lorma_variant["default"]
    x = torch.randn(4, 300, 48)  # many tokens: folding is the cheaper way for pi here
    with torch.no_grad():
        assert variant.folded_forward(layer, "default", x) is None  # never reads W0 in forward while quantized
        layer.dequantize_base()
        assert type(layer.base_weight) is LB.FloatWeight and layer.quant_kind is None
        W0 = layer.get_base_layer().weight.detach().double()
        M = reference_inflation(layer.lorma_A["default"], layer.lorma_B["default"], "pi", layer.scaling["default"])
        expected = x.double() @ (M @ W0).T + layer.get_base_layer().bias.detach().double()
        folded = variant.folded_forward(layer, "default", x)
        assert folded is not None and rel_err(folded, expected) < 1e-5
        assert rel_err(model(x), expected) < 1e-5
        w0 = layer.get_base_layer().weight.detach().clone()
        layer.merge()  # a float merge: no re-quantization warning, a kept copy for pi
        assert rel_err(model(x), expected) < 1e-5
        layer.unmerge()
        assert torch.equal(layer.get_base_layer().weight, w0)


def test_fused_post_on_quantized_is_refused() -> None:
    model = nn.Sequential(quantized_linear("4bit", 16, 48))
    cfg = LormaConfig(r=2, side="post", target_modules=["0"], fused_parts={"0": {"num_parts": 3, "parts": [0, 2]}})
    with pytest.raises(ValueError, match=r"module '0'.*fused parts of a quantized layer"):
        get_peft_model(model, cfg)


# ------------------------------------------------------------------ the real SmolLM2-135M in 4 bit
# (smollm2_plain: conftest's fp32 copy of the packaged GGUF)
@pytest.mark.slow
def test_real_smollm2_nf4(smollm2_plain: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    fp32 = AutoModelForCausalLM.from_pretrained(str(smollm2_plain), dtype=torch.float32)
    fp32_bytes = LB.module_bytes(fp32)
    del fp32
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_plain), dtype=torch.float32, quantization_config=qcfg)
    q4_bytes = LB.module_bytes(base)
    # 4-bit linear layers; the tied embedding / lm_head (28 M of 135 M parameters) and norms stay fp32
    assert q4_bytes < 0.45 * fp32_bytes
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
    model = get_peft_model(base, LormaConfig(r=8, alpha=16, inflation="plus", target_modules=["q_proj", "v_proj"]))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LB.QuantLinear) and q.quant_kind == "4bit"
    with torch.no_grad():
        out = model(ids).logits
        with model.disable_adapter():
            base_out = model(ids).logits
    assert torch.equal(out, base_out)  # B = 0: exactly the quantized base
    # ref came from bitsandbytes' repacked CPU inference kernel (bf16 arithmetic), which the LoRMA model
    # leaves for the autograd-capable layout: the weights read back from it must be the same
    assert rel_err(out, ref) < 0.03
    frozen = LB.dequantized_weight(q.get_base_layer()).clone()
    # still in eval mode, after an eval no-grad forward (where bitsandbytes may repack the weight for its CPU
    # inference kernel, which has no autograd): gradients must reach every adapter all the same
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(LB.dequantized_weight(q.get_base_layer()), frozen)
    first_v = model.base_model.model.model.layers[0].self_attn.v_proj
    assert first_v.lorma_B["default"].abs().sum() > 0  # the first layer's adapter trained too
    with torch.no_grad():
        adapted_logits = model(ids).logits
        plain = model.merge_and_unload(dequantize=True)
        assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
        # k_proj was not adapted and stays 4-bit
        assert LB.quantized_kind(plain.model.layers[0].self_attn.k_proj) == "4bit"
        assert rel_err(plain(ids).logits, adapted_logits) < 1e-4


def test_cpu_inference_repacking_is_undone() -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel (no autograd); LoRMA undoes it."""
    q = quantized_linear("4bit", 64, 64).eval()  # the packed kernel needs d_out divisible by 32
    if not getattr(q, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    W = LB.dequantized_weight(q).clone()
    x = torch.randn(5, 64)
    with torch.no_grad():
        q(x)
    assert q.weight.quant_state.packing_format_for_cpu
    model = get_peft_model(nn.Sequential(q), LormaConfig(r=2, target_modules=["0"], init_weights=False))
    layer = model.base_model.model[0]
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the gradient reaches the input again
    # the repacking itself rounds the block scales to bf16 (bitsandbytes), so W comes back to that rounding
    assert rel_err(LB.dequantized_weight(layer.get_base_layer()), W) < 5e-3
