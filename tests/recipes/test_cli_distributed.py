"""``torchrun --nproc_per_node=2 lorma train``: two CPU processes (gloo) train one model together."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fresh_python
from recipe_support import make_tiny_bert, sentiment_rows, write_csv

LORMA = str(Path(sys.executable).parent / "lorma")


@pytest.mark.slow
def test_two_processes_train_one_model(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    data = write_csv(tmp_path / "data.csv", ["text", "label"], sentiment_rows(64))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", LORMA, "train",
           "--model", str(model), "--train-file", str(data), "--output-dir", str(out), "--method", "lorma-plus",
           "--max-steps", "4", "--per-device-train-batch-size", "4", "--learning-rate", "1e-2"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = dict(re.findall(r"\[rank (\d)/2\] trained weights sha256 ([0-9a-f]{64})", result.stdout))
    assert set(digests) == {"0", "1"}, result.stdout[-2000:]
    assert digests["0"] == digests["1"], "the two processes ended with different weights"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    assert metrics["weights_sha256"] == digests["0"]
    # the initial weights were the same on both ranks too, and the run really moved them
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    # the losses are those of one process training on the same global batch (2 x 4 = 8), not N times them:
    # transformers 5 rescales a loss by the number of processes, which a mean loss must opt out of
    # (tasks.base.Task.loss_divides_by_item_count); dropout draws differ, so equal within a tolerance
    one = tmp_path / "one"
    single = cmd[cmd.index("train") - 1 :]
    single[single.index("--output-dir") + 1] = str(one)
    single[single.index("--per-device-train-batch-size") + 1] = "8"
    result = fresh_python.run(single, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    alone = json.loads((one / "metrics.json").read_text())
    assert alone["world_size"] == 1
    assert metrics["eval"]["eval_loss"] == pytest.approx(alone["eval"]["eval_loss"], rel=0.15)
    first_alone = json.loads((one / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert log[0]["loss"] == pytest.approx(first_alone, rel=0.15)
