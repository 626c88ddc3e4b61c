"""``side="auto"``: per module the side with the smaller transform, resolved at layer creation, recorded in the
config's ``side_pattern`` and saved with the adapter (issue 14)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model

import fresh_python
from conftest import reference_inflation
from lorma import LormaConfig
from lorma.config import cheaper_side
from lorma.layers.base import LormaLayer

LLAMA_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_cheaper_side_by_hand() -> None:
    # SmolLM2-135M: hidden 576, intermediate 1536, 3 KV heads of 64
    assert cheaper_side(576, 1536) == "post"  # gate / up: pre would be 1536^2, post 576^2
    assert cheaper_side(1536, 576) == "pre"  # down: pre 576^2, post 1536^2
    assert cheaper_side(576, 576) == "pre"  # q / o: a tie goes to the paper's default
    assert cheaper_side(576, 192) == "pre"  # k / v
    assert cheaper_side(32, 96, num_parts=3) == "pre"  # GPT-2's c_attn part: 32 <= 32
    assert cheaper_side(32, 128, num_parts=3) == "post"  # 42 > 32


def test_auto_resolves_per_module_and_matches_the_dense_formula(tiny_llama) -> None:
    config = LormaConfig(r=2, alpha=4, inflation="pi", side="auto", init_weights=False,
                         target_modules=LLAMA_ALL_LINEAR)
    model = get_peft_model(tiny_llama, config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LormaLayer)}
    assert len(layers) == 2 * 7
    expected_side = {"q_proj": "pre", "k_proj": "pre", "v_proj": "pre", "o_proj": "pre", "gate_proj": "post",
                     "up_proj": "post", "down_proj": "pre"}  # hidden 32, intermediate 48, k / v 16 wide
    for name, layer in layers.items():
        side = layer.side["default"]
        assert side == expected_side[name.rsplit(".", 1)[-1]], name
        w0 = layer.get_base_layer().weight.detach().double()
        d = w0.shape[0] if side == "pre" else w0.shape[1]
        assert d == min(w0.shape)  # the smaller transform, always
        assert layer.lorma_A["default"].shape == (2, d)
        M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(), "pi",
                                layer.scaling["default"])
        x = torch.randn(3, w0.shape[1])
        dense = x.double() @ (M @ w0 if side == "pre" else w0 @ M).T
        assert rel_err(layer(x), dense) < 1e-5, name
    # recorded with the config, full names, so that it is saved with the adapter
    pattern = model.peft_config["default"].side_pattern
    assert len(pattern) == 14 and pattern[r"model\.layers\.1\.mlp\.up_proj"] == "post"
    assert model.peft_config["default"].side == "auto"  # the setting stays what the user asked for


def test_auto_trains_fewer_parameters_than_either_fixed_side(tiny_llama) -> None:
    import copy

    counts = {}
    for side in ("pre", "post", "auto"):
        model = get_peft_model(copy.deepcopy(tiny_llama), LormaConfig(r=2, inflation="pi", side=side,
                                                                      target_modules=LLAMA_ALL_LINEAR))
        counts[side] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per layer 2 r d summed over q k v o gate up down: pre 32+16+16+32+48+48+32, post 32*6+48, auto min of each
    assert counts == {"pre": 2 * 2 * 2 * 224, "post": 2 * 2 * 2 * 240, "auto": 2 * 2 * 2 * 192}


def test_side_pattern_wins_and_bad_values_are_refused() -> None:
    config = LormaConfig(side="auto", side_pattern={"up_proj": "pre"})
    assert config.side_for("model.layers.0.mlp.up_proj", 32, 48) == "pre"  # recorded choice over the rule
    assert config.side_for("model.layers.0.mlp.gate_proj", 32, 48) == "post"
    assert LormaConfig(side="post").side_for("x", 48, 32) == "post"  # a fixed side is never switched
    with pytest.raises(ValueError, match=r"unknown side 'sideways'.*'auto'"):
        LormaConfig(side="sideways")
    with pytest.raises(ValueError, match=r"side_pattern\['up_proj'\] must be one of"):
        LormaConfig(side="auto", side_pattern={"up_proj": "auto"})


LOAD = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    import lorma  # noqa: F401
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    sides = sorted({m.side["default"] for m in model.modules() if hasattr(m, "lorma_A") and m.lorma_A})
    print(",".join(sides))
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(sys.argv[3])).logits, sys.argv[4])
    """
)


def test_save_and_load_in_a_fresh_process(tiny_llama, tmp_path) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama.save_pretrained(base_dir)
    model = get_peft_model(tiny_llama, LormaConfig(r=2, inflation="pi", side="auto", init_weights=False,
                                                   target_modules=LLAMA_ALL_LINEAR)).eval()
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["side"] == "auto"
    assert saved["side_pattern"][r"model\.layers\.0\.mlp\.gate_proj"] == "post"
    assert saved["side_pattern"][r"model\.layers\.0\.mlp\.down_proj"] == "pre"
    ids = torch.randint(0, 120, (2, 7))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    run = fresh_python.run([sys.executable, str(script), base_dir, adapter_dir, tmp_path / "ids.pt",
                            tmp_path / "out.pt"], check=True)
    assert run.stdout.strip() == "post,pre"
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    # the saved pattern is what decides: a hand-edited side no longer fits the saved weights, named
    saved["side_pattern"][r"model\.layers\.0\.mlp\.gate_proj"] = "pre"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(saved))
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match=r"gate_proj"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)


def test_combining_auto_adapters_keeps_each_module_on_its_side(tiny_llama) -> None:
    config = LormaConfig(r=2, alpha=2, inflation="plus", side="auto", init_weights=False,
                         target_modules=["up_proj", "down_proj"])
    model = get_peft_model(tiny_llama, config)
    model.add_adapter("second", LormaConfig(r=2, alpha=2, inflation="plus", side="auto", init_weights=False,
                                            target_modules=["up_proj", "down_proj"]))
    model.add_weighted_adapter(["default", "second"], [1.0, 0.5], "sum")
    assert model.peft_config["sum"].side == "auto"
    assert set(model.peft_config["sum"].side_pattern.values()) == {"pre", "post"}
    up = model.base_model.model.model.layers[0].mlp.up_proj
    assert up.side["sum"] == "post"
    w0 = up.get_base_layer().weight.detach().double()
    update = sum(w * up.scaling[a] * (up.lorma_B[a].detach().double() @ up.lorma_A[a].detach().double())
                 for a, w in (("default", 1.0), ("second", 0.5)))
    model.set_adapter("sum")
    x = torch.randn(3, 32)
    assert rel_err(up(x), x.double() @ (w0 @ (torch.eye(32, dtype=torch.float64) + update)).T) < 1e-6


def test_recipe_size_estimate_follows_auto(tiny_llama) -> None:
    from lorma.recipes.config import build_config
    from lorma.recipes.methods import adapter_parameter_count, build_method_model, count_parameters

    cfg = build_config({"method": "lorma-pi", "side": "auto", "r": 2, "modules_to_save": [],
                        "target_modules": LLAMA_ALL_LINEAR}, {})
    estimated, modules = adapter_parameter_count(tiny_llama, cfg)
    trainable, _ = count_parameters(build_method_model(tiny_llama, cfg, [], None))
    assert (estimated, modules) == (trainable, 14) and trainable == 2 * 2 * 2 * 192
