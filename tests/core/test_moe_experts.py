"""LoRMA on MoE expert parameters (``target_parameters``): per expert ``I(B_e A_e) W0_e`` / ``W0_e I(B_e A_e)``
against the dense formula in float64, for transformers 5's fused 3-D experts in both layouts."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.func import functional_call
from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM

import fresh_python
from conftest import reference_inflation
from lorma import LormaConfig, hotswap_adapter
from lorma.layers.experts import LormaExperts

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def tiny_mixtral(experts_implementation: str = "eager") -> MixtralForCausalLM:
    """Mixtral: experts (E, d_out, d_in), applied as F.linear(x, W[e]). The eager experts loop runs in float64
    (the default grouped_mm takes float32 / half only)."""
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=60,
                           experts_implementation=experts_implementation)
    return MixtralForCausalLM(config).eval()


def tiny_gpt_oss() -> GptOssForCausalLM:
    """gpt-oss: experts (E, d_in, d_out) with is_transposed=True, applied as x @ W[e] + bias[e]."""
    torch.manual_seed(0)
    config = GptOssConfig(hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=60, attn_implementation="eager", experts_implementation="eager")
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():  # transformers leaves them at zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith("_proj_bias"):
                param.normal_(std=0.1)
    return model


MODELS = {"mixtral": tiny_mixtral, "gpt_oss": tiny_gpt_oss}
# whether the model computes x @ W[e] (W[e] stored (d_in, d_out)), from the modeling code, not from lorma
STORED_TRANSPOSED = {"mixtral": False, "gpt_oss": True}
IDS = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(1))


def _adapted(base, inflation: str, side: str, **config):
    model = get_peft_model(copy.deepcopy(base), LormaConfig(r=3, alpha=6, inflation=inflation, side=side,
                                                            target_parameters=TARGETS, init_weights=False, **config))
    return model.double()


def _wrappers(model) -> dict[str, LormaExperts]:
    """Full parameter name (as in the base model) -> its wrapper."""
    return {m.module_name: m for m in model.modules() if isinstance(m, LormaExperts)}


def dense_weight(base_param: torch.Tensor, A, B, inflation: str, s: float, side: str, transposed: bool) -> torch.Tensor:
    """The adapted parameter from the formula, expert by expert, in float64 and in the parameter's layout."""
    experts = []
    for e in range(base_param.shape[0]):
        w0 = base_param[e].double()
        w0 = w0.T if transposed else w0  # nn.Linear layout (d_out, d_in)
        m = reference_inflation(A[e], B[e], inflation, s)
        w = m @ w0 if side == "pre" else w0 @ m
        experts.append(w.T if transposed else w)
    return torch.stack(experts)


def reference_logits(base, model, adapter: str = "default", grad_leaves: dict | None = None) -> torch.Tensor:
    """The base model (float64) run with every targeted parameter replaced by :func:`dense_weight`."""
    transposed = STORED_TRANSPOSED[base.config.model_type]
    reference = copy.deepcopy(base).double()
    weights = {}
    for key, layer in _wrappers(model).items():
        A, B = layer.lorma_A[adapter], layer.lorma_B[adapter]
        if grad_leaves is not None:
            A, B = grad_leaves[f"{key}.A"], grad_leaves[f"{key}.B"]
        else:
            A, B = A.detach(), B.detach()
        weights[key] = dense_weight(reference.get_parameter(key), A, B, layer.inflation[adapter],
                                    layer.scaling[adapter], layer.side[adapter], transposed)
    return functional_call(reference, weights, (), {"input_ids": IDS}).logits


CASES = [
    ("mixtral", "plus", "pre"),
    ("mixtral", "pi", "post"),
    ("mixtral", "none", "pre"),
    ("mixtral", "plus", "auto"),
    ("gpt_oss", "plus", "post"),
    ("gpt_oss", "pi", "pre"),
]


