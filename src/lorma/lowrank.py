"""LoRMA+'s update in low-rank form: the algebra behind ``lorma export`` and ``add_weighted_adapter``.

Only the ``plus`` inflation has an update that is low rank and closed under composition and sums:

- its weight update is a rank-``r`` LoRA update, one matmul away from ``(A, B)``:
  pre side ``W - W0 = s B (A W0)``, post side ``W - W0 = s (W0 B) A``;
- a product of two plus transforms is again a plus transform, of rank ``r1 + r2``:
  ``(I + X1 Y1)(I + X2 Y2) = I + [X1 | X2 + X1 (Y1 X2)] [Y1; Y2]``;
- so is a weighted sum: ``I + sum_i w_i s_i B_i A_i = I + [w_1 s_1 B_1 | ...] [A_1; ...]``.

``pi`` and ``none`` transforms are dense ``d x d`` maps: their update is full rank in general (the paper's
Table 15), and a product of two of them is not one of them. What depends on the inflation for export and
arithmetic is kept in this module (see :data:`LOW_RANK_INFLATIONS`), so that it can move with the inflation
when inflations become objects.

A transform ``I + X Y`` is written here as the pair ``(X, Y)``, ``X`` ``(d, k)``, ``Y`` ``(k, d)``, with the
scaling already folded into ``X``: as a LoRMA adapter it is ``B = X``, ``A = Y`` at ``alpha = r = k``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .functional import Side

# Inflations whose update W - W0 is exactly a rank-r LoRA update and whose products and sums stay in the family.
LOW_RANK_INFLATIONS: tuple[str, ...] = ("plus",)

Pair = tuple[torch.Tensor, torch.Tensor]


def plus_pair(A: torch.Tensor, B: torch.Tensor, scaling: float, weight: float = 1.0) -> Pair:
    """``I + weight * s * BA`` as a pair ``(X, Y)`` with the scaling folded into ``X``."""
    return weight * scaling * B, A


def plus_weight_update(A: torch.Tensor, B: torch.Tensor, scaling: float, weight: torch.Tensor, side: Side) -> Pair:
    """LoRA factors ``(U, V)`` with ``U V = W - W0`` exactly, for ``W = (I + sBA) W0`` or ``W0 (I + sBA)``.

    ``weight`` is ``W0`` in ``nn.Linear`` layout ``(d_out, d_in)``. ``U`` is ``(d_out, r)`` (LoRA's ``lora_B``
    at scaling 1), ``V`` is ``(r, d_in)`` (``lora_A``). One ``r x d x d_other`` matmul, no ``d x d`` matrix.
    """
    if side == "pre":
        return scaling * B, A @ weight
    if side == "post":
        return scaling * (weight @ B), A
    raise ValueError(f"unknown side {side!r}; expected 'pre' or 'post'")


def compose(left: Pair, right: Pair) -> Pair:
    """``(I + X1 Y1)(I + X2 Y2) = I + [X1 | X2 + X1 (Y1 X2)] [Y1; Y2]``: rank ``k1 + k2``, no ``d x d`` matrix."""
    x1, y1 = left
    x2, y2 = right
    return torch.cat([x1, x2 + x1 @ (y1 @ x2)], dim=-1), torch.cat([y1, y2], dim=-2)


def product(pairs: Sequence[Pair], side: Side) -> Pair:
    """The transform that activating (or merging, in this order) the given plus transforms computes.

    Active adapters ``a1, ..., an`` act with ``a1`` nearest to ``W0``: on the pre side the layer computes
    ``I_n ... I_1 W0 x``, on the post side ``W0 I_1 ... I_n x`` (see :mod:`lorma.layer`).
    """
    if not pairs:
        raise ValueError("product of no transforms")
    result = pairs[0]
    for pair in pairs[1:]:
        result = compose(pair, result) if side == "pre" else compose(result, pair)
    return result


def weighted_sum(pairs: Sequence[Pair]) -> Pair:
    """``I + sum_i X_i Y_i`` (weights and scalings already folded into each ``X_i``): rank ``sum k_i``, exact."""
    if not pairs:
        raise ValueError("sum of no transforms")
    return torch.cat([x for x, _ in pairs], dim=-1), torch.cat([y for _, y in pairs], dim=-2)
