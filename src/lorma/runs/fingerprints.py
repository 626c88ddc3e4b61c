"""Fingerprints of a run's inputs, so that ``--resume`` never continues a run silently on other data.

A run records what it reads in ``OUTPUT_DIR/inputs.json`` (:data:`INPUTS_FILE`), written with ``config.yaml``:
the training file, the eval file, the data folder (every file in it) and the base model (a local directory: its
config, tokenizer and weight files; a hub name: the name only), each file as its size, modification time and
SHA-256 of its content. Hashes are computed afresh by every command, streaming (nothing is cached between
processes: a cached hash would trust the modification time, which an edit can keep).

``--resume`` fingerprints the inputs again before anything in the run is touched and compares (content decides:
a file whose modification time alone changed is the same input, and is only noted). A change is refused with one
line naming the file and what changed (:class:`~lorma.plumbing.errors.InputError`, exit code 2), unless the user gives
``--allow-changed-inputs``: then the run goes on and ``inputs.json`` keeps, in ``history``, the old and the new
fingerprints and that the user allowed it; ``metrics.json`` repeats that history under ``input_changes``. A run made
before inputs were recorded (no ``inputs.json``) resumes with a warning that its inputs cannot be checked, and
records them from then on.

``inputs.json``::

    {"format": 1,
     "inputs": {"model": {...}, "train_file": {...}, ...},   # what the run trains on (since its last allowed change)
     "history": [{"event": "changed inputs allowed", "allowed_by_user": true, "resumed_from_step": 3, "time": ...,
                  "changes": ["..."], "previous": {...}, "current": {...}}, ...]}

An input is ``{"kind": "file" | "directory", "path": as given, "resolved": absolute, "files": {name: {"size",
"mtime_ns", "modified", "sha256"}}}`` (``name``: the file's own name, or its path inside the directory), or
``{"kind": "hub", "name": ...}`` for a model named on a hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import DataFormatError, InputError
from lorma.plumbing.fileio import atomic_write_json, read_json
from lorma.runs.layout import INPUTS_FILE, METRICS_FILE, checkpoint_step, notify

FORMAT = 1
#: the inputs a run may read: RunConfig field -> how messages name it
ROLES: dict[str, str] = {"model": "base model", "train_file": "training file", "eval_file": "eval file",
                         "data": "data folder"}
#: the files of a local model directory that make the model: its config, its tokenizer and its weights (a README
#: or a training log beside them changes nothing)
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json",
    "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.gguf",
    "*.h5", "*.msgpack",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json",
)
#: files of a data folder that are not input: the cache files the datasets library writes beside a saved dataset
DATA_FOLDER_SKIPPED = ("cache-*.arrow",)
#: bytes read at a time while hashing (hashlib.file_digest is Python 3.11+)
_CHUNK = 1 << 20
#: how many changes the refusal lists before "and N more"
_SHOWN_CHANGES = 5

Fingerprints = dict[str, dict[str, Any]]


# --------------------------------------------------------------------------------------------------
# Fingerprinting
# --------------------------------------------------------------------------------------------------


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size, modification time and SHA-256 (streamed: a file of any size in constant memory) of ``path``."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as fh:
            stat = os.fstat(fh.fileno())
            while read := fh.readinto(buffer):
                digest.update(view[:read])
    except OSError as err:
        raise InputError(f"{path}: cannot read it to fingerprint the run's inputs ({err.strerror or err})") from None
    modified = datetime.fromtimestamp(stat.st_mtime_ns / 1e9, tz=timezone.utc)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "modified": modified.isoformat(timespec="microseconds"), "sha256": digest.hexdigest()}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _directory_files(folder: Path, role: str) -> list[str]:
    """The files of ``folder`` that make input ``role``, as paths relative to it (``/``-separated), sorted."""
    if role == "model":
        return sorted(p.name for p in folder.iterdir() if p.is_file() and _matches(p.name, MODEL_FILE_PATTERNS))
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not _matches(p.name, DATA_FOLDER_SKIPPED))


def input_fingerprint(role: str, value: str) -> dict[str, Any]:
    """The fingerprint of one input: a file, a directory, or (for the model) a hub name."""
    path = Path(value)
    if not path.exists():
        if role == "model":
            return {"kind": "hub", "name": value}
        return {"kind": "missing", "path": value}
    base = {"path": value, "resolved": str(path.resolve())}
    if path.is_dir():
        return {"kind": "directory", **base,
                "files": {name: file_fingerprint(path / name) for name in _directory_files(path, role)}}
    return {"kind": "file", **base, "files": {path.name: file_fingerprint(path)}}


def inputs_read(cfg: Any) -> dict[str, str]:
    """The inputs of run settings ``cfg`` that the run reads, by RunConfig field: the model, the training file or
    else the data folder, and the eval file unless the run evaluates on a validation split (which never reads it)."""
    read = {"model": cfg.model, "train_file": cfg.train_file,
            "eval_file": None if getattr(cfg, "eval_on", "eval") == "validation" else cfg.eval_file,
            "data": cfg.data if cfg.train_file is None else None}
    return {role: str(value) for role, value in read.items() if value is not None}


def fingerprint_inputs(cfg: Any) -> Fingerprints:
    """Fingerprints of every input the run of ``cfg`` reads (see :func:`inputs_read`)."""
    return {role: input_fingerprint(role, value) for role, value in inputs_read(cfg).items()}


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------


def _describe(entry: Mapping[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == "hub":
        return f"the hub name {entry.get('name')}"
    if kind == "missing":
        return f"{entry.get('path')} (missing)"
    return f"the {kind} {entry.get('path')}"


def _shown_file(entry: Mapping[str, Any], name: str) -> str:
    """A file of an input as messages name it: the path as given (inside it, for a directory)."""
    return str(entry.get("path")) if entry.get("kind") == "file" else str(Path(str(entry.get("path"))) / name)


def _files(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The file fingerprints of an input by name inside it; a single file's under ``""`` (so that the same content
    read from another path compares equal)."""
    files = entry.get("files") or {}
    return {"": next(iter(files.values()))} if entry.get("kind") == "file" and files else dict(files)


