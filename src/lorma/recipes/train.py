"""One training run through HF Trainer, and the layout of its output directory.

``OUTPUT_DIR/``
    ``config.yaml``       the resolved settings (written first, so a killed run can be resumed from it)
    ``train_log.jsonl``   one line per logged step: ``{"step", "epoch", "loss", "learning_rate"}``
    ``checkpoints/``      Trainer checkpoints (``--resume`` continues from the last one)
    ``adapter/``          the adapter (safetensors, peft layout) + tokenizer + ``lorma_run.json``
    ``model/``            instead of ``adapter/`` for full / bitfit / head-only: the whole model
    ``metrics.json``      eval metrics (final and best), training time, parameter counts, baseline

Because training is Trainer's, ``torchrun --nproc_per_node=N`` and ``accelerate launch`` run the same
command on several processes; only the main process writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lorma.recipes.config import (
    ADAPTER_METHODS,
    RecipeError,
    RunConfig,
    atomic_write_text,
    current_umask,
    dump_yaml,
)

RUN_INFO_FILE = "lorma_run.json"
LOSS_LOG = "train_log.jsonl"
RUN_FILES = ("config.yaml", "metrics.json", LOSS_LOG, "adapter", "model", "checkpoints")


def world_size() -> int:
    """Processes in this run (torchrun / accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def last_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step under ``output_dir/checkpoints``, if any."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def check_output_dir(output_dir: str | None, overwrite: bool, resume: bool) -> Path:
    """The output directory, refusing to touch an existing run unless ``overwrite`` or ``resume`` says so."""
    if not output_dir:
        raise RecipeError("no output directory: give --output-dir")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output directory {out} exists and is not a directory")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if last_checkpoint(out) is None:
            raise RecipeError(f"--resume: no checkpoint in {out / 'checkpoints'} to resume from")
        if overwrite:
            raise RecipeError("--resume and --overwrite contradict each other: give one")
    elif existing and not overwrite:
        raise RecipeError(
            f"output directory {out} already holds a run ({', '.join(existing)}); "
            "give --overwrite to replace it or --resume to continue it"
        )
    return out


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an older one is removed only after the new one is complete."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def weights_digest(model: Any) -> str:
    """SHA-256 of the trainable weights (names sorted): equal on every rank of one distributed run."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_loss_log(path: str | os.PathLike) -> tuple[list[int], list[float]]:
    """``(steps, losses)`` from a ``train_log.jsonl``."""
    steps: list[int] = []
    losses: list[float] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                steps.append(int(record["step"]))
                losses.append(float(record["loss"]))
    return steps, losses


def _loss_log_callback(path: Path) -> Any:
    """A TrainerCallback appending each logged training loss to ``path`` (main process only)."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Per-step training loss as JSON lines; on resume, lines past the checkpoint's step are dropped.

        Also times the optimizer steps themselves (``step_seconds``), so that seconds per step leave out
        evaluation and checkpointing, which Trainer's ``train_runtime`` includes.
        """

        step_seconds = 0.0
        steps_timed = 0
        _started: float | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._started is not None:
                self.step_seconds += time.perf_counter() - self._started
                self.steps_timed += 1
                self._started = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            kept: list[str] = []
            if path.exists() and state.global_step > 0:
                with open(path, encoding="utf-8") as fh:
                    kept = [ln for ln in fh if ln.strip() and json.loads(ln)["step"] <= state.global_step]
            atomic_write_text(path, "".join(kept))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            record = {"step": state.global_step, "epoch": state.epoch, "loss": float(logs["loss"]),
                      "learning_rate": logs.get("learning_rate")}
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    return LossLog()


def _rank_callback(every: int, output_dir: Path, resume: bool) -> Any:
    """issue 5's RankTrackingCallback (imported lazily: the analysis package is optional for training)."""
    try:
        from lorma.analysis.callback import RankTrackingCallback
    except ImportError as err:
        raise RecipeError(f"--track-rank needs lorma.analysis.callback, which cannot be imported ({err})") from None
    try:
        return RankTrackingCallback(every_n_steps=every, output_dir=str(output_dir), resume=resume)
    except TypeError:  # an older signature without resume
        return RankTrackingCallback(every_n_steps=every, output_dir=str(output_dir))


def _training_arguments(cfg: RunConfig, out: Path, has_eval: bool, task: Any) -> Any:
    from transformers import TrainingArguments

    kwargs = cfg.training_arguments()
    kwargs["output_dir"] = str(out / "checkpoints")
    by_steps = float(kwargs.get("max_steps", -1) or -1) > 0
    if has_eval and "eval_strategy" not in cfg.training:
        # evaluate every epoch (the paper reports the best epoch); with max_steps, once at the end
        kwargs["eval_strategy"] = "no" if by_steps else "epoch"
    if "save_strategy" not in cfg.training and not by_steps:
        kwargs["save_strategy"] = "epoch"
    kwargs.setdefault("save_total_limit", 2)
    # Trainer hides its bars when transformers' log level is above WARN (we quiet its load-time chatter)
    kwargs.setdefault("disable_tqdm", False)
    if "report_to" in cfg.training and kwargs.get("report_to") is None:
        kwargs["report_to"] = "none"  # `report_to: none` reads as YAML/flag null; Trainer wants the word
    elif "report_to" not in cfg.training:
        try:
            import tensorboard  # noqa: F401

            kwargs["report_to"] = ["tensorboard"]
        except ImportError:
            kwargs["report_to"] = "none"
    if task.metric_for_best_model and "metric_for_best_model" not in cfg.training:
        kwargs["metric_for_best_model"] = task.metric_for_best_model
        kwargs["greater_is_better"] = task.greater_is_better
    import torch

    if not torch.cuda.is_available():
        kwargs.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator; avoids a warning
        if world_size() > 1:
            # accelerate treats a CPU-only multi-process run as distributed only when told it is on the CPU
            kwargs.setdefault("ddp_backend", "gloo")
            kwargs.setdefault("use_cpu", True)
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"invalid training arguments: {str(err).splitlines()[0]}") from None


