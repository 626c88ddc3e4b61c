"""Hotswap: a loaded adapter's weights replaced in place equal a fresh load of the new adapter, and a compiled
model does not recompile."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils.hotswap import hotswap_adapter as peft_hotswap_adapter
from torch import nn

from lorma import LormaConfig, hotswap_adapter, hotswap_adapter_from_state_dict
from lorma.inflations import get_inflation, inflation_names
from lorma.layers.base import LormaLayer


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(10, 16)
        self.mid = nn.Linear(16, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(torch.tanh(self.proj(x)))))


def _mlp() -> MLP:
    torch.manual_seed(123)  # the same base model every time
    return MLP().eval()


def _save(tmp: Path, name: str, base: nn.Module, seed: int, **config) -> Path:
    """A random (trained-looking) adapter saved to ``tmp / name``."""
    torch.manual_seed(seed)
    settings = {"r": 4, "alpha": 8, "init_weights": False, "target_modules": ["proj", "mid", "head"]} | config
    model = get_peft_model(copy.deepcopy(base), LormaConfig(**settings))
    model.save_pretrained(tmp / name)
    return tmp / name


def _load(base: nn.Module, path: Path) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


X = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize(
    ("inflation", "side", "second"),
    [
        ("plus", "pre", {}),
        ("plus", "post", {"alpha": 3.0}),
        ("pi", "post", {"alpha": 20.0, "r": 2}),
        ("pi", "pre", {"rank_pattern": {"mid": 3}, "alpha_pattern": {"head": 1.5}}),
        ("none", "pre", {"r": 3, "alpha": 5.0}),
    ],
    ids=["same-r-alpha", "other-alpha", "smaller-r-other-alpha", "patterns", "none-smaller-r"],
)
def test_hotswap_equals_a_fresh_load(tmp_path: Path, inflation: str, side: str, second: dict) -> None:
    base = _mlp()
    first = _save(tmp_path, "first", base, 1, inflation=inflation, side=side)
    new = _save(tmp_path, "second", base, 2, inflation=inflation, side=side, **second)
    model = _load(base, first)
    before = model(X)
    hotswap_adapter(model, new, adapter_name="default")
    swapped = model(X)
    expected = _load(base, new)(X)
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-6)
    assert (before - expected).abs().max() > 1e-3  # the two adapters differ: the test sees a swap that did nothing
    # the parameters are the same objects (what a compiled graph holds), and saving gives the new adapter back
    model.save_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(_load(base, tmp_path / "resaved")(X), expected, rtol=1e-5, atol=1e-6)


def test_hotswap_fused_gpt2_c_attn(tmp_path: Path, tiny_gpt2) -> None:
    """GPT-2's c_attn with its q and v parts (default fused_parts), the second adapter with another alpha."""
    ids = torch.randint(0, 120, (2, 6), generator=torch.Generator().manual_seed(4))
    paths = []
    for seed, alpha in ((1, 8), (2, 24)):
        torch.manual_seed(seed)
        model = get_peft_model(copy.deepcopy(tiny_gpt2), LormaConfig(r=4, alpha=alpha, init_weights=False))
        model.save_pretrained(tmp_path / str(seed))
        paths.append(tmp_path / str(seed))
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), paths[0]).eval()
    assert model.base_model.model.transformer.h[0].attn.c_attn.fused["default"] == (3, [0, 2])
    hotswap_adapter(model, paths[1])
    fresh = PeftModel.from_pretrained(copy.deepcopy(tiny_gpt2), paths[1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_hotswap_from_state_dict_swaps_an_inactive_adapter_and_modules_to_save(tmp_path: Path) -> None:
    base = _mlp()
    settings = {"r": 4, "alpha": 8, "init_weights": False, "target_modules": ["proj", "mid"]}
    settings["modules_to_save"] = ["head"]
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), LormaConfig(**settings), "one")
    model.add_adapter("two", LormaConfig(**settings))
    torch.manual_seed(2)
    donor = get_peft_model(copy.deepcopy(base), LormaConfig(**settings | {"alpha": 2.0}), "new")
    with torch.no_grad():
        donor.base_model.model.head.modules_to_save["new"].weight.normal_()
    model.eval(), donor.eval()
    out_one = model(X)
    hotswap_adapter_from_state_dict(model, get_peft_model_state_dict(donor, adapter_name="new"), "two",
                                    donor.peft_config["new"])
    torch.testing.assert_close(model(X), out_one)  # the active adapter is untouched
    model.set_adapter("two")
    torch.testing.assert_close(model(X), donor(X), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize(("inflation", "side"), [("plus", "pre"), ("pi", "post")])
def test_compiled_model_does_not_recompile(tmp_path: Path, inflation: str, side: str) -> None:
    base = _mlp()
    first = _save(tmp_path, "first", base, 1, inflation=inflation, side=side)
    # another alpha and a smaller rank: both folded into the loaded tensors
    new = _save(tmp_path, "second", base, 2, inflation=inflation, side=side, alpha=3.0, r=2)
    model = _load(base, first)
    expected_first, expected_new = model(X), _load(base, new)(X)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        torch.testing.assert_close(compiled(X), expected_first)
        assert counter.frame_count == 1
        hotswap_adapter(compiled, new)
        torch.testing.assert_close(compiled(X), expected_new, rtol=1e-5, atol=1e-6)
        assert counter.frame_count == 1
        # the check can see a recompile: changing a Python value the forward reads (the scaling) triggers one
        layer = next(m for m in model.modules() if isinstance(m, LormaLayer))
        layer.scaling["default"] = layer.scaling["default"] * 2
        with pytest.raises(torch._dynamo.exc.RecompileError, match="[Rr]ecompil"):
            compiled(X)
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_model_after_hotswap(tmp_path: Path) -> None:
    """The default backend (generated C++ kernels) reads the swapped tensors too."""
    base = _mlp()
    first = _save(tmp_path, "first", base, 1, inflation="pi", side="pre")
    new = _save(tmp_path, "second", base, 2, inflation="pi", side="pre", alpha=2.0)
    model = _load(base, first)
    expected_new = _load(base, new)(X)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        compiled(X)
        hotswap_adapter(compiled, new)
        torch.testing.assert_close(compiled(X), expected_new, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- what is refused
def test_peft_hotswap_refuses_lorma(tmp_path: Path) -> None:
    """Why lorma has its own: peft's hotswap is LoRA-only (peft/utils/hotswap.py, check_hotswap_configs_compatible)."""
    base = _mlp()
    path = _save(tmp_path, "a", base, 1)
    with pytest.raises(ValueError, match="Hotswapping only supports LORA"):
        peft_hotswap_adapter(_load(base, path), str(path), adapter_name="default")


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ({"inflation": "pi"}, "the loaded adapter has inflation='plus', the new one inflation='pi'"),
        ({"side": "post"}, "module 'proj' is adapted on the 'pre' side, the new adapter adapts it on the 'post'"),
        ({"target_modules": ["proj", "mid"]},
         r"different modules: 1 modules it adapts are not in the new adapter \(first: 'head'\)"),
        ({"target_modules": ["proj", "mid", "head", "extra"]},
         r"1 modules of the new adapter are not adapted by the loaded one \(first: 'extra'\)"),
        ({"r": 6}, "the new adapter has rank 6, above the loaded 4"),
        ({"dropout": 0.1}, "the loaded adapter has dropout=0.0, the new one dropout=0.1"),
        ({"variant": "dorma"}, "the loaded adapter has variant=None, the new one variant='dorma'"),
    ],
)
def test_mismatches_are_refused_before_anything_changes(tmp_path: Path, second: dict, match: str) -> None:
    base = _mlp()
    if "extra" in second.get("target_modules", []):
        base.extra = nn.Linear(5, 5)  # a module the loaded adapter does not adapt
    first = _save(tmp_path, "first", base, 1)
    new = _save(tmp_path, "second", base, 2, **second)
    model = _load(base, first)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        hotswap_adapter(model, new)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_shapes_that_disagree_with_the_config_are_refused(tmp_path: Path) -> None:
    base = _mlp()
    model = _load(base, _save(tmp_path, "first", base, 1))
    config = LormaConfig(r=4, alpha=8, target_modules=["proj", "mid", "head"])
    state = {f"base_model.model.{m}.lorma_{p}": t.detach().clone() for m in ("proj", "mid", "head")
             for p, t in (("A", torch.zeros(4, 16 if m == "proj" else 12 if m == "mid" else 5)),
                          ("B", torch.zeros(16 if m == "proj" else 12 if m == "mid" else 5, 4)))}
    state["base_model.model.mid.lorma_A"] = torch.zeros(4, 7)
    with pytest.raises(ValueError, match=r"module 'mid': the new adapter's A \(4, 7\) .* are not the \(4, 12\)"):
        hotswap_adapter_from_state_dict(model, state, "default", config)


