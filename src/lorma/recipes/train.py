"""One training run through HF Trainer, written into a run directory as a transaction.

The directory's layout and the transaction (lock, ``--overwrite`` written beside the old run and swapped at the
end, ``--resume`` from the newest complete checkpoint) are :mod:`lorma.runs.layout`'s; this module trains.
Every input is checked before the heavy stack (torch, transformers, peft) is imported, so bad input is an error
within moments; nothing is written before the model is built, and an error before training starts leaves the
output directory as it was.

Because training is Trainer's, ``torchrun --nproc_per_node=N`` and ``accelerate launch`` run the same
command on several processes; only the main process writes files.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import DiskFullError, InputError, RunInterrupted, WriteFailedError
from lorma.plumbing.fileio import (
    WRITE_FAILURES,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    directory_size,
    is_no_space,
    read_json,
    save_traceback,
    staged_directory,
    trim_jsonl,
    write_failure,
)
from lorma.plumbing.processes import is_main_process, world_size
from lorma.plumbing.quiet import quiet_libraries
from lorma.recipes.config import RunConfig, dump_yaml
from lorma.runs.fingerprints import check_run_inputs, input_changes, model_fingerprint, run_inputs
from lorma.runs.layout import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LOSS_LOG,
    METRICS_FILE,
    MODEL_DIR,
    RANK_DIR,
    RANK_LOG,
    RUN_FILES,
    RUN_INFO_FILE,
    TRAINER_STATE_FILE,
    TUNING_DIR,
    notify,
    scan_checkpoints,
)
from lorma.runs.loss_curve import read_loss_log
from lorma.runs.method_registry import get_method
from lorma.runs.paths import check_not_input
from lorma.runs.transaction import RunTransaction

__all__ = ["LOSS_LOG", "RUN_FILES", "RUN_INFO_FILE", "is_main_process", "quiet_libraries", "read_loss_log",
           "run_training", "weights_digest", "world_size"]


def weights_digest(model: Any) -> str:
    """SHA-256 of the trainable weights (names sorted): equal on every rank of one distributed run.

    Sharded weights (FSDP2, ZeRO-3) are gathered whole first: a collective, so every rank calls this.
    """
    from lorma.plumbing.sharding import trainable_state_dict

    digest = hashlib.sha256()
    for name, tensor in sorted(trainable_state_dict(model).items()):
        digest.update(name.encode())
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _loss_log_callback(path: Path) -> Any:
    """A TrainerCallback appending each logged training loss to ``path`` (main process only)."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Per-step training loss as JSON lines (on resume, run_training first drops lines past the checkpoint).

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

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            append_jsonl(path, {"step": state.global_step, "epoch": state.epoch, "loss": float(logs["loss"]),
                                "learning_rate": logs.get("learning_rate")})

    return LossLog()


def _rank_callback(every: int, output_dir: Path, resume: bool) -> Any:
    """The rank of every I(BA) during training (:class:`lorma.runs.rank_log.RankTrackingCallback`; imported
    here because it imports transformers)."""
    from lorma.runs.rank_log import RankTrackingCallback

    return RankTrackingCallback(every_n_steps=every, output_dir=str(output_dir), resume=resume)


def _training_arguments(cfg: RunConfig, out: Path, has_eval: bool, task: Any) -> Any:
    from transformers import TrainingArguments

    kwargs = cfg.training_arguments()
    kwargs["output_dir"] = str(out / CHECKPOINTS_DIR)
    by_steps = float(kwargs.get("max_steps", -1) or -1) > 0
    if has_eval and "eval_strategy" not in cfg.training:
        # evaluate every epoch (the paper reports the best epoch); with max_steps, once at the end
        kwargs["eval_strategy"] = "no" if by_steps else "epoch"
    if "save_strategy" not in cfg.training and not by_steps:
        kwargs["save_strategy"] = "epoch"
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
    if not task.loss_divides_by_item_count:  # a mean loss: no x N processes rescaling (tasks.base.Task)
        kwargs.setdefault("average_tokens_across_devices", False)
    if task.metric_for_best_model and "metric_for_best_model" not in cfg.training:
        kwargs["metric_for_best_model"] = task.metric_for_best_model
        kwargs["greater_is_better"] = task.greater_is_better
    import torch

    if not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise InputError("accelerate enables FSDP on GPUs only: on this CPU-only machine the FSDP config would "
                             "silently run DDP; launch with configs/distributed/ddp.yaml instead (without --cpu, "
                             "which makes accelerate start a single process)")
        kwargs.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator; avoids a warning
        if world_size() > 1:
            # accelerate treats a CPU-only multi-process run as distributed only when told it is on the CPU
            kwargs.setdefault("ddp_backend", "gloo")
            kwargs.setdefault("use_cpu", True)
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise InputError(f"invalid training arguments: {str(err).splitlines()[0]}") from None


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


