"""What every registered inflation must satisfy, whoever wrote it: its optional methods agree with its transform.

An inflation writes ``initialize`` and ``transform`` and may override the rest (``apply_delta``, ``strategy``,
``delta_weight``, ``unmerge``, ``lora_factors``, ``check_size``, ``transpose_swaps_factors``) for speed or
memory. Each override must compute what the dense transform says, and the layer must give the dense formula
whichever strategy the inflation picks and whatever its memory bound. :func:`check_inflation_contract` checks
that for one registered name; it runs on the built-ins (tests/core/test_inflations.py) and on the docs' worked
example (tests/core/test_extending_docs.py). That the built-ins' transforms are the paper's is checked separately,
against an independent formula.
"""

from __future__ import annotations

import copy

import torch
from peft import get_peft_model
from torch import nn

from lorma import LormaConfig
from lorma.inflations import get_inflation

STRATEGIES = ("activation", "weight", "fft")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_methods_against_transform(name: str) -> None:
    """Each method of the object, in float64 on random factors, against the dense ``transform``."""
    d, d_other, r, s = 10, 6, 3, 0.6
    inflation = get_inflation(name)()
    A, B = 0.3 * torch.randn(r, d, dtype=torch.float64), 0.3 * torch.randn(d, r, dtype=torch.float64)
    M, eye = inflation.transform(A, B, s), torch.eye(d, dtype=torch.float64)
    assert M.shape == (d, d) and torch.isfinite(M).all(), f"{name}: transform is not a finite d x d matrix"
    h, shift = torch.randn(5, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    assert _rel_err(inflation.apply_delta(h, A, B, s), h @ (M - eye).T) < 1e-10
    assert _rel_err(inflation.apply_delta(h, A, B, s, shift), (h - shift) @ (M - eye).T) < 1e-10
    # the transpose, for a layer tied to an adapted one (an embedding's output layer): h -> I(BA)^T h
    assert inflation.transposed_fits(d)
    assert _rel_err(inflation.apply_transposed_delta(h, A, B, s), h @ (M - eye)) < 1e-10, f"{name}: transpose"
    for side, W in (("pre", torch.randn(d, d_other, dtype=torch.float64)),
                    ("post", torch.randn(d_other, d, dtype=torch.float64))):
        expected = (M - eye) @ W if side == "pre" else W @ (M - eye)
        delta = inflation.delta_weight(W, A, B, s, side)
        assert _rel_err(delta, expected) < 1e-10, f"{name}: delta_weight ({side}) is not the transform's"
        factors = inflation.lora_factors(W, A, B, s, side)
        assert (factors is not None) or not inflation.exact_lora_export, f"{name}: exact export without factors"
        if factors is not None:
            U, V = factors
            assert _rel_err(U @ V, expected) < 1e-10, f"{name}: lora_factors ({side}) do not multiply to the delta"
        if inflation.unmerges_exactly(A, B, s):
            assert _rel_err(inflation.unmerge(W + delta, A, B, s, side), W) < 1e-10, f"{name}: unmerge ({side})"
    for n_tokens in (1, 4, 1000):
        for needs_grad in (False, True):
            assert inflation.strategy(n_tokens, d, d_other, needs_grad) in STRATEGIES


def check_layer_against_transform(name: str, max_dense_bytes: int | None) -> None:
    """The peft layer on both sides, at few and many tokens (whichever strategy that picks), equals
    ``x (I(BA) W0)^T + b`` built from the transform; merging gives the same, unmerging gives ``W0`` back.

    With a small ``max_dense_bytes`` an inflation must either refuse the adapter with a ``ValueError`` at creation
    (it has only a dense form) or still give the formula (its bounded form)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20)).double()
    for side in ("pre", "post"):
        config = LormaConfig(
            r=3, alpha=6, inflation=name, side=side, target_modules=["0"], init_weights=False,
            max_dense_bytes=max_dense_bytes,
        )
        try:
            model = get_peft_model(copy.deepcopy(base), config)
        except ValueError as err:
            assert max_dense_bytes is not None and "max_dense_bytes" in str(err), f"{name}: refused ({err})"
            continue
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lorma_A["default"].mul_(0.3)
            layer.lorma_B["default"].mul_(0.3)
        A, B = (p["default"].detach().double() for p in (layer.lorma_A, layer.lorma_B))
        M = get_inflation(name)().transform(A, B, layer.scaling["default"])
        W0, bias = base[0].weight.detach().clone(), base[0].bias.detach()
        W = M @ W0 if side == "pre" else W0 @ M
        for n_tokens in (2, 600):
            x = torch.randn(n_tokens, 12, dtype=torch.float64)
            expected = x @ W.T + bias
            with torch.no_grad():
                assert _rel_err(model(x), expected) < 1e-6, f"{name} {side} n={n_tokens}: forward"
                model.merge_adapter()
                assert _rel_err(model(x), expected) < 1e-6, f"{name} {side} n={n_tokens}: merged forward"
                model.unmerge_adapter()
            assert _rel_err(layer.get_base_layer().weight, W0) < 1e-10, f"{name} {side}: unmerge"


def check_inflation_contract(name: str) -> None:
    """All of the above for the registered inflation ``name``: unbounded, and with a bound far below ``d x d``."""
    check_methods_against_transform(name)
    check_layer_against_transform(name, max_dense_bytes=None)
    check_layer_against_transform(name, max_dense_bytes=64)