@pytest.mark.parametrize(("which", "inflation", "side"), CASES)
def test_forward_and_gradients_against_the_dense_formula(which: str, inflation: str, side: str) -> None:
    base = MODELS[which]()
    model = _adapted(base, inflation, side)
    wrappers = _wrappers(model)
    assert len(wrappers) == 2 * 2  # gate_up and down in both layers
    hidden, intermediate = base.config.hidden_size, base.config.intermediate_size
    for key, layer in wrappers.items():  # one expert's (d_out, d_in), read from the model's own sizes
        expected = (hidden, intermediate) if key.endswith("down_proj") else (2 * intermediate, hidden)
        assert (layer.out_features, layer.in_features) == expected, key
    out = model(input_ids=IDS).logits
    expected = reference_logits(base, model)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert (out - copy.deepcopy(base).double()(input_ids=IDS).logits).abs().max() > 1e-3  # the adapter matters

    out.square().mean().backward()
    leaves = {}
    for key, layer in wrappers.items():
        leaves[f"{key}.A"] = layer.lorma_A["default"].detach().clone().requires_grad_()
        leaves[f"{key}.B"] = layer.lorma_B["default"].detach().clone().requires_grad_()
    reference_logits(base, model, grad_leaves=leaves).square().mean().backward()
    for key, layer in wrappers.items():
        torch.testing.assert_close(layer.lorma_A["default"].grad, leaves[f"{key}.A"].grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.lorma_B["default"].grad, leaves[f"{key}.B"].grad, rtol=1e-9, atol=1e-12)
        assert layer.lorma_A["default"].grad.abs().sum() > 0 and layer.lorma_B["default"].grad.abs().sum() > 0


def test_auto_side_and_patterns_are_per_parameter() -> None:
    """side="auto" per parameter: gate_up (d_out = 2 I = 40 > d_in = H = 16) on the post side, down (d_out = 16 <
    d_in = 20) on the pre side, recorded in side_pattern; rank / alpha patterns match full parameter names."""
    base = tiny_mixtral()
    model = _adapted(base, "plus", "auto", rank_pattern={"down_proj": 2},
                     alpha_pattern={"layers.1.mlp.experts.down_proj": 1.0})
    config = model.peft_config["default"]
    wrappers = _wrappers(model)
    for key, layer in wrappers.items():
        is_down = key.endswith("down_proj")
        assert layer.side["default"] == ("pre" if is_down else "post"), key
        assert config.side_pattern[key.replace(".", r"\.")] == layer.side["default"]
        assert layer.r["default"] == (2 if is_down else 3)
        expected_alpha = 1.0 if key == "model.layers.1.mlp.experts.down_proj" else 6.0
        assert layer.scaling["default"] == expected_alpha / layer.r["default"]
    assert len(config.side_pattern) == len(wrappers) == 4
    torch.testing.assert_close(model(input_ids=IDS).logits, reference_logits(base, model), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("which", "inflation", "side"), [("mixtral", "plus", "pre"), ("gpt_oss", "pi", "post")])
def test_merge_unmerge_and_merge_and_unload(which: str, inflation: str, side: str) -> None:
    base = MODELS[which]()
    model = _adapted(base, inflation, side)
    originals = {k: copy.deepcopy(base).double().get_parameter(k) for k in _wrappers(model)}
    adapted = model(input_ids=IDS).logits.detach()
    model.merge_adapter()
    for key, layer in _wrappers(model).items():
        expected = dense_weight(originals[key], layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(),
                                inflation, layer.scaling["default"], side, STORED_TRANSPOSED[which])
        torch.testing.assert_close(layer.get_param(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model(input_ids=IDS).logits, adapted, rtol=1e-10, atol=1e-10)
    model.unmerge_adapter()
    for key, layer in _wrappers(model).items():
        torch.testing.assert_close(layer.get_param(), originals[key], rtol=1e-10, atol=1e-12)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LormaExperts) for m in merged.modules())
    assert type(merged.model.layers[0].mlp.experts).__name__.endswith("Experts")
    torch.testing.assert_close(merged(input_ids=IDS).logits, adapted, rtol=1e-10, atol=1e-10)


