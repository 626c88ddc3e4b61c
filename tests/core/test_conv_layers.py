"""LoRMA on nn.Conv1d / Conv2d / Conv3d against the dense formula (docs/conv-and-embeddings.md), in float64.

pre:  W = I(BA) W0 over the output channels (W0 seen as out x (in * K));
post: W[:, :, k] = W0[:, :, k] I(BA) at every kernel position k (I(BA) over the input channels).
The reference builds W densely from the paper's definitions (conftest.reference_inflation) and runs a copy of the
base convolution with it, so stride, dilation, padding and padding modes are torch's own.
"""

from __future__ import annotations

import copy
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

import fresh_python
from conftest import reference_inflation
from lorma import LormaConfig
from lorma.layers.conv import Conv

INFLATIONS = ["plus", "pi", "none"]
SIDES = ["pre", "post"]

# (name, constructor, input shape): every dimension, and strides, dilations, padding modes, 'same', no bias
CONVS = {
    "1d-circular-stride": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, padding_mode="circular"), (2, 4, 11)),
    "2d-reflect-dilated": (
        lambda: nn.Conv2d(3, 5, (3, 2), padding=2, dilation=(1, 2), padding_mode="reflect"),
        (2, 3, 7, 8),
    ),
    "2d-same-even-kernel": (lambda: nn.Conv2d(5, 3, 4, padding="same", bias=False), (1, 5, 6, 6)),
    "2d-replicate-stride": (lambda: nn.Conv2d(4, 7, 3, stride=(2, 1), padding=1, padding_mode="replicate"),
                            (2, 4, 9, 5)),
    "3d-zeros": (lambda: nn.Conv3d(3, 4, (2, 3, 1), stride=(1, 2, 1), padding=1, bias=False), (2, 3, 4, 5, 3)),
}


