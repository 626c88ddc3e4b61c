"""The ``LormaConfig`` fields that belong to one variant, checked in one place before any module is built.

A field of a variant other than the one chosen must stay at its default (a ``target_r`` on a plain LoRMA adapter
would otherwise be silently ignored); the chosen variant's fields are checked by its module's ``check_config``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

# variant name -> the LormaConfig fields only that variant reads
VARIANT_FIELDS: dict[str, tuple[str, ...]] = {
    "adalorma": (
        "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step", "final_ranks",
    ),
    "dylorma": ("min_rank", "inference_rank"),
}


def validate_variant_options(config: Any) -> None:
    """Raise a ``ValueError`` naming the field unless ``config``'s variant fields fit its ``variant``."""
    defaults = {f.name: f.default for f in fields(config)}
    for variant, names in VARIANT_FIELDS.items():
        if variant == config.variant:
            continue
        for name in names:
            if getattr(config, name) != defaults[name]:
                raise ValueError(
                    f"LormaConfig: {name}={getattr(config, name)!r} is an option of variant={variant!r}, "
                    f"but variant={config.variant!r}"
                )
    if config.variant == "adalorma":
        from .adalorma import check_config
    elif config.variant == "dylorma":
        from .dylorma import check_config
    else:
        return
    check_config(config)
