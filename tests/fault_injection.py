"""Fault injection for ``lorma train`` (helpers, no tests): a child process that dies or finds the disk full at
a chosen write.

Children are forked from a ``multiprocessing`` forkserver that has already imported torch, transformers, peft
and lorma, so that each run costs its training, not 10 s of imports. In the child, every way a run writes is
wrapped (``open`` for writing, ``torch.save``, safetensors' ``save_file``, ``os.replace`` / ``os.rename``,
``shutil.rmtree``) and each call counts as one *event*; the plan names the event at which to act:

* ``kill``: write a random part of that write's bytes, then ``SIGKILL`` itself (what a kill mid-write leaves);
* ``enospc``: write a part, then fail as that writer fails on a full disk (``OSError(ENOSPC)`` from ``open``,
  torch's ``unexpected pos`` ``RuntimeError``, safetensors' ``StorageFull`` error), and from then on report
  almost no free space (``shutil.disk_usage``), as a full disk would;
* ``sigint``: do the write, then send itself ``SIGINT`` (Ctrl-C);
* ``pause``: do the write, create ``<root>/paused``, then wait until ``<root>/resume`` exists (to hold a run
  open while another command tries the same directory).

A run with no plan records the events it made (with the path of each), so a test can choose among them.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorma.study.runner import CHILD_PRELOAD

#: what the study's forkserver preloads (a process has one forkserver, so whichever starts it first, both kinds of
#: child find the training stack imported), and the command line's path into a classification run
PRELOAD = [*CHILD_PRELOAD, "sklearn.model_selection", "lorma.commands.run_options", "lorma.tasks.classification"]


def context() -> Any:
    """The forkserver context, preloading the heavy stack (call before the first child starts)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def category(label: str, path: str) -> str:
    """What part of a run an event belongs to: a checkpoint, the final save, the logs, the config."""
    if "/checkpoints/" in path:
        return "checkpoint"
    name = Path(path).name
    if "adapter" in path or "metrics.json" in name:
        return "final save"
    if "train_log" in name:
        return "loss log"
    return "config"


