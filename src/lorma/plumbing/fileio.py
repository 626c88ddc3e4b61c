"""File I/O that never leaves a half-written file: atomic writes, strict JSON, JSON Lines, an advisory lock.

A leaf module (standard library and :mod:`lorma.plumbing.errors` only), so that everything that writes can use it
without importing the heavy stack.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json` and the
  :func:`atomic_path` / :func:`staged_directory` context managers write beside the target (same folder, so
  the same filesystem) and ``os.replace`` it into place: a kill or a full disk leaves the old file (or none),
  never a truncated one. A full disk is a :class:`~lorma.plumbing.errors.DiskFullError` naming the file.
* :func:`strict_json` turns ``inf`` / ``nan`` into the strings ``"inf"`` / ``"nan"`` (JSON has no such numbers,
  and ``float()`` reads the strings back), so every JSON file lorma writes is valid JSON.
* :func:`append_jsonl` / :func:`read_jsonl` / :func:`trim_jsonl`: logs are append-only; a line torn by a kill
  can only be the last one, and readers drop it.
* :func:`safetensors_problem` / :func:`torch_file_problem`: whether a weights file is complete, to refuse a
  truncated one with its name instead of a library's error without it.
* :class:`AdvisoryLock`: a lock file holding the owner's pid, host and command, held with ``flock`` for the
  owner's lifetime (the kernel releases it when the owner dies, however it dies).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import DataFormatError, DiskFullError, RunLockedError

try:  # POSIX; elsewhere the lock falls back to the pid check alone
    import fcntl
except ImportError:  # pragma: no cover - not on Linux / macOS
    fcntl = None  # type: ignore[assignment]

#: errno values that mean "the disk (or the user's quota) is full"
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


#: errno values of a write the machine refuses until the user acts, and how each is said in one line
WRITE_FAILURES: dict[int, str] = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this machine's file-size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
#: how writers that drop the errno report it: safetensors' "I/O error: File too large (os error 27)"
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")


def write_failure(err: BaseException) -> tuple[str, str | None] | None:
    """Why the machine refused a write, as ``(reason, file)``, when ``err`` (or what caused it) is one of
    :data:`WRITE_FAILURES`: an ``OSError`` with that errno, or a library's error that quotes it (``os error N``);
    None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_FAILURES:
            filename = current.filename if isinstance(current.filename, str) else None
            return WRITE_FAILURES[current.errno], filename
        match = _OS_ERROR_TEXT.search(str(current))
        if match and int(match.group(1)) in WRITE_FAILURES:
            return WRITE_FAILURES[int(match.group(1))], None
        current = current.__cause__ or current.__context__
    return None


#: the file, in a run's folder, that keeps the traceback of a failure that the command reported in one line
ERROR_LOG = "lorma_error.log"


def save_traceback(err: BaseException, folder: Path) -> Path | None:
    """Append ``err``'s traceback, with the time, to :data:`ERROR_LOG` in ``folder``; the file, or None when it
    cannot be written either (the disk that refused the run's write may refuse this one)."""
    import traceback

    path = Path(folder) / ERROR_LOG
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})\n{text}")
    except OSError:
        return None
    return path