def _quiet_progress(trainer: Any) -> None:
    """Keep Trainer's tqdm bars but not its printing of every log dict (one per step with logging_steps=1).

    The per-step losses are in train_log.jsonl (and tensorboard); the terminal shows bars, eval results and
    the final summary.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and any(k.startswith("eval_") for k in logs) and self.training_bar is not None:
                shown = {k: round(v, 4) for k, v in logs.items() if isinstance(v, float) and k.startswith("eval_")
                         and not k.endswith(("_runtime", "_per_second"))}
                self.training_bar.write(str(shown))

    trainer.pop_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None or not trainer.args.disable_tqdm:
        trainer.add_callback(QuietProgress())


def _best_eval(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The best value of each eval metric over the evaluations during training (the paper's best epoch)."""
    best: dict[str, float] = {}
    for record in log_history:
        for key, value in record.items():
            if not key.startswith("eval_") or not isinstance(value, (int, float)) or key.endswith(
                ("_runtime", "_per_second", "_loss")
            ):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            if key.endswith(("mse", "_ter")):  # lower is better
                best[key] = min(best.get(key, math.inf), float(value))
            else:
                best[key] = max(best.get(key, -math.inf), float(value))
    return best


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What makes a base model compatible with an adapter: type and shapes."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size", "n_embd", "n_layer")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