def test_merged_and_unknown_adapters_are_refused(tmp_path: Path) -> None:
    base = _mlp()
    path = _save(tmp_path, "a", base, 1)
    model = _load(base, path)
    with pytest.raises(ValueError, match=r"no adapter named 'other' \(adapters: \['default'\]\)"):
        hotswap_adapter(model, path, adapter_name="other")
    model.merge_adapter()
    with pytest.raises(ValueError, match="it is merged into the weights of .*call unmerge_adapter"):
        hotswap_adapter(model, path)


@pytest.mark.parametrize("name", [n for n in inflation_names() if get_inflation(n).scaled_product_only])
def test_scaled_product_only_inflations_take_folded_scaling_and_padding(name: str) -> None:
    """The property hotswap relies on: (A', B', s') is the transform of ([A'; 0], [B' s'/s, 0], s)."""
    inflation = get_inflation(name)()
    A, B = torch.randn(3, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    s_new, s_old = 1.7, 0.4
    A_pad, B_pad = torch.zeros(5, 7, dtype=torch.float64), torch.zeros(7, 5, dtype=torch.float64)
    A_pad[:3], B_pad[:, :3] = A, B * (s_new / s_old)
    torch.testing.assert_close(inflation.transform(A_pad, B_pad, s_old), inflation.transform(A, B, s_new))
