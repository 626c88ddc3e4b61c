"""A ``lorma train`` run directory: its layout, and reading it back (writing it: :mod:`lorma.runs.transaction`).

``OUTPUT_DIR/``
    ``config.yaml``       the resolved settings (``--resume`` reads them back)
    ``inputs.json``       fingerprints of the model and data read (``--resume`` refuses changed ones:
                          :mod:`lorma.runs.fingerprints`)
    ``train_log.jsonl``   one line per logged step: ``{"step", "epoch", "loss", "learning_rate"}``
    ``checkpoints/``      Trainer checkpoints ``checkpoint-<step>/``
    ``rank/``             ``rank_log.jsonl`` with ``--track-rank``
    ``adapter/``          the adapter (safetensors, peft layout) + tokenizer + ``lorma_run.json``
    ``model/``            instead of ``adapter/`` for full / bitfit / head-only: the whole model
    ``eval_predictions.json``  the final evaluation's predictions and labels (the verdicts' bootstrap)
    ``metrics.json``      written last: a run with it has finished; with the main metric and whether the run
                          collapsed (:mod:`lorma.recipes.collapse`)
    ``tuning/``           with ``lorma train --tune``: one run directory per candidate (kept by ``--overwrite``)

"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import DataFormatError, InputError
from lorma.plumbing.fileio import read_json, safetensors_problem, torch_file_problem

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
    named = named_adapter_dirs(path)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        if named:
            notify(f"{path} also holds the adapters {', '.join(p.name for p in named)} (peft's folders for adapters "
                   f"not named 'default'); using the one in {path} itself; give {named[0]} to use another")
        return FinishedAdapter(path, check_adapter_dir(path), None)
    adapter = path / ADAPTER_DIR
    if (adapter / ADAPTER_CONFIG_FILE).is_file():
        config = check_adapter_dir(adapter)
        check_run_consistency(path, adapter, config)
        return FinishedAdapter(adapter, config, path)
    if len(named) == 1:
        notify(f"using {named[0]}, the one adapter in {path} (peft saves an adapter not named 'default' in a folder "
               "of its name)")
        return FinishedAdapter(named[0], check_adapter_dir(named[0]), None)
    if named:
        raise InputError(several_adapters_message(path, named))
    raise InputError(f"{path}: {missing_adapter_reason(path)}")


def named_adapter_dirs(path: Path) -> list[Path]:
    """The adapters peft saved in sub-folders of ``path`` (``save_pretrained`` puts an adapter not named
    ``default`` in a folder of its name), sorted; a run's ``adapter/`` is not one of them."""
    return sorted(p.parent for p in path.glob(f"*/{ADAPTER_CONFIG_FILE}") if p.parent.name != ADAPTER_DIR)


def several_adapters_message(path: Path, named: list[Path]) -> str:
    """Why ``path`` is refused when it holds several named adapters and none of its own: which to give instead."""
    return (f"{path} holds {len(named)} adapters ({', '.join(p.name for p in named)}), each in a folder of its "
            f"name as peft saves them: give one of them, e.g. {named[0]}")