def run_training(cfg: RunConfig, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train one run as configured; returns the metrics written to ``metrics.json``."""
    from lorma.recipes.methods import build_method_model, count_parameters
    from lorma.tasks.base import get_task

    out = check_output_dir(cfg.output_dir, overwrite, resume)
    if cfg.track_rank and not cfg.method.startswith("lorma-"):
        raise RecipeError(f"--track-rank tracks the rank of LoRMA's I(BA); method {cfg.method} has none")
    task = get_task(cfg)
    task.check_inputs()
    main = is_main_process()

    import torch
    from transformers import Trainer, set_seed

    set_seed(cfg.seed)
    tokenizer = task.load_tokenizer()
    base = task.load_model(tokenizer)
    base_fingerprint = model_fingerprint(base.config)
    model = build_method_model(base, cfg, task.head_module_names(base), task.peft_task_type)
    trainable, total = count_parameters(model)
    train_ds, eval_ds = task.build_datasets(tokenizer)
    args = _training_arguments(cfg, out, eval_ds is not None, task)
    checkpoint = last_checkpoint(out) if resume else None
    # everything is checked and built: only now touch the output directory
    if main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = cfg.to_dict()
        resolved["training"] = {k: v for k, v in cfg.training_arguments().items() if k != "seed"}
        atomic_write_text(out / "config.yaml", dump_yaml(resolved))
        if overwrite:
            for stale in ("checkpoints", "metrics.json", LOSS_LOG, "rank"):
                target = out / stale
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    loss_log = _loss_log_callback(out / LOSS_LOG)
    callbacks = [loss_log]
    if cfg.track_rank:
        # after the overwrite clean-up above, so that an old rank log is gone
        callbacks.append(_rank_callback(cfg.track_rank, out / "rank", resume))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=task.data_collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics if task.has_compute_metrics() else None,
        callbacks=callbacks,
    )
    _quiet_progress(trainer)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    eval_metrics = task.evaluate(trainer, eval_ds)
    steps = int(trainer.state.global_step)
    runtime = float(result.metrics.get("train_runtime", math.nan))
    digest = weights_digest(model)
    if world_size() > 1:  # every rank says what it trained: one model means one digest
        print(f"[rank {os.environ.get('RANK', '0')}/{world_size()}] trained weights sha256 {digest}", flush=True)

    metrics: dict[str, Any] = {
        "task": task.name,
        "method": cfg.method,
        "seed": cfg.seed,
        "eval": {k: float(v) for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        "best_eval": _best_eval(trainer.state.log_history),
        "baseline": task.baseline_metrics(),
        "train_loss": float(result.training_loss),
        "global_step": steps,
        "train_runtime": runtime,
        "seconds_per_step": loss_log.step_seconds / loss_log.steps_timed if loss_log.steps_timed else math.nan,
        "trainable_params": trainable,
        "total_params": total,
        "world_size": world_size(),
        "weights_sha256": digest,
        "resumed": bool(resume),
    }
    if hasattr(task, "data_summary"):
        metrics["data"] = task.data_summary()
    if main:
        steps_logged, losses = read_loss_log(out / LOSS_LOG) if (out / LOSS_LOG).exists() else ([], [])
        if len(steps_logged) >= 2:
            from lorma.recipes.compare import loss_auc

            metrics["loss_auc"] = float(loss_auc(steps_logged, losses))
        _save_model(cfg, out, model, tokenizer, task, base_fingerprint)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=_json_default) + "\n")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _save_model(cfg: RunConfig, out: Path, model: Any, tokenizer: Any, task: Any, fingerprint: dict[str, Any]) -> None:
    """Save the adapter (or the whole model for non-adapter methods) atomically, with the tokenizer."""
    final = out / ("adapter" if cfg.method in ADAPTER_METHODS else "model")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        model_path = cfg.model
        if model_path is not None and Path(model_path).exists():
            model_path = str(Path(model_path).resolve())
        info = {
            "base_model": model_path,
            "task": task.name,
            "method": cfg.method,
            "model_info": task.model_info,
            "base_fingerprint": fingerprint,
        }
        atomic_write_text(tmp / RUN_INFO_FILE, json.dumps(info, indent=2) + "\n")
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
