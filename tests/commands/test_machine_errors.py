"""A write the machine refuses (no space, a file-size limit, a read-only folder, no permission) is one line from any
command, with its traceback saved, not a traceback on the terminal (issue 30); any other error keeps its traceback.
``lorma train``'s own message (what was kept, how to resume) is checked on a real run in tests/runs/test_faults.py."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import pytest

from lorma import cli
from lorma.plumbing.fileio import ERROR_LOG, WRITE_FAILURES, save_traceback, write_failure


class SafetensorLikeError(Exception):
    """What safetensors raises for a failed write: no errno, only the OS error's number in the text."""


def test_write_failure_reads_the_errno_or_the_os_error_number_in_the_text() -> None:
    assert write_failure(OSError(errno.EROFS, "Read-only file system", "/ro/x")) == ("read-only file system", "/ro/x")
    text = SafetensorLikeError("Error while serializing: I/O error: File too large (os error 27)")
    assert write_failure(text) == (WRITE_FAILURES[errno.EFBIG], None)
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", "/x/y")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert write_failure(outer) == ("permission denied", "/x/y")  # found through the cause
    assert write_failure(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None  # not the machine's refusal
    assert write_failure(ValueError("bad value (os error 2)")) is None


def test_save_traceback_appends_and_says_when_it_cannot(tmp_path: Path) -> None:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as err:
        assert save_traceback(err, tmp_path) == tmp_path / ERROR_LOG
        assert save_traceback(err, tmp_path) == tmp_path / ERROR_LOG
        assert save_traceback(err, tmp_path / "missing") is None
    assert (tmp_path / ERROR_LOG).read_text().count("Traceback") == 2


def _command_raising(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    """Make ``lorma merge`` raise ``err`` from inside its run, as a library call deep in it would."""
    real = cli.build_parser

    def build_parser() -> argparse.ArgumentParser:
        parser = real()

        def fail(args: argparse.Namespace) -> int:
            raise err

        for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
            action.choices["merge"].set_defaults(func=fail)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)


def test_the_shell_turns_a_refused_write_into_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli.tempfile, "gettempdir", lambda: str(tmp_path))
    _command_raising(monkeypatch, OSError(errno.EROFS, "Read-only file system", "/ro/merged/model.safetensors"))
    assert cli.main(["merge", "a", "b"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lorma merge: error: read-only file system writing /ro/merged/model.safetensors")
    assert f"traceback in {tmp_path / ERROR_LOG}" in err
    assert "Read-only file system" in (tmp_path / ERROR_LOG).read_text()


def test_any_other_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _command_raising(monkeypatch, FileNotFoundError(errno.ENOENT, "No such file", "/x"))
    with pytest.raises(FileNotFoundError):
        cli.main(["merge", "a", "b"])
