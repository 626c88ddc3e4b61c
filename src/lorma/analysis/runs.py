"""Reading what a run directory holds, tolerant of what is missing.

A run directory of ``lorma train`` holds the adapter (``adapter_config.json`` +
``adapter_model.safetensors``, in the directory itself or a sub-directory), the resolved config YAML
(with the base model), ``metrics.json``, a per-step training-loss log and, with ``--track-rank``, the
``rank_log.jsonl`` of :class:`~lorma.runs.rank_log.RankTrackingCallback`. Any saved peft adapter
directory works too; then the base model comes from ``--base-model`` or the adapter's own record.
Nothing here is required except what a measurement needs; each reader returns None when its input is
absent and raises an error naming the file (and line) when it is present but malformed. The layout of a
``lorma train`` run (and which checkpoints are complete) is :mod:`lorma.runs.layout`'s; other layouts
(HF Trainer output directories, other tools' names) are recognised too. Reading a run imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorma.plumbing.fileio import read_json
from lorma.runs.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOSS_LOG,
    METRICS_FILE,
    RANK_DIR,
    RANK_LOG,
    RUN_INFO_FILE,
    TRAINER_STATE_FILE,
    missing_adapter_reason,
    named_adapter_dirs,
    read_adapter_config,
    read_yaml_settings,
    scan_checkpoints,
    several_adapters_message,
)
from lorma.runs.loss_curve import read_loss_log
from lorma.runs.method_registry import label_of, method_of_adapter_config

__all__ = ["RunInfo", "find_adapter_dir", "method_label", "read_loss_curve", "read_run"]

_ADAPTER_SUBDIRS = (ADAPTER_DIR, "final", "final_adapter", "best")
_CONFIG_NAMES = (CONFIG_FILE, "resolved_config.yaml", "run_config.yaml", "config.yml", "train_config.yaml")
_LOSS_JSONL_NAMES = ("train_loss.jsonl", "loss_log.jsonl", "losses.jsonl", LOSS_LOG, "log_history.jsonl")
_LOSS_CSV_NAMES = ("train_loss.csv", "loss_log.csv", "losses.csv")


@dataclass
class RunInfo:
    """What :func:`read_run` found in one directory (None: not there)."""

    path: Path
    label: str
    adapter_dir: Path | None
    adapter_config: dict[str, Any] | None
    config: dict[str, Any] | None
    config_path: Path | None
    base_model_hint: str | None
    metrics: dict[str, Any] | None
    loss_curve: tuple[list[float], list[float]] | None
    loss_source: Path | None
    rank_log: Path | None
    notes: list[str] = field(default_factory=list)


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first, of a run (``checkpoints/``) or a Trainer output directory."""
    found = scan_checkpoints(run_dir / CHECKPOINTS_DIR).complete + scan_checkpoints(run_dir).complete
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)


def find_adapter_dir(run_dir: Path) -> Path | None:
    """The directory holding ``adapter_config.json``: the run dir, a known sub-dir, or the newest *complete*
    checkpoint (one a kill left half-written is never measured)."""
    if (run_dir / ADAPTER_CONFIG_FILE).is_file():
        return run_dir
    for name in _ADAPTER_SUBDIRS:
        if (run_dir / name / ADAPTER_CONFIG_FILE).is_file():
            return run_dir / name
    checkpoints = [p for p in _complete_checkpoints(run_dir) if (p / ADAPTER_CONFIG_FILE).is_file()]
    if checkpoints:
        return checkpoints[0]
    others = named_adapter_dirs(run_dir)
    if len(others) > 1:  # several adapters saved side by side (peft's folders per adapter name): never one at random
        raise ValueError(several_adapters_message(run_dir, others))
    return others[0] if others else None


def read_loss_curve(run_dir: Path) -> tuple[tuple[list[float], list[float]], Path] | None:
    """The per-step training loss of a run and the file it came from, or None if there is none.

    Looks for a JSON Lines loss log, a CSV with ``step`` and ``loss`` columns, and the ``log_history`` of HF
    Trainer's ``trainer_state.json`` (the run dir's own, else the latest checkpoint's), in that order; the
    first with two points or more is read (by :func:`lorma.runs.layout.read_loss_log`).
    """
    candidates = [run_dir / name for name in (*_LOSS_JSONL_NAMES, *_LOSS_CSV_NAMES)]
    candidates += [run_dir / TRAINER_STATE_FILE] + [p / TRAINER_STATE_FILE for p in _complete_checkpoints(run_dir)]
    for path in candidates:
        if path.is_file():
            steps, losses = read_loss_log(path)
            if len(steps) >= 2:
                return (steps, losses), path
    return None