def compare_inputs(recorded: Fingerprints, current: Fingerprints) -> tuple[list[str], list[str]]:
    """``(changes, notes)`` between the recorded and the current fingerprints, in words naming each file.

    A change is a different content (size, or hash at the same size), a file added or removed, an input given or
    no longer given, or another kind of input (a hub name for a directory). A note is what changes nothing: a
    file whose modification time alone changed, or an input now read from another path with the same content.
    """
    changes: list[str] = []
    notes: list[str] = []
    for role in [*ROLES, *sorted((set(recorded) | set(current)) - set(ROLES))]:
        old, new = recorded.get(role), current.get(role)
        label = ROLES.get(role, role)
        if old is None and new is None:
            continue
        if old is None:
            changes.append(f"{label} {_describe(new)} was not read when the run started")  # type: ignore[arg-type]
            continue
        if new is None:
            changes.append(f"{label} {_describe(old)} is no longer given")
            continue
        if old.get("kind") != new.get("kind") or (old.get("kind") == "hub" and old.get("name") != new.get("name")):
            changes.append(f"{label} was {_describe(old)}, now {_describe(new)}")
            continue
        if old.get("kind") in ("hub", "missing"):
            continue
        old_files, new_files = _files(old), _files(new)
        before = len(changes)
        for name in sorted(set(old_files) | set(new_files)):
            a, b = old_files.get(name), new_files.get(name)
            shown = _shown_file(new, name)
            if b is None:
                changes.append(f"{label} file {_shown_file(old, name)} was removed")
            elif a is None:
                changes.append(f"{label} file {shown} is new")
            elif a.get("size") != b.get("size"):
                changes.append(f"{label} {shown}: size {a.get('size'):,} -> {b.get('size'):,} bytes")
            elif a.get("sha256") != b.get("sha256"):
                changes.append(f"{label} {shown}: content changed (same size, {b.get('size'):,} bytes)")
            elif a.get("mtime_ns") != b.get("mtime_ns"):
                notes.append(f"{label} {shown} was modified ({a.get('modified')} -> {b.get('modified')}) but its "
                             "content is the same")
        if len(changes) == before and old.get("resolved") != new.get("resolved"):
            notes.append(f"{label} is now read from {new.get('path')} (was {old.get('path')}), with the same content")
    return changes, notes


# --------------------------------------------------------------------------------------------------
# The record of a run
# --------------------------------------------------------------------------------------------------


