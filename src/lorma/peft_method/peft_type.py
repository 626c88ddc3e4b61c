"""``PeftType.LORMA``: the one place that touches peft's closed ``PeftType`` enum.

peft looks methods up by ``PeftType`` members (``PeftType.LORA``, ...), and the enum has no public way to
grow, so the member is added here, in place. If a future peft changes the enum's layout, this fails here, with a
message that says so, instead of somewhere deep inside peft. ``LormaConfig`` needs the member when it is created;
registering the method (:mod:`.registration`) is another step, which the package face does once.
"""

from __future__ import annotations

import enum

PEFT_TYPE_NAME = "LORMA"


class LormaRegistrationError(RuntimeError):
    """The installed peft cannot take a new method."""


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to a ``(str, Enum)`` class in place, as if it had been declared there."""
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    # set the class attribute before the member map knows the name (EnumType.__setattr__ refuses to
    # reassign members), bypassing EnumType.__setattr__ for the same reason
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def lorma_peft_type() -> enum.Enum:
    """``PeftType.LORMA``, adding it to the enum if this process has not done so yet."""
    try:
        from peft.utils.peft_types import PeftType
    except ImportError as err:  # pragma: no cover - peft is a hard dependency
        raise LormaRegistrationError(f"lorma needs peft installed: {err}") from err
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    try:
        member = _add_enum_member(PeftType, PEFT_TYPE_NAME, PEFT_TYPE_NAME)
    except (AttributeError, TypeError) as err:
        raise LormaRegistrationError(
            f"this version of peft cannot take a new PeftType member ({type(err).__name__}: {err}); "
            "lorma is tested with peft 0.21"
        ) from err
    if PeftType(PEFT_TYPE_NAME) is not member or PeftType[PEFT_TYPE_NAME] is not member:
        raise LormaRegistrationError("adding PeftType.LORMA did not take effect in this version of peft")
    return member
