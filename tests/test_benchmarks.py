"""The benchmark harness does not rot: reference orderings compute LoRMA, memory tracking is exact, and a
tiny ``python -m benchmarks.run --quick`` writes its report and plot."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import reference_inflation

benchmarks = pytest.importorskip("benchmarks.harness", reason="run pytest from the repository root")

from benchmarks import harness as H  # noqa: E402
from benchmarks import run as R  # noqa: E402
from benchmarks.reference_orderings import ReferenceLorma, apply_reference  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("ordering", ["table11", "released"])
@pytest.mark.parametrize("inflation", ["plus", "pi"])
def test_reference_orderings_compute_lorma(ordering: str, inflation: str) -> None:
    base = nn.Linear(10, 12)
    ref = ReferenceLorma(base, r=3, alpha=6, inflation=inflation, ordering=ordering)
    with torch.no_grad():
        ref.A.normal_()
        ref.B.normal_()
    x = torch.randn(4, 10)
    M = reference_inflation(ref.A[0].detach(), ref.B[0].detach(), inflation, 2.0)
    expected = x.double() @ (M @ base.weight.detach().double()).T + base.bias.detach().double()
    assert rel_err(ref(x), expected) < 1e-5


def test_reference_ordering_on_fused_gpt2_parts(tiny_gpt2) -> None:
    model = apply_reference(tiny_gpt2, ["c_attn"], 2, 4, "pi", "released", {"c_attn": (3, [0, 2])})
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.A.normal_()
        layer.B.normal_()
    W0 = layer.base.weight.detach().double().T  # Conv1D stores (d_in, d_out)
    W = W0.clone()
    for i, p in enumerate([0, 2]):
        rows = slice(32 * p, 32 * (p + 1))
        W[rows] = reference_inflation(layer.A[i].detach(), layer.B[i].detach(), "pi", 2.0) @ W0[rows]
    x = torch.randn(3, 32)
    assert rel_err(layer(x), x.double() @ W.T + layer.base.bias.detach().double()) < 1e-5
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"transformer.h.{i}.attn.c_attn.{w}" for i in range(2) for w in ("A", "B")
    }


def test_step_peak_bytes_counts_what_is_alive_together() -> None:
    model = nn.Linear(4, 4)
    start = H.live_bytes(model, None)

    def step() -> None:
        a = torch.ones(262144)  # 1 MiB
        b = torch.ones(524288)  # 2 MiB, while a is alive
        del a, b
        c = torch.ones(524288)  # 2 MiB after both were freed: not a new peak
        del c

    assert H.step_peak_bytes(step, model) - start == 3 * 2**20


def test_quick_run_writes_report_and_plot(tmp_path) -> None:
    out = tmp_path / "B.md"
    assert R.main(["--quick", "--skip", "minilm", "gpt2", "compile", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python -m benchmarks.run --quick" in text
    for d in (64, 128):
        assert f"### Linear {d} x {d}" in text
    assert "| lora | " in text and "| lorma-pi-pre | " in text and "| ref-released-pi | " in text
    lora_row = next(line for line in text.splitlines() if line.startswith("| lora | "))
    assert lora_row.split("|")[4].strip() == "1.00"  # LoRA is its own baseline
    png = tmp_path / "benchmarks-layers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))
