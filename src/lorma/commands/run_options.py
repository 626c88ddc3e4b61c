"""The settings flags that ``lorma train`` and ``lorma compare`` share: every RunConfig key and the common HF
TrainingArguments fields, read back into a :class:`lorma.recipes.config.RunConfig` (YAML file, then flags).

Not a subcommand (:mod:`lorma.commands` lists those). Cheap to import: the recipes are imported inside the
functions.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
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
        from lorma.runs.layout import CONFIG_FILE
        from lorma.runs.transaction import resume_source

        saved = resume_source(Path(flags["output_dir"])) / CONFIG_FILE  # an unfinished --overwrite run's, if any
        if saved.is_file():
            source = str(saved)
            yaml_values = load_yaml(source)
    return build_config(normalise_yaml(yaml_values), flags, source=source)


def wrapped(text: str) -> str:
    """A description wrapped as argparse would (the parsers whose epilog is a table print text as it is)."""
    import textwrap

    return textwrap.fill(text, 100)
