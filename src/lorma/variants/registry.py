"""The variants by name: the built-in ``x`` is the module ``lorma.variants.x`` (found on disk, imported on first use,
registering itself with :func:`register_variant`); a user's own variant registers the same way from any module."""

from __future__ import annotations

from ..plumbing.named_registry import Registry
from .base import LormaVariant

_REGISTRY: Registry[type[LormaVariant]] = Registry(
    LormaVariant, "variant", package="lorma.variants", one_module_per_entry=True, skip=("base", "options", "registry"),
    first=("dorma", "adalorma", "dylorma"),
    register_hint="a custom variant must be registered with lorma.variants.register_variant before it is used or "
                  "loaded",
)
_VARIANTS = _REGISTRY.entries  # name -> class


def register_variant(cls: type[LormaVariant]) -> type[LormaVariant]:
    """Make ``LormaConfig(variant=cls.name)`` use ``cls`` (a class decorator); names are unique."""
    return _REGISTRY.register(cls)


def variant_names() -> tuple[str, ...]:
    """The variants' names: the built-ins (the modules of ``lorma/variants/``), then those registered."""
    return _REGISTRY.names()


def get_variant(name: str | None) -> type[LormaVariant]:
    """The class for ``LormaConfig(variant=name)``: plain :class:`LormaVariant` for ``None``."""
    if name is None:
        return LormaVariant
    return _REGISTRY.get(name, also="None")
