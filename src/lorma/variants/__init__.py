"""Variants of LoRMA: per-adapter objects that take over how an adapter is initialised, applied and merged.

Plain LoRMA is :class:`LormaVariant` itself; a variant is one module here with one subclass, registered with
:func:`register_variant` (a built-in ``x`` is found as the module ``lorma.variants.x``) and chosen by
``LormaConfig(variant=name)``. Built in: ``dorma`` (weight-decomposed, after DoRA; :mod:`lorma.variants.dorma`),
``adalorma`` (adaptive rank budget, after AdaLoRA;
:mod:`lorma.variants.adalorma`) and ``dylorma`` (nested ranks, after DyLoRA; :mod:`lorma.variants.dylorma`);
docs/variants.md describes and measures them, docs/extending.md shows how a variant is written and tested.

A variant's options (``LormaConfig.variant_options``) and what it does to the whole model (a rank drawn per
forward, a loss term, a step after the optimizer's) are declared on its class (:class:`LormaVariant`), so that
``LormaConfig`` and ``LormaModel`` ask this registry and never name a variant.

May import: :mod:`lorma.functional`, :mod:`lorma.inflations` and :mod:`lorma.plumbing` only (a variant is handed
the layer it serves, :class:`~lorma.variants.base.AdaptedLayer`, instead of importing the layers).
"""

from __future__ import annotations

from .adalorma import AdaLormaOptions, AdaLormaVariant
from .base import AdaptedLayer, LormaVariant
from .dorma import DormaVariant
from .dylorma import DyLormaOptions, DyLormaVariant
from .options import VariantOptions
from .registry import get_variant, register_variant, variant_names

__all__ = [
    "AdaLormaOptions",
    "AdaLormaVariant",
    "AdaptedLayer",
    "DormaVariant",
    "DyLormaOptions",
    "DyLormaVariant",
    "LormaVariant",
    "VariantOptions",
    "get_variant",
    "register_variant",
    "variant_names",
]