class Wrap(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def adapted(conv: nn.Module, **config) -> tuple[nn.Module, Conv]:
    """A peft model around ``conv`` with random A, B (init_weights=False), all in float64."""
    config = {"target_modules": ["conv"], "r": 2, "alpha": 3.0, "init_weights": False, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > d on the tiny layers
        model = get_peft_model(Wrap(conv), LormaConfig(**config)).double()
    layer = model.base_model.model.conv
    assert isinstance(layer, Conv)
    return model, layer


def dense_weight(layer: Conv, adapter: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The adapted weight from the formula, float64: I(BA) over the output channels or, per kernel position, the
    input channels."""
    W0 = (layer.get_base_layer().weight if base_weight is None else base_weight).detach().double()
    A, B = layer.lorma_A[adapter], layer.lorma_B[adapter]
    M = reference_inflation(A, B, layer.inflation[adapter], layer.scaling[adapter])
    if layer.side[adapter] == "pre":
        return torch.einsum("op,pi...->oi...", M, W0)
    return torch.einsum("oi...,ij->oj...", W0, M)


def run_with_weight(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base convolution (its own stride, padding, mode) with ``weight``, in float64."""
    conv = copy.deepcopy(base).double()
    conv.weight = nn.Parameter(weight.detach().clone())
    return conv(x.double())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("inflation", INFLATIONS)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("conv_name", list(CONVS))
def test_forward_merge_unmerge_match_the_dense_formula(conv_name: str, side: str, inflation: str) -> None:
    make, shape = CONVS[conv_name]
    model, layer = adapted(make(), side=side, inflation=inflation)
    base = layer.get_base_layer()
    W0 = base.weight.detach().clone()
    x = torch.randn(shape, dtype=torch.float64)
    expected = run_with_weight(base, dense_weight(layer, "default"), x)

    out = model(x)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < 1e-12
    assert rel_err(out, run_with_weight(base, W0, x)) > 1e-3  # the adapter does something

    model.merge_adapter()
    assert rel_err(base.weight, dense_weight(layer, "default", W0)) < 1e-12
    assert rel_err(model(x), expected) < 1e-12
    model.unmerge_adapter()
    if inflation == "plus":  # Woodbury, an r x r solve
        assert (base.weight - W0).abs().max().item() < 1e-12
    else:  # pi / none: the weight kept at merge time
        assert torch.equal(base.weight, W0)
    assert rel_err(model(x), expected) < 1e-12


@pytest.mark.parametrize("strategy", ["activation", "weight"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("inflation", ["pi", "none"])
def test_both_dense_strategies_give_the_formula_and_its_gradients(
    inflation: str, side: str, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dense transform on the channel activations, or folded into the weight for one convolution: the same
    output and the same gradients of A, B and the input as autograd through the dense formula."""
    model, layer = adapted(nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), side=side,
                           inflation=inflation)
    monkeypatch.setattr(layer.lorma_variant["default"].inflation, "strategy", lambda *args, **kw: strategy)
    base = layer.get_base_layer()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    probe = torch.randn_like(run_with_weight(base, base.weight, x))

    (model(x) * probe).sum().backward()
    got = (layer.lorma_A["default"].grad, layer.lorma_B["default"].grad, x.grad)

    A = layer.lorma_A["default"].detach().clone().requires_grad_(True)
    B = layer.lorma_B["default"].detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    M = reference_inflation(A, B, inflation, layer.scaling["default"])
    W0 = base.weight.detach()
    W = torch.einsum("op,pi...->oi...", M, W0) if side == "pre" else torch.einsum("oi...,ij->oj...", W0, M)
    (nn.functional.conv2d(nn.functional.pad(x_ref, (1, 1, 1, 1), mode="reflect"), W, base.bias.detach(), stride=2)
     * probe).sum().backward()
    for g, ref in zip(got, (A.grad, B.grad, x_ref.grad)):
        assert rel_err(g, ref) < 1e-10


@pytest.mark.parametrize("inflation", INFLATIONS)
def test_pre_and_post_adapters_compose_on_one_convolution(inflation: str) -> None:
    """Adapter "a" on the output channels, "b" on the input channels, both active: W = I_a W0 I_b per position."""
    model, layer = adapted(nn.Conv1d(3, 5, 3, padding=1), side="pre", inflation=inflation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("b", LormaConfig(target_modules=["conv"], r=2, side="post", inflation=inflation,
                                           init_weights=False))
    model.double()
    model.base_model.set_adapter(["default", "b"])
    base = layer.get_base_layer()
    W0 = base.weight.detach().clone()
    expected_w = dense_weight(layer, "b", dense_weight(layer, "default"))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = run_with_weight(base, expected_w, x)
    assert rel_err(model(x), expected) < 1e-12
    layer.merge(adapter_names=["default", "b"])
    assert rel_err(base.weight, expected_w) < 1e-12
    layer.unmerge()
    assert (base.weight - W0).abs().max().item() < 1e-12


def test_unbatched_and_channels_last_inputs() -> None:
    model, layer = adapted(nn.Conv1d(3, 4, 2), side="pre", inflation="plus")
    x = torch.randn(3, 9, dtype=torch.float64)  # (C, L): Conv1d's unbatched form
    assert rel_err(model(x), run_with_weight(layer.get_base_layer(), dense_weight(layer, "default"), x)) < 1e-12

    model, layer = adapted(nn.Conv2d(3, 4, 3, padding=1), side="post", inflation="pi")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    expected = run_with_weight(layer.get_base_layer(), dense_weight(layer, "default"), x.contiguous())
    assert rel_err(model(x), expected) < 1e-12


def test_float32_forward_and_unmerge() -> None:
    """Default dtypes: float32 base and adapters; plus unmerges to rounding, pi restores the weight bit for bit."""
    for inflation, side in (("plus", "post"), ("pi", "pre")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(Wrap(nn.Conv2d(4, 6, 3, padding=1)), LormaConfig(
                target_modules=["conv"], r=2, side=side, inflation=inflation, init_weights=False))
        layer = model.base_model.model.conv
        base = layer.get_base_layer()
        W0 = base.weight.detach().clone()
        x = torch.randn(2, 4, 5, 5)
        expected = run_with_weight(base, dense_weight(layer, "default"), x)
        assert rel_err(model(x), expected) < 1e-5
        model.merge_adapter()
        model.unmerge_adapter()
        if inflation == "plus":
            assert rel_err(base.weight, W0) < 1e-6
        else:
            assert torch.equal(base.weight, W0)


def test_identity_initialisation_leaves_the_output_unchanged() -> None:
    for inflation in ("plus", "pi"):
        conv = nn.Conv2d(3, 5, 3)
        x = torch.randn(2, 3, 6, 6)
        expected = conv(x)
        model = get_peft_model(Wrap(conv), LormaConfig(target_modules=["conv"], r=2, inflation=inflation,
                                                       side="post"))
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_grouped_convolutions_are_refused_naming_module_and_groups() -> None:
    with pytest.raises(ValueError, match=r"'conv' is a Conv2d with groups=2.*groups=1"):
        get_peft_model(Wrap(nn.Conv2d(4, 6, 3, groups=2)), LormaConfig(target_modules=["conv"], r=2))


def test_linear_only_options_are_refused_naming_the_module() -> None:
    with pytest.raises(ValueError, match=r"'conv' is a Conv2d: LoRMA variants \('dorma'\)"):
        get_peft_model(Wrap(nn.Conv2d(4, 6, 3)), LormaConfig(target_modules=["conv"], r=2, variant="dorma"))
    with pytest.raises(ValueError, match=r"'conv' is a Conv2d: fused_parts"):
        get_peft_model(Wrap(nn.Conv2d(4, 6, 3)), LormaConfig(target_modules=["conv"], r=2,
                                                            fused_parts={"conv": {"num_parts": 2, "parts": [0]}}))


def test_side_auto_picks_the_smaller_channel_transform_and_records_it() -> None:
    model = get_peft_model(Wrap(nn.Conv2d(3, 16, 3)), LormaConfig(target_modules=["conv"], r=2, side="auto"))
    layer = model.base_model.model.conv
    assert layer.side["default"] == "post" and layer.lorma_A["default"].shape == (2, 3)
    assert list(model.peft_config["default"].side_pattern.values()) == ["post"]


# the model both processes build (the same seed gives the same frozen weights)
NET_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular")
            self.c2 = nn.Conv3d(6, 4, (1, 2, 2), stride=(1, 2, 1))

        def forward(self, x):
            return self.c2(torch.tanh(self.c1(x)).unsqueeze(2))
    """
)

LOAD_SCRIPT = NET_SOURCE + textwrap.dedent(
    """
    import sys
    from peft import PeftModel
    import lorma  # registers LoRMA with peft

    torch.manual_seed(0)
    saved = torch.load(sys.argv[2])
    model = PeftModel.from_pretrained(Net(), sys.argv[1]).eval()
    assert (model(saved["x"]) - saved["y"]).abs().max().item() < 1e-5
    merged = model.merge_and_unload()
    assert type(merged.c1) is nn.Conv2d and type(merged.c2) is nn.Conv3d
    assert (merged(saved["x"]) - saved["y"]).abs().max().item() < 1e-5
    print("ok")
    """
)


def test_save_and_load_in_a_fresh_process(tmp_path: Path) -> None:
    """save_pretrained, then PeftModel.from_pretrained in a new interpreter: the same outputs, merged too."""
    namespace: dict = {}
    exec(NET_SOURCE, namespace)
    torch.manual_seed(0)
    config = LormaConfig(target_modules=["c1", "c2"], r=2, inflation="pi", side_pattern={"c1": "post", "c2": "pre"},
                         init_weights=False)
    model = get_peft_model(namespace["Net"](), config).eval()
    x = torch.randn(2, 3, 5, 4)
    y = model(x).detach()
    model.save_pretrained(tmp_path / "adapter")
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    result = fresh_python.run([sys.executable, str(script), str(tmp_path / "adapter"), str(tmp_path / "io.pt")],
                              timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_lora_export_refuses_convolutions_naming_the_module() -> None:
    from lorma.export.lora import ExportError, lora_export

    model = get_peft_model(Wrap(nn.Conv2d(3, 4, 3)), LormaConfig(target_modules=["conv"], r=2))
    with pytest.raises(ExportError, match=r"module 'conv' is a Conv2d: lorma export writes LoRA adapters for Linear"):
        lora_export(model)


@pytest.mark.parametrize("side", SIDES)
def test_add_weighted_adapter_product_is_the_composition_on_a_convolution(side: str) -> None:
    """LoRMA+'s exact "product" combination: one adapter equal to activating both, on either channel axis."""
    model, layer = adapted(nn.Conv2d(3, 5, 3, padding=1), side=side, inflation="plus")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("b", LormaConfig(target_modules=["conv"], r=2, side=side, init_weights=False))
    model.double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.base_model.set_adapter(["default", "b"])
    both = model(x).detach()
    model.base_model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "ab", combination_type="product")
    model.base_model.set_adapter("ab")
    assert layer.lorma_A["ab"].shape == (4, 5 if side == "pre" else 3)
    assert rel_err(model(x), both) < 1e-10