def test_adapters_switch_and_disable() -> None:
    base = tiny_mixtral()
    model = _adapted(base, "plus", "pre")
    torch.manual_seed(5)
    model.add_adapter("other", LormaConfig(r=2, alpha=4, inflation="pi", side="post", target_parameters=TARGETS,
                                           init_weights=False))
    model.double()
    first = model(input_ids=IDS).logits
    torch.testing.assert_close(first, reference_logits(base, model, "default"), rtol=1e-10, atol=1e-10)
    model.set_adapter("other")
    torch.testing.assert_close(model(input_ids=IDS).logits, reference_logits(base, model, "other"),
                               rtol=1e-10, atol=1e-10)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=IDS).logits, copy.deepcopy(base).double()(input_ids=IDS).logits)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert all(list(layer.lorma_A) == ["default"] for layer in _wrappers(model).values())
    torch.testing.assert_close(model(input_ids=IDS).logits, first)


def test_save_and_load_in_a_fresh_process(tmp_path: Path) -> None:
    base = tiny_mixtral()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), LormaConfig(r=3, alpha=6, inflation="pi", side="auto",
                                                            target_parameters=TARGETS, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    expected = model(input_ids=IDS).logits.detach()
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == TARGETS and saved["side_pattern"]
    script = f"""
import json, torch, lorma
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}).eval()
model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
ids = torch.tensor({IDS.tolist()})
print(json.dumps(model(input_ids=ids).logits.tolist()))
"""
    run = fresh_python.run([sys.executable, "-c", script], timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)


def test_hotswap_of_expert_adapters(tmp_path: Path) -> None:
    base = tiny_mixtral()
    for seed, alpha in ((1, 6.0), (2, 2.0)):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(base), LormaConfig(r=3, alpha=alpha, target_parameters=TARGETS,
                                                                init_weights=False))
        model.save_pretrained(tmp_path / str(seed))
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "1").eval()
    hotswap_adapter(model, tmp_path / "2")
    fresh = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "2").eval()
    torch.testing.assert_close(model(input_ids=IDS).logits, fresh(input_ids=IDS).logits, rtol=1e-5, atol=1e-6)


def test_every_experts_implementation_reads_the_adapted_weight() -> None:
    """transformers dispatches the experts' forward (eager loop, grouped_mm, batched_mm): each reads the fold."""
    outputs = {}
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        torch.manual_seed(3)
        model = get_peft_model(tiny_mixtral(implementation), LormaConfig(r=3, alpha=6, target_parameters=TARGETS,
                                                                         init_weights=False))
        outputs[implementation] = model(input_ids=IDS).logits.detach()
    base = tiny_mixtral()(input_ids=IDS).logits
    assert (outputs["eager"] - base).abs().max() > 1e-3
    for implementation in ("grouped_mm", "batched_mm"):
        torch.testing.assert_close(outputs[implementation], outputs["eager"], rtol=1e-4, atol=1e-5)


def test_with_target_modules_too() -> None:
    """Attention projections through target_modules and the experts through target_parameters, one adapter."""
    base = tiny_mixtral()
    model = _adapted(base, "plus", "pre", target_modules=["q_proj"])
    assert sum(isinstance(m, LormaExperts) for m in model.modules()) == 4
    out = model(input_ids=IDS).logits
    out.sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lorma_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("experts" in n for n in trainable)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"target_parameters": "experts.gate_up_proj"}, ValueError, "target_parameters must be a list"),
        ({"target_parameters": TARGETS, "variant": "dorma"}, ValueError, "plain LoRMA only; variant='dorma'"),
        ({"target_parameters": TARGETS, "dropout": 0.1}, ValueError, "dropout on the adapter.s inputs cannot act"),
    ],
)
def test_config_refuses(settings, error, match) -> None:
    with pytest.raises(error, match=match):
        LormaConfig(**settings)


def test_unknown_parameter_and_mixed_targets_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\['experts.up_proj'\] match no parameter of the model"):
        get_peft_model(tiny_mixtral(), LormaConfig(target_parameters=["experts.up_proj", "experts.down_proj"]))
    model = get_peft_model(tiny_mixtral(), LormaConfig(target_parameters=TARGETS))
    with pytest.raises(ValueError, match="must target the same ones"):
        model.add_adapter("other", LormaConfig(target_parameters=["experts.down_proj"]))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"target_parameters": ["input_layernorm.weight"]}, r"has shape \(16,\) .* adapts 2-D or 3-D"),
        ({"target_parameters": ["q_proj.weight"], "target_modules": ["q_proj"]}, "target it one way only"),
    ],
)
def test_parameters_that_cannot_be_adapted_are_refused(settings, match) -> None:
    model = tiny_mixtral()
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LormaConfig(**settings))


