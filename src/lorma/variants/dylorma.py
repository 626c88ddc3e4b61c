"""DyLoRMA: LoRMA+ with nested ranks, after DyLoRA (Valipour et al., 2023).

Each training forward uses only the first ``b`` rank components, ``b`` drawn uniformly from ``[min_rank, r]`` once
per forward of the whole model (every layer the same ``b``, as in DyLoRA), with DyLoRA's scaling ``alpha / b``::

    I_b = I_d + (alpha / b) B[:, :b] A[:b, :],   W = I_b W0 (pre side)  or  W0 I_b (post side)

so one training gives an adapter usable at every rank ``b <= r``: component ``i`` is trained together with all
components before it, never relying on those after it. Outside training the rank is ``inference_rank`` (``None``:
all ``r``); ``lorma export --rank b`` writes the rank-``b`` truncation as a plain LoRMA+ adapter (``r = b``,
``alpha`` kept, so the same ``alpha / b``). The draw uses torch's global generator, so a seeded run is
reproducible. DyLoRA's "frozen" mode (only the ``b``-th component updated each step) is not built: here every
component up to ``b`` trains, which is what the truncation's gradient gives.

Everything else is LoRMA+'s on the truncated pair with scaling ``alpha / b`` (the variant hook's ``pairs`` and
``scaling``): forward, merge (the rank in force at merge time is merged), exact export. Only ``plus`` is accepted:
truncating ``pi``'s identity initialisation with ``alpha / b`` gives ``(r / b) I``, not the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..inflations.base import get_inflation
from .base import AdaptedLayer, LormaVariant, PairSlice
from .options import VariantOptions
from .registry import register_variant


@dataclass
class DyLormaOptions(VariantOptions):
    """DyLoRMA's options (``LormaConfig.variant_options``)."""

    #: the smallest rank a training forward draws (the largest is ``r``)
    min_rank: int = 1
    #: the rank used outside training; ``None``: all ``r``
    inference_rank: int | None = None

    def check(self, config: Any) -> None:
        """Checked before any module is built (``ValueError`` naming the option)."""
        where = "LormaConfig (variant='dylorma')"
        if not get_inflation(config.inflation).identity_plus_low_rank:
            raise ValueError(
                f"{where}: DyLoRMA needs inflation='plus', got {config.inflation!r}: a truncated {config.inflation} "
                "transform with DyLoRA's alpha / b scaling is not the identity at init"
            )
        smallest = min([config.r, *config.rank_pattern.values()])
        low = self.min_rank
        if isinstance(low, bool) or not isinstance(low, int) or not 1 <= low <= smallest:
            raise ValueError(f"{where}: min_rank must be an integer in [1, {smallest}] (the smallest r), got {low!r}")
        rank = self.inference_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= config.r):
            raise ValueError(f"{where}: inference_rank must be None or an integer in [1, r={config.r}], got {rank!r}")


@register_variant
class DyLormaVariant(LormaVariant):
    """LoRMA+ truncated to the first ``b`` ranks: ``I + (alpha / b) B[:, :b] A[:b]`` (module docstring)."""

    name = "dylorma"
    options = DyLormaOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the rank a training forward uses (drawn by :func:`sample_rank`); ``None`` before the first draw
        self.training_rank: int | None = None
        #: the rank outside training (the ``inference_rank`` option); ``None``: all ``r``
        self.inference_rank: int | None = None

    def configure(self, config: Any) -> None:
        """Take ``inference_rank`` from the adapter's options."""
        self.inference_rank = self.options_of(config).inference_rank

    @classmethod
    def before_training_forward(cls, model: nn.Module, adapter: str, config: Any) -> None:
        """Draw the rank of this forward for all of the adapter's layers (:func:`sample_rank`)."""
        sample_rank(model, [adapter], cls.options_of(config).min_rank, config.r)

    def init(self, layer: AdaptedLayer, adapter: str, init_weights: bool) -> None:
        if not self.inflation.identity_plus_low_rank:
            raise ValueError(
                f"module {layer.module_name!r}: DyLoRMA needs the plus inflation, got {self.inflation.name!r}"
            )
        super().init(layer, adapter, init_weights)

    def rank_in_force(self, layer: AdaptedLayer, adapter: str) -> int:
        """``b``: the drawn rank in training (once drawn), else ``inference_rank`` (or ``r``); at most this ``r``."""
        training = getattr(layer, "training", False) and self.training_rank is not None
        wanted = self.training_rank if training else self.inference_rank
        return min(wanted or layer.r[adapter], layer.r[adapter])

    def unmerges_exactly(self, layer: AdaptedLayer, adapter: str) -> bool:
        """``False``: the layer keeps a copy at merge time, since the rank in force follows ``train()`` / ``eval()``
        and an inverse at another rank than the merged one would give a wrong ``W0`` without a sign."""
        return False

    def pairs(self, layer: AdaptedLayer, adapter: str) -> list[PairSlice]:
        """The first ``b`` components of every part."""
        b = self.rank_in_force(layer, adapter)
        return [(rows, A[..., :b, :], B[..., :, :b]) for rows, A, B in super().pairs(layer, adapter)]

    def scaling(self, layer: AdaptedLayer, adapter: str) -> float:
        """DyLoRA's ``alpha / b`` for the ``b`` components in force."""
        return layer.alpha[adapter] / self.rank_in_force(layer, adapter)


def sample_rank(model: nn.Module, adapters: list[str], min_rank: int, max_rank: int) -> int:
    """Draw ``b`` uniformly from ``[min_rank, max_rank]`` and give it to every DyLoRMA layer of ``adapters``."""
    b = int(torch.randint(min_rank, max_rank + 1, ()).item())
    for module in model.modules():
        for adapter in adapters:
            variant = getattr(module, "lorma_variant", {}).get(adapter)
            if isinstance(variant, DyLormaVariant):
                variant.training_rank = b
    return b
