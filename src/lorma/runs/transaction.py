"""Writing a run directory as a transaction (:class:`RunTransaction`), and the files beside it while a command
writes it (the layout of the directory itself: :mod:`lorma.runs.layout`).

Beside ``OUTPUT_DIR`` (in the parent folder) while a command writes it:
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

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.plumbing.fileio import AdvisoryLock
from lorma.runs.layout import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    RANK_DIR,
    RUN_FILES,
    notify,
    scan_checkpoints,
)
from lorma.runs.paths import check_output_location


def lock_path(final: Path) -> Path:
    """The lock file of run directory ``final`` (beside it, so that it outlives a swap)."""
    return final.with_name(f".{final.name}.lock")


def staging_path(final: Path) -> Path:
    """Where ``--overwrite`` writes the new run until it has finished."""
    return final.with_name(f".{final.name}.new")


def old_path(final: Path) -> Path:
    """Where the old run waits during the swap (:func:`lorma.plumbing.fileio.replace_directory`'s name)."""
    return final.with_name(f".{final.name}.old")


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
            from lorma.plumbing.fileio import replace_directory

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
