"""A variant's own options (``LormaConfig.variant_options``): declared by the variant, checked before any module.

Each variant class names a dataclass of its options (:attr:`lorma.variants.LormaVariant.options`, a subclass of
:class:`VariantOptions`, every field with a default); ``LormaConfig`` keeps them in one field, ``variant_options``, so
that a new variant adds options without an edit to ``LormaConfig`` and an option of one variant is never silently
ignored on another. This module knows no variant by name: it reads the registry.

Two older spellings keep working, both folded into ``variant_options`` by :func:`fold_flat_options`:

- ``adapter_config.json`` files saved before ``variant_options`` existed carry every variant's options as top-level
  keys (``target_r``, ``min_rank``, ``final_ranks`` ...), the chosen variant's and the others' at their defaults;
- ``LormaConfig(variant="adalorma", target_r=4, total_step=100)``: the same flat keywords, a documented shorthand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

__all__ = ["VariantOptions", "fold_flat_options", "option_owners", "validate_variant_options"]


@dataclasses.dataclass
class VariantOptions:
    """A variant's options (none here: plain LoRMA and DoRMA have none).

    Subclass it as a ``@dataclass`` whose fields are the options, each with the default the variant has when the
    option is not given, JSON values only (they are saved in ``adapter_config.json``), and override :meth:`check`.
    """

    def check(self, config: Any) -> None:
        """Raise a ``ValueError`` naming the option unless these options fit ``config`` (the whole ``LormaConfig``,
        for ``r``, ``inflation``, ``rank_pattern`` ...); called by ``LormaConfig`` before any module is built."""


def option_owners() -> dict[str, list[str]]:
    """Option name -> the registered variants that declare it, in registration order."""
    from . import get_variant, variant_names

    owners: dict[str, list[str]] = {}
    for name in variant_names():
        for field in dataclasses.fields(get_variant(name).options):
            owners.setdefault(field.name, []).append(name)
    return owners


def _default(variant: str, option: str) -> Any:
    from . import get_variant

    field = next(f for f in dataclasses.fields(get_variant(variant).options) if f.name == option)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def fold_flat_options(kwargs: dict[str, Any], config_fields: Iterable[str]) -> dict[str, Any]:
    """``LormaConfig`` keyword arguments with top-level variant options moved into ``variant_options``.

    A key that is not a field of ``LormaConfig`` (``config_fields``) but an option of the chosen variant is moved;
    one that belongs to another variant is dropped at that variant's default (an old ``adapter_config.json``
    carries them all) and refused otherwise, naming it, as before ``variant_options`` existed; any other key is
    left for the constructor to refuse. Given both flat and in ``variant_options``, an option is refused.
    """
    fields = set(config_fields)
    owners = option_owners()
    flat = {key: value for key, value in kwargs.items() if key not in fields and key in owners}
    if not flat:
        return kwargs
    variant = kwargs.get("variant")
    if variant is None and kwargs.get("use_dora"):
        variant = "dorma"  # peft's name for DoRMA (LormaConfig resolves it the same way)
    if variant is not None:
        from . import get_variant

        try:
            get_variant(variant)
        except ValueError as err:
            raise ValueError(f"LormaConfig: {err}") from None
    folded = {key: value for key, value in kwargs.items() if key not in flat}
    nested = dict(folded.get("variant_options") or {})
    for key, value in flat.items():
        if variant in owners[key]:
            if key in nested:
                raise ValueError(f"LormaConfig: option {key!r} is given twice, as {key}= and in variant_options")
            nested[key] = value
        elif all(value != _default(owner, key) for owner in owners[key]):
            raise ValueError(
                f"LormaConfig: {key}={value!r} is an option of variant={owners[key][0]!r}, but variant={variant!r}"
            )
    folded["variant_options"] = nested
    return folded


def validate_variant_options(config: Any) -> dict[str, Any]:
    """``config.variant_options`` checked against its variant's options and completed with their defaults.

    ``ValueError`` naming the key for an option the variant does not declare (and the variant that does, if one
    does), for options without a variant, and whatever the variant's :meth:`VariantOptions.check` refuses.
    """
    from . import get_variant

    given = config.variant_options if config.variant_options is not None else {}
    if not isinstance(given, dict) or not all(isinstance(key, str) for key in given):
        raise ValueError(f"LormaConfig: variant_options must be a dict of option names, got {given!r}")
    if config.variant is None and given:
        raise ValueError(
            f"LormaConfig: variant_options {sorted(given)} given without a variant (variant=None); they are the "
            "options of the variant chosen with variant=..."
        )
    options_cls = get_variant(config.variant).options
    declared = [field.name for field in dataclasses.fields(options_cls)]
    for key in given:
        if key not in declared:
            owners = [name for name in option_owners().get(key, []) if name != config.variant]
            elsewhere = f" (an option of variant={owners[0]!r})" if owners else ""
            raise ValueError(
                f"LormaConfig: unknown option {key!r} for variant={config.variant!r}{elsewhere}; its options are "
                f"{declared}"
            )
    try:
        options = options_cls(**given)
    except TypeError as err:  # an option declared without a default, and not given
        raise ValueError(f"LormaConfig (variant={config.variant!r}): {err}") from None
    options.check(config)
    return dataclasses.asdict(options)