def _close_progress_bars(trainer: Any) -> None:
    """Close Trainer's tqdm bars, so that a message after an interruption starts on a line of its own."""
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            for bar in (callback.training_bar, getattr(callback, "prediction_bar", None)):
                if bar is not None:
                    bar.close()


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


def _failed_write(err: BaseException) -> str | None:
    """Why the machine refused a write, when ``err`` says so (errno, or the text of torch's / safetensors'
    writers, which do not always keep the errno): no space, a file-size limit, a read-only folder, no permission."""
    if isinstance(err, DiskFullError) or is_no_space(err):
        return WRITE_FAILURES[errno.ENOSPC]
    found = write_failure(err)
    if found is not None:
        return found[0]
    text = str(err)
    if any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded")):
        return WRITE_FAILURES[errno.ENOSPC]
    return None


def _torch_write_failure(err: BaseException) -> bool:
    """torch's zip writer reports a failed write as ``unexpected pos`` or ``failed writing``, without the errno."""
    return isinstance(err, RuntimeError) and any(s in str(err) for s in ("unexpected pos", "failed writing",
                                                                         "PytorchStreamWriter"))


def disk_full_error(err: BaseException, txn: RunTransaction) -> WriteFailedError | None:
    """A one-line :class:`WriteFailedError` (:class:`DiskFullError` for a full disk) when ``err`` is a write the
    machine refused: why, what was being written in which folder, what was kept (the last complete checkpoint) and
    how to resume; ``err``'s traceback goes to :data:`~lorma.plumbing.fileio.ERROR_LOG` in the run's folder. None
    for any other error."""
    folder = txn.work if txn.work.exists() else txn.final.parent
    free = shutil.disk_usage(folder).free
    scan = scan_checkpoints(txn.checkpoints)
    newest_size = directory_size(scan.newest) if scan.newest is not None else 0
    reason = _failed_write(err)
    if reason is None and _torch_write_failure(err) and free < max(64 << 20, 2 * newest_size):
        reason = WRITE_FAILURES[errno.ENOSPC]
    if reason is None:
        return None
    skipped = scan.skipped_newer()
    what = f"checkpoint {skipped[-1][0]}" if skipped else f"the files of {txn.work}"
    log = save_traceback(err, folder)
    logged = f" (traceback in {log})" if log is not None else " (the traceback could not be saved either)"
    if reason == WRITE_FAILURES[errno.ENOSPC]:
        return DiskFullError(f"no space left on the device while writing {what} ({free / 1e6:.1f} MB free){logged}; "
                             f"free some space: {txn.describe_stop()}")
    return WriteFailedError(f"{reason} while writing {what}{logged}; {txn.describe_stop()}")


def _trim_logs(work: Path, checkpoint: Path | None, rank_log: Path) -> None:
    """Drop log lines written after the checkpoint a run resumes from (all of them when it starts from step 0):
    they will be written again."""
    step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else -1
    for log in (work / LOSS_LOG, rank_log):
        trim_jsonl(log, lambda r: int(r.get("step", -1)) <= step)


