"""lorma's own error types (a leaf module: no imports beyond the standard library).

Every command prints a :class:`LormaError` as one line, ``lorma COMMAND: error: MESSAGE``, and exits with its
``exit_code``; anything else is a bug and keeps its traceback. The library raises the same types, so a
caller of :func:`lorma.recipes.train.run_training` can tell bad input (:class:`InputError`) from a run that
was stopped (:class:`RunInterrupted`) or a write the machine refused (:class:`WriteFailedError`: a full disk,
:class:`DiskFullError`, a file-size limit, a read-only folder, no permission).
"""

from __future__ import annotations

from pathlib import Path


class LormaError(Exception):
    """Base of the errors lorma reports to a user as one line (no traceback)."""

    exit_code = 1


class InputError(LormaError):
    """The user's input is wrong (a file, a column, a value, a directory); nothing was changed. Exit code 2."""

    exit_code = 2


class DataFormatError(InputError, ValueError):
    """A malformed file or record; the message starts with ``path:line:`` (or ``path:``)."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class UnknownNameError(InputError, ValueError):
    """A name that no registry knows (an inflation, a variant, a method, a task); the message lists the known ones.
    A ``ValueError`` too, as a bad argument of a library call (``LormaConfig(inflation="x")``) always was."""


class RunLockedError(InputError):
    """Another live process is writing the run directory (its pid and host are in the message)."""


class WriteFailedError(LormaError):
    """The machine refused a write (no space, a file-size limit, a read-only folder, no permission): not the user's
    input nor a bug. The message names the folder and what was kept; what was saved before is intact."""


class DiskFullError(WriteFailedError):
    """A write failed for lack of space; what was saved before is intact and the run can be resumed."""


class RunInterrupted(LormaError):
    """The run was stopped (Ctrl-C); the message says where it stopped and how to resume. Exit code 130."""

    exit_code = 130
