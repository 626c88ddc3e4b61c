"""Rank inflations as objects: one module per inflation, a registry that maps names to classes.

``plus`` (LoRMA+, ``I + sBA``), ``pi`` (LoRMA_pi, ``s pi(BA)``) and ``none`` (the ablation, ``s BA``) are built in.
A built-in is found by its module: ``lorma/inflations/x.py`` registers inflation ``x`` (``@register_inflation``), and
``lorma train --method lorma-x`` offers it, with nothing else to edit; a user's own inflation is registered the same
way from any module (docs/extending.md: one file and its tests).

May import: :mod:`lorma.functional` and :mod:`lorma.plumbing` only (the variants, the config and the layers ask
this registry; it knows none of them).
"""

from __future__ import annotations

from .base import (
    DEFAULT_FFT_CHUNK_BYTES,
    DEFAULT_MAX_DENSE_BYTES,
    Inflation,
    Strategy,
    get_inflation,
    inflation_names,
    register_inflation,
)
from .none import NoneInflation
from .pi import PiInflation
from .plus import PlusInflation

__all__ = [
    "DEFAULT_FFT_CHUNK_BYTES",
    "DEFAULT_MAX_DENSE_BYTES",
    "Inflation",
    "NoneInflation",
    "PiInflation",
    "PlusInflation",
    "Strategy",
    "get_inflation",
    "inflation_names",
    "register_inflation",
]
