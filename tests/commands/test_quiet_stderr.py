"""``import lorma, peft``, a normal ``lorma train`` and ``lorma analyze`` print no third-party noise on stderr: only
progress bars and lorma's own lines (issue 30: a quiet library, not only a quiet command).

The known noise: bitsandbytes' notice about an optional hub kernel, logged when peft's import imports it on a CPU
with AVX512-BF16, is dropped by a filter on exactly its logger and message, installed around peft's import only;
peft's deprecated ``is_gradient_checkpointing`` call is ignored around lorma's own ``get_peft_model`` /
``PeftModel.from_pretrained`` only (:mod:`lorma.plumbing.quiet`). The child processes here run on a simulated
AVX512-BF16 CPU (``tests/simulated_cpu/sitecustomize.py``), so the notice is really logged there.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lorma.plumbing.quiet import KNOWN_NOISE, known_noise_dropped, known_warnings_ignored, silence_known_noise
from recipe_support import make_tiny_bert, sentiment_rows, write_csv

LORMA = str(Path(sys.executable).parent / "lorma")  # the installed console script, as users run it
# tqdm's default bar: "[desc: ] NN%|bar| n/total [elapsed<remaining, rate]"
TQDM_BAR = re.compile(r"^(?:.*: )?\s*\d{1,3}%\|[^|]*\| *\d+/\d+ \[[^\]]*\]$")
# lorma's own lines: notices and errors ("lorma: ...", "lorma train: ..."), and the collapse warning of a run
OWN_LINE = re.compile(r"^(?:lorma(?: [a-z]+)?: |warning: \S+ \(seed \d+\) collapsed )")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor between nested bars
SIMULATED_CPU = Path(__file__).resolve().parents[1] / "simulated_cpu"
BNB_NOTICE = "Failed to load CPU gemm_4bit_forward"


def _child_env() -> dict[str, str]:
    """The environment of a child process on the simulated AVX512-BF16 CPU, one torch thread."""
    path = os.pathsep.join(p for p in (str(SIMULATED_CPU), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _foreign(stderr: str) -> list[str]:
    return [line for line in _stderr_lines(stderr) if not TQDM_BAR.match(line) and not OWN_LINE.match(line)]


def _stderr_lines(text: str) -> list[str]:
    """The lines of ``text`` as a terminal shows them in turn (tqdm redraws with carriage returns), non-blank."""
    return [line.strip() for line in re.split(r"[\r\n]", ANSI.sub("", text)) if line.strip()]


def test_the_bitsandbytes_kernel_notice_is_dropped_and_nothing_else() -> None:
    silence_known_noise()
    silence_known_noise()  # once per logger
    [noise] = KNOWN_NOISE
    logger = logging.getLogger(noise.logger)
    assert len(logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        # bitsandbytes 0.50's call, verbatim (backends/cpu/ops.py)
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                       "`pip install kernels` and the kernels >= 0.11.1",
                       ModuleNotFoundError("No module named 'kernels'"))
        logger.warning("some other warning of bitsandbytes")
        logging.getLogger("bitsandbytes").warning("Failed to load CPU gemm_4bit_forward elsewhere")  # another logger
    finally:
        logger.removeHandler(handler)
    assert seen == ["some other warning of bitsandbytes"]


def test_the_filters_hold_only_inside_their_with_blocks() -> None:
    [noise] = KNOWN_NOISE
    logger = logging.getLogger(noise.logger)
    before = list(logger.filters)
    with known_noise_dropped():
        assert len(logger.filters) == len(before) + 1
    assert logger.filters == before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with known_warnings_ignored():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                          stacklevel=1)
            warnings.warn("a user's own FutureWarning", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated (the user's own call)", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a user's own FutureWarning",
                                                "`is_gradient_checkpointing` is deprecated (the user's own call)"]


@pytest.mark.parametrize("code", ["import lorma, peft", "import lorma\nfrom transformers import Trainer",
                                  "from lorma import LormaConfig\nLormaConfig(r=2)"])
def test_importing_lorma_then_peft_prints_nothing(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(),
                            timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]


def test_the_simulated_cpu_makes_peft_print_the_notice_without_lorma() -> None:
    # the check above can fail: on this simulated CPU, peft imported without lorma's hook logs the notice
    result = subprocess.run([sys.executable, "-c", "import peft"], capture_output=True, text=True, env=_child_env(),
                            timeout=300)
    assert BNB_NOTICE in result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp_path = tmp_path_factory.mktemp("quiet")
    model = make_tiny_bert(tmp_path / "model")
    rows = sentiment_rows(100)
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows[:80])
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], rows[80:])
    out = tmp_path / "run"
    # tensorboard logging is on by default when installed, evaluation each epoch: what a user's run does
    command = [LORMA, "train", "--model", str(model), "--train-file", str(train), "--eval-file", str(dev),
               "--output-dir", str(out), "--method", "lorma-plus", "--num-train-epochs", "1",
               "--per-device-train-batch-size", "8", "--learning-rate", "1e-2"]
    result = subprocess.run(command, capture_output=True, text=True, env=_child_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_a_normal_lorma_train_prints_no_third_party_lines(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = trained
    foreign = _foreign(result.stderr)
    assert foreign == [], "third-party lines on stderr:\n" + "\n".join(foreign)
    lines = _stderr_lines(result.stderr)
    assert any(TQDM_BAR.match(line) and "10/10" in line for line in lines), "Trainer's progress bar must stay"
    assert (out / "metrics.json").is_file()


def test_lorma_analyze_prints_no_third_party_lines(trained: tuple[Path, subprocess.CompletedProcess],
                                                   tmp_path: Path) -> None:
    run, _ = trained
    result = subprocess.run([LORMA, "analyze", str(run), "--out", str(tmp_path / "analysis"), "--no-plots"],
                            capture_output=True, text=True, env=_child_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    foreign = _foreign(result.stderr)
    assert foreign == [], "third-party lines on stderr:\n" + "\n".join(foreign)
    assert (tmp_path / "analysis").is_dir()
