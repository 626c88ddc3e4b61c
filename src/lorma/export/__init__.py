"""A trained adapter out of its training form and into service.

- :mod:`~lorma.export.lora`: a LoRMA adapter as a standard peft LoRA adapter (exact for LoRMA+, a truncated SVD
  otherwise) and the vLLM / llama.cpp loaders' rules (``lorma export``, ``--serving``).
- :mod:`~lorma.export.hotswap`: another saved adapter's tensors put into a loaded one in place (no recompile under
  ``torch.compile``); ``lorma.hotswap_adapter`` is its public name.

The package is named for the command and the documented entry point: ``lorma.export.lora_export(...)`` (and
``LoraExport``, ``ExportError``) are importable from here, as docs/serving.md names them; they are imported on
first use (PEP 562), so importing one module of this room does not import the others. Mixed-adapter batches, also
a serving feature, live in :mod:`lorma.layers.mixed_batch`: the layers' forward calls them.

May import: :mod:`lorma.model`, :mod:`lorma.layers`, the core and :mod:`lorma.plumbing`; never a floor above
(``lorma.runs``, ``lorma.recipes``, ...: reading a run directory is :mod:`lorma.recipes.export`'s job).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module of this room that defines it
_EXPORTS: dict[str, str] = {
    "ExportError": "lorma.export.lora",
    "LoraExport": "lorma.export.lora",
    "lora_export": "lorma.export.lora",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .lora import ExportError as ExportError
    from .lora import LoraExport as LoraExport
    from .lora import lora_export as lora_export


def __getattr__(name: str) -> Any:
    """Import what defines ``name`` on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
