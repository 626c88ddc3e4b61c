"""Adapter dtypes as peft's LoRA has them: ``autocast_adapter_dtype=True`` (default) float32 adapters,
``False`` adapters in a float16 / bfloat16 base's dtype; creating, adding, saving and loading all follow it."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import reference_inflation
from lorma import LormaConfig
from lorma.layers.base import LormaLayer
from test_adapter_formula import INFLATIONS, SIDES, TwoLayer, dense_forward, linear_weight

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def lorma_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lorma_" in n}


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_dtype_on_create_add_save_and_load(
    tiny_llama, tmp_path, dtype: torch.dtype, autocast_adapter_dtype: bool, low_cpu_mem_usage: bool
) -> None:
    """The cases of peft's generic tuner test (tests/test_custom_models.py::test_adapter_dtype_autocast)."""
    expected = torch.float32 if autocast_adapter_dtype else dtype
    config = LormaConfig(r=4, target_modules=["q_proj", "up_proj"], init_weights=False)
    model = get_peft_model(copy.deepcopy(tiny_llama).to(dtype), config, autocast_adapter_dtype=autocast_adapter_dtype)
    model.add_adapter("other", config, autocast_adapter_dtype=autocast_adapter_dtype)
    params = lorma_params(model)
    assert len(params) == 2 * 2 * 2 * 2  # 2 layers x 2 modules x (A, B) x 2 adapters
    assert {p.dtype for p in params.values()} == {expected}
    saved = {n: p.detach().clone() for n, p in params.items()}
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(
        copy.deepcopy(tiny_llama).to(dtype),
        tmp_path,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    loaded.load_adapter(
        tmp_path / "other",
        adapter_name="other",
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
    params = lorma_params(loaded)
    assert {p.dtype for p in params.values()} == {expected}
    assert set(params) == set(saved)
    for name, value in saved.items():  # the saved values come back (the file holds them in their dtype)
        assert torch.equal(params[name].detach().to(value.dtype), value), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loading_float32_weights_into_half_adapters_rounds_once(tiny_llama, tmp_path, dtype: torch.dtype) -> None:
    """An adapter trained in float32 loads into a half-precision base with autocast off: rounded to its dtype."""
    config = LormaConfig(r=4, target_modules=["down_proj"], init_weights=False)
    trained = get_peft_model(copy.deepcopy(tiny_llama), config)
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_llama).to(dtype), tmp_path, autocast_adapter_dtype=False)
    reference = lorma_params(trained)
    for name, param in lorma_params(loaded).items():
        assert param.dtype == dtype
        assert torch.equal(param, reference[name].detach().to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inflation", ["plus", "pi"])
def test_identity_at_init_in_the_adapter_dtype(dtype: torch.dtype, inflation: str) -> None:
    """plus starts at exactly I in any dtype (B = 0); pi's s pi(BA) = I is rounded once to the dtype."""
    torch.manual_seed(0)
    base = TwoLayer(d_in=16, d_hidden=24).to(dtype)
    x = torch.randn(5, 16, dtype=dtype)
    with torch.no_grad():
        ref = base.proj(x)
    config = LormaConfig(r=4, alpha=6, inflation=inflation, target_modules=["proj"])  # s = 1.5: 1/sqrt(s) inexact
    model = get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    assert layer.lorma_A["default"].dtype == dtype
    A, B = layer.lorma_A["default"], layer.lorma_B["default"]
    transform = reference_inflation(A, B, inflation, layer.scaling["default"])
    eye = torch.eye(24, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == dtype
    if inflation == "plus":
        assert torch.equal(transform, eye)
        assert torch.equal(out, ref)
    else:
        # A[0, 0] and B[:, 0] each carry one rounding to the dtype: the transform is c I with |c - 1| <= 3 eps
        assert (transform - eye).abs().max().item() <= 3 * EPS[dtype]
        assert torch.allclose(out.double(), ref.double(), rtol=6 * EPS[dtype], atol=0)
    # with the default (float32 adapters) the identity of pi is exact up to float32 rounding
    model32 = get_peft_model(copy.deepcopy(base), config)
    layer32 = model32.base_model.model.proj
    assert layer32.lorma_A["default"].dtype == torch.float32
    transform32 = reference_inflation(
        layer32.lorma_A["default"], layer32.lorma_B["default"], inflation, layer32.scaling["default"]
    )
    assert (transform32 - eye).abs().max().item() <= 3 * EPS[torch.float32]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", INFLATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_adapters_forward_merge_unmerge(dtype: torch.dtype, inflation: str, side: str) -> None:
    """peft's forward-in-half-precision-without-autocast case: every forward path, merge, unmerge, unload."""
    torch.manual_seed(0)
    base = TwoLayer(d_in=16, d_hidden=24).to(dtype)
    config = LormaConfig(r=4, alpha=8, inflation=inflation, side=side, target_modules=["proj"], init_weights=False)
    model = get_peft_model(base, config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    w0 = linear_weight(layer).clone()
    x = torch.randn(7, 16, dtype=dtype)
    expected = dense_forward(layer, "default", x)  # float64 formula on the half-precision values
    # rounding costs at most 0.96 eps * max over these cases; the adapter moves the output by 60 to 2000 eps * max
    # (30 eps, the old bound, let an adapter half skipped through)
    tol = 4 * EPS[dtype] * expected.abs().max().item()
    with torch.no_grad():
        outputs = {"chosen": layer(x)}
        if inflation != "plus":
            bounds = layer.lorma_variant["default"].inflation
            bounds.max_dense_bytes = 1  # pi: the bounded FFT path (float32 inside); none: its low-rank form
            outputs["bounded"] = layer(x)
            bounds.max_dense_bytes = LormaConfig().max_dense_bytes
    for path, out in outputs.items():
        assert out.dtype == dtype, path
        assert (out.double() - expected).abs().max().item() <= tol, path
    model.merge_adapter()
    with torch.no_grad():
        merged = layer(x)
    assert (merged.double() - expected).abs().max().item() <= tol
    model.unmerge_adapter()
    assert torch.equal(linear_weight(layer), w0)  # a half-precision weight is restored from its copy, bit for bit
    loss = model(x).float().square().mean()
    loss.backward()
    grads = [p.grad for p in lorma_params(model).values()]
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    unloaded = model.merge_and_unload()
    assert unloaded.proj.weight.dtype == dtype


def test_half_adapters_on_gpt2_fused_c_attn(tiny_gpt2) -> None:
    """GPT-2's fused c_attn (Conv1D) in bfloat16 with bfloat16 adapters: the formula part by part."""
    model = get_peft_model(
        tiny_gpt2.to(torch.bfloat16), LormaConfig(r=4, init_weights=False), autocast_adapter_dtype=False
    )
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LormaLayer) and layer.fused["default"] == (3, [0, 2])
    assert layer.lorma_A["default"].dtype == torch.bfloat16
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    expected = dense_forward(layer, "default", x)
    with torch.no_grad():
        out = layer(x)
    assert (out.double() - expected).abs().max().item() <= 30 * EPS[torch.bfloat16] * expected.abs().max().item()


@pytest.mark.parametrize("inflation", ["pi", "none"])
def test_training_step_under_cpu_bf16_autocast(inflation: str) -> None:
    """Trainer's ``bf16=True`` on a CPU (Accelerate's mixed precision) runs forward and backward under autocast.
    The dense transform's recomputing backward gets a bf16 gradient and rebuilds ``M`` in float32: the step must
    run and give the gradients of the plain (saved-``M``) graph under the same autocast, to bf16's precision."""
    from lorma.functional import apply_dense_recomputed

    torch.manual_seed(0)
    d, r, n = 24, 4, 10
    A = (0.3 * torch.randn(r, d)).requires_grad_()
    B = (0.3 * torch.randn(d, r)).requires_grad_()
    h = torch.randn(n, d, requires_grad=True)
    build = {"pi": lambda a, b: torch.eye(d) + 0.5 * (b @ a).roll(1, dims=1), "none": lambda a, b: b @ a}[inflation]
    grads = []
    for recompute in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = apply_dense_recomputed(h, A, B, build) if recompute else torch.nn.functional.linear(h, build(A, B))
        assert y.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(y.float().square().sum(), (h, A, B)))
    for got, want, x in zip(grads[0], grads[1], (h, A, B)):
        assert got.dtype == x.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
