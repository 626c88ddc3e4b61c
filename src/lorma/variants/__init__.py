"""Variants of LoRMA: per-adapter objects that take over how an adapter is initialised, applied and merged.

Plain LoRMA is :class:`LormaVariant` itself; a variant is one module here with one subclass, registered with
:func:`register_variant` and chosen by ``LormaConfig(variant=name)``. Built in: ``dorma`` (weight-decomposed,
after DoRA; :mod:`lorma.variants.dorma`), ``adalorma`` (adaptive rank budget, after AdaLoRA;
:mod:`lorma.variants.adalorma`) and ``dylorma`` (nested ranks, after DyLoRA; :mod:`lorma.variants.dylorma`);
docs/variants.md describes and measures them, docs/extending.md shows how a variant is written and tested.

A variant's options (``LormaConfig.variant_options``) and what it does to the whole model (a rank drawn per
forward, a loss term, a step after the optimizer's) are declared on its class (:class:`LormaVariant`), so that
``LormaConfig`` and ``LormaModel`` ask this registry and never name a variant.
"""

from __future__ import annotations

from ..registries import Registry
from .adalorma import AdaLormaOptions, AdaLormaVariant
from .base import AdaptedLayer, LormaVariant
from .dorma import DormaVariant
from .dylorma import DyLormaOptions, DyLormaVariant
from .options import VariantOptions

_REGISTRY: Registry[type[LormaVariant]] = Registry(
    LormaVariant, "variant",
    register_hint="a custom variant must be registered with lorma.variants.register_variant before it is used or "
                  "loaded",
)
_VARIANTS = _REGISTRY.entries  # name -> class


def register_variant(cls: type[LormaVariant]) -> type[LormaVariant]:
    """Make ``LormaConfig(variant=cls.name)`` use ``cls`` (a class decorator); names are unique."""
    return _REGISTRY.register(cls)


def variant_names() -> tuple[str, ...]:
    """The registered variants' names, in registration order."""
    return _REGISTRY.names()


def get_variant(name: str | None) -> type[LormaVariant]:
    """The class for ``LormaConfig(variant=name)``: plain :class:`LormaVariant` for ``None``."""
    if name is None:
        return LormaVariant
    return _REGISTRY.get(name, also="None")


# the built-in variants, registered here at the package face (as the inflations are)
for _variant in (DormaVariant, AdaLormaVariant, DyLormaVariant):
    register_variant(_variant)
del _variant

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
