"""The adapter against the dense formula of NOTES.md: h = I(BA) W0 x + b (pre), W0 I(BA) x + b (post)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorma
from conftest import reference_inflation
from lorma import LormaConfig
from lorma import functional as LF
from lorma.inflations import get_inflation
from lorma.layers.base import LormaLayer

INFLATIONS = ["plus", "pi", "none"]
SIDES = ["pre", "post"]


class TwoLayer(nn.Module):
    def __init__(self, d_in: int = 12, d_hidden: int = 20, d_out: int = 7, conv1d: bool = False) -> None:
        super().__init__()
        self.proj = Conv1D(d_hidden, d_in) if conv1d else nn.Linear(d_in, d_hidden)
        if conv1d:
            nn.init.normal_(self.proj.weight)
            nn.init.normal_(self.proj.bias)
        self.act = nn.Tanh()
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.proj(x)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def linear_weight(layer: LormaLayer) -> torch.Tensor:
    w = layer.get_base_layer().weight.detach()
    return w.T if layer.fan_in_fan_out else w


def dense_forward(layer: LormaLayer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """The adapted layer's output from the formula, in float64, with fused parts handled part by part."""
    W0 = linear_weight(layer).double()
    b = layer.get_base_layer().bias.detach().double()
    A, B = layer.lorma_A[adapter].detach(), layer.lorma_B[adapter].detach()
    s, infl, side = layer.scaling[adapter], layer.inflation[adapter], layer.side[adapter]
    xd = x.double()
    fused = layer.fused[adapter]
    if fused is None:
        M = reference_inflation(A, B, infl, s)
        W = M @ W0 if side == "pre" else W0 @ M
        return xd @ W.T + b
    num_parts, parts = fused
    size = W0.shape[0] // num_parts
    W = W0.clone()
    for i, p in enumerate(parts):
        rows = slice(p * size, (p + 1) * size)
        M = reference_inflation(A[i], B[i], infl, s)
        W[rows] = M @ W0[rows] if side == "pre" else W0[rows] @ M
    return xd @ W.T + b


@pytest.mark.parametrize("inflation", INFLATIONS)
def test_rotate_rows_matches_index_definition(inflation: str) -> None:
    A, B = torch.randn(3, 9), torch.randn(9, 3)
    ours = get_inflation(inflation)().transform(A, B, 0.7)
    assert rel_err(ours, reference_inflation(A, B, inflation, 0.7)) < 1e-6


def test_rotate_rows_batched_and_differentiable() -> None:
    m = torch.randn(2, 5, 5, requires_grad=True)
    out = LF.rotate_rows(m)
    for k in range(2):
        for i in range(5):
            for j in range(5):
                assert out[k, i, j] == m[k, i, (j - i) % 5]
    weights = torch.randn(2, 5, 5)
    (out * weights).sum().backward()
    # the gradient of a permutation is the inverse permutation of the upstream gradient
    expected = torch.empty_like(weights)
    for i in range(5):
        for j in range(5):
            expected[:, i, (j - i) % 5] = weights[:, i, j]
    assert torch.equal(m.grad, expected)
    with pytest.raises(ValueError, match="square"):
        LF.rotate_rows(torch.randn(3, 4))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", INFLATIONS)
