"""The variant hook: :class:`LormaVariant` decides how one adapter of a layer is initialised, applied, merged, unmerged.

After peft's ``LoraVariant`` (``peft/tuners/lora/layer.py``), with one difference: here plain LoRMA is itself the
base class, so the layer never asks "variant or vanilla" — it asks the adapter's variant object, and a variant
(weight-decomposed DoRMA, SVD-form AdaLoRMA, nested-rank DyLoRMA, ...) subclasses :class:`LormaVariant` and
overrides only what differs, one module each (docs/extending.md). Each adapter of each layer has its own variant
object, which holds the adapter's :class:`~lorma.inflations.Inflation`.

What this class does (plain LoRMA) and which method to override for what:

- :meth:`init`: fill the adapter's ``lorma_A`` / ``lorma_B`` (identity by the inflation, or random); a variant that
  needs more trainable tensors creates them here with ``layer.adapter_parameters("lorma_<what>")``.
- :meth:`pairs`: the ``(A, B)`` pairs the transform is built from, one per adapted part (a nested-rank variant
  truncates them here, and everything below follows).
- :meth:`before_base` / :meth:`after_base`: the forward around the one base-layer call, on activations: the post
  side transforms the input, the pre side the output (without the bias). :meth:`folded_forward` replaces both
  (and the base call) when folding a dense transform into the weight costs fewer flops, and
  :meth:`low_rank_post_forward` when a post-side update is exactly low rank and the input needs no gradient.
- :meth:`transform`, :meth:`delta_weight`, :meth:`unmerges_exactly`, :meth:`unmerge`: merging and unmerging; the
  layer keeps a copy of the weight whenever :meth:`unmerges_exactly` is ``False``.

A variant also owns what it adds to the whole model, so that neither ``LormaConfig`` nor ``LormaModel`` names it:

- :attr:`options`: the dataclass of its options (``LormaConfig.variant_options``; :mod:`lorma.variants.options`).
- :meth:`before_training_forward`, :meth:`training_loss`, :meth:`step_updater`: what runs once per forward of the
  whole model in training (a rank drawn for all layers), what is added to its loss in training (a regulariser), and
  what runs after each optimizer step (a rank budget). ``LormaModel`` calls them for each active adapter; plain
  LoRMA does nothing in any of them.

Activations are row vectors (``(..., d)``); weights are in ``nn.Linear`` layout ``(d_out, d_in)``. The layer
(:class:`lorma.layers.base.LormaLayer`) does the bookkeeping: the order adapters compose in, dtypes, merge state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import Pair
from ..inflations.base import Inflation
from .options import VariantOptions

# (output rows of a fused projection, or None for the whole layer; A; B)
PairSlice = tuple[slice | None, torch.Tensor, torch.Tensor]


class AdaptedLayer(Protocol):
    """What a variant uses of the layer it serves (:class:`lorma.layers.base.LormaLayer` provides all of it)."""

    module_name: str
    in_features: int
    out_features: int
    lorma_A: nn.ParameterDict
    lorma_B: nn.ParameterDict
    lorma_dropout: nn.ModuleDict
    scaling: dict[str, float]
    side: dict[str, str]
    fused: dict[str, tuple[int, list[int]] | None]
    base_weight: Any  # lorma.layers.base.FloatWeight, or lorma.layers.bnb.QuantizedWeight

    def get_base_layer(self) -> nn.Module: ...

    def weight_linear(self) -> torch.Tensor: ...

    def part_slice(self, adapter: str, part: int) -> slice: ...

    def adapter_parameters(self, name: str) -> nn.ParameterDict: ...

    def _cast_input_dtype(self, x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None: ...


class LormaVariant:
    """Plain LoRMA for one adapter of one layer: ``I(BA) W0 x + b`` (pre side) or ``W0 I(BA) x + b`` (post side).

    Subclass it for a variant, set :attr:`name` and register the class with
    :func:`lorma.variants.register_variant`; ``LormaConfig(variant=name)`` then gives every adapted module of that
    adapter an instance of it.
    """

    #: the name ``LormaConfig(variant=...)`` takes; empty for plain LoRMA
    name: ClassVar[str] = ""
    #: whether one adapter's rows of a mixed-adapter batch (:mod:`lorma.layers.mixed_batch`) can be computed by
    #: :meth:`before_base` / :meth:`after_base` on those rows alone, as running them alone would
    mixed_batch: ClassVar[bool] = True
    #: the dataclass of this variant's options, ``LormaConfig(variant=name, variant_options={...})``: its fields
    #: (each with a default) are the keys accepted, its ``check`` refuses values that do not fit; none here
    options: ClassVar[type[VariantOptions]] = VariantOptions

    def __init__(self, inflation: Inflation) -> None:
        self.inflation = inflation

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inflation!r})"

    @classmethod
    def options_of(cls, config: Any) -> Any:
        """The adapter's options as this variant's :attr:`options` dataclass (``config.variant_options``, which
        ``LormaConfig`` has checked and completed with the defaults)."""
        return cls.options(**(config.variant_options or {}))

    def configure(self, config: Any) -> None:
        """Read this adapter's ``LormaConfig`` (its :meth:`options_of`; called once the adapter exists on the
        layer); nothing here."""

    # ------------------------------------------------------------------ the whole model (LormaModel calls these)
    @classmethod
    def before_training_forward(cls, model: nn.Module, adapter: str, config: Any) -> None:
        """Once per forward of the whole model in training, before it runs (peft enters ``LormaModel``'s forward
        hook around every forward and generate), for an active adapter of this variant; nothing here."""

    @classmethod
    def training_loss(cls, model: nn.Module, adapter: str, config: Any) -> torch.Tensor | None:
        """A term ``LormaModel.forward`` adds to the returned loss in training (a regulariser), for an active
        adapter of this variant; ``None``: nothing to add."""
        return None

    @classmethod
    def step_updater(cls, model: nn.Module, adapter: str, config: Any) -> Callable[[int], None] | None:
        """What ``LormaModel.update_and_allocate(step)`` calls after each optimizer step (before ``zero_grad``, so
        that it can read the step's gradients) for an active adapter of this variant: made once, on the first call,
        then called with the 0-based step each time; ``None``: this variant does nothing after a step."""
        return None

    @classmethod
    def updates_after_steps(cls) -> bool:
        """Whether this variant has a :meth:`step_updater` (overrides it)."""
        return cls.step_updater.__func__ is not LormaVariant.step_updater.__func__  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ initialisation
    def init(self, layer: AdaptedLayer, adapter: str, init_weights: bool) -> None:
        """Fill ``lorma_A[adapter]`` / ``lorma_B[adapter]`` (float32, on the CPU, created by the layer) in place.

        ``init_weights=True``: the inflation's identity initialisation (the paper's), per fused part;
        ``False``: random ``A`` and ``B`` (tests).
        """
        A, B = layer.lorma_A[adapter], layer.lorma_B[adapter]
        with torch.no_grad():
            for a, b in zip(A, B) if A.dim() == 3 else [(A, B)]:
                if init_weights:
                    self.inflation.initialize(a, b, self.scaling(layer, adapter))
                else:
                    self.inflation.initialize_random(a, b)

    # ------------------------------------------------------------------ the pairs the transform is built from
    def pairs(self, layer: AdaptedLayer, adapter: str) -> list[PairSlice]:
        """``(output rows, A, B)`` per transform of this adapter: one, or one per adapted fused part."""
        A, B = layer.lorma_A[adapter], layer.lorma_B[adapter]
        fused = layer.fused[adapter]
        if fused is None:
            return [(None, A, B)]
        return [(layer.part_slice(adapter, p), A[i], B[i]) for i, p in enumerate(fused[1])]

    def scaling(self, layer: AdaptedLayer, adapter: str) -> float:
        """The ``s`` the inflation is given with :meth:`pairs`: ``alpha / r`` (a nested-rank variant that trains
        ``b < r`` ranks returns ``alpha / b`` here, as DyLoRA scales)."""
        return layer.scaling[adapter]

    # ------------------------------------------------------------------ forward
    def before_base(self, layer: AdaptedLayer, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """The input the base layer sees: ``I(BA) x`` for a (whole-layer) post-side adapter, else ``x``."""
        if layer.side[adapter] != "post" or layer.fused[adapter] is not None:
            return x
        return self._apply(layer, adapter, x, None)

    def after_base(self, layer: AdaptedLayer, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The output after the base layer ran on ``x``: ``I(BA) (W0 x) + b`` on the pre side (bias kept out).

        A post-side adapter on fused parts acts here too, since only some rows of ``W0`` see its transform:
        part ``p`` of the output gets ``W0_p (I_p x - x)`` added.
        """
        if layer.side[adapter] == "pre":
            return self._apply(layer, adapter, result, getattr(layer.get_base_layer(), "bias", None))
        if layer.fused[adapter] is None:
            return result
        xc = layer._cast_input_dtype(x, layer.lorma_A[adapter].dtype)
        weight = layer.weight_linear()
        size = layer.out_features // layer.fused[adapter][0]
        chunks = list(result.split(size, dim=-1))
        for rows, A, B in self.pairs(layer, adapter):
            part = rows.start // size
            chunks[part] = chunks[part] + self._post_output_delta(layer, adapter, xc, A, B, weight[rows]).to(
                result.dtype
            )
        return torch.cat(chunks, dim=-1)

    def _post_output_delta(
        self, layer: AdaptedLayer, adapter: str, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        weight: torch.Tensor,
    ) -> torch.Tensor:
        """``W (I(BA) - I) drop(x)``: what a post-side transform adds to the output of the base rows ``weight``.

        When the inflation's update is exactly low rank (:meth:`Inflation.lora_factors` gives ``W (I(BA) - I) =
        U V``; LoRMA+: ``U = s W B``, ``V = A``), it is ``(x V^T) U^T``: ``n r (d_in + d_out)`` multiply-adds plus
        ``r d_in d_out`` for ``U``, whatever the token count ``n``. Otherwise the input's delta goes through the
        frozen rows: ``n d_in d_out`` in the forward and again in the backward.
        """
        source = layer.lorma_dropout[adapter](x) if self._dropout_active(layer, adapter) else x
        s = self.scaling(layer, adapter)
        factors = self.inflation.lora_factors(weight.to(A.dtype), A, B, s, "post")
        if factors is not None:
            u, v = factors
            return F.linear(F.linear(source, v), u)
        return F.linear(self.inflation.apply_delta(source, A, B, s).to(weight.dtype), weight)

    def low_rank_post_forward(self, layer: AdaptedLayer, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output as ``W0 x + b + (x V^T) U^T`` for a lone post-side adapter whose update is exactly
        low rank, when that is cheaper than transforming the input; ``None`` to run :meth:`before_base`.

        Where the input needs no gradient (the first adapted layer of a model, a layer alone), LoRA's backward
        skips ``W0^T g``; transforming the input first (``W0 I(BA) x``) would need it to reach ``A`` and ``B``:
        ``n d_in d_out`` more multiply-adds, against ``2 r d_in d_out`` for building ``U = s W0 B`` and its
        gradient here. So: training, input without gradient, ``n > 2r``, and plain LoRMA's forward (a variant
        that overrides the forward hooks keeps its own).
        """
        A = layer.lorma_A[adapter]
        if layer.side[adapter] != "post" or layer.fused[adapter] is not None or not self._plain_forward():
            return None
        if x.requires_grad or not (torch.is_grad_enabled() and A.requires_grad):
            return None
        if not layer.base_weight.readable_in_forward or x.numel() // max(layer.in_features, 1) <= 2 * A.shape[0]:
            return None
        if self.inflation.lora_factors.__func__ is Inflation.lora_factors:  # no exact low-rank form: skip the call
            return None
        [(_, A, B)] = self.pairs(layer, adapter)
        result = layer.get_base_layer()(x)
        xc = layer._cast_input_dtype(x, A.dtype)
        return result + self._post_output_delta(layer, adapter, xc, A, B, layer.weight_linear()).to(result.dtype)

    def _plain_forward(self) -> bool:
        """Whether this variant applies plain LoRMA's forward (does not override its hooks)."""
        hooks = ("before_base", "after_base", "_delta", "_apply", "_post_output_delta")
        return all(getattr(type(self), h) is getattr(LormaVariant, h) for h in hooks)

    def folded_forward(self, layer: AdaptedLayer, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer's output through the merged weight ``W + delta_weight(W)``, built this step, when the
        inflation says that is cheaper (:meth:`Inflation.strategy` is ``"weight"``); ``None`` to run the
        activation forms. Built from :meth:`delta_weight`, so it is whatever merging computes, for any variant."""
        A = layer.lorma_A[adapter]
        if layer.fused[adapter] is not None or self._dropout_active(layer, adapter):
            return None
        if not layer.base_weight.readable_in_forward:
            return None
        d, d_other = layer.out_features, layer.in_features
        if layer.side[adapter] == "post":
            d, d_other = d_other, d
        n_tokens = x.numel() // max(layer.in_features, 1)
        needs_grad = torch.is_grad_enabled() and A.requires_grad
        if self.inflation.strategy(n_tokens, d, d_other, needs_grad) != "weight":
            return None
        weight = layer.weight_linear().to(A.dtype)
        folded = weight + self.delta_weight(layer, adapter, weight)
        bias = layer._cast_input_dtype(getattr(layer.get_base_layer(), "bias", None), A.dtype)
        return F.linear(layer._cast_input_dtype(x, A.dtype), folded, bias).to(x.dtype)

    def _dropout_active(self, layer: AdaptedLayer, adapter: str) -> bool:
        module = layer.lorma_dropout[adapter]
        return isinstance(module, nn.Dropout) and module.training and module.p > 0

    def _delta(
        self,
        layer: AdaptedLayer,
        adapter: str,
        h: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        shift: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(I(BA) - I) drop(h - shift)``: the adapter path, the only place dropout acts."""
        if self._dropout_active(layer, adapter):
            source = h if shift is None else h - shift
            dropped = layer.lorma_dropout[adapter](source)
            return self.inflation.apply_delta(dropped, A, B, self.scaling(layer, adapter))
        return self.inflation.apply_delta(h, A, B, self.scaling(layer, adapter), shift)

    def _apply(
        self, layer: AdaptedLayer, adapter: str, h: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``I(BA)`` applied to activations ``h`` (output or input side); ``bias`` is kept out of the product."""
        dtype = layer.lorma_A[adapter].dtype
        hc = layer._cast_input_dtype(h, dtype)
        shift = layer._cast_input_dtype(bias, dtype)
        pairs = self.pairs(layer, adapter)
        if layer.fused[adapter] is None:
            [(_, A, B)] = pairs
            return (hc + self._delta(layer, adapter, hc, A, B, shift)).to(h.dtype)
        size = layer.out_features // layer.fused[adapter][0]
        chunks = list(hc.split(size, dim=-1))
        for rows, A, B in pairs:
            part, part_shift = rows.start // size, None if shift is None else shift[rows]
            chunks[part] = chunks[part] + self._delta(layer, adapter, chunks[part], A, B, part_shift)
        return torch.cat(chunks, dim=-1).to(h.dtype)

    # ------------------------------------------------------------------ merge / unmerge
    def transform(self, layer: AdaptedLayer, adapter: str) -> torch.Tensor:
        """The dense ``I(BA)``, float32, no grad: ``(d, d)``, or ``(parts, d, d)`` for a fused layer."""
        s = self.scaling(layer, adapter)
        with torch.no_grad():
            parts = [self.inflation.transform(A.float(), B.float(), s) for _, A, B in self.pairs(layer, adapter)]
        return parts[0] if layer.fused[adapter] is None else torch.stack(parts)

    def delta_weight(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """What merging adds to ``weight`` (``nn.Linear`` layout, float), computed without ``W - W0``."""
        side, s = layer.side[adapter], self.scaling(layer, adapter)
        delta = None if layer.fused[adapter] is None else torch.zeros_like(weight)
        for rows, A, B in self.pairs(layer, adapter):
            w = weight if rows is None else weight[rows]
            part = self.inflation.delta_weight(w, A.to(weight.dtype), B.to(weight.dtype), s, side)
            if rows is None:
                delta = part
            else:
                delta[rows] = part
        return delta

    def lora_factors(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> Pair | None:
        """LoRA factors ``(U, V)`` with ``U V`` = what merging adds to ``weight``, exactly; ``None`` if not low rank.

        One block per adapted fused part, with zero rows for the parts that are not adapted (``lorma export``).
        A variant with its own :meth:`delta_weight` gets ``None`` (export then approximates that delta by SVD)
        unless it also writes its own :meth:`lora_factors`.
        """
        if self._own_merge() and type(self).lora_factors is LormaVariant.lora_factors:
            return None
        side, s = layer.side[adapter], self.scaling(layer, adapter)
        blocks_u, blocks_v = [], []
        for rows, A, B in self.pairs(layer, adapter):
            w = weight if rows is None else weight[rows]
            factors = self.inflation.lora_factors(w, A.detach().to(w.dtype), B.detach().to(w.dtype), s, side)
            if factors is None:
                return None
            u, v = factors
            if rows is not None:  # this part's rows of a fused projection; the other parts' rows stay zero
                full = weight.new_zeros(weight.shape[0], u.shape[1])
                full[rows] = u
                u = full
            blocks_u.append(u)
            blocks_v.append(v)
        return torch.cat(blocks_u, dim=1), torch.cat(blocks_v, dim=0)

    def _own_merge(self) -> bool:
        """Whether this variant merges its own way (the inflation's inverse and factors then do not apply)."""
        return type(self).delta_weight is not LormaVariant.delta_weight

    def unmerges_exactly(self, layer: AdaptedLayer, adapter: str) -> bool:
        """Whether :meth:`unmerge` restores ``W0`` by algebra (else the layer keeps a copy at merge time).

        The inflation's inverse undoes the plain merge only: a variant with its own :meth:`delta_weight` gets
        ``False`` (a kept copy, always right) unless it also writes its own :meth:`unmerge`.
        """
        if self._own_merge() and type(self).unmerge is LormaVariant.unmerge:
            return False
        s = self.scaling(layer, adapter)
        return all(self.inflation.unmerges_exactly(A, B, s) for _, A, B in self.pairs(layer, adapter))

    def unmerge(self, layer: AdaptedLayer, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """``W0`` from the merged ``weight`` (``nn.Linear`` layout), by the inflation's inverse, part by part."""
        side, s = layer.side[adapter], self.scaling(layer, adapter)
        restored = weight.clone()
        for rows, A, B in self.pairs(layer, adapter):
            w = weight if rows is None else weight[rows]
            part = self.inflation.unmerge(w, A.detach().to(w.dtype), B.detach().to(w.dtype), s, side)
            if rows is None:
                restored = part
            else:
                restored[rows] = part
        return restored