def test_a_2d_parameter_is_one_transform() -> None:
    """The router's (E, H) weight, applied as F.linear: a 2-D parameter gets one (A, B) pair, like a Linear."""
    base = tiny_mixtral()
    model = get_peft_model(copy.deepcopy(base), LormaConfig(r=2, alpha=4, inflation="pi", side="post",
                                                            target_parameters=["mlp.gate.weight"],
                                                            init_weights=False)).double()
    layer = model.base_model.model.model.layers[0].mlp.gate
    assert isinstance(layer, LormaExperts) and layer.lorma_A["default"].shape == (2, 16)
    reference = copy.deepcopy(base).double()
    weights = {}
    for i in range(2):
        wrapper = model.base_model.model.model.layers[i].mlp.gate
        m = reference_inflation(wrapper.lorma_A["default"].detach(), wrapper.lorma_B["default"].detach(), "pi", 2.0)
        weights[f"model.layers.{i}.mlp.gate.weight"] = reference.get_parameter(f"model.layers.{i}.mlp.gate.weight") @ m
    expected = functional_call(reference, weights, (), {"input_ids": IDS}).logits
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=1e-10, atol=1e-10)


def test_mixed_batches_and_weighted_adapters_refuse_expert_adapters() -> None:
    model = _adapted(tiny_mixtral(), "plus", "pre").eval()
    with pytest.raises(ValueError, match="expert parameters see routed tokens"):
        model(input_ids=IDS, adapter_names=["default", "__base__"])
    model.add_adapter("two", LormaConfig(target_parameters=TARGETS))
    with pytest.raises(ValueError, match="adapt target_parameters"):
        model.add_weighted_adapter(["default", "two"], [1.0, 1.0], "sum")


def test_bfloat16_experts_with_adapters_in_float32_or_bfloat16() -> None:
    """A bf16 model: the adapters stay float32 by default and take bf16 with autocast_adapter_dtype=False (as for
    Linear layers); the fold is computed in the adapter's dtype and handed to the experts in theirs."""
    base = tiny_mixtral().to(torch.bfloat16)  # (grouped_mm in bf16 needs 16-byte strides: d = 20 has 40)
    config = {"r": 3, "alpha": 6, "target_parameters": TARGETS, "init_weights": False}
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        torch.manual_seed(4)
        model = get_peft_model(copy.deepcopy(base), LormaConfig(**config), autocast_adapter_dtype=autocast)
        assert {layer.lorma_A["default"].dtype for layer in _wrappers(model).values()} == {dtype}
        out = model(input_ids=IDS).logits
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        out.float().square().mean().backward()
        assert all(layer.lorma_B["default"].grad is not None for layer in _wrappers(model).values())


def test_lora_export_refuses_expert_adapters() -> None:
    from lorma.export.lora import ExportError, lora_export

    with pytest.raises(ExportError, match="adapts expert parameters"):
        lora_export(get_peft_model(tiny_mixtral(), LormaConfig(target_parameters=TARGETS)), "default")


def test_mixed_batch_of_adapters_that_leave_the_experts_alone() -> None:
    """An expert adapter may be loaded (even active) while a mixed batch names only other adapters: the experts
    then run as the base model's for every row, as each row alone with its adapter active gives."""
    base = tiny_mixtral()
    torch.manual_seed(6)
    model = get_peft_model(copy.deepcopy(base), LormaConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                            init_weights=False), "attn")
    model.add_adapter("moe", LormaConfig(r=2, target_parameters=TARGETS, init_weights=False))
    model.set_adapter("moe")
    model.eval()
    names = ["attn", "__base__"]
    mixed = model(input_ids=IDS, adapter_names=names).logits
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(input_ids=IDS[row : row + 1]).logits
        else:
            model.set_adapter(name)
            alone = model(input_ids=IDS[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-6)
    assert (mixed[0] - mixed.new_tensor(base(input_ids=IDS[:1]).logits[0])).abs().max() > 1e-4