def run_training(cfg: RunConfig, overwrite: bool = False, resume: bool = False,
                 tuning: dict[str, Any] | None = None, allow_changed_inputs: bool = False) -> dict[str, Any]:
    """Train one run as configured; returns the metrics written to ``metrics.json``.

    ``tuning``: the ``--tune`` record that chose this run's settings (:mod:`lorma.recipes.tuning`): kept in
    ``metrics.json``, and its candidates (``OUTPUT_DIR/tuning/``) survive ``--overwrite``.
    ``allow_changed_inputs``: resume even if the model or data changed since the run started (recorded);
    without it that is refused (:mod:`lorma.runs.fingerprints`).

    Raises :class:`~lorma.plumbing.errors.InputError` for bad input (nothing written), :class:`RunInterrupted` on
    Ctrl-C and :class:`WriteFailedError` for a write the machine refused (:class:`DiskFullError` for a full disk;
    the run can be resumed from its last complete checkpoint after either).
    """
    from lorma.recipes.learning_rates import head_rate_trainer
    from lorma.recipes.methods import build_method_model, check_adapter_fits, count_parameters
    from lorma.tasks.base import get_task

    main = is_main_process()
    txn = RunTransaction(cfg.output_dir, overwrite=overwrite, resume=resume, main_process=main,
                         keep=(TUNING_DIR,) if tuning else ())
    check_not_input(txn.final, run_inputs(cfg), replacing=overwrite)
    method = get_method(cfg.method)
    if cfg.track_rank and (method.inflation is None or method.variant is not None):
        raise InputError(f"--track-rank tracks the rank of LoRMA's I(BA) (methods lorma-plus, lorma-pi, lorma-none); "
                         f"method {cfg.method} " + ("is a LoRMA variant" if method.variant else "has none"))
    task = get_task(cfg)
    task.check_inputs()
    inputs = check_run_inputs(cfg, txn.work, resume, txn.resume_from, allow_changed_inputs,
                              notify if main else lambda message: None)  # before the run is touched

    with txn:  # the lock: a second writer is refused from here; an error before txn.started() undoes it all
        quiet_libraries()
        import torch
        from transformers import set_seed

        set_seed(cfg.seed)
        tokenizer = task.load_tokenizer()
        base = task.load_model(tokenizer)
        base_fingerprint = model_fingerprint(base.config)
        check_adapter_fits(base, cfg)
        head_modules = task.head_module_names(base)
        model = build_method_model(base, cfg, head_modules, task.peft_task_type)
        trainable, total = count_parameters(model)
        train_ds, eval_ds = task.build_datasets(tokenizer)
        args = _training_arguments(cfg, txn.work, eval_ds is not None, task)
        loss_function = task.loss_function()
        checkpoint = txn.resume_from
        out = txn.work
        rank_log = out / RANK_DIR / RANK_LOG
        # everything is checked and built: only now touch the output directory
        if main:
            txn.prepare()
            resolved = cfg.to_dict()
            resolved["class_weights"] = cfg.class_weighting()
            resolved["training"] = {k: v for k, v in cfg.training_arguments().items() if k != "seed"}
            if cfg.learning_rate_auto:
                resolved["training"]["learning_rate"] = "auto"
            inputs.write(out)  # before config.yaml: a run with a config always has its inputs recorded
            atomic_write_text(out / CONFIG_FILE, dump_yaml(resolved))
            _trim_logs(out, checkpoint, rank_log)
            if getattr(task, "class_weights_reason", None):
                print(f"lorma: {task.class_weights_reason}", flush=True)
        modules_to_save = cfg.modules_to_save if cfg.modules_to_save is not None else head_modules
        trainer_kwargs = {
            "train_dataset": train_ds,
            "eval_dataset": eval_ds,
            "data_collator": task.data_collator(tokenizer),
            "processing_class": tokenizer,
            "compute_metrics": task.compute_metrics if task.has_compute_metrics() else None,
            "compute_loss_func": loss_function,
        }
        budget = _default_budget(cfg, args, len(train_ds))
        if budget and main:
            print(f"lorma: {budget['reason']}", flush=True)
        rates = _learning_rates(cfg, args, model, modules_to_save, trainer_kwargs, out, checkpoint is not None, main)
        args.learning_rate = rates["learning_rate"]
        trainer_cls = head_rate_trainer(modules_to_save, rates.get("head_learning_rate"))
        loss_log = _loss_log_callback(out / LOSS_LOG)
        callbacks = [loss_log, *task.callbacks()]
        if cfg.track_rank:
            callbacks.append(_rank_callback(cfg.track_rank, rank_log.parent, checkpoint is not None))
        if method.rank_budget:  # AdaLoRMA / AdaLoRA: prune to the rank budget after each step
            from lorma.plumbing.callbacks import RankAllocationCallback

            callbacks.append(RankAllocationCallback())
        trainer = trainer_cls(model=model, args=args, callbacks=callbacks, **trainer_kwargs)
        _quiet_progress(trainer)
        txn.started()
        try:
            metrics = _train_and_save(cfg, txn, trainer, task, model, tokenizer, eval_ds, loss_log, checkpoint,
                                      trainable, total, base_fingerprint, tuning, rates, budget)
        except BaseException as err:  # only Ctrl-C and a failed write become messages; the rest re-raise
            _close_progress_bars(trainer)  # so that what follows starts on a line of its own
            if isinstance(err, KeyboardInterrupt):
                raise RunInterrupted(f"stopped at step {trainer.state.global_step}; {txn.describe_stop()}") from None
            full = disk_full_error(err, txn) if isinstance(err, Exception) else None
            if full is None:
                raise
            raise full from err
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        txn.commit()
    return metrics