def test_forward_equals_dense_formula(inflation: str, side: str, conv1d: bool) -> None:
    model = get_peft_model(
        TwoLayer(conv1d=conv1d),
        LormaConfig(r=3, alpha=6, inflation=inflation, side=side, target_modules=["proj"], init_weights=False),
    )
    layer = model.base_model.model.proj
    x = torch.randn(4, 5, 12)
    out = layer(x)
    assert rel_err(out, dense_forward(layer, "default", x)) < 1e-5
    # both ways of applying a dense transform (activations / folded weight) give the formula
    if inflation != "plus":
        variant = layer.lorma_variant["default"]
        with torch.no_grad():
            folded = variant.folded_forward(layer, "default", torch.randn(200, 12))
        tokens = torch.randn(200, 12)
        d_other = 12 if side == "pre" else 20
        strategy = variant.inflation.strategy(200, layer.transform_size_for(side, None), d_other, False)
        with torch.no_grad():
            out_big = layer(tokens)
        assert rel_err(out_big, dense_forward(layer, "default", tokens)) < 1e-5
        assert (folded is not None) == (strategy == "weight")


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", INFLATIONS)
def test_non_square_llama_mlp(tiny_llama, inflation: str, side: str) -> None:
    """up/gate (d_out 48 > d_in 32) and down (48 -> 32) on both sides: d follows the side."""
    model = get_peft_model(
        tiny_llama,
        LormaConfig(r=2, alpha=4, inflation=inflation, side=side, init_weights=False,
                    target_modules=["up_proj", "down_proj", "gate_proj"]),
    )
    up = model.base_model.model.model.layers[0].mlp.up_proj
    down = model.base_model.model.model.layers[0].mlp.down_proj
    assert up.lorma_A["default"].shape == (2, 48 if side == "pre" else 32)
    assert down.lorma_A["default"].shape == (2, 32 if side == "pre" else 48)
    for layer, d_in in ((up, 32), (down, 48)):
        x = torch.randn(3, d_in)
        # Llama projections have no bias: compare against the formula with a zero bias
        W0 = linear_weight(layer).double()
        M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(),
                                inflation, layer.scaling["default"])
        expected = x.double() @ (M @ W0 if side == "pre" else W0 @ M).T
        assert rel_err(layer(x), expected) < 1e-5


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", INFLATIONS)
def test_gpt2_fused_q_and_v_only(tiny_gpt2, inflation: str, side: str) -> None:
    model = get_peft_model(tiny_gpt2, LormaConfig(r=4, alpha=8, inflation=inflation, side=side, init_weights=False))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fused["default"] == (3, [0, 2])
    d = 32
    assert layer.lorma_A["default"].shape == (2, 4, d)
    assert layer.lorma_B["default"].shape == (2, d, 4)
    # the paper's count: 2 parts x 2 r d per layer
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == 2 * 2 * 2 * 4 * d
    x = torch.randn(2, 3, d)
    out = layer(x)
    assert rel_err(out, dense_forward(layer, "default", x)) < 1e-5
    base_out = layer.get_base_layer()(x)
    # k (the middle third) is untouched by any transform
    assert torch.allclose(out[..., d : 2 * d], base_out[..., d : 2 * d], atol=1e-6)
    assert not torch.allclose(out[..., :d], base_out[..., :d], atol=1e-3)


def test_fused_parts_any_subset(tiny_gpt2) -> None:
    cfg = LormaConfig(r=2, alpha=2, init_weights=False, target_modules=["c_attn"],
                      fused_parts={"c_attn": {"num_parts": 3, "parts": [1]}})
    model = get_peft_model(tiny_gpt2, cfg)
    layer = model.base_model.model.transformer.h[1].attn.c_attn
    x = torch.randn(5, 32)
    out, base_out = layer(x), layer.get_base_layer()(x)
    assert torch.allclose(out[:, :32], base_out[:, :32], atol=1e-6)
    assert torch.allclose(out[:, 64:], base_out[:, 64:], atol=1e-6)
    assert rel_err(out, dense_forward(layer, "default", x)) < 1e-5


@pytest.mark.parametrize("inflation", INFLATIONS)
def test_init_is_identity(tiny_bert, tiny_gpt2, tiny_llama, inflation: str) -> None:
    ids = torch.randint(0, 120, (2, 9))
    for base in (tiny_bert, tiny_gpt2, tiny_llama):
        with torch.no_grad():
            ref = base(ids)[0]
        for side in SIDES:
            model = get_peft_model(copy.deepcopy(base), LormaConfig(r=4, alpha=8, inflation=inflation, side=side))
            with torch.no_grad():
                out = model(input_ids=ids)[0]
            if inflation == "plus":
                assert torch.equal(out, ref), f"{type(base).__name__} {side}"
            elif inflation == "pi":
                assert (out - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item()), type(base).__name__
            else:  # rank <= r: cannot be the identity, and is not
                assert not torch.allclose(out, ref, atol=1e-3)


def test_pi_init_transform_is_identity_and_none_is_projection() -> None:
    model = get_peft_model(TwoLayer(d_hidden=16), LormaConfig(r=4, alpha=16, inflation="pi", target_modules=["proj"]))
    M = model.base_model.model.proj.get_transform("default")
    assert torch.allclose(M, torch.eye(16), atol=1e-6)
    model = get_peft_model(TwoLayer(d_hidden=16), LormaConfig(r=4, alpha=16, inflation="none", target_modules=["proj"]))
    M = model.base_model.model.proj.get_transform("default").double()
    assert torch.allclose(M @ M, M, atol=1e-5)  # a projection
    assert torch.linalg.matrix_rank(M, rtol=1e-5).item() == 4  # fp32 noise aside


def test_pi_keeps_no_square_index() -> None:
    """No d x d integer tensor anywhere in the module (the authors' code keeps one per module)."""
    model = get_peft_model(TwoLayer(d_hidden=64), LormaConfig(r=4, inflation="pi", target_modules=["proj"]))
    layer = model.base_model.model.proj
    tensors = list(layer.state_dict().values()) + list(layer.buffers())
    assert not any(t.numel() >= 64 * 64 for t in tensors if not t.is_floating_point())
    assert not any(t.numel() >= 64 * 64 for t in layer.state_dict().values() if t.shape[-2:] == (64, 64))


