"""The kinds of checks peft runs on small custom models (peft's tests/test_custom_models.py), written for LoRMA:
forward, identity at initialisation, training touches only the adapter, merge / unmerge / merge_and_unload /
safe merge, disabling adapters (also when merged), several adapters, deleting adapters, save / load (also with
low_cpu_mem_usage), and adapter names that make no difference. On our own small models with nn.Linear,
nn.Embedding, transformers' Conv1D and nn.Conv1d / Conv2d / Conv3d layers."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorma import LormaConfig
from lorma.layers.base import LormaLayer


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.drop = nn.Dropout(0.3)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x)))), dim=-1)


class EmbeddingModel(nn.Module):
    """An embedding, transformers' Conv1D over the embedded tokens, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.proj = Conv1D(6, 8)
        nn.init.normal_(self.proj.weight, std=0.3)
        self.head = nn.Linear(6 * 5, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(torch.relu(self.proj(self.emb(ids))).flatten(1)), dim=-1)


class Conv1dModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1, padding_mode="replicate")
        self.head = nn.Linear(6 * 10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(torch.relu(self.conv(x.reshape(-1, 4, 10))).flatten(1)), dim=-1)


class Conv1dKernel1Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 7, 1)
        self.head = nn.Linear(7 * 10, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x.reshape(-1, 3, 10))).flatten(1))


class Conv2dModel(nn.Module):
    """A Linear feeding a strided, padded Conv2d feeding a 1x1 Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 5 * 6 * 6)
        self.conv = nn.Conv2d(5, 8, 3, stride=2, padding=1, padding_mode="reflect")
        self.conv1x1 = nn.Conv2d(8, 4, 1, bias=False)
        self.head = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin0(x)).reshape(-1, 5, 6, 6)
        h = torch.relu(self.conv1x1(torch.relu(self.conv(h))))
        return torch.log_softmax(self.head(h.flatten(1)), dim=-1)


class Conv3dModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 5, (2, 3, 3), dilation=(1, 2, 1))
        self.head = nn.Linear(5 * 2 * 1 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(torch.relu(self.conv(x.reshape(-1, 2, 3, 5, 5))).flatten(1)), dim=-1)


def floats(n: int = 10) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(6, n)


MODELS: dict[str, tuple[type[nn.Module], Callable[[], torch.Tensor], list[str]]] = {
    "mlp": (MLP, floats(10), ["lin0", "lin1"]),
    "embedding": (EmbeddingModel, lambda: torch.randint(0, 50, (6, 5)), ["emb", "proj", "head"]),
    "conv1d": (Conv1dModel, floats(40), ["conv", "head"]),
    "conv1d-kernel1": (Conv1dKernel1Model, floats(30), ["conv"]),
    "conv2d": (Conv2dModel, floats(10), ["lin0", "conv", "conv1x1"]),
    "conv3d": (Conv3dModel, floats(150), ["conv"]),
}

# (model, inflation, side): every model with plus and pi; conv and Linear ones on both sides (embeddings: pre)
CASES = [
    (name, inflation, side)
    for name in MODELS
    for inflation in ("plus", "pi")
    for side in (("pre",) if name == "embedding" else ("pre", "post"))
]
IDS = [f"{name}-{inflation}-{side}" for name, inflation, side in CASES]


def base_model(name: str) -> nn.Module:
    """The frozen model, the same weights every time it is built."""
    torch.manual_seed(0)
    return MODELS[name][0]().eval()


def inputs(name: str) -> torch.Tensor:
    torch.manual_seed(1)
    return MODELS[name][1]()


def config_for(name: str, inflation: str, side: str, **overrides) -> LormaConfig:
    """Random A, B (init_weights=False) so every check compares adapted outputs that differ from the base's."""
    kwargs = {"target_modules": MODELS[name][2], "r": 2, "alpha": 2.0, "inflation": inflation, "side": side,
              "side_pattern": {"emb": "pre"}, "init_weights": False, **overrides}
    return LormaConfig(**kwargs)


def peft_model(name: str, inflation: str, side: str, adapter_name: str = "default", **overrides) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r > d where a layer is tiny
        torch.manual_seed(2)
        return get_peft_model(base_model(name), config_for(name, inflation, side, **overrides),
                              adapter_name=adapter_name).eval()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(a, b, atol=tol, rtol=tol)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tuner_layers(model: nn.Module) -> list[LormaLayer]:
    return [m for m in model.modules() if isinstance(m, LormaLayer)]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    return request.param


def test_forward_is_finite_and_adapted(case: tuple[str, str, str]) -> None:
    name, inflation, side = case
    x = inputs(name)
    plain = base_model(name)(x)
    model = peft_model(name, inflation, side)
    out = model(x)
    assert out.shape == plain.shape and torch.isfinite(out).all()
    assert not close(out, plain, 1e-4)
    adapted = {type(m.get_base_layer()) for m in tuner_layers(model)}
    assert len(tuner_layers(model)) == len(MODELS[name][2]) and adapted <= {nn.Linear, nn.Embedding, Conv1D,
                                                                           nn.Conv1d, nn.Conv2d, nn.Conv3d}


def test_identity_initialisation_keeps_the_base_output(case: tuple[str, str, str]) -> None:
    name, inflation, side = case
    x = inputs(name)
    model = peft_model(name, inflation, side, init_weights=True)
    assert close(model(x), base_model(name)(x))


