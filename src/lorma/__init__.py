"""lorma: Low-Rank Multiplicative Adaptation (LoRMA) as a peft tuner.

``import lorma`` registers the ``LORMA`` method with peft, so ``get_peft_model(model, LormaConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as they do for LoRA.

Importing lorma is cheap: the names below are imported on first use (PEP 562), and registration with peft
happens as soon as peft is imported, or at once if it already was (:mod:`lorma.peft_method.registration`). So the
``lorma`` command can check its input before it imports torch, transformers or peft.

The package's rooms (README, "Layout"): the core at this level (``config``, ``model``, ``functional``, with
``inflations/`` and ``variants/``), ``layers/`` (one module per wrapped layer kind), ``export/`` (a trained
adapter out and into service), ``peft_method/`` (what peft is told), ``plumbing/`` (what every floor uses); the
command line and its floors above them (``cli``, ``commands/``, ``recipes/``, ``analysis/``, ``runs/``, ``tasks/``,
``scoring/``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .peft_method import registration

__version__ = "0.1.0"

# public name -> the submodule that defines it (a submodule itself when the name is the module's)
_EXPORTS: dict[str, str] = {
    "DEFAULT_FUSED_PARTS": "lorma.config",
    "DEFAULT_TARGET_MODULES": "lorma.config",
    "LormaConfig": "lorma.config",
    "LormaLayer": "lorma.layers.base",
    "LormaModel": "lorma.model",
    "functional": "lorma.functional",
    "hotswap_adapter": "lorma.export.hotswap",
    "hotswap_adapter_from_state_dict": "lorma.export.hotswap",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from . import functional as functional
    from .config import DEFAULT_FUSED_PARTS as DEFAULT_FUSED_PARTS
    from .config import DEFAULT_TARGET_MODULES as DEFAULT_TARGET_MODULES
    from .config import LormaConfig as LormaConfig
    from .export.hotswap import hotswap_adapter as hotswap_adapter
    from .export.hotswap import hotswap_adapter_from_state_dict as hotswap_adapter_from_state_dict
    from .layers.base import LormaLayer as LormaLayer
    from .model import LormaModel as LormaModel


def __getattr__(name: str) -> Any:
    """Import what defines ``name`` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _tuner_classes() -> tuple[type, type]:
    """What peft registers as the LORMA method: imported when registration happens (peft imported), not before."""
    from .config import LormaConfig
    from .model import LormaModel

    return LormaConfig, LormaModel


registration.register_when_peft_is_imported(_tuner_classes)
