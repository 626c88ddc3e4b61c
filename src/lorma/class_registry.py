"""Classes registered by their ``name`` attribute: what the inflations and the variants share.

``LormaConfig(inflation=...)`` and ``LormaConfig(variant=...)`` name a class; a user adds one with a class decorator
(``register_inflation``, ``register_variant``). The rules are the same for both: a subclass of the family's base
class, a non-empty name, one class per name. The same class defined again (a module re-imported or reloaded, which
makes a new class object with the same module and qualified name) replaces itself, so that reloading a user's
module is not an error; another class under a taken name is.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["ClassRegistry"]

T = TypeVar("T")


class ClassRegistry(Generic[T]):
    """The subclasses of ``base`` by name; ``noun`` names them in errors (``inflation``, ``variant``)."""

    def __init__(self, base: type[T], noun: str) -> None:
        self.base = base
        self.noun = noun
        #: name -> class, in registration order
        self.classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Add ``cls`` under ``cls.name`` (TypeError for a class outside the family, ValueError for a missing or
        taken name); returns it, so that it works as a class decorator."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)) or cls is self.base:
            raise TypeError(f"register_{self.noun} takes a {self.base.__name__} subclass, got {cls!r}")
        name = getattr(cls, "name", None)
        if not name or not isinstance(name, str):
            raise ValueError(f"{cls.__name__} has no name: set the class attribute `name`")
        known = self.classes.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            article = "an" if self.noun[0] in "aeiou" else "a"
            raise ValueError(f"{article} {self.noun} named {name!r} is already registered "
                             f"({known.__module__}.{known.__qualname__})")
        self.classes[name] = cls
        return cls

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self.classes)

    def get(self, name: str, *, also: str = "") -> type[T]:
        """The class registered under ``name``; a ``ValueError`` naming the known ones otherwise (``also``: what
        the caller accepts besides a name, said first in the list, e.g. ``"None"``)."""
        try:
            return self.classes[name]
        except (KeyError, TypeError):
            expected = f"{also} or one of" if also else "one of"
            raise ValueError(
                f"unknown {self.noun} {name!r}; expected {expected} {self.names()} (a custom {self.noun} must be "
                f"registered with lorma.{self.noun}s.register_{self.noun} before it is used or loaded)"
            ) from None
