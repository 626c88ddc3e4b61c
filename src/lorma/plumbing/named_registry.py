"""Named entries of one kind: the one way lorma registers inflations, variants, methods and tasks.

A :class:`Registry` maps names to classes (an inflation, a variant, a task: subclasses of the family's base class)
or to objects (a method: an instance of :class:`lorma.runs.method_registry.Method`). The rules are the same for all:
an entry of the family, a non-empty name, one entry per name; the same class defined again (a module re-imported or
reloaded, which makes a new class object with the same module and qualified name) replaces itself, so that reloading
a user's module is not an error; another entry under a taken name is. An unknown name is an
:class:`~lorma.plumbing.errors.UnknownNameError` that lists the known ones.

Built-ins are found, not listed: ``package`` names the folder that holds them, and nothing else has to be edited to
add one. Two layouts:

- ``one_module_per_entry=True`` (inflations, variants): the built-in ``x`` is the module ``package.x``, which
  registers ``x`` when imported. Its name is known without importing anything (:func:`module_names`: the command
  line lists ``lorma-x`` before torch is imported), and the module is imported on the first :meth:`Registry.get`.
- ``one_module_per_entry=False`` (tasks, several names per module): every module of ``package`` is imported on the
  first lookup that needs them; a module that fails to import is reported with the unknown name, not raised, so
  that one broken module does not take the others down.

Users add entries with the family's decorator (``register_inflation``, ``register_variant``, ``register_task``) or
function (``register_method``); their names are listed after the built-ins, in registration order.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from lorma.plumbing.errors import UnknownNameError

__all__ = ["Registry", "module_names"]

T = TypeVar("T")


def module_names(package: str, skip: Iterable[str] = (), first: Iterable[str] = ()) -> tuple[str, ...]:
    """The modules of ``package`` (without ``_private`` ones and ``skip``), found on disk: the package itself is not
    imported (its ``__init__`` may import torch). Those named in ``first`` come first, in that order; the others
    follow, sorted. The folders are listed once per set of search locations (a location added to the package's
    ``__path__`` later is a new set, listed anew)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package} is not a package")
    found = _listed(tuple(spec.submodule_search_locations), frozenset(skip))
    head = tuple(n for n in first if n in found)
    return head + tuple(n for n in found if n not in head)


@functools.cache
def _listed(locations: tuple[str, ...], skip: frozenset[str]) -> tuple[str, ...]:
    """The sorted public module names in ``locations`` (``method_names`` asks on every lookup: listed once)."""
    found = pkgutil.iter_modules(list(locations))
    return tuple(sorted(m.name for m in found if not m.name.startswith("_") and m.name not in skip))


