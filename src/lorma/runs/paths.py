"""Where a command may write: never onto or around one of its own inputs, never into a file or an unwritable
place. Every command that writes (train, compare, merge, export, evaluate --output, analyze) asks these checks
before any work is done."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lorma.plumbing.errors import InputError


def check_output_location(path: Path, flag: str = "--output-dir") -> None:
    """Refuse an output directory that cannot be created: below a file, or in a folder that takes no new entries
    (``/proc``, read-only, no permission). Checked by creating and removing a probe in the nearest existing
    folder, so that nothing is left behind."""
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{flag} {path}: exists and is not a directory")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a directory")
    probe = ancestor / f".lorma-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot create directories in {ancestor} ({err.strerror or err})") from None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(output: Path, inputs: Mapping[str, str | os.PathLike[str] | None], replacing: bool,
                    flag: str = "--output-dir", containers: Mapping[str, str | os.PathLike[str] | None] | None = None
                    ) -> None:
    """A command never writes into its own input: ``output`` must not be an input nor lie inside one, and when it
    is replaced as a whole (``replacing``), no input may lie inside it. ``containers`` (e.g. the run directory
    around an adapter) may hold the output but not be replaced by it."""
    out = output.resolve()
    for what, value in [*inputs.items(), *(containers or {}).items()]:
        if value is None or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if out == source:
            raise InputError(f"{flag} {output} is the input {what}: a command never writes into its own input; "
                             "choose another directory")
        if what in inputs and _inside(out, source):
            raise InputError(f"{flag} {output} is inside the input {what} ({value}): a command never writes into "
                             "its own input; choose another directory")
        if replacing and _inside(source, out):
            raise InputError(f"{flag} {output} contains the input {what} ({value}), which replacing it would "
                             "delete; choose another directory")
