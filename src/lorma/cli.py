"""The `lorma` command: a thin shell over the library.

Each subcommand lives in its own module of :mod:`lorma.commands` (listed in ``lorma.commands.COMMANDS``), which
exposes ``register(subparsers)`` (adds its parser and sets ``func`` on it), so that this file stays short and
importing the CLI stays cheap: heavy imports (torch, transformers) happen inside each ``func``, after its input has
been checked.

Errors: a :class:`lorma.plumbing.errors.LormaError` is printed as one line (``lorma COMMAND: error: ...``) with its
exit code (2 for bad input); Ctrl-C ends with a line saying where the command stopped (exit code 130), never a
traceback. A write the machine refused (no space, a file-size limit, a read-only folder, no permission) that no
command turned into its own message is one line too (exit code 1), naming the file and where its traceback was
saved; any other error is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lorma.commands import COMMANDS, command_module
from lorma.plumbing.errors import LormaError, RunInterrupted
from lorma.plumbing.fileio import save_traceback, write_failure
from lorma.plumbing.quiet import silence_known_noise

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorma",
        description="LoRMA: low-rank multiplicative adaptation (W = I(BA) W0) for transformers models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMANDS:
        command_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``lorma`` command; returns its exit code."""
    silence_known_noise()  # before any command imports the libraries that print it
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed (for "try next" advice)
    try:
        result = args.func(args)
    except RunInterrupted as err:
        print(f"lorma {args.command}: interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except LormaError as err:
        print(f"lorma {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"lorma {args.command}: interrupted (nothing was left half-written)", file=sys.stderr)
        return RunInterrupted.exit_code
    except Exception as err:
        refused = write_failure(err)
        if refused is None:
            raise
        reason, filename = refused
        print(f"lorma {args.command}: error: {machine_error_line(reason, filename, err)}", file=sys.stderr)
        return 1
    return int(result or 0)


def machine_error_line(reason: str, filename: str | None, err: BaseException) -> str:
    """One line for a write the machine refused: why, the file (when known), where the traceback went."""
    log = save_traceback(err, Path(tempfile.gettempdir()))
    where = f" writing {filename}" if filename else ""
    saved = f"traceback in {log}" if log is not None else "the traceback could not be saved either"
    return f"{reason}{where} ({type(err).__name__}; {saved}); files written before it are kept whole"


if __name__ == "__main__":
    sys.exit(main())
