"""The command line: every subcommand is one module of ``lorma.commands``, listed once; the parser is built without
torch, transformers or peft; bad input is one error type whatever the command."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import lorma.commands
from lorma.commands import COMMANDS, command_module

PACKAGE = Path(lorma.commands.__file__).parent
#: modules of lorma.commands that are not subcommands (shared flags)
HELPERS = {"run_options"}


def test_every_command_module_is_registered_once_and_registers_its_own_name() -> None:
    modules = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])} - HELPERS
    assert sorted(COMMANDS) == sorted(modules)
    assert len(set(COMMANDS)) == len(COMMANDS)
    import argparse

    for name in COMMANDS:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command")
        command_module(name).register(sub)
        assert list(sub.choices) == [name], f"lorma.commands.{name} registers {list(sub.choices)}"
        # one shape: a parser and run(args), which the shell calls
        assert sub.choices[name].get_default("func") is command_module(name).run


def test_an_unknown_command_name_is_refused() -> None:
    try:
        command_module("trian")
    except ValueError as err:
        assert "trian" in str(err) and "train" in str(err)
    else:  # pragma: no cover - the assertion that fails the test
        raise AssertionError("command_module accepted an unknown name")


def test_the_whole_parser_is_built_without_the_heavy_libraries() -> None:
    code = ("import sys, json; from lorma.cli import build_parser; build_parser(); "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_one_input_error_type() -> None:
    """No module of the package defines its own bad-input exception or an alias of InputError."""
    src = Path(lorma.commands.__file__).parents[1]
    aliases = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "lorma.plumbing.errors":
                aliases += [f"{path.name}: {a.name} as {a.asname}" for a in node.names if a.asname]
    assert aliases == []
    from lorma.plumbing.errors import InputError

    for name in COMMANDS:
        module = command_module(name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == module.__name__:
                assert issubclass(value, InputError), f"lorma.commands.{name} defines {value.__name__}"
