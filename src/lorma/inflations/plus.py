"""LoRMA+ (paper eq. 8): ``I(BA) = I + s BA``, the identity at ``B = 0``, low rank in every operation.

Nothing here builds a ``d x d`` matrix except :meth:`PlusInflation.transform` (for analysis and the tests): the
forward is ``h + s B(A h)`` (LoRA's cost), the merge delta ``s B (A W0)`` is rank ``r``, unmerging is exact by
Woodbury (an ``r x r`` solve), the update exports exactly as a LoRA adapter, and products and sums of LoRMA+
transforms are LoRMA+ transforms again (:mod:`lorma.functional`'s low-rank algebra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..functional import (
    Pair,
    Side,
    plus_condition_estimate,
    plus_delta,
    plus_weight_update,
    product,
    unmerge_plus,
    weighted_sum,
)
from .base import Inflation, Strategy, Term, register_inflation

# Above this (estimated) condition number of I + sBA, merging keeps a copy of the weight instead of trusting the
# Woodbury inverse to restore it on unmerge.
WOODBURY_MAX_CONDITION = 100.0


@register_inflation
class PlusInflation(Inflation):
    """``I + s BA`` (LoRMA+)."""

    name = "plus"
    exact_lora_export = True
    identity_plus_low_rank = True
    transpose_swaps_factors = True
    scaled_product_only = True  # I + (sB)A
    combination_types = ("linear", "product")

    def initialize(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """LoRA's initialisation: ``A`` random, ``B = 0``, so ``I + sBA`` is exactly ``I``."""
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)

    def transform(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        ba = B @ A
        return torch.eye(ba.shape[-1], dtype=ba.dtype, device=ba.device) + scaling * ba

    def check_size(self, d: int, where: str) -> None:
        """Any ``d``: the forward never builds ``d x d``."""

    def strategy(self, n_tokens: int, d: int, d_other: int, needs_grad: bool) -> Strategy:
        """Always on activations: ``2 n r d`` flops, less than any fold."""
        return "activation"

    def apply_delta(
        self, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        return plus_delta(h, A, B, scaling, shift)

    def delta_weight(
        self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, side: Side
    ) -> torch.Tensor:
        """``s B (A W0)`` (pre) or ``s (W0 B) A`` (post): rank ``r``, never ``d x d``."""
        u, v = plus_weight_update(A, B, scaling, weight, side)
        return u @ v

    def unmerges_exactly(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> bool:
        """Woodbury restores ``W0`` to rounding when ``I + sBA`` is well conditioned."""
        estimate = plus_condition_estimate(A, B, scaling)
        return math.isfinite(estimate) and estimate <= WOODBURY_MAX_CONDITION

    def unmerge(
        self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, side: Side
    ) -> torch.Tensor:
        return unmerge_plus(weight, A, B, scaling, side)

    def lora_factors(
        self, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, side: Side
    ) -> Pair | None:
        return plus_weight_update(A, B, scaling, weight, side)

    def combine(self, terms: Sequence[Term], combination_type: str, side: Side) -> Pair:
        """``"linear"``: ``I + sum_i w_i s_i B_i A_i``; ``"product"``: ``prod_i (I + w_i s_i B_i A_i)`` in the order
        activating the adapters applies them. Both exact at rank ``sum_i r_i``."""
        pairs = [(weight * scaling * B, A) for A, B, scaling, weight in terms]
        if combination_type == "product":
            return product(pairs, side)
        if combination_type == "linear":
            return weighted_sum(pairs)
        raise ValueError(f"combination_type {combination_type!r}; expected one of {self.combination_types}")
