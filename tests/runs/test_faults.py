"""Fault injection: ``lorma train`` killed (SIGKILL) or out of disk space at random points of a short real run,
then resumed, must end with exactly the weights of an uninterrupted run; and a real full disk (a file-size
limit on the child, RLIMIT_FSIZE) gives one line, not a traceback.

The runs are real (a tiny BERT from a config with the MiniLM tokenizer, real data, HF Trainer, checkpoints every
2 steps, the final save); the faults come from :mod:`fault_injection`: a kill or an ENOSPC at a chosen write
(inside a checkpoint, in the final save, in the logs, in the config) or a kill at a random moment (during the
steps). Every resumed run is compared with the uninterrupted one tensor by tensor, bit for bit, and its loss log
line by line; nothing may be left behind (no lock, no temporary file, no half-swapped directory).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import fault_injection as fi
import fresh_python
from recipe_support import make_tiny_bert, sentiment_rows, write_csv

pytestmark = pytest.mark.slow

STEPS = 8
SEED = 20250611  # the random kill points; printed with the counts


def _train_args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(setup["model"]), "--train-file", str(setup["data"]), "--output-dir", str(out),
            "--method", "lorma-plus", "--max-steps", str(STEPS), "--save-steps", "2", "--save-total-limit", "2",
            "--per-device-train-batch-size", "8", "--learning-rate", "5e-3", "--max-seq-length", "32",
            "--report-to", "none", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faults")
    model = make_tiny_bert(root / "model")
    data = write_csv(root / "data.csv", ["text", "label"], sentiment_rows(80))
    (root / "logs").mkdir()
    # one thread in every child: the same arithmetic in every run, and fair to a shared machine
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    ctx = fi.context()
    info: dict[str, Any] = {"root": root, "model": model, "data": data, "ctx": ctx}
    try:
        reference = root / "reference" / "run"
        code, output, events = fi.run(ctx, _train_args(info, reference), reference.parent, root / "logs" / "ref.txt")
        assert code == 0, output[-3000:]
        # a second uninterrupted run: the same weights (what every resumed run is held to), and its duration (the
        # first one also started the forkserver) bounds the random kill times
        again = root / "again" / "run"
        started = time.perf_counter()
        code, output, _ = fi.run(ctx, _train_args(info, again), again.parent, root / "logs" / "again.txt")
        info["duration"] = time.perf_counter() - started
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert code == 0, output[-3000:]
    assert_same_run(again, reference, "a second uninterrupted run")
    info.update(reference=reference, events=events)
    return info


def _tensors(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def _log(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())]


def assert_same_run(run: Path, reference: Path, what: str) -> None:
    """Bit-identical adapter, the same loss log, a finished run, and nothing left behind."""
    import torch

    expected, got = _tensors(reference), _tensors(run)
    assert set(got) == set(expected), what
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{what}: {key} differs from the uninterrupted run"
    assert _log(run) == _log(reference), f"{what}: the loss log differs"
    assert json.loads((run / "metrics.json").read_text())["global_step"] == STEPS, what
    leftovers = [p.name for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.")]
    leftovers += [str(p.relative_to(run)) for p in run.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert not leftovers, f"{what}: left behind {leftovers}"


def _resume(setup: dict[str, Any], run: Path, log: Path) -> tuple[int, str, str]:
    """``lorma train --resume``; a run killed before it had written its config starts again instead."""
    code, output, _ = fi.run(setup["ctx"], ["train", "--resume", "--output-dir", str(run)], run.parent, log)
    if code == 2 and "nothing to resume" in output:
        code, output, _ = fi.run(setup["ctx"], _train_args(setup, run), run.parent, log)
        return code, output, "started again"
    return code, output, "resumed"


WRITES = ("write", "torch.save", "safetensors")  # events that take space (renames and deletions do not)


def _choose(events: list[tuple[str, str]], counts: dict[str, int], rng: random.Random,
            labels: tuple[str, ...] | None = None) -> list[tuple[int, str]]:
    """``counts[category]`` distinct event numbers (1-based) of each category, at random (of ``labels`` only)."""
    by_category: dict[str, list[int]] = {}
    for number, (label, path) in enumerate(events, start=1):
        if labels is None or label in labels:
            by_category.setdefault(fi.category(label, path), []).append(number)
    chosen = []
    for name, count in counts.items():
        pool = by_category.get(name, [])
        chosen += [(n, name) for n in rng.sample(pool, min(count, len(pool)))]
    return chosen


def test_killed_runs_resume_to_the_same_weights(setup: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    plans: list[tuple[str, dict[str, Any] | None, float | None]] = []
    for number, name in _choose(setup["events"], {"checkpoint": 5, "final save": 3, "loss log": 1, "config": 1},
                                rng):
        plans.append((f"kill in {name}", {"kind": "kill", "event": number, "fraction": rng.random()}, None))
    for _ in range(3):  # at a random moment: mostly during the steps
        plans.append(("kill at a random time", None, rng.uniform(0.5, setup["duration"])))
    outcomes: Counter[str] = Counter()
    for i, (what, plan, delay) in enumerate(plans):
        run = setup["root"] / f"kill-{i}" / "run"
        run.parent.mkdir()
        logs = setup["root"] / "logs"
        code, output, _ = fi.run(setup["ctx"], _train_args(setup, run), run.parent, logs / f"kill-{i}.txt", plan,
                                 kill_after=delay)
        assert code in (-9, 0), f"{what}: exit {code}\n{output[-3000:]}"
        outcomes["killed" if code == -9 else "finished before the kill"] += 1
        code, output, how = _resume(setup, run, logs / f"kill-{i}-resume.txt")
        assert code == 0, f"{what} (plan {plan}, delay {delay}): resume failed\n{output[-3000:]}"
        assert "Traceback" not in output, output[-3000:]
        outcomes[how] += 1
        outcomes[what] += 1
        assert_same_run(run, setup["reference"], f"{what} (plan {plan}, delay {delay})")
    with capsys.disabled():
        print(f"\nfault injection (seed {SEED}): {len(plans)} kills: {dict(outcomes)}")
    assert outcomes["killed"] >= 10  # the timed kills may land after a short run has finished


def test_full_disk_stops_with_a_message_and_resumes_to_the_same_weights(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED + 1)
    outcomes: Counter[str] = Counter()
    chosen = _choose(setup["events"], {"checkpoint": 5, "final save": 4, "loss log": 2, "config": 1}, rng, WRITES)
    for i, (number, name) in enumerate(chosen):
        run = setup["root"] / f"enospc-{i}" / "run"
        run.parent.mkdir()
        logs = setup["root"] / "logs"
        plan = {"kind": "enospc", "event": number, "fraction": rng.random()}
        code, output, _ = fi.run(setup["ctx"], _train_args(setup, run), run.parent, logs / f"enospc-{i}.txt", plan)
        errors = [line for line in re.split(r"[\r\n]", output) if line.startswith("lorma train: error:")]
        assert code == 1 and "Traceback" not in output, f"ENOSPC in {name} ({plan}): exit {code}\n{output[-3000:]}"
        assert len(errors) == 1 and "no space left on the device" in errors[0], output[-3000:]
        if "resume" in errors[0]:
            assert re.search(r"--resume --output-dir \S+", errors[0]), errors[0]
        code, output, how = _resume(setup, run, logs / f"enospc-{i}-resume.txt")
        assert code == 0, f"ENOSPC in {name} ({plan}): resume failed\n{output[-3000:]}"
        outcomes[how] += 1
        outcomes[f"ENOSPC in {name}"] += 1
        assert_same_run(run, setup["reference"], f"ENOSPC in {name} ({plan})")
    with capsys.disabled():
        print(f"\nfault injection (seed {SEED + 1}): {len(chosen)} ENOSPC: {dict(outcomes)}")
    assert sum(v for k, v in outcomes.items() if k.startswith("ENOSPC")) == 12


def test_ctrl_c_says_where_the_run_stopped_and_resumes(setup: dict[str, Any]) -> None:
    events = setup["events"]
    # Ctrl-C right after the second checkpoint's trainer state was written
    states = [n for n, (label, path) in enumerate(events, start=1) if path.endswith("checkpoint-4/trainer_state.json")]
    run = setup["root"] / "sigint" / "run"
    run.parent.mkdir()
    logs = setup["root"] / "logs"
    code, output, _ = fi.run(setup["ctx"], _train_args(setup, run), run.parent, logs / "sigint.txt",
                             {"kind": "sigint", "event": states[-1]})
    assert code == 130 and "Traceback" not in output, output[-3000:]
    last = [line for line in re.split(r"[\r\n]", output) if line.startswith("lorma train:")]
    assert len(last) == 1 and output.rstrip().endswith(last[0]), output[-3000:]
    assert re.fullmatch(r"lorma train: interrupted: stopped at step [45]; the run is in \S+; its last complete "
                        r"checkpoint is checkpoint-4: `lorma train --resume --output-dir \S+` continues from there",
                        last[0]), last[0]
    code, output, _ = _resume(setup, run, logs / "sigint-resume.txt")
    assert code == 0, output[-3000:]
    assert_same_run(run, setup["reference"], "Ctrl-C")


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(setup: dict[str, Any]) -> None:
    run = setup["root"] / "race" / "run"
    run.parent.mkdir()
    logs = setup["root"] / "logs"
    ctx = setup["ctx"]
    # A holds the directory open (paused at its first checkpoint's trainer state) while B starts on it
    first_state = next(n for n, (label, path) in enumerate(setup["events"], start=1)
                       if path.endswith("trainer_state.json"))
    a = ctx.Process(target=fi.child_main, args=(_train_args(setup, run), {"kind": "pause", "event": first_state},
                                                 str(run.parent), str(logs / "race-a.txt")))
    a.start()
    deadline = time.time() + 300
    while not (run.parent / "paused").exists():
        assert a.is_alive() and time.time() < deadline, (logs / "race-a.txt").read_text()[-3000:]
        time.sleep(0.1)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    code, output, _ = fi.run(ctx, _train_args(setup, run), run.parent, logs / "race-b.txt")
    assert code == 2, output[-3000:]
    assert f"is in use by pid {a.pid} on host " in output and "lorma train" in output, output[-3000:]
    code, output, _ = fi.run(ctx, ["train", "--resume", "--output-dir", str(run)], run.parent, logs / "race-c.txt")
    assert code == 2 and f"pid {a.pid}" in output, output[-3000:]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # the refused ones touched nothing
    # A dies holding the lock: the next command takes the lock over, says so, and finishes the run
    a.kill()
    a.join()
    assert (run.parent / ".run.lock").exists()
    code, output, _ = fi.run(ctx, ["train", "--resume", "--output-dir", str(run)], run.parent, logs / "race-d.txt")
    assert code == 0, output[-3000:]
    assert f"took over the lock of {run} left by pid {a.pid}" in output
    assert_same_run(run, setup["reference"], "after a stale lock")


def test_a_crashed_overwrite_leaves_the_old_run_whole(setup: dict[str, Any]) -> None:
    """``--overwrite`` writes beside the old run: killed anywhere (4 random writes of it), the old run is untouched
    (or, killed between the two renames of the swap, whole beside it); resumed, the new run replaces it."""
    from recipe_support import snapshot

    rng = random.Random(SEED + 2)
    logs = setup["root"] / "logs"
    ctx = setup["ctx"]
    old_run = setup["root"] / "old" / "run"
    code, output, _ = fi.run(ctx, _train_args(setup, old_run, "--r", "4"), old_run.parent, logs / "old.txt")
    assert code == 0, output[-3000:]
    before = snapshot(old_run)
    probe = setup["root"] / "probe" / "run"
    shutil.copytree(old_run, probe)
    _, _, events = fi.run(ctx, _train_args(setup, probe, "--overwrite"), probe.parent, logs / "probe.txt")
    assert_same_run(probe, setup["reference"], "an uninterrupted --overwrite")
    for i, number in enumerate(sorted(rng.sample(range(1, len(events) + 1), 4))):
        run = setup["root"] / f"overwrite-{i}" / "run"
        shutil.copytree(old_run, run)
        code, output, _ = fi.run(ctx, _train_args(setup, run, "--overwrite"), run.parent, logs / f"ow-{i}-kill.txt",
                                 {"kind": "kill", "event": number, "fraction": rng.random()})
        assert code == -9, output[-3000:]
        new, old = run.parent / ".run.new", run.parent / ".run.old"
        if run.exists():
            assert snapshot(run) == before, f"a --overwrite killed at event {number} changed the old run"
        else:  # killed between the two renames of the swap: both runs are whole beside it
            assert snapshot(old) == before and (new / "metrics.json").is_file()
        if (new / "config.yaml").is_file():
            argv = ["train", "--resume", "--output-dir", str(run)]
        else:  # killed before the new run had its config: nothing of it to resume
            argv = _train_args(setup, run, "--overwrite")
        code, output, _ = fi.run(ctx, argv, run.parent, logs / f"ow-{i}-resume.txt")
        assert code == 0, output[-3000:]
        assert_same_run(run, setup["reference"], f"--overwrite killed at event {number}")


FILE_SIZE_LIMIT = 8000  # bytes: above the files a run writes before its first checkpoint's weights, below those

#: ``lorma <argv>`` in a process whose writes past ``limit`` bytes fail with EFBIG, as on a full disk (SIGXFSZ
#: ignored, or the kernel would kill the process instead); argv[1]: the limit, then the command's arguments
LIMITED_LORMA = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from lorma.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_file_size_limit_stops_the_run_with_one_line_and_resume_finishes_it(setup: dict[str, Any]) -> None:
    """The disk 'fills' while the first checkpoint is saved (RLIMIT_FSIZE in the child: safetensors' write fails
    with EFBIG, 'File too large (os error 27)'): one line naming the run and what was kept, the traceback in the
    run's folder, and ``--resume`` with the limit lifted ends with the weights of an uninterrupted run."""
    checkpoint = setup["reference"] / "checkpoints"
    sizes = {p.name: p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}
    assert sizes["README.md"] < FILE_SIZE_LIMIT < sizes["adapter_model.safetensors"]  # the premise: as reported
    run = setup["root"] / "file-size-limit" / "run"
    run.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    full = fresh_python.run([sys.executable, "-c", LIMITED_LORMA, str(FILE_SIZE_LIMIT), *_train_args(setup, run)],
                            env=env, timeout=600)
    lines = [line for line in re.split(r"[\r\n]", full.stderr) if line.strip() and "%|" not in line]
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("lorma train: error: file too large"), lines
    assert f"checkpoint {run / 'checkpoints' / 'checkpoint-2'}" in lines[0]
    assert "no checkpoint was complete" in lines[0] and f"--resume --output-dir {run}" in lines[0]
    log = run / "lorma_error.log"
    assert f"(traceback in {log})" in lines[0]
    assert "Traceback" in log.read_text() and "File too large (os error 27)" in log.read_text()
    resumed = fresh_python.run([sys.executable, "-m", "lorma.cli", "train", "--resume", "--output-dir", str(run)],
                               env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run, setup["reference"], "a run resumed after its file-size limit was lifted")