def _default_budget(cfg: RunConfig, args: Any, train_rows: int) -> dict[str, Any] | None:
    """With neither ``max_steps`` nor ``num_train_epochs`` given, small data gets more epochs
    (:func:`lorma.recipes.config.default_epochs`): sets ``args.num_train_epochs`` and says why; None otherwise."""
    from lorma.recipes.config import DEFAULT_TRAINING, default_epochs

    if "max_steps" in cfg.training or "num_train_epochs" in cfg.training:
        return None
    batch = args.per_device_train_batch_size * max(world_size(), 1)
    steps_per_epoch = math.ceil(math.ceil(train_rows / batch) / max(args.gradient_accumulation_steps, 1))
    base = float(DEFAULT_TRAINING["num_train_epochs"])
    epochs = default_epochs(steps_per_epoch, base)
    if epochs == base:
        return None
    args.num_train_epochs = epochs
    return {"epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "reason": f"{train_rows} training rows make {steps_per_epoch} steps per epoch: training {epochs:g} "
                      f"epochs ({int(epochs) * steps_per_epoch} steps) instead of {base:g}, so that small data gets "
                      "enough steps (--num-train-epochs or --max-steps to choose)"}


def _learning_rates(cfg: RunConfig, args: Any, model: Any, head_modules: list[str], trainer_kwargs: dict[str, Any],
                    out: Path, resuming: bool, main: bool) -> dict[str, Any]:
    """The run's learning rates: ``learning_rate`` (the body's), ``head_learning_rate`` (None: the same), and with
    ``--learning-rate auto`` the range test (``range_test``: its curve; the test's record is written to
    ``lr_range.json`` and plotted in ``lr_range.png``; a resumed run reads the record instead of testing again)."""
    from lorma.recipes.learning_rates import LR_RANGE_FILE, LR_RANGE_PLOT, run_range_test

    base = float(args.learning_rate)
    head = cfg.head_rate(base)
    rates: dict[str, Any] = {"learning_rate": base, "head_learning_rate": head}
    if not cfg.learning_rate_auto:
        return rates
    record_path = out / LR_RANGE_FILE
    if resuming and record_path.is_file():
        record = read_json(record_path)
    else:
        if main:
            print(f"lorma: learning-rate range test ({cfg.method}): sweeping from the family default "
                  f"{base:g} x 1e-2 to x 1e3", flush=True)
        test = run_range_test(model, args, base, trainer_kwargs, head_modules, head)
        record = test.to_dict()
        record["head_ratio"] = None if head is None else head / base
        if main:
            atomic_write_json(record_path, record)
            from lorma.runs.plots import plot_lr_range

            plot_lr_range(record, out / LR_RANGE_PLOT, title=f"{cfg.method}, seed {cfg.seed}")
            print(f"lorma: learning rate {record['chosen']:.3g} (a tenth of {record['lowest_at']:.3g}, where the "
                  f"smoothed loss was lowest; {record['stopped']}); curve: {out / LR_RANGE_PLOT}", flush=True)
    chosen = float(record["chosen"])
    rates["learning_rate"] = chosen
    if head is not None:
        rates["head_learning_rate"] = head * chosen / base
    rates["range_test"] = record
    return rates


