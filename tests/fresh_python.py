"""A fresh Python process for a test, without paying 10 s of third-party imports each time (helpers, no tests).

Many tests must run something in a new interpreter: a saved adapter loaded where nothing of the saving process is
left, a command's exit code and output as a user sees them, peft learning of LORMA in some import order. A real
``python`` pays torch + transformers + peft's imports each time (10-13 s on the 2-core machine; peft alone pulls
bitsandbytes, and bitsandbytes torch's inductor), which made a third of ``make test``.

:func:`run` is ``subprocess.run([sys.executable, ...], capture_output=True, text=True)`` for such a process, but
the process is forked from a *zygote*: a server started once per test worker that has imported only third-party
libraries (the preload list, :data:`STACK` by default: no lorma module, nothing built, no model loaded, no torch
op run) and then waits. Each child is a new process: its own memory, working directory, environment, ``argv``,
``__main__``, standard streams (files, not the parent's), exit code and signals; it imports lorma itself, as a user's
process would. What the zygote had already imported is the one difference from a new interpreter, so a test that
is about imports themselves (what ``import lorma`` pulls in, what a library prints while it is imported) starts a
real interpreter instead; :data:`STACK` leaves out what such tests look for (the text scorers).

``argv[0]`` is the interpreter (``-c CODE``, ``-m MODULE`` or ``SCRIPT``, then its arguments) or a console script
(``.venv/bin/lorma``: pip writes it as a Python script, run as one). The child's ``sys.path`` is what that
interpreter would have (``''``, the module's folder or the script's folder first; ``PYTHONPATH`` next), and
``OMP_NUM_THREADS`` in its environment sizes its torch thread pool, which the zygote never started.
Environment variables that a preloaded library read when it was imported (``HF_HUB_OFFLINE`` for
huggingface_hub) keep the zygote's value: the zygote starts with the test worker's environment.

Run as a script, this file is the zygote: ``python fresh_python.py MODULE,MODULE,...`` reads one request per line
(JSON) on file descriptor 3, forks a child for it, and writes the child's pid, then its exit status, on descriptor 4.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: the third-party stack a lorma process imports (transformers' model code is lazy: named so that it is loaded)
STACK = ("torch", "transformers", "transformers.modeling_utils", "peft", "safetensors.torch", "accelerate",
         "datasets", "sklearn.metrics")
#: the stack without peft: for tests of what happens when peft is imported (before or after lorma); with what peft
#: imports of its own where it is installed (bitsandbytes: 2 s of torch's inductor), which knows neither
WITHOUT_PEFT = ("torch", "transformers", "transformers.modeling_utils", "safetensors.torch",
                *(("bitsandbytes",) if importlib.util.find_spec("bitsandbytes") else ()))

_REQUESTS, _REPLIES = 3, 4  # the zygote's protocol descriptors (its 0, 1 and 2 are the worker's)
_zygotes: dict[tuple[str, ...], _Zygote] = {}
_lock = threading.Lock()


class _Zygote:
    """One zygote process, started with the worker's environment; it exits when its request pipe closes."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        requests_read, self._requests = os.pipe()
        self._replies, replies_write = os.pipe()
        code = (f"import os, sys; os.dup2({requests_read}, {_REQUESTS}); os.dup2({replies_write}, {_REPLIES}); "
                f"sys.argv = [{__file__!r}, {','.join(preload)!r}]; import runpy; "
                f"runpy.run_path({__file__!r}, run_name='__main__')")
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(requests_read, replies_write),
                                        stdin=subprocess.DEVNULL)
        os.close(requests_read)
        os.close(replies_write)
        self._buffer = b""

    def _reply(self, timeout: float | None) -> dict[str, Any] | None:
        """The next reply line, or None when ``timeout`` seconds pass first."""
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._replies, 65536)
            if not chunk:
                raise RuntimeError(f"the zygote (pid {self.process.pid}) died: exit status {self.process.wait()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, request: dict[str, Any], timeout: float | None) -> int:
        os.write(self._requests, (json.dumps(request) + "\n").encode())
        started = self._reply(None)
        assert started is not None
        pid = started["pid"]
        done = self._reply(timeout)
        if done is None:  # what subprocess.run does on a timeout: kill the child, then raise
            os.kill(pid, signal.SIGKILL)
            self._reply(None)
            raise subprocess.TimeoutExpired(request["argv"], timeout or 0)
        return int(done["returncode"])

    def close(self) -> None:
        os.close(self._requests)
        os.close(self._replies)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@atexit.register
def _close_zygotes() -> None:
    for zygote in _zygotes.values():
        zygote.close()
    _zygotes.clear()


def run(args: Sequence[Any], *, cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
        timeout: float | None = None, input: str | None = None, check: bool = False,  # noqa: A002 (subprocess's)
        preload: Sequence[str] = STACK) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(args, capture_output=True, text=True, ...)`` in a child of the zygote for ``preload``."""
    argv = [os.fspath(a) for a in args]
    key = tuple(preload)
    with _lock:
        zygote = _zygotes.get(key)
        if zygote is None or zygote.process.poll() is not None:
            zygote = _zygotes[key] = _Zygote(key)
        with tempfile.TemporaryDirectory(prefix="fresh-python-") as folder:
            streams = {name: os.path.join(folder, name) for name in ("stdin", "stdout", "stderr")}
            Path(streams["stdin"]).write_text(input or "")
            request = {"argv": argv, "cwd": os.fspath(cwd) if cwd is not None else os.getcwd(),
                       "env": dict(os.environ if env is None else env), **streams}
            returncode = zygote.run(request, timeout)
            stdout = Path(streams["stdout"]).read_text(errors="replace")
            stderr = Path(streams["stderr"]).read_text(errors="replace")
    done = subprocess.CompletedProcess(argv, returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


# --- the zygote ----------------------------------------------------------------------------------------------------


def _child(request: dict[str, Any]) -> int:
    """In the forked child: become the process ``request`` asks for, run it, return its exit code."""
    import builtins
    import runpy
    import traceback
    import types

    for fd, name, flags in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY | os.O_TRUNC | os.O_CREAT),
                            (2, "stderr", os.O_WRONLY | os.O_TRUNC | os.O_CREAT)):
        opened = os.open(request[name], flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.close(_REQUESTS)
    os.close(_REPLIES)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    argv = request["argv"]
    site = sys.path[1:]  # the interpreter's own entries (the zygote's first is '', from its -c)
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    code = 0
    try:
        if Path(argv[0]).name.startswith("python"):
            option, rest = argv[1], argv[2:]
            if option == "-c":
                sys.argv, sys.path[:] = ["-c", *rest[1:]], ["", *extra, *site]
                main = types.ModuleType("__main__")
                main.__dict__["__builtins__"] = builtins
                sys.modules["__main__"] = main
                exec(compile(rest[0], "<string>", "exec"), main.__dict__)
            elif option == "-m":
                sys.argv, sys.path[:] = [rest[0], *rest[1:]], [os.getcwd(), *extra, *site]
                runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
            else:
                script = os.path.abspath(option)
                sys.argv, sys.path[:] = [option, *rest], [os.path.dirname(script), *extra, *site]
                runpy.run_path(script, run_name="__main__")
        else:  # a console script: a Python file with a shebang
            script = os.path.abspath(argv[0])
            sys.argv, sys.path[:] = list(argv), [os.path.dirname(script), *extra, *site]
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException as error:  # what the interpreter does with an uncaught exception (from the code's frames)
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        code = 1
    # what the interpreter does at exit: wait for its threads, run atexit, flush (a failure there keeps the code)
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code & 0xFF


def _serve(preload: list[str]) -> None:
    import importlib

    for name in preload:
        importlib.import_module(name)
    sys.stdout.flush()
    sys.stderr.flush()
    requests = os.fdopen(_REQUESTS, "rb", buffering=0)
    for line in iter(requests.readline, b""):
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 70  # the child could not become the process asked for (EX_SOFTWARE): never back to the loop
            try:
                code = _child(request)
            finally:
                os._exit(code)
        os.write(_REPLIES, (json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        os.write(_REPLIES, (json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


if __name__ == "__main__":
    _serve([name for name in sys.argv[1].split(",") if name])
