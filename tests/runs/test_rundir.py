"""``lorma.runs.layout``: which checkpoints are complete, where a command may write, the transaction's states
(refusals before anything is written, clean-up of what an early error created, an interrupted swap finished or
undone), and the adapter checks that name the broken file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorma.plumbing.errors import DataFormatError, InputError
from lorma.runs.layout import check_adapter_dir, checkpoint_problem, find_adapter, scan_checkpoints
from lorma.runs.paths import check_not_input, check_output_location
from lorma.runs.transaction import RunTransaction, recover_interrupted_swap


def _checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint as Trainer writes it: weights, optimizer (torch zip), trainer state last."""
    import torch
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "README.md").write_text("peft's model card")
    save_file({"w": torch.ones(4, 4) * step}, path / "adapter_model.safetensors")
    torch.save({"state": torch.zeros(64)}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return path


def test_checkpoint_completeness(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        _checkpoint(folder, step)
    (folder / "checkpoint-8" / "trainer_state.json").unlink()  # killed before the state: only files before it
    blob = folder / "checkpoint-6" / "optimizer.pt"
    blob.write_bytes(blob.read_bytes()[:100])  # a full disk mid-write of the optimizer
    weights = folder / "checkpoint-4" / "adapter_model.safetensors"
    assert checkpoint_problem(folder / "checkpoint-2") is None
    assert "no trainer_state.json" in checkpoint_problem(folder / "checkpoint-8")
    assert "optimizer.pt: not a complete torch file" in checkpoint_problem(folder / "checkpoint-6")
    scan = scan_checkpoints(folder)
    assert [p.name for p in scan.complete] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p, _ in scan.skipped_newer()] == ["checkpoint-6", "checkpoint-8"]
    weights.write_bytes(weights.read_bytes()[:-8])
    assert "adapter_model.safetensors: not a complete safetensors file" in checkpoint_problem(weights.parent)
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert "for step 3" in checkpoint_problem(folder / "checkpoint-2")
    (folder / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hi')
    assert "invalid JSON" in checkpoint_problem(folder / "checkpoint-2")
    assert scan_checkpoints(folder).newest is None


def test_output_location_below_a_file_or_unwritable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory"):
        check_output_location(tmp_path / "file" / "run")
    with pytest.raises(InputError, match="exists and is not a directory"):
        check_output_location(tmp_path / "file")
    with pytest.raises(InputError, match=r"cannot create directories in /proc"):
        check_output_location(Path("/proc/lorma-run"))
    check_output_location(tmp_path / "a" / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_commands_never_write_into_their_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("text,label\n")
    with pytest.raises(InputError, match="is the input --data"):
        check_not_input(data, {"--data": data}, replacing=False)
    with pytest.raises(InputError, match="is inside the input --data"):
        check_not_input(data / "run", {"--data": data}, replacing=False)
    with pytest.raises(InputError, match="contains the input --train-file"):
        check_not_input(tmp_path, {"--train-file": data / "train.csv"}, replacing=True)
    check_not_input(tmp_path / "run", {"--train-file": data / "train.csv", "--model": None}, replacing=True)
    check_not_input(data / "merged", {}, replacing=True, containers={"run": data})  # beside the adapter: fine
    with pytest.raises(InputError, match="is the input run"):
        check_not_input(data, {}, replacing=True, containers={"run": data})


def _run_dir(path: Path, finished: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("method: lorma-plus\nr: 8\n")
    if finished:
        (path / "metrics.json").write_text("{}")
    return path


def test_transaction_refuses_before_writing(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    with pytest.raises(InputError, match="already holds a run"):
        RunTransaction(run)
    with pytest.raises(InputError, match="contradict"):
        RunTransaction(run, overwrite=True, resume=True)
    with pytest.raises(InputError, match="nothing to resume"):
        RunTransaction(tmp_path / "none", resume=True)
    with pytest.raises(InputError, match="no output directory"):
        RunTransaction(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_error_before_training_removes_what_the_transaction_created(tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError, match="^bad target modules$"), RunTransaction(out) as txn:
        txn.prepare()
        (txn.work / "config.yaml").write_text("x")
        raise RuntimeError("bad target modules")
    assert list(tmp_path.iterdir()) == []
    # after training started, the run stays for --resume; the lock goes either way
    with pytest.raises(RuntimeError, match="^out of memory at step 3$"), RunTransaction(out) as txn:
        txn.prepare()
        (txn.work / "config.yaml").write_text("x")
        txn.started()
        raise RuntimeError("out of memory at step 3")
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]


def test_overwrite_is_staged_beside_and_swapped_on_commit(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    with pytest.raises(RuntimeError, match="^crash$"), RunTransaction(run, overwrite=True) as txn:
        assert txn.work == tmp_path / ".run.new"
        txn.prepare()
        (txn.work / "config.yaml").write_text("new")
        txn.started()
        raise RuntimeError("crash")
    assert (run / "config.yaml").read_text() == "method: lorma-plus\nr: 8\n"  # the old run is whole
    other = tmp_path / "other"
    _run_dir(other / ".x.new", finished=False)
    with pytest.raises(InputError, match="holds an unfinished --overwrite run"):
        RunTransaction(other / "x")  # a new run where an unfinished one waits: resume it or overwrite it
    shutil.rmtree(other)
    txn = RunTransaction(run, resume=True)  # --resume continues the unfinished new run, beside
    assert txn.work == tmp_path / ".run.new" and txn.staged
    with txn:
        (txn.work / "metrics.json").write_text("{}")
        txn.started()
        txn.commit()
    assert (run / "config.yaml").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_an_interrupted_swap_is_finished_or_undone(tmp_path: Path) -> None:
    run, old, new = tmp_path / "run", tmp_path / ".run.old", tmp_path / ".run.new"
    _run_dir(old)  # killed after moving the old run aside, before moving the finished new one in
    _run_dir(new)
    (new / "config.yaml").write_text("new")
    messages: list[str] = []
    recover_interrupted_swap(run, messages.append)
    assert (run / "config.yaml").read_text() == "new" and not old.exists() and not new.exists()
    assert "finished the interrupted replacement" in messages[0]
    shutil.move(run, old)  # the same, but the new run had not finished: the old one comes back
    _run_dir(new, finished=False)
    recover_interrupted_swap(run, messages.append)
    assert (run / "config.yaml").read_text() == "new" and "restored" in messages[1]


def _adapter(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORMA", "r": 8}))
    save_file({"a": torch.ones(8, 4)}, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors: not a complete"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(
            (d / "adapter_model.safetensors").read_bytes()[:60]), "adapter_model.safetensors: not a complete"),
        (lambda d: (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 8),
         "adapter_model.safetensors: not a complete"),
        (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LOR'), "adapter_config.json:1: invalid JSON"),
        (lambda d: (d / "adapter_config.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00"), "adapter_config.json: not UTF-8"),
        (lambda d: (d / "adapter_config.json").write_text('{"r": 8}'), "adapter_config.json: no 'peft_type'"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    ],
)
def test_broken_adapters_are_named(tmp_path: Path, damage, message: str) -> None:
    adapter = _adapter(tmp_path / "adapter")
    check_adapter_dir(adapter)
    damage(adapter)
    with pytest.raises(DataFormatError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_adapter_dir(adapter)


def test_find_adapter_says_what_a_directory_is(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", finished=False)
    with pytest.raises(InputError, match="the run has not finished .* --resume --output-dir"):
        find_adapter(run)
    _adapter(run / "adapter")
    (run / "config.yaml").write_text("method: lorma-plus\nr: 100000\n")  # a config beside another run's adapter
    (run / "adapter" / "lorma_run.json").write_text(json.dumps({"method": "lorma-plus"}))
    with pytest.raises(InputError, match=r"adapter/ does not belong to the run .*r 8 vs 100000"):
        find_adapter(run)
    assert find_adapter(run / "adapter").run_dir is None  # the adapter itself is fine on its own
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="plain transformers model"):
        find_adapter(merged)


def test_only_the_main_process_locks(tmp_path: Path) -> None:
    """Under torchrun every rank opens the run; rank 0 locks it, and the others must not take that for a rival."""
    from lorma.plumbing.errors import RunLockedError
    from lorma.plumbing.fileio import AdvisoryLock

    run = tmp_path / "run"
    with AdvisoryLock(tmp_path / ".run.lock", "rank 0"):
        other_rank = RunTransaction(run, main_process=False)
        with other_rank:
            assert other_rank.prepare() == run and not run.exists()  # rank 0 creates and writes
        with pytest.raises(RunLockedError, match="run directory .* is in use by pid"):
            RunTransaction(run)
