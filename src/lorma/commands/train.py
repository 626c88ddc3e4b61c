"""``lorma train``: fine-tune one model with one method (after ``--tune``'s choice, if asked).

The parser only (cheap to import, so ``lorma --help`` is fast); the work is in :mod:`lorma.recipes.train` and
:mod:`lorma.recipes.tuning`, which check their input before they import torch, transformers or peft.
"""

from __future__ import annotations

import argparse
from typing import Any

from lorma.commands.run_options import add_run_options, resolve_config, wrapped
from lorma.plumbing.errors import InputError


def register(subparsers: Any) -> None:
    """Add the ``train`` subcommand."""
    from lorma.recipes.config import defaults_table

    train = subparsers.add_parser(
        "train", help="Fine-tune one model with one method.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=defaults_table(),
        description=wrapped("Fine-tune a model with LoRMA or a baseline method through HF Trainer. The output "
                    "directory receives the adapter (safetensors), config.yaml, metrics.json, train_log.jsonl "
                    "(per-step loss), eval_predictions.json and checkpoints/. With --tune, the settings are first "
                    "chosen on the training data (k-fold cross-validation on small data, else a validation split; "
                    "OUTPUT_DIR/tuning/). Works under torchrun / accelerate launch."),
    )
    add_run_options(train)
    train.add_argument("--resume", action="store_true",
                       help="Continue from the last checkpoint in --output-dir (its config.yaml is reused when "
                            "no CONFIG is given).")
    train.add_argument("--allow-changed-inputs", action="store_true",
                       help="With --resume: continue even if the model or data files changed since the run started "
                            "(refused otherwise; the change is recorded in inputs.json and metrics.json).")
    train.add_argument("--overwrite", action="store_true", help="Replace an existing run in --output-dir.")
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``lorma train``: one run (after choosing its settings on the training data, with --tune / --grid)."""
    cfg = resolve_config(args, resume=args.resume)
    from lorma.plumbing.processes import is_main_process
    from lorma.recipes.train import run_training
    from lorma.recipes.tuning import train_tuned, wants_tuning

    allow = args.allow_changed_inputs
    if allow and not args.resume:
        raise InputError("--allow-changed-inputs applies to --resume only (a new run records its inputs)")
    if wants_tuning(cfg):
        metrics = train_tuned(cfg, overwrite=args.overwrite, resume=args.resume, allow_changed_inputs=allow)
    else:
        metrics = run_training(cfg, overwrite=args.overwrite, resume=args.resume, allow_changed_inputs=allow)
    if is_main_process():
        if metrics.get("tuning"):
            from lorma.recipes.compare import print_tuning

            print_tuning(metrics["tuning"])
        print(format_run_summary(metrics, cfg.output_dir))
        if metrics.get("collapsed"):
            from lorma.recipes.collapse import collapse_advice

            print(collapse_advice(getattr(args, "argv", None), cfg, [metrics]))
    return 0


def format_run_summary(metrics: dict[str, Any], output_dir: str | None) -> str:
    """A few readable lines about a finished run."""
    lines = [f"{metrics['method']} on {metrics['task']} (seed {metrics['seed']}): {metrics['global_step']} steps, "
             f"{metrics['trainable_params']:,} trainable of {metrics['total_params']:,} parameters"]
    if metrics.get("tuning"):
        from lorma.recipes.tuning import candidate_label

        chosen = metrics["tuning"]["methods"][metrics["method"]]["chosen"]
        lines.append(f"  tuned on the training data: {candidate_label(chosen)}")
    if metrics.get("class_weights"):
        weights = ", ".join(f"{k} {v:.3g}" for k, v in metrics["class_weights"].items())
        lines.append(f"  class-weighted loss (balanced): {weights}")
    for key, value in metrics["eval"].items():
        if not key.endswith(("_runtime", "_per_second", "epoch")):
            lines.append(f"  {key:32s} {value:.4f}")
    for key, value in (metrics.get("baseline") or {}).items():
        lines.append(f"  majority baseline {key.removeprefix('eval_'):14s} {value:.4f}")
    if (metrics.get("data") or {}).get("scorer"):  # generation tasks: what computed the scores
        lines.append(f"  scorer: {metrics['data']['scorer']}")
    if metrics.get("main_metric"):
        lines.append(f"  main metric: {metrics['main_metric'].removeprefix('eval_')}")
    if metrics.get("collapsed"):
        from lorma.recipes.collapse import describe_collapse

        lines.append(f"  COLLAPSED: {describe_collapse(metrics)}")
    lines.append(f"  output: {output_dir}")
    return "\n".join(lines)
