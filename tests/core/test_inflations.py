"""Inflations as objects: the registry, each built-in's methods against the dense formula in float64, and the
memory bounds as LormaConfig fields saved with the adapter."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import fresh_python
from conftest import reference_inflation
from inflation_contract import check_inflation_contract
from lorma import LormaConfig
from lorma.inflations import (
    DEFAULT_FFT_CHUNK_BYTES,
    DEFAULT_MAX_DENSE_BYTES,
    Inflation,
    get_inflation,
    inflation_names,
    register_inflation,
)
from lorma.inflations import base as inflations_base

BUILT_IN = ("plus", "pi", "none")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------- the registry
def test_built_ins_are_registered_in_the_papers_order() -> None:
    assert inflation_names()[:3] == BUILT_IN
    for name in BUILT_IN:
        assert get_inflation(name).name == name
    with pytest.raises(ValueError, match=r"unknown inflation 'times'; expected one of \('plus', 'pi', 'none'"):
        get_inflation("times")
    with pytest.raises(ValueError, match=r"LormaConfig: unknown inflation 'times'.*register_inflation"):
        LormaConfig(inflation="times")


def test_registering_checks_the_class_and_keeps_names_unique() -> None:
    with pytest.raises(TypeError, match="Inflation subclass"):
        register_inflation(object)  # type: ignore[arg-type]

    class Nameless(Inflation):
        pass

    with pytest.raises(ValueError, match="Nameless has no name"):
        register_inflation(Nameless)

    class Impostor(Inflation):
        name = "plus"

    with pytest.raises(ValueError, match=r"an inflation named 'plus' is already registered \(lorma\.inflations\.plus"):
        register_inflation(Impostor)
    assert get_inflation("plus").__name__ == "PlusInflation"


def test_a_custom_inflation_registered_from_a_test_runs_through_peft() -> None:
    """A transform the built-ins do not have (a negated LoRMA+, I - sBA), dense, through the defaults."""

    @register_inflation
    class MinusInflation(Inflation):
        name = "test-minus"

        def initialize(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
            nn.init.normal_(A)
            B.zero_()

        def transform(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
            return torch.eye(B.shape[-2], dtype=A.dtype) - scaling * (B @ A)

    try:
        assert "test-minus" in inflation_names()
        base = nn.Sequential(nn.Linear(6, 10))
        model = get_peft_model(base, LormaConfig(r=2, alpha=4, inflation="test-minus", side="post",
                                                 target_modules=["0"], init_weights=False))
        layer = model.base_model.model[0]
        assert type(layer.lorma_variant["default"].inflation) is MinusInflation
        A, B = layer.lorma_A["default"].detach().double(), layer.lorma_B["default"].detach().double()
        M = torch.eye(6, dtype=torch.float64) - 2.0 * (B @ A)
        W0, b = base[0].weight.detach().double(), base[0].bias.detach().double()
        x = torch.randn(3, 6)
        assert rel_err(model(x), x.double() @ (W0 @ M).T + b) < 1e-6
    finally:
        inflations_base._INFLATIONS.pop("test-minus")


# ---------------------------------------------------------------------------------------------- the objects
@pytest.mark.parametrize("name", BUILT_IN)
def test_transform_apply_and_merge_equal_the_dense_formula(name: str) -> None:
    d, d_other, r, s = 9, 5, 3, 0.7
    inflation = get_inflation(name)()
    A, B = torch.randn(r, d, dtype=torch.float64), torch.randn(d, r, dtype=torch.float64)
    M = reference_inflation(A, B, name, s)
    assert rel_err(inflation.transform(A, B, s), M) < 1e-12
    # batched pairs (fused parts)
    A2, B2 = torch.stack([A, 2 * A]), torch.stack([B, -B])
    batched = inflation.transform(A2, B2, s)
    assert rel_err(batched[1], reference_inflation(2 * A, -B, name, s)) < 1e-12
    # the adapter path: (I(BA) - I)(h - shift), the shift (a bias) kept out of the product
    h, shift = torch.randn(4, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    assert rel_err(inflation.apply_delta(h, A, B, s), h @ (M - eye).T) < 1e-12
    assert rel_err(inflation.apply_delta(h, A, B, s, shift), (h - shift) @ (M - eye).T) < 1e-12
    # merging: what it adds on each side
    W_pre, W_post = torch.randn(d, d_other, dtype=torch.float64), torch.randn(d_other, d, dtype=torch.float64)
    assert rel_err(inflation.delta_weight(W_pre, A, B, s, "pre"), (M - eye) @ W_pre) < 1e-12
    assert rel_err(inflation.delta_weight(W_post, A, B, s, "post"), W_post @ (M - eye)) < 1e-12


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_ins_keep_the_contract_every_inflation_keeps(name: str) -> None:
    check_inflation_contract(name)


@pytest.mark.parametrize("name", BUILT_IN)
def test_identity_initialisation(name: str) -> None:
    inflation = get_inflation(name)()
    A, B = torch.empty(4, 16), torch.empty(16, 4)
    with torch.no_grad():
        inflation.initialize(A, B, 2.0)
    M = inflation.transform(A, B, 2.0)
    if name == "plus":
        assert torch.equal(M, torch.eye(16))
    elif name == "pi":
        assert torch.allclose(M, torch.eye(16), atol=1e-6)
    else:  # a rank-4 projection: the identity is out of reach
        assert torch.allclose(M @ M, M, atol=1e-5) and torch.linalg.matrix_rank(M.double(), rtol=1e-5) == 4


def test_plus_unmerges_by_woodbury_and_exports_and_combines_in_low_rank_form() -> None:
    plus = get_inflation("plus")()
    d, d_other, r = 8, 6, 2
    A1, B1, A2, B2 = (torch.randn(*shape, dtype=torch.float64) * 0.3 for shape in [(r, d), (d, r)] * 2)
    eye = torch.eye(d, dtype=torch.float64)
    M1 = eye + 0.5 * B1 @ A1
    W0 = torch.randn(d, d_other, dtype=torch.float64)
    assert plus.unmerges_exactly(A1, B1, 0.5)
    assert rel_err(plus.unmerge(M1 @ W0, A1, B1, 0.5, "pre"), W0) < 1e-12
    u, v = plus.lora_factors(W0, A1, B1, 0.5, "pre")
    assert u.shape == (d, r) and v.shape == (r, d_other) and rel_err(u @ v, (M1 - eye) @ W0) < 1e-12
    # an ill-conditioned I + sBA (near-singular core) is not trusted to unmerge: the layer keeps a copy
    A_bad = -B1.pinverse() / 0.5 * (1 - 1e-9)
    assert not plus.unmerges_exactly(A_bad, B1, 0.5)
    terms = [(A1, B1, 0.5, 1.0), (A2, B2, 2.0, 0.5)]
    x, y = plus.combine(terms, "linear", "pre")
    assert rel_err(eye + x @ y, eye + 0.5 * B1 @ A1 + 0.5 * 2.0 * B2 @ A2) < 1e-12
    x, y = plus.combine(terms, "product", "pre")  # adapter 1 nearest to W0: I_2 I_1 W0
    assert rel_err(eye + x @ y, (eye + 0.5 * 2.0 * B2 @ A2) @ M1) < 1e-12
    for name in ("pi", "none"):
        dense = get_inflation(name)()
        assert dense.lora_factors(W0, A1, B1, 0.5, "pre") is None and not dense.unmerges_exactly(A1, B1, 0.5)
        assert dense.combination_types == () and not dense.exact_lora_export
        with pytest.raises(ValueError, match=f"'{name}' inflation cannot be combined"):
            dense.combine(terms, "linear", "pre")


# ---------------------------------------------------------------------------------------------- the bounds
def test_bounds_are_validated_config_fields() -> None:
    config = LormaConfig()
    assert (config.max_dense_bytes, config.fft_chunk_bytes) == (DEFAULT_MAX_DENSE_BYTES, DEFAULT_FFT_CHUNK_BYTES)
    assert LormaConfig(max_dense_bytes=None).max_dense_bytes is None
    for bad in (0, -1, True, 1.5, "256MiB"):
        with pytest.raises(ValueError, match=r"LormaConfig: max_dense_bytes must be a positive integer or None"):
            LormaConfig(max_dense_bytes=bad)
    for bad in (0, None, False, 2.0):
        with pytest.raises(ValueError, match="LormaConfig: fft_chunk_bytes must be a positive integer"):
            LormaConfig(fft_chunk_bytes=bad)


def test_bounds_are_saved_with_the_adapter_and_loaded_in_a_fresh_process(tmp_path) -> None:
    """A pi adapter made with a small bound takes the bounded FFT path; the bound travels with the adapter."""
    d_in, d_out = 16, 24
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out))
    torch.save(base.state_dict(), tmp_path / "base.pt")
    config = LormaConfig(r=3, inflation="pi", target_modules=["0"], init_weights=False,
                         max_dense_bytes=d_out * d_out * 4 - 1, fft_chunk_bytes=4096)
    model = get_peft_model(base, config)
    inflation = model.base_model.model[0].lorma_variant["default"].inflation
    assert (inflation.max_dense_bytes, inflation.fft_chunk_bytes) == (d_out * d_out * 4 - 1, 4096)
    assert inflation.strategy(10, d_out, d_in, True) == "fft"
    x = torch.randn(5, d_in)
    with torch.no_grad():
        out = model(x)
    layer = model.base_model.model[0]
    M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(), "pi",
                            layer.scaling["default"])
    expected = x.double() @ (M @ base[0].get_base_layer().weight.detach().double()).T
    assert rel_err(out, expected + base[0].get_base_layer().bias.detach().double()) < 1e-5
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["max_dense_bytes"], saved["fft_chunk_bytes"], saved["variant"]) == (d_out * d_out * 4 - 1, 4096, None)
    torch.save(x, tmp_path / "x.pt")
    torch.save(out, tmp_path / "out.pt")
    script = textwrap.dedent(f"""
        import torch
        from torch import nn
        from peft import PeftModel
        import lorma

        base = nn.Sequential(nn.Linear({d_in}, {d_out}))
        base.load_state_dict(torch.load(r"{tmp_path / 'base.pt'}"))
        model = PeftModel.from_pretrained(base, r"{tmp_path / 'adapter'}")
        inflation = model.base_model.model[0].lorma_variant["default"].inflation
        assert (inflation.max_dense_bytes, inflation.fft_chunk_bytes) == ({d_out * d_out * 4 - 1}, 4096), inflation
        with torch.no_grad():
            out = model(torch.load(r"{tmp_path / 'x.pt'}"))
        assert torch.equal(out, torch.load(r"{tmp_path / 'out.pt'}"))
        print("ok")
    """)
    done = fresh_python.run([sys.executable, "-c", script], timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
    # an adapter saved before the fields existed loads with the defaults
    del saved["max_dense_bytes"], saved["fft_chunk_bytes"], saved["variant"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    old = PeftModel.from_pretrained(nn.Sequential(nn.Linear(d_in, d_out)), tmp_path / "adapter")
    assert old.base_model.model[0].lorma_variant["default"].inflation.max_dense_bytes == DEFAULT_MAX_DENSE_BYTES