class Registry(Generic[T]):
    """The entries of one family by name; ``noun`` names them in messages (``inflation``, ``method``, ``task``).

    Args:
        kind: the family's base class: entries are its subclasses, or with ``instances=True`` its instances.
        noun: what an entry is called in messages.
        instances: entries are objects (with a ``name`` attribute), not classes.
        package: where the built-ins are (see the module docstring); None: registered entries only.
        one_module_per_entry: the built-in ``x`` is module ``package.x``.
        skip: modules of ``package`` that hold no entry (``base``, helpers).
        register_hint: how a user adds one, said when a name is unknown.
        first: built-ins listed first, in this order (the paper's); the others follow, sorted. A display order
            only: a built-in missing from it is found all the same.
    """

    def __init__(
        self,
        kind: type,
        noun: str,
        *,
        instances: bool = False,
        package: str | None = None,
        one_module_per_entry: bool = False,
        skip: Iterable[str] = ("base",),
        register_hint: str = "",
        first: tuple[str, ...] = (),
    ) -> None:
        self.kind = kind
        self.noun = noun
        self.instances = instances
        self.package = package
        self.one_module_per_entry = one_module_per_entry
        self.skip = tuple(skip)
        self.register_hint = register_hint
        self.first = first
        #: name -> entry, in registration order
        self.entries: dict[str, T] = {}
        #: modules of ``package`` that failed to import -> why
        self.broken: dict[str, str] = {}
        self._scanned = False

    # ------------------------------------------------------------------------------------------------ adding
    def register(self, entry: T, *names: str) -> T:
        """Add ``entry`` under ``names`` (default: its ``name`` attribute); returns it, so that it works as a class
        decorator. TypeError for an entry outside the family, ValueError for a missing or taken name."""
        if self.instances:
            if not isinstance(entry, self.kind):
                raise TypeError(f"register_{self.noun} takes a {self.kind.__name__}, got {entry!r}")
        elif not (isinstance(entry, type) and issubclass(entry, self.kind)) or entry is self.kind:
            raise TypeError(f"register_{self.noun} takes a {self.kind.__name__} subclass, got {entry!r}")
        if not names:
            name = getattr(entry, "name", None)
            if not name or not isinstance(name, str):
                what = entry.__name__ if isinstance(entry, type) else repr(entry)
                raise ValueError(f"{what} has no name: set the attribute `name`")
            names = (name,)
        for name in names:
            known = self.entries.get(name)
            if known is not None and known is not entry and not _same_class(known, entry):
                article = "an" if self.noun[0] in "aeiou" else "a"
                raise ValueError(f"{article} {self.noun} named {name!r} is already registered ({_describe(known)})")
        for name in names:
            self.entries[name] = entry
        return entry

    def decorator(self, *names: str) -> Callable[[T], T]:
        """``@registry.decorator("a", "b")``: register the decorated class under these names."""
        return lambda entry: self.register(entry, *names)

    # ------------------------------------------------------------------------------------------------ reading
    def builtin_names(self) -> tuple[str, ...]:
        """The built-ins' names (one module per entry: without importing them)."""
        if self.package is None:
            return ()
        if self.one_module_per_entry:
            return module_names(self.package, self.skip, self.first)
        self._scan()
        return tuple(self.entries)

    def names(self) -> tuple[str, ...]:
        """Every name: the built-ins first, then what was registered, in registration order."""
        builtins = self.builtin_names()
        return builtins + tuple(n for n in self.entries if n not in builtins)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def get(self, name: str, *, also: str = "") -> T:
        """The entry registered under ``name`` (importing its built-in module if need be); an
        :class:`UnknownNameError` naming the known ones otherwise (``also``: what the caller accepts besides a name,
        said first in the list, e.g. ``"None"``)."""
        if isinstance(name, str) and name not in self.entries and self.package is not None:
            if self.one_module_per_entry:
                if name in module_names(self.package, self.skip):
                    importlib.import_module(f"{self.package}.{name}")
                    if name not in self.entries:
                        raise ValueError(f"module {self.package}.{name} registers no {self.noun} named {name!r}")
            else:
                self._scan()
        try:
            return self.entries[name]
        except (KeyError, TypeError):
            expected = f"{also} or one of" if also else "one of"
            broken = "".join(f"; module {self.package}.{m} failed to import ({why})" for m, why in self.broken.items())
            hint = f" ({self.register_hint})" if self.register_hint else ""
            raise UnknownNameError(f"unknown {self.noun} {name!r}; expected {expected} {self.names()}{hint}{broken}")\
                from None

    def _scan(self) -> None:
        """Import every module of ``package`` once, so that their registrations run."""
        if self._scanned or self.package is None:
            return
        self._scanned = True
        for module in module_names(self.package, self.skip):
            try:
                importlib.import_module(f"{self.package}.{module}")
            except Exception as err:  # one broken module must not take the other entries down
                self.broken[module] = f"{type(err).__name__}: {err}"


def _same_class(a: Any, b: Any) -> bool:
    """The same class defined again (a reloaded module)."""
    return isinstance(a, type) and isinstance(b, type) and (a.__module__, a.__qualname__) == (b.__module__,
                                                                                              b.__qualname__)


def _describe(entry: Any) -> str:
    if isinstance(entry, type):
        return f"{entry.__module__}.{entry.__qualname__}"
    return repr(getattr(entry, "name", entry))
