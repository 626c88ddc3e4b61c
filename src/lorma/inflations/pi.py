"""LoRMA_pi (paper eq. 7): ``I(BA) = s pi(BA)``, row ``i`` of ``BA`` rotated cyclically right by ``i``.

``pi(BA)`` is full rank in general, so it is applied as a dense ``d x d`` map (on activations, or folded into the
weight, whichever costs fewer flops) while that map fits in ``max_dense_bytes``; above it (LLaMA-3-8B's up/gate on
the pre side, ``d = 14336``) by the FFT form in token chunks (:func:`lorma.functional.apply_pi_bounded`), which
never builds ``d x d`` and uses at most ``fft_chunk_bytes`` of working memory per module.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..functional import apply_pi_bounded, rotate_rows
from .base import Inflation, Strategy, register_inflation


@register_inflation
class PiInflation(Inflation):
    """``s pi(BA)`` (LoRMA_pi)."""

    name = "pi"
    scaled_product_only = True  # pi((sB)A): pi is linear

    def initialize(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """``BA`` = ones in column 0 (times ``1/s``), so ``pi`` moves row ``i``'s one onto the diagonal: ``I``.

        ``B``'s other columns are random so that ``A``'s other rows get gradients; both factors are divided by
        ``sqrt(s)`` to keep them balanced.
        """
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        B[:, 0] = 1.0
        A.zero_()
        A[0, 0] = 1.0
        root = math.sqrt(scaling)
        A.div_(root)
        B.div_(root)

    def transform(self, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
        return scaling * rotate_rows(B @ A)

    def check_size(self, d: int, where: str) -> None:
        """Any ``d``: above ``max_dense_bytes`` the bounded FFT form applies it."""

    def strategy(self, n_tokens: int, d: int, d_other: int, needs_grad: bool) -> Strategy:
        """The bounded FFT form when ``d x d`` would exceed ``max_dense_bytes``, else the cheaper dense form.

        The FFT form is only a memory bound: on CPU it was slower than a dense GEMM at every size measured
        (BENCHMARKS.md), its ``O(n r d log d)`` flops running far below GEMM speed.
        """
        if not self.dense_fits(d):
            return "fft"
        return super().strategy(n_tokens, d, d_other, needs_grad)

    def apply_delta(
        self, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.dense_fits(h.shape[-1]):
            return super().apply_delta(h, A, B, scaling, shift)
        source = h if shift is None else h - shift
        return apply_pi_bounded(source, A, B, scaling, self.fft_chunk_bytes) - source
