"""The naive inflation (the paper's Table 6 ablation): ``I(BA) = s BA``, of rank at most ``r``.

It cannot start at the identity; as in the authors' code it starts from a rank-``r`` projection (``B`` random,
``A = pinv(B) / s``). On activations it is applied in low-rank form, ``s B (A h)``, never as a ``d x d`` matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Inflation, Strategy, register_inflation


@register_inflation
class NoneInflation(Inflation):
    """``s BA`` (no inflation)."""

    name = "none"
    transpose_swaps_factors = True
    scaled_product_only = True  # (sB)A

    def initialize(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """The projection onto ``B``'s columns: ``s B pinv(B) / s`` (rank ``r``; the identity is out of reach)."""
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        A.copy_(torch.linalg.pinv(B) / scaling)

    def transform(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        return scaling * (B @ A)

    def check_size(self, d: int, where: str) -> None:
        """Any ``d``: the activation form is low rank."""

    def strategy(self, n_tokens: int, d: int, d_other: int, needs_grad: bool) -> Strategy:
        """Above ``max_dense_bytes`` on activations (low rank); below, the dense flop count decides, as for ``pi``."""
        if not self.dense_fits(d):
            return "activation"
        return super().strategy(n_tokens, d, d_other, needs_grad)

    def apply_delta(
        self, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``s B (A h) - h``: ``2 n r d`` flops."""
        source = h if shift is None else h - shift
        return F.linear(F.linear(source, A) * scaling, B) - source
