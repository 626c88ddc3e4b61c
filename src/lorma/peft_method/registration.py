"""Registering LoRMA with peft (the ``PeftType.LORMA`` member itself is added by :mod:`.peft_type`).

peft looks methods up by ``PeftType`` members (``PeftType.LORA``, ...), and the enum has no public way to
grow. ``register_peft_method`` (peft >= 0.15) does everything else but requires the member to exist, so we
add ``PeftType.LORMA``, then register. If a future peft changes the enum's layout, this fails in peft_type, with a
message that says so, instead of somewhere deep inside peft.

*What* is registered is handed in, not imported here: :func:`register_when_peft_is_imported` takes a function that
returns the config and model classes (``lorma/__init__`` passes one that imports :mod:`lorma.config` and
:mod:`lorma.model`). So this room imports nothing of the core, and ``LormaConfig``, which needs ``PeftType.LORMA``
when it is created, can import :mod:`.peft_type` from here without a cycle.

*When* it happens: ``import lorma`` must stay cheap (the command line validates its input before importing
torch, transformers or peft), yet after ``import lorma`` peft must know LORMA, whatever is imported next
and in which order. :func:`register_when_peft_is_imported` registers at once if peft is already imported,
and otherwise installs a post-import hook (a ``sys.meta_path`` finder) that registers as soon as ``peft``
has finished importing. peft is imported by ``lorma.config`` and ``lorma.model`` themselves, whose classes
registration needs: when one of them is what triggered peft's import, registration waits for it to finish
(the hook watches those modules too). The hook removes itself once registration is done.

A process that never imports lorma cannot know LORMA: peft's loaders then fail with ``KeyError: 'LORMA'``.
That is peft's lookup, out of lorma's reach; the README and the model card lorma writes beside a saved
adapter say to ``import lorma`` first.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import threading
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..plumbing.quiet import known_noise_dropped
from .peft_type import PEFT_TYPE_NAME, LormaRegistrationError, lorma_peft_type

__all__ = [
    "PEFT_TYPE_NAME",
    "LormaRegistrationError",
    "lorma_peft_type",
    "register",
    "register_if_ready",
    "register_when_peft_is_imported",
]


#: returns the classes peft registers, ``(LormaConfig, LormaModel)``: set by :func:`register_when_peft_is_imported`
TunerClasses = Callable[[], tuple[type, type]]
_tuner_classes: TunerClasses | None = None


def register() -> None:
    """Make ``peft`` know the ``LORMA`` method (config, tuner, prefix). Idempotent."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = lorma_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    try:
        from peft.utils import register_peft_method
    except ImportError as err:
        raise LormaRegistrationError(
            f"peft {peft.__version__} has no register_peft_method (needs peft >= 0.15)"
        ) from err
    if _tuner_classes is None:
        raise LormaRegistrationError("nothing to register: register_when_peft_is_imported was not called")
    config_cls, model_cls = _tuner_classes()
    register_peft_method(name="lorma", config_cls=config_cls, model_cls=model_cls, prefix="lorma_")


# --------------------------------------------------------------------------------------------------
# Registration as soon as peft is imported (a post-import hook)
# --------------------------------------------------------------------------------------------------

#: modules whose import completing may make registration possible: peft itself, and lorma's own modules (those
#: that import peft, directly or not, may be what triggered peft's import, and registration imports them)
_WATCHED_PREFIX = "lorma."


def _watched(name: str) -> bool:
    return name == "peft" or name.startswith(_WATCHED_PREFIX)
_lock = threading.RLock()
_done = False


def _ready(just_loaded: str | None) -> bool:
    """peft is imported and no watched module is half-way through its import (``just_loaded`` has finished
    executing; importlib clears its flag only after our loader returns)."""
    for name, module in list(sys.modules.items()):
        if name == just_loaded or not _watched(name):
            continue
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            return False
    return "peft" in sys.modules


def register_if_ready(just_loaded: str | None = None) -> bool:
    """Register now if peft is imported and nothing is mid-import; True once LORMA is registered."""
    global _done
    with _lock:
        if _done:
            return True
        if not _ready(just_loaded):
            return False
        try:
            register()
        except ImportError:  # a watched module is still initialising further up the stack: wait for it
            return False
        except LormaRegistrationError as err:  # keep peft usable; LormaConfig raises this again when used
            warnings.warn(f"lorma could not register with peft: {err}", stacklevel=2)
            return False
        _done = True
        _uninstall()
        return True


class _LoaderThenRegister(importlib.abc.Loader):
    """Wraps a module's loader: executes the module, then tries to register."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # peft's import imports bitsandbytes, which may log a notice that says nothing to a user of lorma: dropped
        # while peft's import runs, and only then (lorma.plumbing.quiet)
        with known_noise_dropped() if module.__name__ == "peft" else contextlib.nullcontext():
            self._loader.exec_module(module)
        register_if_ready(just_loaded=module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds the watched modules with the other finders and wraps their loaders."""

    def __init__(self) -> None:
        self._finding: set[str] = set()

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not _watched(fullname) or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._finding.discard(fullname)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenRegister(spec.loader)
        return spec


_hook: _PostImportHook | None = None


def _uninstall() -> None:
    global _hook
    if _hook is not None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(_hook)
        _hook = None


def register_when_peft_is_imported(tuner_classes: TunerClasses) -> None:
    """Register LORMA with peft now if peft is imported, else as soon as it is (see the module docstring);
    ``tuner_classes()`` returns the config and model classes, imported only when registration happens."""
    global _hook, _tuner_classes
    with _lock:
        _tuner_classes = tuner_classes
        if register_if_ready() or _hook is not None:
            return
        _hook = _PostImportHook()
        sys.meta_path.insert(0, _hook)