def _train_and_save(cfg: RunConfig, txn: RunTransaction, trainer: Any, task: Any, model: Any, tokenizer: Any,
                    eval_ds: Any, loss_log: Any, checkpoint: Path | None, trainable: int, total: int,
                    base_fingerprint: dict[str, Any], tuning: dict[str, Any] | None = None,
                    rates: dict[str, Any] | None = None, budget: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (from ``checkpoint`` if given), evaluate, save the model and ``metrics.json`` (main process)."""
    from lorma.recipes.collapse import EVAL_PREDICTIONS, describe_collapse, outcome_fields, save_eval_predictions

    out = txn.work
    if checkpoint is not None and _training_was_done(checkpoint, trainer.args):
        train_loss, runtime = _load_finished_checkpoint(trainer, checkpoint, out / LOSS_LOG)
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        train_loss, runtime = float(result.training_loss), float(result.metrics.get("train_runtime", math.nan))
    eval_metrics = task.evaluate(trainer, eval_ds)
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
        "train_loss": train_loss,
        "global_step": int(trainer.state.global_step),
        "train_runtime": runtime,
        "seconds_per_step": loss_log.step_seconds / loss_log.steps_timed if loss_log.steps_timed else math.nan,
        "trainable_params": trainable,
        "total_params": total,
        "world_size": world_size(),
        "weights_sha256": digest,
        "resumed": txn.resume,
    }
    if rates is not None:
        metrics["learning_rate"] = {"body": rates["learning_rate"],
                                    "head": rates["head_learning_rate"] or rates["learning_rate"]}
        if "range_test" in rates:
            metrics["lr_range_test"] = rates["range_test"]
    if budget is not None:
        metrics["budget"] = budget
    if hasattr(task, "data_summary"):
        metrics["data"] = task.data_summary()
    metrics.update(outcome_fields(task))  # main metric, collapse flags, class weights
    if tuning:
        metrics["tuning"] = tuning
    metrics.update(input_changes(out))  # resumes on changed inputs (allowed) or on unrecorded ones
    # a sharded model (FSDP2, ZeRO-3) is gathered on every rank (collective) and saved whole by the main process
    from lorma.plumbing.sharding import model_is_sharded, trainable_state_dict

    whole = trainable_state_dict(model, get_method(cfg.method).adapter) if model_is_sharded(model) else None
    if is_main_process():
        steps_logged, losses = read_loss_log(out / LOSS_LOG) if (out / LOSS_LOG).exists() else ([], [])
        if len(steps_logged) >= 2:
            from lorma.runs.loss_curve import loss_auc

            metrics["loss_auc"] = float(loss_auc(steps_logged, losses))
        _save_model(cfg, out, model, tokenizer, task, base_fingerprint, whole)
        save_eval_predictions(out / EVAL_PREDICTIONS, task)
        atomic_write_json(out / METRICS_FILE, metrics)  # last: a run directory with metrics.json has finished
        warning = describe_collapse(metrics)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    return metrics


def _training_was_done(checkpoint: Path, args: Any) -> bool:
    """Whether ``checkpoint`` is at the run's last step (the run was stopped after training, while saving)."""
    state = read_json(checkpoint / TRAINER_STATE_FILE)
    planned = args.max_steps if args.max_steps > 0 else state.get("max_steps", 0)
    return int(state["global_step"]) >= int(planned) > 0


def _load_finished_checkpoint(trainer: Any, checkpoint: Path, loss_log: Path) -> tuple[float, float]:
    """Load a checkpoint at the run's last step into ``trainer`` without training; ``(train loss, runtime)``.

    ``Trainer.train`` resumed from its last step trains one batch more when that step is inside an epoch
    (transformers 5's epoch loop has no check before its first step): a step beyond ``max_steps``, which changes
    the weights unless the learning rate has decayed to 0. So the weights and state are loaded as ``train``
    loads them (its own ``_load_from_checkpoint``: adapters, full models, sharded checkpoints alike) and nothing
    is trained. The training loss is the mean of the logged per-step losses (what Trainer reports with
    ``logging_steps=1``); the runtime of a training that happened in another process is not known: NaN.
    """
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_FILE))
    _, losses = read_loss_log(loss_log) if loss_log.exists() else ([], [])
    return (sum(losses) / len(losses) if losses else math.nan), math.nan


LOAD_NOTE = """
## Loading this adapter

This is a LoRMA adapter (`peft_type` "LORMA"). peft knows the method only in a process that has run
`import lorma`: import it before `PeftModel.from_pretrained` (otherwise peft fails with `KeyError: 'LORMA'`).
"""


def _save_model(cfg: RunConfig, out: Path, model: Any, tokenizer: Any, task: Any, fingerprint: dict[str, Any],
                state_dict: dict[str, Any] | None = None) -> None:
    """Save the adapter (or the whole model for non-adapter methods) atomically, with the tokenizer.

    ``state_dict``: the weights gathered whole from a sharded model (the files are then those of an unsharded run).
    """
    final = out / (ADAPTER_DIR if get_method(cfg.method).adapter else MODEL_DIR)
    with staged_directory(final) as tmp:
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(str(tmp), safe_serialization=True, **extra)
        tokenizer.save_pretrained(str(tmp))
        if get_method(cfg.method).inflation is not None:  # a LoRMA adapter: say how to load it
            card = tmp / "README.md"
            atomic_write_text(card, (card.read_text(encoding="utf-8") if card.is_file() else "") + LOAD_NOTE)
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
        atomic_write_json(tmp / RUN_INFO_FILE, info)
