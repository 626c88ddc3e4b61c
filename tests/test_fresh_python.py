"""The tests' fresh processes (:mod:`fresh_python`): a child of the zygote must be what a new interpreter would be
for everything the tests rely on: nothing of lorma or of the test's process in it, its own argv, working directory,
environment, ``sys.path``, standard streams and exit code, and a timeout that kills it. (The zygote without peft is
checked where it is used: each import-order case of tests/core/test_registration.py first asserts that neither
peft nor lorma is loaded.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fresh_python

STATE = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                  "lorma": sorted(m for m in sys.modules if m == "lorma" or m.startswith("lorma.")),
                  "scorers": sorted(m for m in ("sacrebleu", "nltk", "pycocoevalcap") if m in sys.modules),
                  "torch": "torch" in sys.modules, "marker": os.environ.get("FRESH_MARKER"),
                  "pythonpath": [p for p in sys.path if p.endswith("extra-path")]}))
"""


def test_a_child_has_nothing_of_lorma_and_its_own_argv_cwd_env_and_path(tmp_path: Path) -> None:
    import lorma.model  # noqa: F401  (loaded here: the child must not have it)

    env = {**os.environ, "FRESH_MARKER": "m1", "PYTHONPATH": str(tmp_path / "extra-path")}
    done = fresh_python.run([sys.executable, "-c", STATE, "a", "b"], cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state == {"argv": ["-c", "a", "b"], "cwd": str(tmp_path), "path0": "", "name": "__main__", "lorma": [],
                     "scorers": [], "torch": True, "marker": "m1", "pythonpath": [str(tmp_path / "extra-path")]}
    # what one child imported or set is not in the next
    script = tmp_path / "script.py"
    script.write_text("import lorma.model\n" + STATE)
    first = json.loads(fresh_python.run([sys.executable, str(script), "x"], timeout=300).stdout)
    assert first["lorma"] and first["argv"] == [str(script), "x"] and first["path0"] == str(tmp_path)
    assert first["marker"] is None
    again = json.loads(fresh_python.run([sys.executable, "-c", STATE], timeout=300).stdout)
    assert again["lorma"] == []


def test_streams_exit_codes_and_errors_are_a_processes_own() -> None:
    done = fresh_python.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); "
                             "sys.exit(int(input()))"], input="3\n")
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    failed = fresh_python.run([sys.executable, "-c", "raise ValueError('boom')"])
    assert failed.returncode == 1 and failed.stderr.rstrip().endswith("ValueError: boom")
    assert "fresh_python" not in failed.stderr  # the traceback starts at the code, as the interpreter's would
    with pytest.raises(subprocess.CalledProcessError):
        fresh_python.run([sys.executable, "-c", "import sys; sys.exit('no')"], check=True)
    module = fresh_python.run([sys.executable, "-m", "lorma.cli", "train", "--method", "nope"])
    assert module.returncode == 2 and "unknown method 'nope'" in module.stderr
    console = fresh_python.run([str(Path(sys.executable).parent / "lorma"), "--help"])
    assert console.returncode == 0 and console.stdout.startswith("usage: lorma")


def test_a_timeout_kills_the_child_and_the_zygote_serves_the_next() -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        fresh_python.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert fresh_python.run([sys.executable, "-c", "print(6 * 7)"]).stdout == "42\n"