class Injector:
    """Counts the writes of this process under ``root`` and acts at ``plan["event"]``."""

    def __init__(self, plan: dict[str, Any] | None, root: Path) -> None:
        self.plan = plan or {}
        self.root = str(root)
        self.count = 0
        self.events: list[tuple[str, str]] = []
        self.full = False

    def _ours(self, path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(self.root)

    def event(self, label: str, path: Any) -> str | None:
        """Count a write to ``path``; the plan's action if this is its event."""
        self.count += 1
        self.events.append((label, os.fspath(path)))
        if self.plan.get("event") == self.count:
            return str(self.plan["kind"])
        return None

    def part(self, data: bytes | str) -> bytes | str:
        return data[: int(len(data) * float(self.plan.get("fraction", 0.5)))]

    def die(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def pause(self) -> None:
        Path(self.root, "paused").touch()
        while not Path(self.root, "resume").exists():
            time.sleep(0.05)

    # --- the wrappers -------------------------------------------------------------------------------
    def install(self) -> None:
        """Replace the writers in every loaded module (modules that imported them by name included)."""
        import safetensors.torch
        import torch

        real_open, real_save, real_st_save = builtins.open, torch.save, safetensors.torch.save_file
        real_replace, real_rename, real_rmtree = os.replace, os.rename, shutil.rmtree
        real_disk_usage = shutil.disk_usage
        inj = self

        def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+") and inj._ours(file):
                return _File(handle, inj, file)
            return handle

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if not inj._ours(f):
                return real_save(obj, f, *args, **kwargs)
            action = inj.event("torch.save", f)
            if action in ("kill", "enospc"):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                with real_open(f, "wb") as fh:
                    fh.write(inj.part(buffer.getvalue()))
                if action == "kill":
                    inj.die()
                inj.full = True
                # what torch's zip writer says when a write fails; it keeps no errno
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
            result = real_save(obj, f, *args, **kwargs)
            inj.after(action)
            return result

        def save_file(tensors: Any, filename: Any, metadata: Any = None) -> Any:
            if not inj._ours(filename):
                return real_st_save(tensors, filename, metadata)
            action = inj.event("safetensors", filename)
            if action in ("kill", "enospc"):
                data = safetensors.torch.save(tensors, metadata)
                with real_open(filename, "wb") as fh:
                    fh.write(inj.part(data))
                if action == "kill":
                    inj.die()
                inj.full = True
                from safetensors import SafetensorError

                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                      '"No space left on device" })')
            result = real_st_save(tensors, filename, metadata)
            inj.after(action)
            return result

        def renamer(real: Callable[..., Any], label: str) -> Callable[..., Any]:
            def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
                action = inj.event(label, dst) if inj._ours(dst) else None
                if action == "kill":
                    inj.die()
                result = real(src, dst, *args, **kwargs)
                inj.after(action)
                return result

            return rename

        def rmtree(path: Any, *args: Any, **kwargs: Any) -> Any:
            action = inj.event("rmtree", path) if inj._ours(path) else None
            if action == "kill":  # a kill half-way through a deletion
                files = [os.path.join(r, n) for r, _, names in os.walk(path) for n in names]
                for name in files[: len(files) // 2]:
                    os.unlink(name)
                inj.die()
            result = real_rmtree(path, *args, **kwargs)
            inj.after(action)
            return result

        def disk_usage(path: Any) -> Any:
            usage = real_disk_usage(path)
            if inj.full:
                return type(usage)(usage.total, usage.total - 4096, 4096)
            return usage

        replacements = {id(real_open): open_, id(real_save): save, id(real_st_save): save_file,
                        id(real_replace): renamer(real_replace, "replace"),
                        id(real_rename): renamer(real_rename, "rename"), id(real_rmtree): rmtree,
                        id(real_disk_usage): disk_usage}
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for key, value in list(namespace.items()):
                new = replacements.get(id(value))
                if new is not None:
                    namespace[key] = new

    def after(self, action: str | None) -> None:
        """Actions that come after the write has been done."""
        if action == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        elif action == "pause":
            self.pause()


class _File:
    """A file opened for writing whose every ``write`` is an event."""

    def __init__(self, handle: Any, inj: Injector, path: Any) -> None:
        self._handle = handle
        self._inj = inj
        self._path = path

    def write(self, data: Any) -> int:
        action = self._inj.event("write", self._path)
        if action in ("kill", "enospc"):
            self._handle.write(self._inj.part(data))
            self._handle.flush()
            if action == "kill":
                self._inj.die()
            self._inj.full = True
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(self._path))
        written = self._handle.write(data)
        self._inj.after(action)
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.close()

    def __iter__(self) -> Any:
        return iter(self._handle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def child_main(argv: list[str], plan: dict[str, Any] | None, root: str, log: str) -> None:
    """Run ``lorma <argv>`` with the plan; stdout and stderr go to ``log``, the events to ``log + '.events'``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # A shell that starts a job in the background without job control (CI runners, `cmd &` in a script) starts it
    # with SIGINT ignored, and Python then keeps ignoring it: give the child the interactive Ctrl-C it simulates.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    injector = Injector(plan, Path(root))
    injector.install()
    from lorma.cli import main

    try:
        code = main(argv)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # a traceback is a failure the test reports
        traceback.print_exc()
        code = 99
    with open(log + ".events", "w") as fh:  # the log folder is outside root: not an event
        json.dump(injector.events, fh)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)  # multiprocessing makes it the exit code, after its own clean-up


def run(ctx: Any, argv: list[str], root: Path, log: Path, plan: dict[str, Any] | None = None,
        kill_after: float | None = None, timeout: float = 600) -> tuple[int, str, list[tuple[str, str]]]:
    """Run a child to its end (or ``SIGKILL`` it after ``kill_after`` seconds); ``(exit code, output, events)``.

    The exit code is negative for a signal (``-9`` for a kill).
    """
    process = ctx.Process(target=child_main, args=(argv, plan, str(root), str(log)))
    process.start()
    process.join(timeout=kill_after if kill_after is not None else timeout)
    if process.exitcode is None:
        if kill_after is None:
            process.kill()
            process.join()
            raise TimeoutError(f"lorma {' '.join(argv)} did not finish in {timeout} s")
        process.kill()
        process.join()
    output = log.read_text() if log.exists() else ""
    events_file = Path(str(log) + ".events")
    events = [tuple(e) for e in json.loads(events_file.read_text())] if events_file.exists() else []
    return int(process.exitcode), output, events  # type: ignore[arg-type]
