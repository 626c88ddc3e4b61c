"""``lorma.plumbing.fileio``: atomic writes that leave the old file on any failure, strict JSON, logs with a torn
tail, and the advisory lock (held by a live process: refused with its pid; left by a dead one: taken over)."""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorma.plumbing.errors import DataFormatError, DiskFullError, RunLockedError
from lorma.plumbing.fileio import (
    AdvisoryLock,
    append_jsonl,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    replace_directory,
    staged_directory,
    strict_json,
    trim_jsonl,
)


def test_atomic_write_replaces_and_keeps_the_usual_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(DiskFullError, match=f"no space left on the device writing {target}"), \
            atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "b"')  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("x")
        raise KeyboardInterrupt
    assert read_json(target) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_strict_json_writes_inf_and_nan_as_strings(tmp_path: Path) -> None:
    import numpy as np

    data = {"x": math.nan, "y": [math.inf, -math.inf, 1.5], "z": np.float32(0.25), "p": tmp_path, 3: True}
    atomic_write_json(tmp_path / "m.json", data)
    text = (tmp_path / "m.json").read_text()
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert back == {"x": "nan", "y": ["inf", "-inf", 1.5], "z": 0.25, "p": str(tmp_path), "3": True}
    assert math.isnan(float(back["x"])) and float(back["y"][1]) == -math.inf
    assert strict_json(math.inf) == "inf"


def test_read_json_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text('{\n  "a": 1,\n  "b": \n')
    with pytest.raises(DataFormatError, match=r"c\.json:4: invalid JSON"):
        read_json(bad)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataFormatError, match=r"c\.json: not UTF-8 text"):
        read_json(bad)
    bad.write_text("")
    with pytest.raises(DataFormatError, match=r"c\.json: empty file"):
        read_json(bad)
    with pytest.raises(DataFormatError, match=r"nope\.json: no such file"):
        read_json(tmp_path / "nope.json")


def test_jsonl_log_drops_a_torn_last_line_only(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    for step in (1, 2, 3):
        append_jsonl(log, {"step": step, "loss": 1.0 / step})
    with open(log, "a") as fh:
        fh.write('{"step": 4, "lo')  # a kill in the middle of a line
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]
    assert trim_jsonl(log, lambda r: r["step"] <= 2) == 2
    assert log.read_text().splitlines() == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 0.5}']
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DataFormatError, match=r"log\.jsonl:2: not a JSON line"):
        read_jsonl(log)


def test_staged_directory_replaces_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "adapter"
    with staged_directory(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError, match="^killed$"), staged_directory(final) as tmp:
        (tmp / "a").write_text("new, half")
        raise RuntimeError("killed")
    assert (final / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    new = tmp_path / "new"
    new.mkdir()
    (new / "a").write_text("new")
    replace_directory(new, final)
    assert (final / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


HOLDER = """
import sys, time
from lorma.plumbing.fileio import AdvisoryLock
lock = AdvisoryLock(sys.argv[1], "the thing")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / ".run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as refused:
            AdvisoryLock(path, "run directory X").acquire()
        message = str(refused.value)
        assert f"run directory X is in use by pid {holder.pid} on host {socket.gethostname()}" in message
        assert "-c" in message  # the holder's command line
        assert AdvisoryLock(path, "X").holder().pid == holder.pid  # a look that takes nothing
    finally:
        holder.kill()
        holder.wait()
    assert AdvisoryLock(path, "X").holder() is None and path.exists()  # stale: the file stays until taken over
    assert AdvisoryLock(tmp_path / "none.lock", "X").holder() is None and not (tmp_path / "none.lock").exists()
    lock = AdvisoryLock(path, "run directory X")
    lock.acquire()
    assert lock.took_over is not None and lock.took_over.pid == holder.pid
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_a_lock_file_of_a_live_process_without_flock_is_still_refused(tmp_path: Path) -> None:
    """The pid check backs the flock up (a filesystem where flock is a no-op, or a file copied from elsewhere)."""
    path = tmp_path / ".run.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "then",
                                    "command": "lorma train"}))
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            AdvisoryLock(path, "X").acquire()
        path.write_text(json.dumps({"pid": sleeper.pid, "host": "elsewhere", "started": "then", "command": ""}))
        with pytest.raises(RunLockedError, match="another host"):
            AdvisoryLock(path, "X").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    time.sleep(0.1)
    path.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "then",
                                "command": "lorma train"}))
    with AdvisoryLock(path, "X") as lock:
        assert lock.took_over is not None and lock.took_over.command == "lorma train"
    assert not path.exists()