# plain LoRMA and each variant (docs/variants.md): (options, the variant's own trained tensor)
VARIANT_OPTIONS = [
    ({"inflation": "pi"}, None),
    ({"inflation": "pi", "variant": "dorma"}, "lorma_magnitude"),
    ({"variant": "adalorma", "target_r": 2, "total_step": 10}, "lorma_E"),
    ({"variant": "dylorma", "min_rank": 4}, None),  # every draw is b = r = 4: all of A and B get a gradient
]


@pytest.mark.parametrize(("options", "own"), VARIANT_OPTIONS, ids=["lorma-pi", "dorma-pi", "adalorma", "dylorma"])
def test_gradients_reach_only_adapter_weights(tiny_bert, options: dict, own: str | None) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    cls = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=120, num_labels=3))
    model = get_peft_model(cls, LormaConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                           init_weights=False, **options))
    out = model(input_ids=torch.randint(0, 120, (2, 6)), labels=torch.tensor([0, 2]))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    names = ("lorma_A", "lorma_B", "classifier") + ((own,) if own else ())
    assert all(any(part in n for part in names) for n in trainable)
    # 2 layers x (query, value) x (A, B, and the variant's own tensor)
    assert sum("lorma_" in n for n in trainable) == 2 * 2 * (3 if own else 2)
    assert any("modules_to_save" in n for n in trainable)


@pytest.mark.parametrize("inflation", INFLATIONS)
def test_dropout_only_on_adapter_path(inflation: str) -> None:
    model = get_peft_model(
        TwoLayer(), LormaConfig(r=3, alpha=3, inflation=inflation, dropout=0.5, target_modules=["proj"])
    )
    layer = model.base_model.model.proj
    layer.train()
    x = torch.randn(64, 12)
    base_out = layer.get_base_layer()(x)
    if inflation != "none":  # identity at init: the adapter path is zero, so dropout can change nothing
        assert torch.allclose(layer(x), base_out, atol=1e-6)
    # with a non-identity transform: output = base + (I(BA) - I) drop(h) exactly, for the mask dropout drew
    with torch.no_grad():
        layer.lorma_B["default"].normal_()
        layer.lorma_A["default"].normal_()
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    h = x @ linear_weight(layer).T  # pre side: the transform acts on W0 x (without the bias)
    dropped = torch.nn.functional.dropout(h, 0.5, training=True)
    M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(), inflation,
                            layer.scaling["default"]).float()
    expected = base_out + dropped @ (M - torch.eye(M.shape[0])).T
    assert rel_err(out, expected) < 1e-5
    layer.eval()
    assert rel_err(layer(x), dense_forward(layer, "default", x)) < 1e-5


def test_dropout_post_side_keeps_frozen_path() -> None:
    model = get_peft_model(TwoLayer(), LormaConfig(r=3, side="post", dropout=0.9, target_modules=["proj"]))
    layer = model.base_model.model.proj
    layer.train()
    x = torch.randn(32, 12)
    assert torch.equal(layer(x), layer.get_base_layer()(x))  # B = 0: nothing to drop, W0 x untouched


def test_r_larger_than_d_warns_with_module_name() -> None:
    with pytest.warns(UserWarning, match=r"proj.*r=40.*d=20"):
        get_peft_model(TwoLayer(), LormaConfig(r=40, target_modules=["proj"]))


def test_rank_and_alpha_patterns() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x))

    model = get_peft_model(
        Two(), LormaConfig(r=2, alpha=4, target_modules=["a", "b"], rank_pattern={"b": 5}, alpha_pattern={"b": 1})
    )
    a, b = model.base_model.model.a, model.base_model.model.b
    assert a.lorma_A["default"].shape == (2, 8) and a.scaling["default"] == 2.0
    assert b.lorma_A["default"].shape == (5, 8) and b.scaling["default"] == pytest.approx(0.2)


def test_registration_is_idempotent_and_serializable(tmp_path) -> None:
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    lorma.peft_method.registration.register()
    lorma.peft_method.registration.register()
    assert PeftType("LORMA") is PeftType.LORMA is PeftType["LORMA"]
    assert PeftType.LORMA in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORMA] is LormaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORMA] is lorma.LormaModel
    cfg = LormaConfig(r=4, inflation="pi", side="post", target_modules=["q"])
    cfg.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert '"peft_type": "LORMA"' in text
    loaded = LormaConfig.from_pretrained(tmp_path)
    assert (loaded.r, loaded.inflation, loaded.side) == (4, "pi", "post")
