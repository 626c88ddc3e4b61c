"""LoRMA around an ``nn.Linear`` or a transformers ``Conv1D``: the layer most adapters are.

Nothing differs from :class:`~lorma.layers.base.LormaLayer`'s protocol here: a linear weight is the plain
``d_out x d_in`` matrix that the base class transforms (``fan_in_fan_out`` for ``Conv1D``, whose weight is stored
transposed), so this class only names the layer kind for ``LormaModel``'s dispatch and for readers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import LormaLayer


class Linear(nn.Module, LormaLayer):
    """LoRMA around an ``nn.Linear`` (or a ``Conv1D``, whose weight is stored transposed)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        module_name: str = "",
        fan_in_fan_out: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LormaLayer.__init__(self, base_layer, module_name=module_name, fan_in_fan_out=fan_in_fan_out)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return LormaLayer.forward(self, x, *args, **kwargs)
