"""lorma: Low-Rank Multiplicative Adaptation (LoRMA) as a peft tuner.

``import lorma`` registers the ``LORMA`` method with peft, so ``get_peft_model(model, LormaConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as they do for LoRA.
"""

from __future__ import annotations

from . import functional
from .config import DEFAULT_FUSED_PARTS, DEFAULT_TARGET_MODULES, LormaConfig
from .layer import LormaLayer
from .model import LormaModel
from .registry import register as _register

_register()

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_FUSED_PARTS",
    "DEFAULT_TARGET_MODULES",
    "LormaConfig",
    "LormaLayer",
    "LormaModel",
    "functional",
]
