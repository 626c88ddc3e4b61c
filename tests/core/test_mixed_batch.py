"""Mixed-adapter batches: ``adapter_names=[...]`` gives each row what running it alone with that adapter gives."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from conftest import reference_inflation
from lorma import LormaConfig
from lorma.layers.base import LormaLayer


class TwoLinear(nn.Module):
    """A 2-layer MLP in float64 (each row a sequence of 3 tokens)."""

    def __init__(self, d_in: int = 10, d_hidden: int = 14, d_out: int = 6) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_hidden)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x)))


def _config(inflation: str, side: str, alpha: float = 6, **kwargs) -> LormaConfig:
    return LormaConfig(r=3, alpha=alpha, inflation=inflation, side=side, init_weights=False, **kwargs)


def _alone(model, name: str, fn):
    """``fn()`` with only adapter ``name`` active (``"__base__"``: adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def _three_adapter_mlp(specs: dict[str, tuple[str, str]]):
    torch.manual_seed(0)
    first, *rest = specs
    model = get_peft_model(TwoLinear().double(), _config(*specs[first], target_modules=["proj", "head"]), first)
    for name in rest:
        model.add_adapter(name, _config(*specs[name], target_modules=["proj", "head"]))
    return model.double().eval()


@pytest.mark.parametrize(
    "specs",
    [
        {"x": ("plus", "pre"), "y": ("pi", "post"), "z": ("none", "pre")},
        {"x": ("plus", "post"), "y": ("pi", "pre"), "z": ("plus", "pre")},
    ],
    ids=["plus-pre,pi-post,none-pre", "plus-post,pi-pre,plus-pre"],
)
def test_linear_rows_equal_each_row_alone(specs) -> None:
    model = _three_adapter_mlp(specs)
    x = torch.randn(6, 3, 10, dtype=torch.float64)
    names = ["x", "__base__", "y", "x", "z", "y"]
    mixed = model(x, adapter_names=names)
    for row, name in enumerate(names):
        alone = _alone(model, name, lambda row=row: model(x[row : row + 1]))
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-12, atol=1e-12)
    # the adapters differ from each other and from the base, so a mix-up of rows would show
    outs = {n: _alone(model, n, lambda: model(x[:1])) for n in ["x", "y", "z", "__base__"]}
    assert min((outs[p] - outs[q]).abs().max() for p in outs for q in outs if p < q) > 1e-3


def test_linear_layer_against_dense_formula() -> None:
    """One adapted layer, each row against ``I(BA) W0 x + b`` / ``W0 I(BA) x + b`` in float64 (independent)."""
    model = _three_adapter_mlp({"x": ("plus", "pre"), "y": ("pi", "post"), "z": ("none", "post")})
    layer = model.base_model.model.proj
    x = torch.randn(4, 3, 10, dtype=torch.float64)
    names = ["z", "x", "__base__", "y"]
    out = layer(x, adapter_names=names)
    W0, bias = layer.get_base_layer().weight.detach(), layer.get_base_layer().bias.detach()
    for row, name in enumerate(names):
        if name == "__base__":
            W = W0
        else:
            M = reference_inflation(layer.lorma_A[name].detach(), layer.lorma_B[name].detach(), layer.inflation[name],
                                    layer.scaling[name])
            W = M @ W0 if layer.side[name] == "pre" else W0 @ M
        torch.testing.assert_close(out[row], x[row] @ W.T + bias, rtol=1e-12, atol=1e-12)


def test_fused_gpt2_c_attn_rows_equal_each_row_alone(tiny_gpt2) -> None:
    """GPT-2's fused c_attn (q and v parts, each its own transform), pre and post side adapters in one batch."""
    model = get_peft_model(copy.deepcopy(tiny_gpt2), _config("plus", "pre"), "q_pre")
    model.add_adapter("v_post", _config("pi", "post"))
    model.eval()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LormaLayer) and layer.fused["q_pre"] == (3, [0, 2]) == layer.fused["v_post"]
    ids = torch.randint(0, 120, (4, 7), generator=torch.Generator().manual_seed(3))
    names = ["v_post", "q_pre", "__base__", "v_post"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = _alone(model, name, lambda row=row: model(input_ids=ids[row : row + 1]).logits)
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)
        base = _alone(model, "__base__", lambda: model(input_ids=ids[:1]).logits)
        assert (mixed[0] - base[0]).abs().max() > 1e-2  # the adapter changes the output


