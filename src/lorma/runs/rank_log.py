"""``RankTrackingCallback``: the rank of every LoRMA transform I(BA) during training (the paper's Fig. 7).

Every ``every_n_steps`` optimizer steps (and once before the first step and once after the last), the
callback takes ``layer.get_transform(adapter)`` of every LoRMA layer of the model (one d x d matrix, or
one per adapted part of a fused projection), and appends one JSON line per transform to
``<output_dir>/rank_log.jsonl``::

    {"step": 100, "epoch": 0.5, "module": "bert.encoder.layer.0.attention.self.query", "adapter": "default",
     "part": null, "d": 384, "inflation": "plus", "side": "pre", "rank": 384, "size": 384,
     "rtol": 4.6e-05, "tol": 5.1e-05, "sigma_max": 1.1, "sigma_min": 0.93, "cond": 1.18, "sigma_median": 1.0}

The rank is the number of singular values above ``tol = rtol * sigma_max``; ``rtol`` is the ``tol``
argument, or by default ``d * eps(float32)`` (the transform is formed in float32), see
:mod:`lorma.analysis.matrices`. All lines of one step go out in one ``write`` on a file opened for
appending, then flushed and fsync'ed, so a crash leaves whole steps only (at most a torn last line,
which :func:`read_rank_log` skips).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lorma.plumbing.errors import DataFormatError
from lorma.plumbing.fileio import dumps_json, iter_jsonl, strict_json
from lorma.runs.layout import RANK_LOG
from lorma.runs.spectrum import sv_summary

__all__ = ["RANK_LOG_NAME", "RankTrackingCallback", "rank_records", "read_rank_log", "module_key"]

RANK_LOG_NAME = RANK_LOG  # the run directory layout's name (lorma.runs.layout)
_PEFT_PREFIXES = ("base_model.model.", "module.")


def module_key(name: str) -> str:
    """A module's name without peft's / DDP's wrapper prefixes, so runs of different methods line up."""
    changed = True
    while changed:
        changed = False
        for prefix in _PEFT_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def rank_records(model: Any, rtol: float | None = None) -> list[dict[str, Any]]:
    """One rank / singular-value record per LoRMA transform in ``model`` (no step fields)."""
    from lorma.layers.base import LormaLayer

    records: list[dict[str, Any]] = []
    for name, module in model.named_modules():
        if not isinstance(module, LormaLayer):
            continue
        for adapter in module.lorma_A:
            transform = module.get_transform(adapter)
            fused = module.fused.get(adapter)
            mats = [(None, transform)] if transform.dim() == 2 else list(zip(fused[1], transform))
            for part, mat in mats:
                summary = sv_summary(mat, rtol=rtol, name=f"I(BA) of {name} ({adapter})")
                record: dict[str, Any] = {
                    "module": module_key(name),
                    "adapter": adapter,
                    "part": part,
                    "d": int(mat.shape[0]),
                    "inflation": module.inflation[adapter],
                    "side": module.side[adapter],
                }
                record.update(strict_json(summary.as_dict()))  # JSON has no inf / nan: strings
                records.append(record)
    return records


class RankTrackingCallback(TrainerCallback):
    """Log the numerical rank and singular-value summary of every I(BA) every ``every_n_steps`` steps.

    Args:
        every_n_steps: interval in optimizer steps (``state.global_step``), >= 1.
        output_dir: where ``rank_log.jsonl`` goes (created if missing).
        tol: relative tolerance (threshold = tol * sigma_max); None for ``d * eps(float32)``.
        overwrite: replace an existing non-empty log; otherwise such a log is an error at construction.
        resume: append to an existing log (a run resumed from a checkpoint); no step-0 record then.
    """

    def __init__(
        self,
        every_n_steps: int,
        output_dir: str | os.PathLike[str],
        tol: float | None = None,
        *,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"RankTrackingCallback: every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if tol is not None and not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"RankTrackingCallback: tol must be a finite number >= 0, got {tol!r}")
        self.every_n_steps = every_n_steps
        self.tol = tol
        self.overwrite = overwrite
        self.resume = resume
        self.path = Path(output_dir) / RANK_LOG_NAME
        if self.path.exists() and self.path.stat().st_size > 0 and not (overwrite or resume):
            raise FileExistsError(
                f"{self.path} already exists; pass overwrite=True to replace it or resume=True to append"
            )
        self._last_logged_step: int | None = None
        self._found_layers = False

    def _record(self, state: TrainerState, model: Any) -> None:
        if model is None or not state.is_world_process_zero:
            return
        records = rank_records(model, rtol=self.tol)
        if not records:
            if not self._found_layers:
                raise ValueError(
                    "RankTrackingCallback: the model has no LoRMA layers (lorma.layers.base.LormaLayer) to track; "
                    "it tracks I(BA) of LoRMA adapters only"
                )
            return
        self._found_layers = True
        head = {"step": int(state.global_step), "epoch": state.epoch}
        text = "".join(dumps_json({**head, **rec}, indent=None) for rec in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        self._last_logged_step = int(state.global_step)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start the log; record the initial transforms (identity for plus and pi) unless resuming."""
        if not state.is_world_process_zero:
            return
        if self.overwrite and self.path.exists():
            self.path.unlink()
            self.overwrite = False  # a second train() call on the same trainer appends
        if not self.resume:
            self._record(state, kwargs.get("model"))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Record every ``every_n_steps`` optimizer steps."""
        if state.global_step % self.every_n_steps == 0 and state.global_step != self._last_logged_step:
            self._record(state, kwargs.get("model"))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Record the final transforms if the last step was not on the interval."""
        if state.global_step != self._last_logged_step:
            self._record(state, kwargs.get("model"))


def read_rank_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``rank_log.jsonl``; a torn last line (crash mid-write) is skipped, others are errors.

    A run resumed from a checkpoint logs some steps again: for each (step, module, part, adapter) the
    last record wins, and the result is sorted by step.
    """
    records: list[dict[str, Any]] = []
    for number, rec in iter_jsonl(path):
        missing = [k for k in ("step", "module", "rank") if k not in rec]
        if missing:
            raise DataFormatError(path, number, f"record lacks {', '.join(missing)}")
        for key in ("sigma_max", "sigma_min", "cond", "tol", "rtol", "sigma_median"):
            if isinstance(rec.get(key), str):
                rec[key] = float(rec[key])
        records.append(rec)
    latest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in records:
        latest[(rec["step"], rec["module"], rec.get("part"), rec.get("adapter"))] = rec
    return sorted(latest.values(), key=lambda r: (r["step"], r["module"], str(r.get("part"))))
