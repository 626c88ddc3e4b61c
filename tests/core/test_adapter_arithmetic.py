"""``add_weighted_adapter`` on LoRMA models: exact products and sums of LoRMA+ adapters, clear refusals otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import reference_inflation
from lorma import LormaConfig
from lorma.layers.base import LormaLayer
from test_adapter_formula import rel_err

IDS = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(3))


def two_adapters(base: torch.nn.Module, side: str, fused_ok: bool = True) -> PeftModel:
    """``a1`` (r=4, alpha=8) and ``a2`` (r=2, alpha=3) on overlapping module sets, both far from the identity."""
    targets1, targets2 = (["q_proj", "up_proj"], ["q_proj", "down_proj"])
    model = get_peft_model(
        base, LormaConfig(r=4, alpha=8, side=side, target_modules=targets1, init_weights=False), adapter_name="a1"
    )
    model.add_adapter("a2", LormaConfig(r=2, alpha=3, side=side, target_modules=targets2, init_weights=False))
    return model.eval()


def layers_of(model: torch.nn.Module) -> dict[str, LormaLayer]:
    return {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, LormaLayer)}


def dense(layer: LormaLayer, adapter: str, weight: float = 1.0) -> torch.Tensor:
    """``I + w s BA`` in float64 from the paper's formula (independent of lorma's code)."""
    A, B = layer.lorma_A[adapter].detach(), layer.lorma_B[adapter].detach()
    eye = torch.eye(A.shape[-1], dtype=torch.float64)
    return eye + weight * (reference_inflation(A, B, "plus", layer.scaling[adapter]) - eye)


def logits(model: PeftModel, adapters: str | list[str]) -> torch.Tensor:
    model.base_model.set_adapter(adapters)
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("side", ["pre", "post"])
def test_product_is_what_both_active_adapters_compute(tiny_llama, side: str) -> None:
    model = two_adapters(tiny_llama, side)
    both = logits(model, ["a1", "a2"])
    assert rel_err(both, logits(model, "a1")) > 1e-3 and rel_err(both, logits(model, "a2")) > 1e-3
    active = list(model.base_model.active_adapters)
    model.add_weighted_adapter(["a1", "a2"], [1.0, 1.0], "prod", combination_type="product")
    # added inactive and frozen, as peft's LoRA adds it
    assert model.base_model.active_adapters == active
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".prod" in n)
    assert rel_err(logits(model, "prod"), both) < 1e-5

    for key, layer in layers_of(model).items():
        present = [a for a in ("a1", "a2") if a in layer.lorma_A]
        ranks = {"a1": 4, "a2": 2}
        assert layer.r["prod"] == sum(ranks[a] for a in present), key  # rank r1 + r2 where both adapt
        expected = torch.eye(layer.lorma_A["prod"].shape[-1], dtype=torch.float64)
        for adapter in present:  # a1 nearest to W0: I2 I1 on the pre side, I1 I2 on the post side
            expected = dense(layer, adapter) @ expected if side == "pre" else expected @ dense(layer, adapter)
        assert rel_err(dense(layer, "prod"), expected) < 1e-6, key


def test_weighted_product_and_linear_against_the_dense_formula(tiny_llama) -> None:
    model = two_adapters(tiny_llama, "pre")
    model.add_weighted_adapter(["a1", "a2"], [0.5, -2.0], "prod", combination_type="product")
    model.add_weighted_adapter(["a1", "a2"], [0.5, -2.0], "lin", combination_type="linear")
    model.add_weighted_adapter(["a2"], [3.0], "scaled")
    for key, layer in layers_of(model).items():
        present = [(a, w) for a, w in (("a1", 0.5), ("a2", -2.0)) if a in layer.lorma_A]
        eye = torch.eye(layer.lorma_A["prod"].shape[-1], dtype=torch.float64)
        product, total = eye, eye.clone()
        for adapter, w in present:
            product = dense(layer, adapter, w) @ product
            total = total + (dense(layer, adapter, w) - eye)
        assert rel_err(dense(layer, "prod"), product) < 1e-6, key
        assert rel_err(dense(layer, "lin"), total) < 1e-6, key
        assert layer.r["lin"] == sum({"a1": 4, "a2": 2}[a] for a, _ in present)
        if "a2" in layer.lorma_A:
            assert rel_err(dense(layer, "scaled"), dense(layer, "a2", 3.0)) < 1e-6
    # linear: the weight updates add up (task arithmetic), checked on the merged weights
    merged_updates = {}
    for adapters in (["a1"], ["a2"], ["lin"]):
        copy_ = copy.deepcopy(model)
        copy_.base_model.set_adapter(adapters[0])
        for key, layer in layers_of(copy_).items():
            if adapters[0] in layer.lorma_A:
                merged_updates.setdefault(adapters[0], {})[key] = layer.get_delta_weight(adapters[0]).double()
    for key, delta in merged_updates["lin"].items():
        expected = 0.5 * merged_updates["a1"].get(key, 0) - 2.0 * merged_updates["a2"].get(key, 0)
        assert rel_err(delta, expected) < 1e-5, key


def test_product_on_gpt2_fused_c_attn(tiny_gpt2) -> None:
    """Fused q | k | v: the parts combine part by part; k stays untouched."""
    model = get_peft_model(tiny_gpt2, LormaConfig(r=4, alpha=8, init_weights=False), adapter_name="a1").eval()
    model.add_adapter("a2", LormaConfig(r=3, alpha=6, init_weights=False))
    both = logits(model, ["a1", "a2"])
    model.add_weighted_adapter(["a1", "a2"], [1.0, 1.0], "prod", combination_type="product")
    assert rel_err(logits(model, "prod"), both) < 1e-5
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fused["prod"] == (3, [0, 2]) and tuple(layer.lorma_A["prod"].shape) == (2, 7, 32)


def test_product_of_post_side_fused_parts_equals_merging_both(tiny_gpt2) -> None:
    """Two post-side adapters on fused parts cannot be active together; merging them in order is the reference."""
    model = get_peft_model(tiny_gpt2, LormaConfig(r=4, alpha=8, side="post", init_weights=False), adapter_name="a1")
    model.add_adapter("a2", LormaConfig(r=2, alpha=2, side="post", init_weights=False))
    model.add_weighted_adapter(["a1", "a2"], [1.0, 1.0], "prod", combination_type="product")
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    w0 = layer.get_base_layer().weight.detach().clone()
    layer.merge(adapter_names=["a1", "a2"])
    both = layer.get_base_layer().weight.detach().clone()
    layer.unmerge()
    layer.merge(adapter_names=["prod"])
    assert rel_err(layer.get_base_layer().weight, both) < 1e-5
    assert rel_err(both, w0) > 1e-2


def test_combined_adapter_saves_and_reloads(tiny_llama, tmp_path) -> None:
    base = copy.deepcopy(tiny_llama)
    model = two_adapters(tiny_llama, "pre")
    model.add_weighted_adapter(["a1", "a2"], [1.0, 0.5], "prod", combination_type="product")
    expected = logits(model, "prod")
    model.save_pretrained(tmp_path, selected_adapters=["prod"])
    loaded = PeftModel.from_pretrained(base, tmp_path / "prod").eval()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=IDS).logits, expected) < 1e-6
    assert loaded.peft_config["default"].rank_pattern  # modules of rank 6, 4 and 2: per-module ranks survive


def test_modules_to_save_come_from_the_one_adapter_that_trained_them(tiny_llama) -> None:
    head = ["lm_head"]
    model = get_peft_model(tiny_llama, LormaConfig(r=2, init_weights=False, modules_to_save=head), adapter_name="a1")
    model.add_adapter("a2", LormaConfig(r=2, init_weights=False))
    wrapper = model.base_model.model.lm_head
    with torch.no_grad():
        wrapper.modules_to_save["a1"].weight.add_(1.0)  # "trained"
    model.add_weighted_adapter(["a1", "a2"], [1.0, 1.0], "prod", combination_type="product")
    assert torch.equal(wrapper.modules_to_save["prod"].weight, wrapper.modules_to_save["a1"].weight)
    assert not torch.equal(wrapper.modules_to_save["prod"].weight, wrapper.original_module.weight)
    model.add_adapter("a3", LormaConfig(r=2, init_weights=False, modules_to_save=head))
    with pytest.raises(ValueError, match=r"\['a1', 'a3'\] each train their own modules_to_save"):
        model.add_weighted_adapter(["a1", "a3"], [1.0, 1.0], "x", combination_type="product")


@pytest.mark.parametrize(
    ("second", "kwargs", "message"),
    [
        ({"inflation": "pi"}, {}, r"inflation \{'q': 'pi'\} cannot be combined"),
        ({"inflation": "none"}, {"combination_type": "product"}, r"inflation \{'q': 'none'\} cannot be combined"),
        ({"side": "post"}, {}, r"different sides \{'p': 'pre', 'q': 'post'\}"),
        ({}, {"combination_type": "svd"}, r"combination_type 'svd' is not available for LoRMA"),
        ({}, {"combination_type": "cat"}, r"combination_type 'cat' is not available for LoRMA"),
        ({}, {"svd_rank": 4}, r"options \['svd_rank'\] are LoRA-only"),
        ({}, {"density": 0.5, "combination_type": "linear"}, r"options \['density'\] are LoRA-only"),
        ({}, {"svd_full_matrices": False}, r"options \['svd_full_matrices'\] are LoRA-only"),
    ],
)
def test_what_cannot_be_combined_is_refused_clearly(tiny_llama, second, kwargs, message) -> None:
    model = get_peft_model(tiny_llama, LormaConfig(r=2, init_weights=False), adapter_name="p")
    model.add_adapter("q", LormaConfig(r=2, init_weights=False, **second))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        model.add_weighted_adapter(["p", "q"], [1.0, 1.0], "new", **kwargs)
    text = str(err.value)
    assert "LoRMA" in text and "['p', 'q']" in text and "supported" in text
    assert "new" not in model.peft_config
    assert set(model.state_dict()) == set(before)


def test_bad_arguments(tiny_llama) -> None:
    model = get_peft_model(tiny_llama, LormaConfig(r=2, init_weights=False), adapter_name="p")
    model.add_adapter("q", LormaConfig(r=2, init_weights=False))
    with pytest.raises(ValueError, match=r"no adapter named \['zz'\]"):
        model.add_weighted_adapter(["p", "zz"], [1.0, 1.0], "new")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["p", "q"], [1.0, 1.0], "q")
    with pytest.raises(ValueError, match="weights must be 2 finite numbers"):
        model.add_weighted_adapter(["p", "q"], [1.0], "new")
    with pytest.raises(ValueError, match="weights must be 2 finite numbers"):
        model.add_weighted_adapter(["p", "q"], [1.0, float("nan")], "new")
    assert set(model.peft_config) == {"p", "q"}
    # peft's LoRA-only options at their defaults are accepted (callers that pass them all explicitly)
    model.add_weighted_adapter(["p", "q"], [1.0, 1.0], "ok", svd_rank=None, svd_full_matrices=True,
                               majority_sign_method="total")
    assert set(model.peft_config) == {"p", "q", "ok"}