def is_no_space(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is an ``OSError`` for a full disk or quota."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem lets a directory be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write by any means; moved onto ``path`` when the block succeeds.

    ``suffix`` keeps an extension for writers that choose the format by it (matplotlib's ``savefig``).
    On any exception the temporary file is removed and ``path`` is untouched; a full disk becomes a
    :class:`DiskFullError` naming ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and is_no_space(err):
            raise DiskFullError(f"no space left on the device writing {target}") from err
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then ``os.replace``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(value: Any) -> Any:
    """``value`` made valid for strict JSON: non-finite floats become ``"inf"``, ``"-inf"``, ``"nan"``.

    numpy / torch scalars become Python numbers, paths and other objects their ``str``.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return strict_json(item())
    return str(value)


def dumps_json(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``value`` (see :func:`strict_json`), ending with a newline."""
    return json.dumps(strict_json(value), indent=indent, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON to ``path`` atomically."""
    return atomic_write_text(path, dumps_json(value, indent))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a :class:`DataFormatError` naming it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(p, None, "no such file") from None
    except UnicodeDecodeError as err:
        raise DataFormatError(p, None, f"not UTF-8 text ({err.reason} at byte {err.start}): not a JSON file") from None
    except OSError as err:
        raise DataFormatError(p, None, f"cannot read ({err.strerror or err})") from None
    if not text.strip():
        raise DataFormatError(p, None, "empty file (expected JSON)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(p, err.lineno, f"invalid JSON ({err.msg}, column {err.colno})") from None


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one strict-JSON line. Appends are the one non-atomic write: readers drop a torn last line."""
    line = dumps_json(record, indent=None)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
    except OSError as err:
        if is_no_space(err):
            raise DiskFullError(f"no space left on the device writing {path}") from err
        raise


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each record of a JSON Lines log, so that a reader checking the records' fields
    can name the line. A malformed *last* line (torn by a kill) is dropped; any other is an error naming the file
    and line."""
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == last:
                return
            raise DataFormatError(p, number, f"not a JSON line ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataFormatError(p, number, f"expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON Lines log (:func:`iter_jsonl`)."""
    return [record for _, record in iter_jsonl(path)]


def trim_jsonl(path: str | os.PathLike[str], keep: Callable[[dict[str, Any]], bool]) -> int:
    """Rewrite a JSON Lines log atomically with only the records ``keep`` accepts; returns how many were kept.

    Used when a run resumes from a checkpoint: lines logged after the checkpoint (and a torn last line) go.
    """
    p = Path(path)
    if not p.exists():
        return 0
    kept = [r for r in read_jsonl(p) if keep(r)]
    atomic_write_text(p, "".join(dumps_json(r, indent=None) for r in kept))
    return len(kept)


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary directory beside ``final`` to fill; it replaces ``final`` only when the block succeeds.

    The old ``final`` (if any) is moved aside, the new one moved in, then the old one removed, so at every
    moment ``final`` is either the whole old directory or the whole new one (after a kill between the two
    renames, ``.NAME.old`` beside it holds the old one).
    """
    target = Path(final)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        replace_directory(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and is_no_space(err):
            raise DiskFullError(f"no space left on the device writing {target}") from err
        raise


def replace_directory(new: Path, final: Path) -> None:
    """Move the finished directory ``new`` onto ``final``; an old ``final`` is removed only once ``new`` is in."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)
    _fsync_dir(final.parent)


def directory_size(folder: str | os.PathLike[str]) -> int:
    """Bytes in the files under ``folder`` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


# --------------------------------------------------------------------------------------------------
# Is a file complete?
# --------------------------------------------------------------------------------------------------


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None when it is); safetensors checks the header and
    that the tensors' byte ranges cover the file exactly, without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except SafetensorError as err:
        return f"not a complete safetensors file ({err}; {path.stat().st_size} bytes): truncated or corrupt"
    except OSError as err:
        return f"cannot read ({err.strerror or err})"


def torch_file_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` file (a zip archive whose directory is at its end)."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
        return None
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"not a complete torch file ({err})"


# --------------------------------------------------------------------------------------------------
# The advisory lock
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or held) a lock, as written in the lock file."""

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        """``pid 123 on host h, since 2025-01-01 12:00:00 (`lorma train ...`)``."""
        command = f" (`{self.command}`)" if self.command else ""
        return f"pid {self.pid} on host {self.host}, since {self.started}{command}"

    @classmethod
    def current(cls) -> LockOwner:
        """This process."""
        argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
        return cls(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"), " ".join(argv)[:300])

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        """The owner recorded in a lock file's text, or None when it is empty or unreadable (a torn write)."""
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data.get("started", "?")), str(data.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


class AdvisoryLock:
    """An exclusive lock on ``path`` (a lock file), naming its owner to whoever is refused.

    The owner holds ``flock`` on the file for its lifetime, so the lock disappears with the process however it
    ends; the file also records pid, host and command. A lock file left by a process that is gone (same host,
    pid not running) is *stale*: it is taken over and :attr:`took_over` names the previous owner, for a
    warning. A live owner, or one on another host (whose pid cannot be checked from here), is refused with a
    :class:`RunLockedError` naming it.
    """

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.took_over: LockOwner | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def _refuse(self, owner: LockOwner | None, extra: str = "") -> RunLockedError:
        who = owner.describe() if owner is not None else "another process"
        return RunLockedError(f"{self.what} is in use by {who}{extra}; wait for it to finish, or remove {self.path} "
                              "if that process is gone")

    def holder(self) -> LockOwner | None:
        """The live owner of the lock, without taking it or creating anything (None when it is free)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        try:
            owner = LockOwner.parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
            if fcntl is None:
                return owner if owner is not None and pid_alive(owner.pid) else None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return owner or LockOwner(0, "?", "?", "")
                raise
            return None
        finally:
            os.close(fd)  # also drops the shared lock, if it was taken

    def refuse_if_held(self) -> None:
        """Raise :class:`RunLockedError` naming the owner if a live process holds the lock."""
        owner = self.holder()
        if owner is not None:
            raise self._refuse(owner)

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunLockedError`; see the class docstring."""
        if self._fd is not None:
            return
        me = LockOwner.current()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as err:
                        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                            raise
                        raise self._refuse(LockOwner.parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))) \
                            from None
                # the file may have been released and unlinked between our open and our flock: then the lock
                # we hold is on a file nobody else will look at; start again on the current one
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = LockOwner.parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
                if previous is not None and (previous.pid, previous.host) != (me.pid, me.host):
                    if previous.host != me.host:
                        raise self._refuse(previous, " (another host: its process cannot be checked from here)")
                    if pid_alive(previous.pid):
                        raise self._refuse(previous)
                    self.took_over = previous
                data = json.dumps({"pid": me.pid, "host": me.host, "started": me.started, "command": me.command})
                os.ftruncate(fd, 0)
                os.pwrite(fd, data.encode("utf-8"), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return

    def release(self) -> None:
        """Give the lock up and remove the lock file (only if it is still ours)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # closing releases the flock

    def __enter__(self) -> AdvisoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
