"""Rank inflations as objects: one module per inflation, a registry that maps names to classes.

``plus`` (LoRMA+, ``I + sBA``), ``pi`` (LoRMA_pi, ``s pi(BA)``) and ``none`` (the ablation, ``s BA``) are built in;
:func:`register_inflation` adds one (docs/extending.md: one file and its tests).
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

# the built-in inflations, registered here at the package face (as peft registers its methods), in the paper's order
for _inflation in (PlusInflation, PiInflation, NoneInflation):
    register_inflation(_inflation)
del _inflation

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
