"""A normal ``lorma train`` prints no third-party noise on stderr: only progress bars and lorma's own lines.

The one known noise (bitsandbytes' notice about an optional hub kernel, printed when peft imports it) is dropped
by a filter on exactly its logger and message (:mod:`lorma.plumbing.quiet`); other messages of that logger still show.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from lorma.plumbing.quiet import KNOWN_NOISE, silence_known_noise
from recipe_support import make_tiny_bert, sentiment_rows, write_csv

LORMA = str(Path(sys.executable).parent / "lorma")  # the installed console script, as users run it
# tqdm's default bar: "[desc: ] NN%|bar| n/total [elapsed<remaining, rate]"
TQDM_BAR = re.compile(r"^(?:.*: )?\s*\d{1,3}%\|[^|]*\| *\d+/\d+ \[[^\]]*\]$")
# lorma's own lines: notices and errors ("lorma: ...", "lorma train: ..."), and the collapse warning of a run
OWN_LINE = re.compile(r"^(?:lorma(?: [a-z]+)?: |warning: \S+ \(seed \d+\) collapsed )")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor between nested bars


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


def test_a_normal_lorma_train_prints_no_third_party_lines(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    rows = sentiment_rows(100)
    train = write_csv(tmp_path / "train.csv", ["text", "label"], rows[:80])
    dev = write_csv(tmp_path / "dev.csv", ["text", "label"], rows[80:])
    out = tmp_path / "run"
    # tensorboard logging is on by default when installed, evaluation each epoch: what a user's run does
    command = [LORMA, "train", "--model", str(model), "--train-file", str(train), "--eval-file", str(dev),
               "--output-dir", str(out), "--method", "lorma-plus", "--num-train-epochs", "1",
               "--per-device-train-batch-size", "8", "--learning-rate", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _stderr_lines(result.stderr)
    foreign = [line for line in lines if not TQDM_BAR.match(line) and not OWN_LINE.match(line)]
    assert foreign == [], "third-party lines on stderr:\n" + "\n".join(foreign)
    assert any(TQDM_BAR.match(line) and "10/10" in line for line in lines), "Trainer's progress bar must stay"
    assert (out / "metrics.json").is_file()
