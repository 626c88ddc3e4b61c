"""A ``lorma train`` run directory: its layout, writing it as a transaction, and reading it back.

``OUTPUT_DIR/``
    ``config.yaml``       the resolved settings (``--resume`` reads them back)
    ``inputs.json``       fingerprints of the model and data read (``--resume`` refuses changed ones:
                          :mod:`lorma.recipes.fingerprints`)
    ``train_log.jsonl``   one line per logged step: ``{"step", "epoch", "loss", "learning_rate"}``
    ``checkpoints/``      Trainer checkpoints ``checkpoint-<step>/``
    ``rank/``             ``rank_log.jsonl`` with ``--track-rank``
    ``adapter/``          the adapter (safetensors, peft layout) + tokenizer + ``lorma_run.json``
    ``model/``            instead of ``adapter/`` for full / bitfit / head-only: the whole model
    ``eval_predictions.json``  the final evaluation's predictions and labels (the verdicts' bootstrap)
    ``metrics.json``      written last: a run with it has finished; with the main metric and whether the run
                          collapsed (:mod:`lorma.recipes.collapse`)
    ``tuning/``           with ``lorma train --tune``: one run directory per candidate (kept by ``--overwrite``)

Beside it (in the parent folder) while a command writes it:
    ``.OUTPUT_DIR.lock``  the advisory lock: pid, host and command of the writer
    ``.OUTPUT_DIR.new``   the new run of ``--overwrite``, moved onto ``OUTPUT_DIR`` only when it has finished
    ``.OUTPUT_DIR.old``   the old run during that swap (two renames; an interrupted swap is completed or undone
                          by the next command that opens the directory)

A :class:`RunTransaction` opens the directory for one command: it refuses a second writer (naming the first),
takes over the lock of a writer that died, writes an ``--overwrite`` run beside the old one and swaps at the
end, resumes from the newest *complete* checkpoint (a checkpoint whose ``trainer_state.json`` was written:
Trainer writes it last), and on an error before training started removes what it created, so bad input
leaves nothing behind.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorma.errors import DataFormatError, InputError
from lorma.fileio import AdvisoryLock, read_json, read_jsonl, safetensors_problem, torch_file_problem

CONFIG_FILE = "config.yaml"
INPUTS_FILE = "inputs.json"
METRICS_FILE = "metrics.json"
LOSS_LOG = "train_log.jsonl"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
RANK_DIR = "rank"
RANK_LOG = "rank_log.jsonl"
RUN_INFO_FILE = "lorma_run.json"
TUNING_DIR = "tuning"
TRAINER_STATE_FILE = "trainer_state.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
#: what makes a directory hold a run (an existing one is replaced only with --overwrite)
RUN_FILES = (CONFIG_FILE, METRICS_FILE, LOSS_LOG, ADAPTER_DIR, MODEL_DIR, CHECKPOINTS_DIR)
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "adapter_model.bin", "pytorch_model.bin")


def notify(message: str) -> None:
    """A warning for the user on stderr (one line), e.g. a skipped checkpoint or a taken-over lock."""
    print(f"lorma: {message}", file=sys.stderr, flush=True)


def lock_path(final: Path) -> Path:
    """The lock file of run directory ``final`` (beside it, so that it outlives a swap)."""
    return final.with_name(f".{final.name}.lock")


def staging_path(final: Path) -> Path:
    """Where ``--overwrite`` writes the new run until it has finished."""
    return final.with_name(f".{final.name}.new")


def old_path(final: Path) -> Path:
    """Where the old run waits during the swap (:func:`lorma.fileio.replace_directory`'s name)."""
    return final.with_name(f".{final.name}.old")


# --------------------------------------------------------------------------------------------------
# Files: complete or not
# --------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    """The step of ``checkpoint-<step>``, or None for another name."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint directory ``path`` cannot be resumed from (None when it is complete).

    Trainer writes the weights, optimizer, scheduler and RNG state, then ``trainer_state.json``: a valid
    trainer state for the checkpoint's step means everything before it was written; the weight and torch
    files are checked too, so that a file damaged later is not trusted either.
    """
    state_file = path / TRAINER_STATE_FILE
    if not state_file.is_file():
        return f"no {TRAINER_STATE_FILE} (interrupted while it was written)"
    try:
        state = read_json(state_file)
    except DataFormatError as err:
        return err.problem
    step = checkpoint_step(path)
    if not isinstance(state, dict) or state.get("global_step") != step:
        return f"{TRAINER_STATE_FILE} is for step {state.get('global_step') if isinstance(state, dict) else '?'}"
    weights = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        return "no model or adapter weights"
    for file in [*weights, *sorted(path.glob("*.pt")), *sorted(path.glob("*.pth"))]:
        problem = safetensors_problem(file) if file.suffix == ".safetensors" else torch_file_problem(file)
        if problem:
            return f"{file.name}: {problem}"
    return None


@dataclass
class CheckpointScan:
    """The checkpoints of a folder: complete ones by step, and the incomplete ones with why."""

    complete: list[Path] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def newest(self) -> Path | None:
        """The complete checkpoint with the highest step."""
        return self.complete[-1] if self.complete else None

    def skipped_newer(self) -> list[tuple[Path, str]]:
        """Incomplete checkpoints newer than :attr:`newest` (those a resume skips)."""
        newest = checkpoint_step(self.newest) if self.newest is not None else None
        floor = -1 if newest is None else newest
        return [(p, why) for p, why in self.incomplete if (checkpoint_step(p) or 0) > floor]


def scan_checkpoints(folder: Path) -> CheckpointScan:
    """Every ``checkpoint-<step>`` directory of ``folder``, sorted by step, checked for completeness."""
    scan = CheckpointScan()
    if not folder.is_dir():
        return scan
    found = sorted((p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
                   key=lambda p: checkpoint_step(p) or 0)
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            scan.complete.append(path)
        else:
            scan.incomplete.append((path, problem))
    return scan


# --------------------------------------------------------------------------------------------------
# Adapters: read with errors that name the file
# --------------------------------------------------------------------------------------------------


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a peft adapter directory; malformed, or without ``peft_type``, is an error
    naming the file."""
    path = adapter_dir / ADAPTER_CONFIG_FILE
    config = read_json(path)
    if not isinstance(config, dict):
        raise DataFormatError(path, None, f"expected a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("peft_type"), str):
        raise DataFormatError(path, None, "no 'peft_type' (not a peft adapter config)")
    return config


def adapter_weights_file(adapter_dir: Path) -> Path:
    """The adapter's weights file, checked complete; an error naming the file otherwise."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = adapter_dir / name
        if path.is_file():
            problem = safetensors_problem(path) if path.suffix == ".safetensors" else torch_file_problem(path)
            if problem:
                raise DataFormatError(path, None, problem)
            return path
    raise DataFormatError(adapter_dir, None, "no adapter_model.safetensors (or adapter_model.bin)")


def check_adapter_dir(adapter_dir: Path) -> dict[str, Any]:
    """Check a saved adapter before any model is loaded: its config and its weights file. Returns the config."""
    config = read_adapter_config(adapter_dir)
    adapter_weights_file(adapter_dir)
    return config


# --------------------------------------------------------------------------------------------------
# Where a command may write
# --------------------------------------------------------------------------------------------------


def check_output_location(path: Path, flag: str = "--output-dir") -> None:
    """Refuse an output directory that cannot be created: below a file, or in a folder that takes no new entries
    (``/proc``, read-only, no permission). Checked by creating and removing a probe in the nearest existing
    folder, so that nothing is left behind."""
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{flag} {path}: exists and is not a directory")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{flag} {path}: {ancestor} is a file, not a directory")
    probe = ancestor / f".lorma-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot create directories in {ancestor} ({err.strerror or err})") from None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_not_input(output: Path, inputs: Mapping[str, str | os.PathLike[str] | None], replacing: bool,
                    flag: str = "--output-dir", containers: Mapping[str, str | os.PathLike[str] | None] | None = None
                    ) -> None:
    """A command never writes into its own input: ``output`` must not be an input nor lie inside one, and when it
    is replaced as a whole (``replacing``), no input may lie inside it. ``containers`` (e.g. the run directory
    around an adapter) may hold the output but not be replaced by it."""
    out = output.resolve()
    for what, value in [*inputs.items(), *(containers or {}).items()]:
        if value is None or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if out == source:
            raise InputError(f"{flag} {output} is the input {what}: a command never writes into its own input; "
                             "choose another directory")
        if what in inputs and _inside(out, source):
            raise InputError(f"{flag} {output} is inside the input {what} ({value}): a command never writes into "
                             "its own input; choose another directory")
        if replacing and _inside(source, out):
            raise InputError(f"{flag} {output} contains the input {what} ({value}), which replacing it would "
                             "delete; choose another directory")


# --------------------------------------------------------------------------------------------------
# Writing a run: the transaction
# --------------------------------------------------------------------------------------------------


def run_files(folder: Path) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``folder``."""
    return [name for name in RUN_FILES if (folder / name).exists()]


def recover_interrupted_swap(final: Path, tell: Callable[[str], None] = notify) -> None:
    """Finish (or undo) a swap of ``--overwrite`` that a kill interrupted between its two renames."""
    old, new = old_path(final), staging_path(final)
    if not old.exists():
        return
    if final.exists():  # the new run is in place; only the old one's removal was left
        shutil.rmtree(old, ignore_errors=True)
    elif (new / METRICS_FILE).is_file():
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
        tell(f"finished the interrupted replacement of {final} by its new run")
    else:
        os.replace(old, final)
        tell(f"restored {final} (an interrupted replacement had moved it aside)")


def remove_stale_temporaries(work: Path) -> None:
    """Remove what a killed command left half-written in a run directory: temporary files and folders of atomic
    writes (``.NAME.*.tmp*``), and finish or undo an interrupted replacement of ``adapter/`` or ``model/``.
    Called under the lock, so no live writer owns them."""
    for folder in (work, work / RANK_DIR):
        if folder.is_dir():
            for stale in folder.glob(".*.tmp*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
    for name in (ADAPTER_DIR, MODEL_DIR):
        recover_interrupted_swap(work / name, tell=lambda message: None)


def resume_source(final: Path) -> Path:
    """The directory a ``--resume`` continues: the unfinished ``--overwrite`` run beside ``final`` if there is
    one, else ``final`` itself."""
    new = staging_path(final)
    return new if (new / CONFIG_FILE).is_file() else final


class RunTransaction:
    """One command's write access to a run directory; see the module docstring.

    Read-only until :meth:`begin`: the constructor plans (which directory is written, which checkpoint is
    resumed) and raises :class:`InputError` for what is wrong on its face. Use as::

        txn = RunTransaction(output_dir, overwrite=..., resume=...)
        ... check the inputs ...
        with txn:                      # begin(): the lock; an exception before started() undoes everything
            ... build the model ...
            txn.prepare()              # the working directory exists from here
            txn.started()              # from here an error keeps the run for --resume
            ... train, save into txn.work ...
            txn.commit()               # --overwrite: the new run replaces the old one
    """

    def __init__(self, output_dir: str | os.PathLike[str] | None, *, overwrite: bool = False, resume: bool = False,
                 main_process: bool = True, tell: Callable[[str], None] = notify, keep: tuple[str, ...] = ()) -> None:
        if not output_dir:
            raise InputError("no output directory: give --output-dir")
        if resume and overwrite:
            raise InputError("--resume and --overwrite contradict each other: give one")
        self.final = Path(output_dir)
        self.main_process = main_process
        self.tell = tell
        self.resume = resume
        self.overwrite = overwrite
        #: entries of the old run that an --overwrite run keeps (``tuning/``: the candidates of ``--tune``, which
        #: were just trained for the new run): moved into the staged run right before the swap
        self.keep = keep
        self._lock = AdvisoryLock(lock_path(self.final), f"run directory {self.final}")
        self._created: list[Path] = []
        self._started = False
        self._committed = False
        self.plan()

    # --- the plan (no side effects) ------------------------------------------------------------------
    def plan(self) -> None:
        """Decide :attr:`work` (where files go), :attr:`resume_from` and :attr:`skipped`; refuse what is wrong."""
        final = self.final
        check_output_location(final)
        if self.main_process and not self._lock.held:  # the other ranks of a run never lock: rank 0 does
            self._lock.refuse_if_held()  # a live writer is named before anything is said about what it wrote
        new = staging_path(final)
        existing = run_files(final) if final.is_dir() else []
        self.resume_from: Path | None = None
        self.skipped: list[tuple[Path, str]] = []
        if self.resume:
            self.work = resume_source(final)
            if not (self.work / CONFIG_FILE).is_file():
                raise InputError(f"--resume: nothing to resume in {final} (no {CONFIG_FILE}, no checkpoint); start "
                                 "the run without --resume")
            scan = scan_checkpoints(self.work / CHECKPOINTS_DIR)
            self.resume_from = scan.newest
            self.skipped = scan.skipped_newer()
            self.staged = self.work != final
        elif existing and not self.overwrite:
            raise InputError(f"output directory {final} already holds a run ({', '.join(existing)}); give "
                             "--overwrite to replace it or --resume to continue it")
        elif not existing and (new / CONFIG_FILE).is_file() and not self.overwrite:
            raise InputError(f"{new} holds an unfinished --overwrite run of {final}; give --resume to continue it "
                             "or --overwrite to start again")
        else:
            # a new run, written in place; or --overwrite of an existing one: written beside it, swapped at the end
            self.staged = bool(existing)
            self.work = new if self.staged else final

    @property
    def checkpoints(self) -> Path:
        """Trainer's output folder (inside the working directory)."""
        return self.work / CHECKPOINTS_DIR

    # --- begin / prepare / started / commit / abort ---------------------------------------------------
    def begin(self) -> RunTransaction:
        """Take the lock (main process only) and tidy what earlier interrupted commands left; re-plan under it."""
        if not self.main_process:
            return self
        self._note_missing_parents()
        self._lock.acquire()
        try:
            if self._lock.took_over is not None:
                self.tell(f"warning: took over the lock of {self.final} left by {self._lock.took_over.describe()}, "
                          "which is no longer running")
            recover_interrupted_swap(self.final, self.tell)
            self.plan()  # the directory may have changed while we were not holding the lock
            new = staging_path(self.final)
            if self.overwrite and new.exists():
                shutil.rmtree(new)
                self.tell(f"removed {new}, an unfinished earlier --overwrite run of {self.final}")
            remove_stale_temporaries(self.work)
            if self.resume:
                for path, why in self.skipped:
                    shutil.rmtree(path, ignore_errors=True)
                    self.tell(f"skipped incomplete checkpoint {path} ({why}); removed it")
                if self.resume_from is None:
                    self.tell(f"--resume: no complete checkpoint in {self.checkpoints}; starting {self.final} again "
                              "from step 0")
        except BaseException:
            self._release()
            raise
        return self

    def _note_missing_parents(self) -> None:
        """Remember the folders the lock file's creation will make, to remove them on an early abort."""
        missing = []
        parent = self.final.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        self._created.extend(missing)

    def prepare(self) -> Path:
        """Create the working directory (recorded, so that an abort before :meth:`started` removes it)."""
        if self.main_process and not self.work.exists():
            missing = []
            folder = self.work
            while not folder.exists():
                missing.append(folder)
                folder = folder.parent
            self.work.mkdir(parents=True)
            self._created = missing + self._created
        return self.work

    def started(self) -> None:
        """Training begins: from now on an error keeps the working directory for ``--resume``."""
        self._started = True

    def commit(self) -> None:
        """The run has finished: move a staged run onto the final directory, then release the lock."""
        if self.main_process and self.staged:
            from lorma.fileio import replace_directory

            for name in self.keep:
                if (self.final / name).exists() and not (self.work / name).exists():
                    os.replace(self.final / name, self.work / name)
            replace_directory(self.work, self.final)
            self.work = self.final
        self._committed = True
        self._release()

    def abort(self) -> None:
        """Undo what this command created if training had not started; release the lock either way."""
        undo = self.main_process and not self._started and self._lock.held
        if undo and self.work in self._created:
            shutil.rmtree(self.work, ignore_errors=True)
        self._release()  # removes the lock file, so that the folders created for it are empty again
        if undo:
            for folder in self._created:  # innermost first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()

    def _release(self) -> None:
        if self.main_process:
            self._lock.release()

    def __enter__(self) -> RunTransaction:
        return self.begin()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._committed:
            self.abort()

    def describe_stop(self) -> str:
        """Where an interrupted run stands and how to continue it (for the message after Ctrl-C or a full disk)."""
        scan = scan_checkpoints(self.checkpoints)
        if self.staged and not self.resume:
            where = f"the new run is in {self.work} ({self.final} still holds the old one)"
        else:
            where = f"the run is in {self.work}"
        if scan.newest is not None:
            return (f"{where}; its last complete checkpoint is {scan.newest.name}: "
                    f"`lorma train --resume --output-dir {self.final}` continues from there")
        return f"{where}; no checkpoint was complete: `lorma train --resume --output-dir {self.final}` starts it again"


# --------------------------------------------------------------------------------------------------
# Reading a run back
# --------------------------------------------------------------------------------------------------


def read_yaml_settings(path: Path) -> dict[str, Any]:
    """A YAML mapping of settings (a run's ``config.yaml``); malformed YAML is an error naming file and line."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataFormatError(path, mark.line + 1 if mark is not None else None,
                              f"invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, None, "expected a mapping of settings")
    return data


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.yaml`` (None when there is none)."""
    path = run_dir / CONFIG_FILE
    return read_yaml_settings(path) if path.is_file() else None


def _adapter_r(adapter_config: dict[str, Any]) -> Any:
    return adapter_config.get("r")


def check_run_consistency(run_dir: Path, adapter_dir: Path, adapter_config: dict[str, Any]) -> None:
    """The adapter of a run directory must be the one its ``config.yaml`` describes (same method and rank):
    a mixture (an old adapter beside a new config) is refused instead of merged or measured as if it matched."""
    config = read_run_config(run_dir)
    if config is None:
        return
    info_path = adapter_dir / RUN_INFO_FILE
    info = read_json(info_path) if info_path.is_file() else {}
    problems = []
    method = info.get("method") if isinstance(info, dict) else None
    if method is not None and config.get("method") is not None and method != config["method"]:
        problems.append(f"method {method} vs {config['method']}")
    adapter_r, config_r = _adapter_r(adapter_config), config.get("r")
    if method in (None, config.get("method")) and adapter_r is not None and config_r is not None \
            and adapter_r != config_r:
        problems.append(f"r {adapter_r} vs {config_r}")
    if problems:
        raise InputError(f"{run_dir}: {adapter_dir.name}/ does not belong to the run that {CONFIG_FILE} describes "
                         f"({'; '.join(problems)}): the directory mixes two runs; train it again, or name the "
                         f"adapter directory itself")


@dataclass
class FinishedAdapter:
    """A saved adapter found through :func:`find_adapter`: where it is, its config, and its run (if any)."""

    path: Path
    config: dict[str, Any]
    run_dir: Path | None


def compare_run_dir(compare_dir: Path, method: str, seed: int) -> Path:
    """Where ``lorma compare`` puts the run of ``method`` with ``seed``: an ordinary run directory."""
    return compare_dir / method / f"seed-{seed}"


def compare_runs(compare_dir: Path) -> list[Path]:
    """The run directories of a ``lorma compare`` output (those that wrote their config), sorted."""
    return sorted(p.parent for p in compare_dir.glob(f"*/seed-*/{CONFIG_FILE}"))


def missing_adapter_reason(path: Path) -> str:
    """Why directory ``path`` holds no adapter, in words for a message (what it is instead, and what to do)."""
    if (path / MODEL_DIR / "config.json").is_file():
        return ("it is a run of a non-adapter method (full / bitfit / head-only): its model/ is already a plain "
                "transformers model")
    if (path / CONFIG_FILE).is_file():
        scan = scan_checkpoints(path / CHECKPOINTS_DIR)
        hint = f"; or use its last complete checkpoint, {scan.newest}" if scan.newest is not None else ""
        return (f"the run has not finished (no {ADAPTER_DIR}/): `lorma train --resume --output-dir {path}` "
                f"finishes it{hint}")
    if (path / "config.json").is_file() and any((path / n).is_file() for n in (
            "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        return "it is a plain transformers model (a merged or base model), not a peft adapter directory"
    return f"no {ADAPTER_CONFIG_FILE} (not a peft adapter directory)"


def find_adapter(path: Path) -> FinishedAdapter:
    """The adapter of ``path``: an adapter directory itself, or a run directory with a finished ``adapter/``.

    Checked before any model is loaded: config and weights complete, and a run directory's adapter consistent
    with its ``config.yaml``. An unfinished run says how to finish it.
    """
    if not path.exists():
        raise InputError(f"adapter directory not found: {path}")
    if not path.is_dir():
        raise InputError(f"{path}: not a directory (give an adapter directory or a run directory)")
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return FinishedAdapter(path, check_adapter_dir(path), None)
    adapter = path / ADAPTER_DIR
    if (adapter / ADAPTER_CONFIG_FILE).is_file():
        config = check_adapter_dir(adapter)
        check_run_consistency(path, adapter, config)
        return FinishedAdapter(adapter, config, path)
    raise InputError(f"{path}: {missing_adapter_reason(path)}")


# --------------------------------------------------------------------------------------------------
# The training-loss log
# --------------------------------------------------------------------------------------------------


def _loss_points(records: list[dict[str, Any]], where: Path) -> tuple[list[float], list[float]]:
    """``(steps, losses)`` of the training-loss records among HF-style log records, sorted by step.

    Evaluation and summary records are skipped; a later record for a step replaces an earlier one (a resumed
    run may log some steps again).
    """
    by_step: dict[float, float] = {}
    for rec in records:
        loss = rec.get("loss", rec.get("train_loss_step"))
        step = rec.get("step", rec.get("global_step"))
        if loss is None or step is None or "eval_loss" in rec or "train_runtime" in rec:
            continue
        try:
            by_step[float(step)] = float(loss)
        except (TypeError, ValueError):
            raise DataFormatError(where, None, f"step {step!r} / loss {loss!r} is not a number") from None
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def read_loss_log(path: Path) -> tuple[list[float], list[float]]:
    """``(steps, losses)`` of the training loss logged in ``path``: this layout's :data:`LOSS_LOG`, another
    tool's JSON Lines or CSV log (columns ``step`` and ``loss``), or a ``trainer_state.json`` (its
    ``log_history``). A line torn by a kill at the end of a JSON Lines log is dropped; anything else malformed
    is an error naming the file (and line)."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not {"step", "loss"} <= set(reader.fieldnames):
                raise DataFormatError(path, 1, f"expected columns 'step' and 'loss', got {reader.fieldnames}")
            return _loss_points(list(reader), path)
    if path.name == TRAINER_STATE_FILE:
        state = read_json(path)
        history = state.get("log_history") if isinstance(state, dict) else None
        return _loss_points(history if isinstance(history, list) else [], path)
    return _loss_points(read_jsonl(path), path)
