"""LoRMA around ``nn.Embedding``, and the output layer tied to an adapted embedding.

An embedding lookup is a linear layer applied to a one-hot vector: ``E0[i] = E0^T e_i``, with ``E0``
``(num_embeddings, dim)`` the transformers ``Conv1D`` layout ``(d_in, d_out)`` of the map from one-hot vectors to
embeddings. LoRMA adapts it on the embedding dimension, the pre side of that map (docs/conv-and-embeddings.md):

    every looked-up row becomes ``I(BA) E0[i]``; the merged table is ``E = E0 I(BA)^T``.

``I(BA)`` is ``dim x dim``. The post side would be a ``num_embeddings x num_embeddings`` transform mixing token
rows; it is refused. The forward looks the rows up in the frozen table and transforms only those (never the whole
table), with the inflation's activation form.

Tied embeddings (an output layer whose weight *is* ``E0``, as transformers' ``tie_word_embeddings`` does): the
merged table serves both, so an output layer computing ``E0 h`` becomes ``E0 I(BA)^T h`` once merged.
With ``LormaConfig(ensure_weight_tying=True)`` (peft's option for LoRA) the output layer is wrapped in
:class:`TiedLinear`, which applies ``I(BA)^T`` of the embedding's own adapter to its input: unmerged and merged
models then compute the same, and merging keeps the weights tied. Without it, merging such a layer is refused
(:meth:`lorma.model.LormaModel._check_merge_allowed`): it would change the output layer as well.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..variants import LormaVariant
from .base import LormaLayer
from .conv import refuse_linear_only_options


class EmbeddingVariant(LormaVariant):
    """Plain LoRMA on an embedding: the transform acts on the looked-up rows only."""

    def folded_forward(self, layer: Any, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """Never: folding would transform all ``num_embeddings`` rows to look up a few; the activation form
        transforms exactly the rows looked up."""
        return None


class Embedding(nn.Module, LormaLayer):
    """LoRMA around an ``nn.Embedding``: ``I(BA)`` (``dim x dim``) on every looked-up row (the pre side).

    ``in_features`` / ``out_features`` are ``num_embeddings`` / ``embedding_dim``, the sizes of the one-hot-to-
    embedding map whose weight is stored transposed (``fan_in_fan_out``, as in transformers' ``Conv1D``).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, module_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        LormaLayer.__init__(self, base_layer, module_name=module_name, fan_in_fan_out=True)
        base = self.get_base_layer()
        if base.max_norm is not None:
            # the lookup renormalises the looked-up rows of E0 in place; I(BA) renorm(E0[i]) is not renorm(E[i])
            raise ValueError(
                f"module {module_name!r} is an nn.Embedding with max_norm={base.max_norm}: the lookup renormalises "
                "rows, which does not commute with I(BA), so merging could not be exact; adapt embeddings without "
                "max_norm"
            )
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def transform_sizes_of(self, base: nn.Module) -> tuple[int, int] | None:
        if isinstance(base, nn.Embedding):
            return base.num_embeddings, base.embedding_dim
        return None

    def update_layer(self, adapter_name: str, r: int, alpha: float, inflation: str, side: str, **kwargs: Any) -> None:
        """As :meth:`LormaLayer.update_layer`; only the pre side (the embedding dimension)."""
        if side != "pre":
            raise ValueError(
                f"module {self.module_name!r} is an nn.Embedding: LoRMA adapts it on the pre side only (I(BA) on "
                f"the embedding dimension, every row E0[i] -> I(BA) E0[i]), got side={side!r}; set "
                f"side_pattern={{{self.module_name.rsplit('.', 1)[-1]!r}: 'pre'}} or side='auto'"
            )
        refuse_linear_only_options(self.module_name, "nn.Embedding", kwargs)
        super().update_layer(adapter_name, r, alpha, inflation, side, **kwargs)
        # the layer made a plain LormaVariant (and initialised A, B with it); same inflation, embedding forward
        self.lorma_variant[adapter_name] = EmbeddingVariant(self.lorma_variant[adapter_name].inflation)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return LormaLayer.forward(self, x, *args, **kwargs)


class TiedLinear(nn.Module, BaseTunerLayer):
    """An ``nn.Linear`` whose weight is an adapted :class:`Embedding`'s table (tied embeddings): ``E0 I(BA)^T h``.

    It holds no parameters: it applies the transpose of the embedding's transform for each of the embedding's
    active, unmerged adapters that it is tied to, and follows the embedding's state (active adapters, disabled,
    merged), since both read one weight. Merging it merges the embedding (the shared table then serves both);
    unmerging it unmerges the embedding.

    The order mirrors the embedding's: rows ``I_n ... I_1 E0[i]`` (adapter 1 nearest ``E0``) merge into
    ``E0 I_1^T ... I_n^T``, so the input meets ``I_n^T`` first.
    """

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ("tied_adapters",)

    def __init__(self, base_layer: nn.Module, source: Embedding, adapter_name: str, module_name: str = "") -> None:
        super().__init__()
        if type(base_layer) is not nn.Linear:
            raise ValueError(
                f"module {module_name!r} shares its weight with the adapted embedding {source.module_name!r} but is "
                f"a {type(base_layer).__name__}; ensure_weight_tying ties plain nn.Linear output layers only"
            )
        self.base_layer = base_layer
        self.module_name = module_name
        # not a submodule: the adapter's parameters belong to the embedding (saved, trained and moved there)
        object.__setattr__(self, "_source", source)
        self.tied_adapters: dict[str, str] = {}  # adapter -> the embedding it follows
        self._active_adapter = adapter_name
        self.tie(adapter_name, source)

    @property
    def source(self) -> Embedding:
        """The adapted embedding whose table this layer's weight is."""
        return self._source

    def tie(self, adapter_name: str, source: Embedding) -> None:
        """Follow ``source``'s adapter ``adapter_name`` (checked: the same weight, a transpose within bounds)."""
        where = f"module {self.module_name!r}"
        if source is not self._source or source.get_base_layer().weight is not self.base_layer.weight:
            raise ValueError(f"{where}: tied to {self._source.module_name!r}, not to {source.module_name!r}")
        inflation = source.lorma_variant[adapter_name].inflation
        if not inflation.transposed_fits(source.out_features):
            raise ValueError(
                f"{where}: tied to {source.module_name!r}, it applies the transpose of the {inflation.name!r} "
                f"transform, a dense {source.out_features} x {source.out_features} matrix above max_dense_bytes="
                f"{inflation.max_dense_bytes}; raise LormaConfig.max_dense_bytes or untie the embeddings"
            )
        self.tied_adapters[adapter_name] = source.module_name

    def _followed(self) -> list[str]:
        """The embedding's active adapters this layer is tied to, in the embedding's order."""
        source = self._source
        return [a for a in source.active_adapters if a in self.tied_adapters and a in source.lorma_A]

    @property
    def merged_adapters(self) -> list[str]:  # peft reads it (merged, delete_adapter's check): the embedding's state
        return [a for a in self._source.merged_adapters if a in self.tied_adapters]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the tied adapters into the shared table, through the embedding (once: not merged there yet)."""
        wanted = self._followed() if adapter_names is None else adapter_names
        pending = [a for a in wanted if a in self.tied_adapters and a not in self._source.merged_adapters]
        if pending:
            self._source.merge(safe_merge=safe_merge, adapter_names=pending)

    def unmerge(self) -> None:
        """Unmerge through the embedding, which restores the shared table."""
        if self.merged_adapters:
            self._source.unmerge()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        source = self._source
        if source.disable_adapters:
            if source.merged:
                source.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if source.merged:
            return self.base_layer(x, *args, **kwargs)
        h = x
        for adapter in reversed(self._followed()):
            variant = source.lorma_variant[adapter]
            A = source.lorma_A[adapter]
            hc = source._cast_input_dtype(h, A.dtype)
            dropped = source.lorma_dropout[adapter](hc) if variant._dropout_active(source, adapter) else hc
            delta = variant.inflation.apply_transposed_delta(
                dropped, A, source.lorma_B[adapter], variant.scaling(source, adapter)
            )
            h = (hc + delta).to(h.dtype)
        return self.base_layer(h, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"tied to {self._source.module_name!r}, adapters {sorted(self.tied_adapters)}"