def test_modules_to_save_rows_use_their_adapters_head() -> None:
    base = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=120,
                   num_labels=3)
    ).eval()
    targets = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    model = get_peft_model(base, _config("plus", "pre", **targets), "x")
    model.add_adapter("y", _config("pi", "pre", **targets))
    with torch.no_grad():  # give each adapter's copy of the head its own weights
        for name in ("x", "y"):
            model.base_model.model.classifier.modules_to_save[name].weight.normal_()
    model.eval()
    ids = torch.randint(0, 120, (3, 6), generator=torch.Generator().manual_seed(4))
    names = ["y", "x", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            alone = _alone(model, name, lambda row=row: model(input_ids=ids[row : row + 1]).logits)
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)


def _generation_model(tiny, inflations: tuple[str, str]):
    """Two adapters strong enough (alpha 24) to change a tiny random model's greedy continuation."""
    targets = ["c_attn", "c_fc"] if tiny.config.model_type == "gpt2" else None
    model = get_peft_model(copy.deepcopy(tiny), _config(inflations[0], "pre", 24, target_modules=targets), "x")
    model.add_adapter("y", _config(inflations[1], "post", 24, target_modules=targets))
    return model.eval()


@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_rows_equal_each_row_alone(which: str, num_beams: int, request) -> None:
    tiny = request.getfixturevalue(which)
    model = _generation_model(tiny, ("plus", "pi"))
    ids = torch.randint(1, 120, (3, 5), generator=torch.Generator().manual_seed(5))
    names = ["y", "__base__", "x"]
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)
    alone = {
        name: _alone(model, name, lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs))
        for name in set(names)
    }
    for row, name in enumerate(names):
        assert mixed[row].tolist() == alone[name][row].tolist(), (row, name)
    # the adapters steer generation differently: a test that would notice rows given the wrong adapter
    assert len({tuple(alone[n].flatten().tolist()) for n in alone}) == 3


def _mlp():
    return _three_adapter_mlp({"x": ("plus", "pre"), "y": ("pi", "post"), "z": ("none", "pre")})


def _no_hooks_left(model) -> bool:
    return all(not m._forward_pre_hooks for m in model.modules() if isinstance(m, LormaLayer))


def test_hooks_are_removed_after_the_call() -> None:
    model = _mlp()
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    model(x, adapter_names=["x", "y"])
    assert _no_hooks_left(model)
    model.set_adapter("z")
    torch.testing.assert_close(model(x), model(x, adapter_names=["z", "z"]))


@pytest.mark.parametrize(
    ("names", "error", "match"),
    [
        (["x", "nope"], ValueError, r"no adapted layer has adapter\(s\) \['nope'\]"),
        (["x", "y", "z"], ValueError, "adapter_names has 3 names but the batch has 2 rows"),
        ("x", TypeError, "must be a list"),
        (["x", 3], TypeError, "must hold strings"),
    ],
)
def test_bad_adapter_names_are_refused_before_any_work(names, error, match) -> None:
    model = _mlp()
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    with pytest.raises(error, match=match):
        model(x, adapter_names=names)
    assert _no_hooks_left(model)


def test_refused_in_training_mode() -> None:
    model = _mlp().train()
    with pytest.raises(ValueError, match="adapter_names is for inference; call model.eval"):
        model(torch.randn(2, 3, 10, dtype=torch.float64), adapter_names=["x", "y"])


def test_refused_with_merged_adapters() -> None:
    model = _mlp()
    model.set_adapter("x")
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"adapters \['x'\] are merged into the weights; call unmerge_adapter"):
        model(torch.randn(2, 3, 10, dtype=torch.float64), adapter_names=["x", "y"])
    model.unmerge_adapter()
    model(torch.randn(2, 3, 10, dtype=torch.float64), adapter_names=["x", "y"])


def test_layer_checks_the_batch_length_itself() -> None:
    """A layer called with another batch than the model's (a flattened MoE input, say) names itself."""
    layer = _mlp().base_model.model.proj
    with pytest.raises(ValueError, match=r"module 'proj': adapter_names has 2 names but the batch has 6 rows"):
        layer(torch.randn(6, 10, dtype=torch.float64), adapter_names=["x", "y"])


def test_dorma_adapters_are_refused() -> None:
    model = get_peft_model(TwoLinear(), _config("plus", "pre", target_modules=["proj"], variant="dorma"), "d")
    model.add_adapter("p", _config("plus", "pre", target_modules=["proj"]))
    model.eval()
    with pytest.raises(ValueError, match="adapter 'd' is a 'dorma' adapter, which cannot serve mixed batches"):
        model(torch.randn(2, 3, 10), adapter_names=["d", "p"])
    model(torch.randn(2, 3, 10), adapter_names=["p", "__base__"])  # the others still mix