def test_training_changes_only_the_adapter(case: tuple[str, str, str]) -> None:
    name, inflation, side = case
    model = peft_model(name, inflation, side).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lorma_A." in n or ".lorma_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = inputs(name)
    target = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_merge_unmerge_and_merge_and_unload(case: tuple[str, str, str]) -> None:
    name, inflation, side = case
    x = inputs(name)
    model = peft_model(name, inflation, side)
    expected = model(x).detach()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    model.merge_adapter()
    assert all(m.merged for m in tuner_layers(model))
    assert close(model(x), expected)
    with pytest.warns(UserWarning, match="already merged"):  # merging twice is a no-op
        model.merge_adapter()
    assert close(model(x), expected)
    model.unmerge_adapter()
    assert not any(m.merged for m in tuner_layers(model))
    for n, p in model.named_parameters():
        if n in frozen:
            assert close(p, frozen[n], 1e-6), n
    assert close(model(x), expected)

    safe = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    merged = model.merge_and_unload()
    for unloaded in (safe, merged):
        assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
        assert close(unloaded(x), expected)


def test_safe_merge_refuses_a_broken_adapter_without_changing_anything(case: tuple[str, str, str]) -> None:
    name, inflation, side = case
    model = peft_model(name, inflation, side)
    layer = tuner_layers(model)[0]
    weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.lorma_A["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.get_base_layer().weight, weight)


def test_disabling_adapters_gives_the_base_model(case: tuple[str, str, str]) -> None:
    name, inflation, side = case
    x = inputs(name)
    plain = base_model(name)(x)
    model = peft_model(name, inflation, side)
    adapted = model(x).detach()
    with model.disable_adapter():
        assert close(model(x), plain)
    assert close(model(x), adapted)
    model.merge_adapter()
    with model.disable_adapter():  # merged layers unmerge themselves when disabled
        assert close(model(x), plain)
    assert close(model(x), adapted)


def test_several_adapters_switch_and_delete(case: tuple[str, str, str]) -> None:
    name, inflation, side = case
    x = inputs(name)
    model = peft_model(name, inflation, side)
    first = model(x).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(3)
        model.add_adapter("other", config_for(name, inflation, side))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)  # added inactive
    assert close(model(x), first)
    model.set_adapter("other")
    second = model(x).detach()
    assert not close(second, first, 1e-4)
    assert all(p.requires_grad == (".other" in n) for n, p in model.named_parameters() if ".lorma_" in n)
    model.set_adapter("default")
    assert close(model(x), first)

    model.merge_adapter()
    with pytest.raises(ValueError, match="while they are merged"):
        model.delete_adapter("default")
    model.unmerge_adapter()
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    assert close(model(x), second)
    for layer in tuner_layers(model):
        for attr in layer.adapter_layer_names + layer.other_param_names:
            assert "default" not in getattr(layer, attr), attr
    assert not any(".default" in n for n in model.state_dict())


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_and_load_roundtrip(case: tuple[str, str, str], low_cpu_mem_usage: bool, tmp_path: Path) -> None:
    name, inflation, side = case
    x = inputs(name)
    model = peft_model(name, inflation, side)
    expected = model(x).detach()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"lorma_A", "lorma_B"}  # the adapter only
    loaded = PeftModel.from_pretrained(base_model(name), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert close(loaded(x), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_the_adapter_name_makes_no_difference(case: tuple[str, str, str], tmp_path: Path) -> None:
    name, inflation, side = case
    x = inputs(name)
    default = peft_model(name, inflation, side)
    other = peft_model(name, inflation, side, adapter_name="my-adapter")
    assert close(default(x), other(x), 0.0)
    default.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    # peft saves an adapter not named "default" in a folder of its name
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "my-adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_layer_sizes_are_exposed(case: tuple[str, str, str]) -> None:
    """in_features / out_features: the sizes of the post- and pre-side transforms (channels for convolutions,
    vocabulary and dimension for embeddings), as A and B have them."""
    name, inflation, side = case
    model = peft_model(name, inflation, side)
    for layer in tuner_layers(model):
        base = layer.get_base_layer()
        sizes = {
            nn.Embedding: lambda b: (b.num_embeddings, b.embedding_dim),
            Conv1D: lambda b: tuple(b.weight.shape),
            nn.Linear: lambda b: (b.in_features, b.out_features),
        }.get(type(base), lambda b: (b.in_channels, b.out_channels))(base)
        assert (layer.in_features, layer.out_features) == sizes
        d = layer.in_features if layer.side["default"] == "post" else layer.out_features
        assert layer.lorma_A["default"].shape == (2, d) and layer.lorma_B["default"].shape == (d, 2)


def test_bfloat16_base_forward_and_merge(case: tuple[str, str, str]) -> None:
    """The whole model in bfloat16: a finite bfloat16 output, merging close to the unmerged output at bfloat16's
    precision, and unmerging restores the half-precision weights bit for bit (the layer keeps a copy)."""
    name, inflation, side = case
    x = inputs(name)
    model = peft_model(name, inflation, side)
    with torch.no_grad():  # float32 references: the adapted output, and the adapter's own effect on it
        reference = model(x).double()
        with model.disable_adapter():
            effect = relative_error(model(x), reference)
    model = model.to(torch.bfloat16)
    x = x if x.dtype == torch.long else x.to(torch.bfloat16)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.merge_adapter()
    # bfloat16 rounding costs about 0.4% here; the adapter moves the output by 1.8% to 80% (a merge that did nothing
    # would be off by that much): the merged output must be within bfloat16's precision and well inside the effect
    error = relative_error(model(x), reference)
    assert error < 0.01 and error < effect / 3, (error, effect)
    model.unmerge_adapter()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
