"""The ``lorma`` subcommands: one module each, named as the command, each with ``register(subparsers)``.

:data:`COMMANDS` is their registry, in the order ``lorma --help`` lists them; :func:`lorma.cli.build_parser`
imports exactly these modules. A command module holds its parser and a thin ``func`` that calls the library
(:mod:`lorma.recipes`, :mod:`lorma.analysis`, :mod:`lorma.runs`, :mod:`lorma.export`): importing it stays cheap
(no torch, transformers or peft at module level), so ``lorma --help`` and bad-input errors are fast. Bad input is
raised as :class:`lorma.plumbing.errors.InputError` everywhere; the shell prints it as one line with exit code 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["COMMANDS", "command_module"]

#: the subcommands, in the order of ``lorma --help`` (a test checks that it names every command module here)
COMMANDS: tuple[str, ...] = ("train", "compare", "merge", "export", "analyze", "evaluate", "reproduce", "demo")


def command_module(name: str) -> ModuleType:
    """The module of subcommand ``name`` (one of :data:`COMMANDS`)."""
    if name not in COMMANDS:
        raise ValueError(f"unknown lorma command {name!r}; expected one of {COMMANDS}")
    return importlib.import_module(f"lorma.commands.{name}")