class RunInputs:
    """What a run will record in ``inputs.json`` (:meth:`write`, with ``config.yaml``), after the check on resume."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def write(self, work: Path) -> Path:
        """Write ``work/inputs.json`` atomically."""
        return atomic_write_json(work / INPUTS_FILE, self.record)


def read_inputs_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``inputs.json`` (None when there is none); malformed is an error naming the file."""
    path = run_dir / INPUTS_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("inputs"), dict):
        raise DataFormatError(path, None, "expected an object with 'inputs' (the run's input fingerprints)")
    return record


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_run_inputs(cfg: Any, work: Path, resume: bool, resume_from: Path | None, allow_changed: bool = False,
                     tell: Callable[[str], None] = notify) -> RunInputs:
    """Fingerprint the inputs of ``cfg``; on ``resume``, compare them with those recorded in ``work`` first.

    Reads only (call it before the run directory is touched). Changed inputs raise :class:`InputError` (one line:
    each changed file and what changed) unless ``allow_changed``; then the change is recorded with the old and the
    new fingerprints. A run without ``inputs.json`` (made before lorma recorded inputs) is resumed with a warning.
    Returns the record to write with ``config.yaml``.
    """
    current = fingerprint_inputs(cfg)
    fresh = {"format": FORMAT, "inputs": current, "history": []}
    if not resume:
        return RunInputs(fresh)
    step = checkpoint_step(resume_from) if resume_from is not None else 0
    recorded = read_inputs_record(work)
    if recorded is None:
        tell(f"warning: {work} has no {INPUTS_FILE} (the run was made before lorma recorded its inputs): cannot "
             "check that its model and data are those it started with; recording them from now on")
        fresh["history"] = [{"event": "inputs not recorded before", "resumed_from_step": step, "time": _now()}]
        return RunInputs(fresh)
    changes, notes = compare_inputs(recorded["inputs"], current)
    if not changes or allow_changed:  # a refusal is one line: the notes only accompany a run that goes on
        for note in notes:
            tell(f"note: {note}")
    if not changes:
        return RunInputs(recorded)
    shown = "; ".join(changes[:_SHOWN_CHANGES])
    if len(changes) > _SHOWN_CHANGES:
        shown += f"; and {len(changes) - _SHOWN_CHANGES} more"
    if not allow_changed:
        raise InputError(f"--resume: the inputs of {work} changed since the run started: {shown}. The rest of the "
                         "run would train on other inputs than its first steps: start a new run (--overwrite), or "
                         f"give --allow-changed-inputs to continue anyway (recorded in {INPUTS_FILE} and "
                         f"{METRICS_FILE})")
    tell(f"warning: continuing {work} on changed inputs (--allow-changed-inputs; recorded in {INPUTS_FILE}): {shown}")
    entry = {"event": "changed inputs allowed", "allowed_by_user": True, "resumed_from_step": step, "time": _now(),
             "changes": changes, "previous": recorded["inputs"], "current": current}
    history = recorded.get("history") if isinstance(recorded.get("history"), list) else []
    return RunInputs({"format": FORMAT, "inputs": current, "history": [*history, entry]})


def input_changes(run_dir: Path) -> dict[str, Any]:
    """``{"input_changes": [...]}`` for ``metrics.json``: the run's history of resumes on changed (or unchecked)
    inputs; empty when there is none (or no ``inputs.json``, as on a process that writes nothing)."""
    try:
        record = read_inputs_record(run_dir)
    except DataFormatError:
        return {}
    history = record.get("history") if record else None
    return {"input_changes": history} if history else {}


def inputs_unchanged(run_dir: Path, cfg: Any) -> bool:
    """Whether ``run_dir`` recorded exactly the inputs ``cfg`` reads now (a run without ``inputs.json`` cannot
    tell: False). A cached result (a ``--tune`` candidate) is reused only then."""
    try:
        record = read_inputs_record(run_dir)
    except DataFormatError:
        return False
    return record is not None and not compare_inputs(record["inputs"], fingerprint_inputs(cfg))[0]


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What makes a base model compatible with an adapter: type and shapes (from a transformers config, or the
    dict of its ``config.json``)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size", "n_embd", "n_layer")
    values = config if isinstance(config, dict) else {k: getattr(config, k, None) for k in keys}
    return {k: values[k] for k in keys if values.get(k) is not None}


def run_inputs(cfg: Any) -> dict[str, str | None]:
    """Every input path the settings name, by flag (``--train-file``), read by this run or not: a run's output
    directory is never one of them, nor contains one when replaced (the cautious set; :func:`inputs_read` is what
    the run reads and fingerprints). The same :data:`ROLES`, so that the two cannot drift apart."""
    return {"--" + role.replace("_", "-"): getattr(cfg, role) for role in ROLES}