def final_ranks(adapter_config: dict[str, Any] | None) -> dict[str, int] | None:
    """The per-module ranks a rank budget left (AdaLoRMA's ``final_ranks``, peft AdaLoRA's ``rank_pattern``),
    keyed by module name without peft's prefixes; ``None`` for an adapter without a budget.

    AdaLoRMA's are in ``variant_options``; an adapter saved before that field existed has them at the top level."""
    from lorma.runs.rank_log import module_key

    if not adapter_config:
        return None
    options = adapter_config.get("variant_options")
    ranks = options.get("final_ranks") if isinstance(options, dict) else None
    if ranks is None:
        ranks = adapter_config.get("final_ranks")
    if isinstance(ranks, dict) and ranks:
        return {module_key(name): int(rank) for name, rank in ranks.items()}
    pattern = adapter_config.get("rank_pattern")
    if str(adapter_config.get("peft_type", "")).upper() == "ADALORA" and isinstance(pattern, dict) and pattern:
        # peft AdaLoRA: "<module>.lora_E" (the adapter name stripped at save) -> kept triplets
        return {module_key(name.rsplit(".lora_E", 1)[0]): int(sum(mask)) for name, mask in pattern.items()}
    return None


def method_label(adapter_config: dict[str, Any] | None, config: dict[str, Any] | None) -> str | None:
    """The run's method as :mod:`lorma.runs.method_registry` labels it (``lorma-plus``, ``lorma-pi-post``,
    ``lora``): from the run's config, else from the adapter's; another peft type by its own name."""
    if config and isinstance(config.get("method"), str):
        found: tuple[str, dict[str, Any]] | None = (config["method"], {"side": config.get("side")})
    elif adapter_config:
        found = method_of_adapter_config(adapter_config)
        if found is None:
            return str(adapter_config.get("peft_type", "")).lower() or None
    else:
        return None
    try:
        return label_of(*found)
    except ValueError:  # a method (or inflation) this version does not know: its name as the run wrote it
        return found[0]


def read_run(run_dir: str | Path) -> RunInfo:
    """Everything :mod:`lorma.analysis` can use from a run directory or a saved adapter directory."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such directory")
    notes: list[str] = []
    adapter_dir = find_adapter_dir(path)
    adapter_config = read_adapter_config(adapter_dir) if adapter_dir else None
    config_path = next((path / n for n in _CONFIG_NAMES if (path / n).is_file()), None)
    config = read_yaml_settings(config_path) if config_path else None
    hint = None
    # lorma train records the resolved base model path beside the adapter (lorma_run.json); the config's
    # ``model`` may be relative to the directory training ran from
    run_info_path = adapter_dir / RUN_INFO_FILE if adapter_dir else None
    if run_info_path is not None and run_info_path.is_file():
        run_info = read_json(run_info_path)
        if isinstance(run_info, dict) and isinstance(run_info.get("base_model"), str):
            hint = run_info["base_model"]
    if hint is None and config:
        for key in ("model", "model_name_or_path", "base_model"):
            if isinstance(config.get(key), str):
                hint = config[key]
                break
    metrics_path = path / METRICS_FILE
    metrics = read_json(metrics_path) if metrics_path.is_file() else None
    loss = read_loss_curve(path)
    # ``lorma train --track-rank`` writes it under rank/; a bare RankTrackingCallback into its output_dir
    rank_log = next((p for p in (path / RANK_LOG, path / RANK_DIR / RANK_LOG) if p.is_file()), path / RANK_LOG)
    if adapter_dir is None:
        notes.append(f"no saved adapter: {missing_adapter_reason(path)}")
    if loss is None:
        notes.append("no training-loss log found")
    label = method_label(adapter_config, config) or path.name
    return RunInfo(
        path=path,
        label=label,
        adapter_dir=adapter_dir,
        adapter_config=adapter_config,
        config=config,
        config_path=config_path,
        base_model_hint=hint,
        metrics=metrics if isinstance(metrics, dict) else None,
        loss_curve=loss[0] if loss else None,
        loss_source=loss[1] if loss else None,
        rank_log=rank_log if rank_log.is_file() else None,
        notes=notes,
    )
