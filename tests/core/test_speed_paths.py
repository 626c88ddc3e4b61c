"""Fast paths of the adapter against the dense formula: the FFT form of ``pi``, its bounded-memory chunking,
the low-rank form of ``none``, and the choice of path at large shapes (LLaMA-3-8B's d_out = 14336).

Never asserts on wall time: only on values, gradients, decisions and the largest tensor an op produced.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import reference_inflation
from lorma import LormaConfig
from lorma import functional as LF
from lorma.inflations import NoneInflation, PiInflation, PlusInflation, get_inflation


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest new tensor any op allocates (forward and backward alike).

    Views (a transposed weight, a slice) share an input's storage and allocate nothing: they are skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        input_storages = {t.untyped_storage().data_ptr() for t in inputs}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in input_storages:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("d", [7, 16, 33])
def test_pi_fft_equals_dense_formula_values_and_gradients(d: int) -> None:
    r, s = 3, 0.7
    A = torch.randn(r, d, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d, r, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)
    out = LF.apply_pi_fft(h, A, B, s)
    M = reference_inflation(A.detach(), B.detach(), "pi", s)
    assert rel_err(out.detach(), h.detach() @ M.T) < 1e-12
    # gradients against autograd through the dense formula (built by explicit indexing, independent of lorma)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), (h, A, B))
    rows = torch.arange(d).unsqueeze(1)
    cols = (torch.arange(d).unsqueeze(0) - rows) % d
    dense = h @ (s * (B @ A)[rows, cols]).T
    expected = torch.autograd.grad((dense * weights).sum(), (h, A, B))
    for got, want in zip(grads, expected):
        assert rel_err(got, want) < 1e-10


def test_bounded_path_chunks_and_checkpoints_exactly() -> None:
    d, r, s = 24, 4, 0.5
    A = torch.randn(r, d, requires_grad=True)
    B = torch.randn(d, r, requires_grad=True)
    h = torch.randn(3, 11, d, requires_grad=True)
    full = LF.apply_pi_fft(h, A, B, s)
    g_full = torch.autograd.grad(full.sum(), (h, A, B))
    # a budget of a few tokens per chunk: many chunks, each checkpointed
    chunked = LF.apply_pi_bounded(h, A, B, s, chunk_bytes=3 * 3 * r * d * 4 * 2)
    assert chunked.shape == h.shape
    assert rel_err(chunked, full) < 1e-6
    g_chunked = torch.autograd.grad(chunked.sum(), (h, A, B))
    for got, want in zip(g_chunked, g_full):
        assert rel_err(got, want) < 1e-6
    with torch.no_grad():
        assert rel_err(LF.apply_pi_bounded(h, A, B, s, chunk_bytes=1), full) < 1e-6  # one token per chunk


def test_strategy_at_llama3_8b_shapes_never_builds_d_out_squared() -> None:
    pi = PiInflation()  # the default bounds, as LormaConfig has them
    # up / gate, pre side: d = d_out = 14336; a dense fp32 transform would be 822 MB
    assert LF.dense_transform_bytes(14336) == 14336 * 14336 * 4 > LormaConfig().max_dense_bytes == pi.max_dense_bytes
    for needs_grad in (True, False):
        assert pi.strategy(2048, 14336, 4096, needs_grad) == "fft"
        # post side of up / gate: d = d_in = 4096, 64 MiB: dense is allowed and the flop count decides
        assert pi.strategy(2048, 4096, 14336, needs_grad) in ("activation", "weight")
    # the user can lift the bound explicitly
    assert PiInflation(max_dense_bytes=None).strategy(2048, 14336, 4096, True) in ("activation", "weight")
    # flop counts: few tokens, wide other side -> apply on activations; many tokens -> fold into the weight
    assert pi.strategy(16, 1024, 4096, True) == "activation"
    assert pi.strategy(8192, 1024, 1024, True) == "weight"
    assert LF.choose_dense_strategy(16, 1024, 4096, True) == "activation"
    assert LF.choose_dense_strategy(8192, 1024, 1024, True) == "weight"
    # the FFT path is pi's: the other built-in inflations never take it, however large d is
    for other in (PlusInflation(), NoneInflation()):
        assert other.strategy(2048, 14336, 4096, True) == "activation"


def _pi_layer(d_in: int, d_out: int, side: str, r: int = 4) -> nn.Module:
    model = get_peft_model(
        nn.Sequential(nn.Linear(d_in, d_out)),
        LormaConfig(r=r, alpha=2 * r, inflation="pi", side=side, target_modules=["0"], init_weights=False),
    )
    return model.base_model.model[0]


@pytest.mark.parametrize("side", ["pre", "post"])
def test_layer_over_the_limit_takes_bounded_path_and_matches_formula(side: str) -> None:
    d_in, d_out = 40, 56
    layer = _pi_layer(d_in, d_out, side)
    d = d_out if side == "pre" else d_in
    x = torch.randn(3, 9, d_in)
    W0 = layer.get_base_layer().weight.detach().double()
    b = layer.get_base_layer().bias.detach().double()
    A, B = layer.lorma_A["default"], layer.lorma_B["default"]
    M = reference_inflation(A.detach(), B.detach(), "pi", layer.scaling["default"])
    expected = x.double() @ (M @ W0 if side == "pre" else W0 @ M).T + b

    # under the default limit the dense path runs, and the probe sees a d x d tensor (the probe works)
    probe = LargestTensor()
    with probe:
        dense_out = layer(x)
        dense_grads = torch.autograd.grad(dense_out.square().sum(), (A, B))
    assert probe.largest >= d * d
    assert rel_err(dense_out, expected) < 1e-5

    inflation = layer.lorma_variant["default"].inflation  # the bounds LormaConfig gave this adapter
    inflation.max_dense_bytes = d * d * 4 - 1
    inflation.fft_chunk_bytes = 5 * 3 * 4 * d * 8  # ~5 tokens per chunk
    probe = LargestTensor()
    with probe:
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), (A, B))
    assert probe.largest < d * d
    assert rel_err(out, expected) < 1e-5
    for got, want in zip(grads, dense_grads):
        assert rel_err(got, want) < 1e-4


def test_real_llama3_up_proj_width_runs_in_bounded_memory() -> None:
    """d_out = 14336 (LLaMA-3-8B up_proj) on the pre side, a narrow d_in to keep the base weight small."""
    layer = _pi_layer(8, 14336, "pre", r=8)
    x = torch.randn(2, 3, 8)
    probe = LargestTensor()
    with probe:
        out = layer(x)
        (gA, gB) = torch.autograd.grad(out.sum(), (layer.lorma_A["default"], layer.lorma_B["default"]))
    # largest tensor: the correlations of one chunk, (tokens, r, d) = 6 x 8 x 14336, far below 14336^2
    assert probe.largest <= 6 * 8 * 14336 * 2
    assert torch.isfinite(out).all() and torch.isfinite(gA).all() and torch.isfinite(gB).all()
    # spot-check a few output rows against the formula, row by row (never the whole d x d)
    A, B = layer.lorma_A["default"].detach().double(), layer.lorma_B["default"].detach().double()
    s = layer.scaling["default"]
    h = x.double().reshape(-1, 8) @ layer.get_base_layer().weight.detach().double().T  # (6, 14336)
    for i in (0, 1, 777, 14335):
        row = torch.roll(B[i] @ A, shifts=i)  # row i of pi(BA): row i of BA rotated right by i
        expected = s * h @ row + layer.get_base_layer().bias.detach().double()[i]
        assert rel_err(out.reshape(-1, 14336)[:, i].detach(), expected) < 1e-4


@pytest.mark.parametrize("side", ["pre", "post"])
def test_none_is_applied_low_rank(side: str) -> None:
    d = 64
    layer = get_peft_model(
        nn.Sequential(nn.Linear(d, d)),
        LormaConfig(r=3, inflation="none", side=side, target_modules=["0"], init_weights=False),
    ).base_model.model[0]
    x = torch.randn(2, 4, d)  # few tokens: the flop count keeps it on activations, never folded
    probe = LargestTensor()
    with probe:
        out = layer(x)
    assert probe.largest < d * d
    W0, b = layer.get_base_layer().weight.detach().double(), layer.get_base_layer().bias.detach().double()
    M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(), "none",
                            layer.scaling["default"])
    expected = x.double() @ (M @ W0 if side == "pre" else W0 @ M).T + b
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("inflation", ["pi", "none", "plus"])
def test_dense_recomputed_is_exact_and_saves_no_square_matrix(inflation: str) -> None:
    """apply_dense_recomputed: the dense formula's values and gradients, with no d x d tensor kept for backward."""
    d, r, s = 24, 3, 0.7
    A = torch.randn(r, d, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d, r, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 5, d, dtype=torch.float64, requires_grad=True)

    def build(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return get_inflation(inflation)().transform(a, b, s)

    saved: dict[str, list[int]] = {}
    for name, apply in (("autograd", lambda: h @ build(A, B).T), ("recomputed",
                                                                   lambda: LF.apply_dense_recomputed(h, A, B, build))):
        saved[name] = []

        def pack(t: torch.Tensor, sizes: list[int] = saved[name]) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = apply()
        M = reference_inflation(A.detach(), B.detach(), inflation, s)
        assert rel_err(out.detach(), h.detach() @ M.T) < 1e-12
        weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad((out * weights).sum(), (h, A, B))
        rows = torch.arange(d).unsqueeze(1)
        cols = (torch.arange(d).unsqueeze(0) - rows) % d
        ba = B @ A
        dense_m = {"pi": s * ba[rows, cols], "none": s * ba, "plus": torch.eye(d, dtype=ba.dtype) + s * ba}[inflation]
        expected = torch.autograd.grad(((h @ dense_m.T) * weights).sum(), (h, A, B))
        for got, want in zip(grads, expected):
            assert rel_err(got, want) < 1e-10
    assert max(saved["autograd"]) >= d * d  # autograd keeps M for the input's gradient
    assert max(saved["recomputed"]) < d * d  # only h, A and B are kept
    with torch.no_grad():  # no graph: a plain matmul
        assert rel_err(LF.apply_dense_recomputed(h, A, B, build), h @ build(A, B).T) < 1e-15


def _step_flops(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
    """Output, gradients of the adapter's parameters, and the multiply-adds of one forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in layer.parameters() if p.requires_grad]
    counter = FlopCounterMode(display=False)
    with counter:
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), params)
    return out, grads, counter.get_total_flops() // 2


@pytest.mark.parametrize("conv1d", [False, True])
def test_plus_post_costs_what_lora_costs_where_the_input_needs_no_gradient(conv1d: bool) -> None:
    """A lone LoRMA+ adapter on the post side, input without gradient (a layer alone, a model's first layer):
    ``W0 x + b + s (W0 B)(A x)``, the formula's values and gradients, and no backward pass of the frozen matmul
    (LoRA skips ``W0^T g`` there; transforming the input first would need it)."""
    from transformers.pytorch_utils import Conv1D

    d_in, d_out, r, n = 48, 80, 4, 64
    torch.manual_seed(0)
    base = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    layer = get_peft_model(nn.Sequential(base), LormaConfig(r=r, alpha=2 * r, inflation="plus", side="post",
                                                            target_modules=["0"], init_weights=False,
                                                            fan_in_fan_out=conv1d)).base_model.model[0]
    x = torch.randn(2, n // 2, d_in)
    W0 = layer.weight_linear().detach().double()
    b = layer.get_base_layer().bias.detach().double()
    A, B = layer.lorma_A["default"], layer.lorma_B["default"]
    Ad, Bd = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    dense = x.double() @ (W0 @ reference_inflation(Ad, Bd, "plus", layer.scaling["default"])).T + b
    want = torch.autograd.grad(dense.square().sum(), (Ad, Bd))
    expected = dense.detach()

    out, grads, macs = _step_flops(layer, x)
    assert rel_err(out, expected) < 1e-5
    for got, ref in zip(grads, want):
        assert rel_err(got, ref) < 1e-5
    frozen = n * d_in * d_out
    # the frozen forward once, the rank-r paths and U = s W0 B with its gradient; never a second n d_in d_out
    assert macs <= frozen + 4 * n * r * (d_in + d_out) + 2 * r * d_in * d_out
    # an input that needs a gradient takes the input-side form (W0^T g is paid by every method there): same values
    xg = x.clone().requires_grad_()
    assert rel_err(layer(xg), expected) < 1e-5


def test_plus_post_on_fused_parts_never_runs_the_frozen_matmul_over_a_delta(tiny_gpt2) -> None:
    """Post-side LoRMA+ on GPT-2's fused c_attn (q and v parts): each part adds ``s (W0_p B)(A x)``, rank-r work,
    instead of a pass of the part's frozen rows over the input's delta (forward and backward)."""
    model = get_peft_model(tiny_gpt2, LormaConfig(r=2, alpha=4, inflation="plus", side="post", init_weights=False,
                                                  target_modules=["c_attn"], fan_in_fan_out=True,
                                                  fused_parts={"c_attn": {"num_parts": 3, "parts": [0, 2]}}))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    d_in, d = layer.in_features, layer.out_features // 3
    n = 24
    x = torch.randn(2, n // 2, d_in)
    W0 = layer.weight_linear().detach().double()
    b = layer.get_base_layer().bias.detach().double()
    s = layer.scaling["default"]
    A, B = layer.lorma_A["default"], layer.lorma_B["default"]
    Ad, Bd = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    parts = [W0[:d] @ reference_inflation(Ad[0], Bd[0], "plus", s), W0[d:2 * d],
             W0[2 * d:] @ reference_inflation(Ad[1], Bd[1], "plus", s)]
    dense = x.double() @ torch.cat(parts).T + b
    want = torch.autograd.grad(dense.square().sum(), (Ad, Bd))

    out, grads, macs = _step_flops(layer, x)
    assert rel_err(out, dense) < 1e-5
    for got, ref in zip(grads, want):
        assert rel_err(got, ref) < 1e-5
    frozen = n * d_in * 3 * d
    # one frozen forward; each of the 2 parts: rank-r paths and U = s W0_p B with its gradient
    assert macs <= frozen + 2 * (4 * n * 2 * (d_in + d) + 2 * 2 * d_in * d)


@pytest.mark.parametrize("layout", ["linear", "conv1d", "rows"])
def test_weight_times_thin_equals_matmul_with_gradients(layout: str) -> None:
    """The hand-written W @ B (thin operand on the left in both passes): matmul's values and both gradients."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(40, 30, dtype=torch.float64, generator=g)
    W = {"linear": full, "conv1d": full.t().contiguous().t(), "rows": full[10:25]}[layout].requires_grad_()
    B = torch.randn(30, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(LF.weight_times_thin, (W, B))
    out = LF.weight_times_thin(W, B)
    assert torch.allclose(out, W @ B)
