"""DoRMA: weight-decomposed LoRMA, after DoRA (Liu et al., 2024), for any inflation.

The adapted weight is split into a trained magnitude and a direction, as DoRA splits ``W0 + s BA``::

    W = diag(m / ||V||_r) V,   V = I(BA) W0 (pre side)  or  W0 I(BA) (post side)

``||V||_r`` is the vector of the Euclidean norms of ``V``'s rows in ``nn.Linear`` layout (one per output
feature: DoRA's "column norm" of the ``(d_in, d_out)`` matrix; peft's ``use_dora`` computes the same
``weight.norm(dim=1)``). ``m`` (``lorma_magnitude``, ``(d_out,)``) is trained and starts at ``||W0||_r``; with
``I(BA) = I`` at init, ``W = W0`` exactly. As in DoRA (its Section 4.3) and peft, ``||V||_r`` is treated as a
constant in the backward pass: the forward value is the formula above, the gradient does not flow through the
norm (no ``d_out x d_in`` activation kept for it).

The forward never builds ``V``: ``y = (m / ||V||_r) * (I(BA)(W0 x)) + b`` (pre) or ``(m / ||V||_r) * W0 (I(BA) x) + b``
(post), i.e. plain LoRMA's activation path followed by one per-feature scale. Only the norm needs ``V``'s rows,
and for a low-rank update (``plus``: ``V = W0 + U Vt`` with ``U Vt`` the exact LoRA factors of the merge) it is
computed from thin products::

    ||V_i||^2 = ||W0_i||^2 + 2 U_i . (W0 Vt^T)_i + U_i (Vt Vt^T) U_i^T

Cost per forward, independent of the number of tokens: ``2 r d_out d_in`` flops (``Vt = A W0`` or ``U = W0 B``,
and ``W0 Vt^T``) and ``O(r (d_out + d_in))`` memory, against peft's DoRA, which builds ``W0 + s BA`` densely
(``r d_out d_in`` flops, plus ``d_in^2 r`` for its identity trick, and a ``d_out x d_in`` temporary). The
``pi`` and ``none`` inflations are full rank, so their norm builds ``V`` (what merging computes anyway).

Merging writes ``W`` above (full rank in general, so ``lorma export`` approximates ``W - W0`` by SVD); unmerging
restores ``W0`` from the copy the layer keeps at merge time (exact to the bit). An algebraic unmerge would need
``||V||_r`` of the weight merged into (peft caches it); ``m`` and the merged weight alone do not determine it.

One restriction: a DoRMA adapter is active alone on its layer. Its norm is of ``V`` built from the weight it
transforms; with another adapter composed before it, the forward would have to rebuild that composition.
Switching adapters, merging them in turn, saving and loading several are all fine.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdaptedLayer, LormaVariant
from .registry import register_variant


@register_variant
class DormaVariant(LormaVariant):
    """Weight-decomposed LoRMA: ``W = diag(m / ||I(BA) W0||_r) I(BA) W0`` (pre) or with ``W0 I(BA)`` (post)."""

    name = "dorma"
    # its after_base refuses other active adapters on the layer; a mixed batch is refused like peft's DoRA
    mixed_batch = False

    def init(self, layer: AdaptedLayer, adapter: str, init_weights: bool) -> None:
        """Plain LoRMA's ``A`` and ``B``, and ``m = ||W0||_r`` (``init_weights=False``: ``m`` scaled at random by
        ``[0.5, 1.5)`` per feature, so that tests see a magnitude that matters)."""
        if not layer.base_weight.readable_in_forward:
            raise ValueError(
                f"module {layer.module_name!r}: DoRMA reads the base weight's row norms in every forward, which a "
                "quantized base does not allow; use a float base model or plain LoRMA"
            )
        super().init(layer, adapter, init_weights)
        with torch.no_grad():
            norms = layer.base_weight.work_copy(layer.get_base_layer()).float().norm(dim=1).cpu()
            if not init_weights:
                norms = norms * (0.5 + torch.rand_like(norms))
        layer.adapter_parameters("lorma_magnitude")[adapter] = nn.Parameter(norms)

    # ------------------------------------------------------------------ the direction's norm
    @torch.no_grad()
    def row_norms(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """``||V||_r`` for ``V`` = plain LoRMA's merge of this adapter into ``weight`` (``nn.Linear`` layout).

        Rows of fused parts this adapter does not transform keep ``||W0_i||``. A low-rank update uses the thin
        form of the module docstring; a full-rank one builds the part of ``V`` it transforms.
        """
        side, s = layer.side[adapter], self.scaling(layer, adapter)
        squared = weight.square().sum(dim=1)
        for rows, A, B in self.pairs(layer, adapter):
            w = weight if rows is None else weight[rows]
            A, B = A.detach().to(w.dtype), B.detach().to(w.dtype)
            factors = self.inflation.lora_factors(w, A, B, s, side)
            if factors is None:  # a full-rank transform: V's rows themselves
                part = (w + self.inflation.delta_weight(w, A, B, s, side)).square().sum(dim=1)
            else:
                u, vt = factors  # V = w + u vt
                cross = (u * (w @ vt.T)).sum(dim=1)
                quad = ((u @ (vt @ vt.T)) * u).sum(dim=1)
                part = squared[rows if rows is not None else slice(None)] + 2.0 * cross + quad
            if rows is None:
                squared = part
            else:
                squared[rows] = part
        # the thin form can round a tiny negative for a row that cancels exactly; such a row has no direction
        return squared.clamp_min(0.0).sqrt()

    def _scale(self, layer: AdaptedLayer, adapter: str) -> torch.Tensor:
        """``m / ||V||_r`` (``(d_out,)``, float32), the norm computed from the current base weight, detached."""
        magnitude = layer.lorma_magnitude[adapter]
        weight = layer.weight_linear().detach().to(magnitude.dtype)
        return magnitude / self.row_norms(layer, adapter, weight)

    # ------------------------------------------------------------------ forward
    def after_base(self, layer: AdaptedLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``(m / ||V||_r) * (V x) + b``: plain LoRMA's output (``V x + b``), its bias taken out, scaled, put back."""
        others = [a for a in layer.active_adapters if a in layer.lorma_A and a != adapter]
        if others:
            raise ValueError(
                f"module {layer.module_name!r}: DoRMA adapter {adapter!r} cannot be active together with "
                f"{others}: its norm is of the weight it transforms (activate one at a time, or merge them in turn)"
            )
        result = super().after_base(layer, adapter, x, result)
        scale = self._scale(layer, adapter).to(result.dtype)
        bias = getattr(layer.get_base_layer(), "bias", None)
        if bias is None:
            return result * scale
        bias = bias.to(result.dtype)
        return (result - bias) * scale + bias

    # ------------------------------------------------------------------ merge
    def delta_weight(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """``diag(m / ||V||_r) V - W`` with ``V`` plain LoRMA's merge of ``weight``; differentiable in ``A``, ``B``
        and ``m`` (the norm detached, as in the forward), so the folded forward of ``pi`` trains through it."""
        direction = weight + super().delta_weight(layer, adapter, weight)
        scale = layer.lorma_magnitude[adapter].to(weight.dtype) / self.row_norms(layer, adapter, weight.detach())
        return scale[:, None] * direction - weight
