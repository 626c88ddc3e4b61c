"""One run's settings (:class:`RunConfig`), merged from an optional YAML file and command-line flags.

Every key of the YAML file is also a flag (``train_file`` <-> ``--train-file``), and any field of HF
``TrainingArguments`` can be given at the top level of the YAML file, under ``training:``, or as a flag
(``--learning-rate 4e-4``), so that a run needs no YAML file and a YAML file needs no new vocabulary.
Flags win over the file. Unknown keys are errors that name the key and the file: a typo must not be
silently ignored and leave the run with a default the user did not ask for.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.runs.method_registry import method_names, trainable_method

# Methods grouped by how large a learning rate they want. A rank-8 adapter starts at the base model and has few
# parameters, so it needs much larger steps than full fine-tuning, where every weight moves; BitFit and a head
# alone need larger ones still. One learning rate shared by all of them decides a comparison more than the
# methods do (issue 10: at a shared 4e-4 every method predicted the majority class).
# Each method's family is the registry's (lorma.runs.method_registry.Method.family).
METHOD_FAMILIES: tuple[str, ...] = ("adapter", "full", "partial")
# The default peak learning rate of each family (checked on two packaged datasets: docs/main-job.md).
DEFAULT_LEARNING_RATES: dict[str, float] = {"adapter": 1e-3, "full": 5e-5, "partial": 3e-3}
# The default learning rate of a new task head (classifier) trained beside the method's parameters; "same" trains
# it at the run's learning rate. A fresh head beside a rank-8 adapter learns faster at 5e-3 than at the adapter's
# 1e-3 (docs/main-job.md, "A result the first time"); full fine-tuning and BitFit / head-only keep one rate (not
# measured otherwise). lorma.recipes.learning_rates says why a head may want its own.
DEFAULT_HEAD_LEARNING_RATES: dict[str, float | str] = {"adapter": 5e-3, "full": "same", "partial": "same"}
# The default class weighting of the classification loss: "auto" is "balanced" when the training labels are skewed
# (lorma.scoring.classification.is_imbalanced), none otherwise; "none" never; "balanced" always. Skewed
# labels made small runs learn only the label prior (issue 22; docs/main-job.md, "A result the first time").
DEFAULT_CLASS_WEIGHTS = "auto"
CLASS_WEIGHTS = ("auto", "balanced", "none")
# The most cross-validation folds --tune-folds accepts: each fold is a full training run per candidate.
MAX_TUNE_FOLDS = 20
AUTO = "auto"  # --learning-rate auto: a learning-rate range test (lorma.recipes.learning_rates)
# The training budget when the user gives neither --max-steps nor --num-train-epochs: DEFAULT_TRAINING's epochs, but
# at least MIN_DEFAULT_STEPS optimizer steps on small data (more epochs, at most MAX_DEFAULT_EPOCHS).
MIN_DEFAULT_STEPS = 300
MAX_DEFAULT_EPOCHS = 20


def default_epochs(steps_per_epoch: int, base_epochs: float) -> float:
    """The default number of epochs for data of ``steps_per_epoch`` optimizer steps: ``base_epochs``, or enough
    epochs for :data:`MIN_DEFAULT_STEPS` steps when that is more (at most :data:`MAX_DEFAULT_EPOCHS`)."""
    needed = math.ceil(MIN_DEFAULT_STEPS / max(steps_per_epoch, 1))
    return float(max(base_epochs, min(needed, MAX_DEFAULT_EPOCHS)))


def defaults_table() -> str:
    """The recipe's defaults, one row per method family (for ``--help`` and the docs)."""
    import textwrap

    from lorma.runs.method_registry import get_method

    rows = [("family", "learning rate", "head rate", "class weights")]
    members = []
    for family in METHOD_FAMILIES:
        head = DEFAULT_HEAD_LEARNING_RATES[family]
        rows.append((family, f"{DEFAULT_LEARNING_RATES[family]:g}", head if isinstance(head, str) else f"{head:g}",
                     DEFAULT_CLASS_WEIGHTS))
        names = ", ".join(n for n in method_names() if get_method(n).family == family)  # the registry's families
        members.append(textwrap.fill(f"{family}: {names}", 100, subsequent_indent="    "))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    budget = (f"Budget when neither --max-steps nor --num-train-epochs is given: "
              f"{DEFAULT_TRAINING['num_train_epochs']:g} epochs, or more on small data so that there are at least "
              f"{MIN_DEFAULT_STEPS} optimizer steps (at most {MAX_DEFAULT_EPOCHS} epochs). Batch "
              f"{DEFAULT_TRAINING['per_device_train_batch_size']}, warm-up {DEFAULT_TRAINING['warmup_steps']:g} "
              "of the steps, linear decay. --learning-rate auto: a range test per run (per method in compare) "
              "scales both rates. class weights auto: balanced when the majority class exceeds an even share by "
              "10 points.")
    return "\n".join(["recipe defaults per method family:", *lines, "", "the methods of each family:", *members, "",
                      textwrap.fill(budget, 100)])

# Training defaults: the learning rate comes from DEFAULT_LEARNING_RATES (TrainingArguments' own 5e-5 is a
# full fine-tuning value and leaves adapters barely moving); logging every step gives the per-step loss log.
DEFAULT_TRAINING: dict[str, Any] = {
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "num_train_epochs": 3.0,
    "warmup_steps": 0.06,  # transformers 5: a float in [0, 1) is a ratio of the total steps
    "lr_scheduler_type": "linear",
    "weight_decay": 0.0,
    "logging_steps": 1,
    "save_total_limit": 2,  # checkpoints kept (a resume needs only the newest complete one)
}


@dataclass
class RunConfig:
    """The settings of one training run. ``None`` means "the task's or method's default"."""

    model: str | None = field(default=None, metadata={"help": "Base model: a local directory or a hub name."})
    task: str = field(
        default="classification",
        metadata={"help": "Task name: 'classification', a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, "
                  "rte) or one registered by another module of lorma.tasks."},
    )
    data: str | None = field(
        default=None, metadata={"help": "A GLUE task folder (train.tsv, dev.tsv) or a saved HF dataset directory."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data: CSV, TSV or JSONL."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out data: CSV, TSV or JSONL."})
    text_column: str | None = field(default=None, metadata={"help": "Column of the text (default: 'text')."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column of the second text, if any."})
    label_column: str | None = field(default=None, metadata={"help": "Column of the label (default: 'label')."})
    file_encoding: str = field(default="utf-8", metadata={"help": "Encoding of CSV/TSV/JSONL files."})
    problem_type: str | None = field(
        default=None, metadata={"help": "'classification' or 'regression' (default: from the task / labels)."}
    )
    eval_split: float = field(
        default=0.1, metadata={"help": "Fraction of the training data held out when no eval data is given."}
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed of that split and of sub-sampling (the same for every run seed)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    method: str = field(default="lorma-plus", metadata={"help": f"Fine-tuning method: {', '.join(method_names())}."})
    r: int = field(default=8, metadata={"help": "Rank of the adapter (LoRMA, LoRA, DoRA)."})
    alpha: float = field(default=8.0, metadata={"help": "Scaling numerator: s = alpha / r."})
    side: str = field(
        default="pre",
        metadata={"help": "LoRMA side: 'pre' (W = I(BA) W0), 'post' (W0 I(BA)) or 'auto' (per module the smaller)."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter path."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: the paper's set for the model type)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (default: the head)."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the run writes everything."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, shuffling and dropout."})
    track_rank: int | None = field(
        default=None, metadata={"help": "Every N steps, record the rank of I(BA) (lorma.analysis)."}
    )
    class_weights: str | None = field(
        default=None,
        metadata={"help": "'balanced': weight the classification loss by n / (classes x count of the class), so "
                  "that a rare class counts as much as a common one; 'auto': balanced when the training labels "
                  "are skewed; 'none' (default: see the defaults table)."},
    )
    head_learning_rate: str | None = field(
        default=None,
        metadata={"help": "Learning rate of the new task head (classifier): a number, or 'same' (the run's "
                  "learning rate); default: see the defaults table. Scaled with --learning-rate auto."},
    )
    eval_on: str = field(
        default="eval",
        metadata={"help": "'eval': evaluate on the eval data; 'validation': train on the training data minus "
                  "validation_split of it and evaluate on that split, never reading the eval data (what each "
                  "--tune candidate does)."},
    )
    validation_split: float = field(
        default=0.2,
        metadata={"help": "Fraction of the training data held out (stratified, seeded by split_seed, the same "
                  "for every method) to choose the --tune values when they are chosen on one split "
                  "(--tune-folds 1, or large data)."},
    )
    tune_folds: int | None = field(
        default=None,
        metadata={"help": "Folds of the cross-validation that chooses the --tune values (stratified, seeded by "
                  "split_seed, the same for every method and candidate); 1: one validation split of "
                  "validation_split; default: from the training rows (5 under 1,000, 3 under 5,000, else 1), "
                  "stated in the output."},
    )
    validation_fold: int | None = field(
        default=None,
        metadata={"help": "With eval_on validation and tune_folds K >= 2: train on the other folds and evaluate "
                  "on fold VALUE (1 to K) of the training data (what each --tune candidate does per fold)."},
    )
    tune: list[str] | None = field(
        default=None,
        metadata={"help": "Settings to choose per method by cross-validation on the training data (--tune-folds) "
                  "before the final runs, e.g. learning_rate or learning_rate,r (grids: --grid, or these "
                  "defaults; a default grid is extended when the best value is at its edge)."},
    )
    grid: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Candidate values per tuned setting (--grid KEY=V1,V2,...)."}
    )
    training: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "HF TrainingArguments fields (overrides the defaults)."}
    )
    task_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Free-form options read by the task (e.g. generation settings)."}
    )

    def training_arguments(self) -> dict[str, Any]:
        """The TrainingArguments keyword arguments: defaults (the method's learning rate), then ``training``.

        With ``learning_rate: auto`` the family's default stands in (the range test's sweep is centred on it, and
        the run replaces it with the rate the test chose)."""
        merged = dict(DEFAULT_TRAINING)
        merged["learning_rate"] = DEFAULT_LEARNING_RATES[method_family(self.method)]
        merged.update(self.training)
        if self.learning_rate_auto:
            merged["learning_rate"] = DEFAULT_LEARNING_RATES[method_family(self.method)]
        merged["seed"] = self.seed
        return merged

    @property
    def learning_rate_auto(self) -> bool:
        """Whether the learning rate is chosen by a range test (``--learning-rate auto``)."""
        return self.training.get("learning_rate") == AUTO

    def head_rate(self, learning_rate: float) -> float | None:
        """The head's learning rate for a run whose body trains at ``learning_rate``; None when it is the same."""
        value = self.head_learning_rate
        if value is None:
            value = DEFAULT_HEAD_LEARNING_RATES[method_family(self.method)]
        if isinstance(value, str) and value == "same":
            return None
        rate = float(value)
        return None if rate == learning_rate else rate

    def class_weighting(self) -> str:
        """``"auto"``, ``"balanced"`` or ``"none"``: the setting, or the default when not given."""
        return self.class_weights if self.class_weights is not None else DEFAULT_CLASS_WEIGHTS

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for the resolved ``config.yaml``)."""
        return dataclasses.asdict(self)


RUN_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunConfig)}

# TrainingArguments fields that configs and flags use most: known without importing transformers (seconds), so
# that a config made of them is checked at once. Any other name is looked up in transformers itself; a test
# keeps this set a subset of the real fields.
COMMON_TRAINING_ARGUMENTS = frozenset({
    "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "weight_decay", "warmup_steps", "lr_scheduler_type", "max_grad_norm",
    "label_smoothing_factor", "optim", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
    "save_total_limit", "logging_steps", "report_to", "dataloader_num_workers", "fp16", "bf16",
    "gradient_checkpointing", "use_cpu", "seed", "output_dir", "adam_beta1", "adam_beta2", "adam_epsilon",
    "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "save_only_model", "disable_tqdm",
    "logging_strategy", "data_seed", "ddp_backend", "dataloader_pin_memory",
})


def method_family(method: str) -> str:
    """``"adapter"``, ``"full"`` or ``"partial"`` (:data:`METHOD_FAMILIES`): the family the method registry gives
    ``method``."""
    return trainable_method(method).family


def training_argument_names() -> set[str]:
    """Names of HF TrainingArguments fields (imported lazily: transformers is slow to import)."""
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _is_training_argument(name: str, known: list[set[str]]) -> bool:
    """Whether ``name`` is a TrainingArguments field; transformers is imported only for an uncommon name."""
    if name in COMMON_TRAINING_ARGUMENTS:
        return True
    if not known:
        known.append(training_argument_names())
    return name in known[0]


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check and convert ``value`` for RunConfig field ``name``; ``where`` names the source in errors."""
    if value is None:
        return None
    kind = RUN_FIELDS[name].type
    kind = kind if isinstance(kind, str) else str(kind)
    try:
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("str"):
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [str(v) for v in value]
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except ValueError:
        raise InputError(f"{where}: '{name}' must be of type {kind}, got {value!r}") from None
    return value


def parse_scalar(text: str) -> Any:
    """A flag's (or a YAML value's) text as int, float, bool or str (so ``4e-4`` is a number, as a user means it)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def normalise_yaml(values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads ``4e-4`` as a string (YAML 1.1 needs a dot); numbers-as-text become numbers here."""
    out = dict(values)
    if isinstance(out.get("training"), dict):
        out["training"] = {k: parse_scalar(v) if isinstance(v, str) else v for k, v in out["training"].items()}
    return {k: parse_scalar(v) if isinstance(v, str) and k not in ("model", "data", "output_dir", "task",
                                                                   "train_file", "eval_file") else v
            for k, v in out.items()}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file (and line, for syntax errors)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}")
    try:
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{p}:{at} invalid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{p}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(
    yaml_values: dict[str, Any] | None = None,
    flag_values: dict[str, Any] | None = None,
    source: str = "config",
) -> RunConfig:
    """Merge YAML values and flag values (flags win) into a checked :class:`RunConfig`.

    Keys that are not RunConfig fields but are TrainingArguments fields go to ``training``; anything
    else is an error naming the key and where it came from.
    """
    ta_names: list[set[str]] = []  # filled on first need
    values: dict[str, Any] = {}
    training: dict[str, Any] = {}
    for where, mapping in ((source, yaml_values or {}), ("command line", flag_values or {})):
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name == "training":
                if not isinstance(value, dict):
                    raise InputError(f"{where}: 'training' must be a mapping of TrainingArguments fields")
                for tkey, tval in value.items():
                    if tkey == "warmup_ratio" and not _is_training_argument(tkey, ta_names):
                        tkey = "warmup_steps"
                    if not _is_training_argument(tkey, ta_names):
                        raise InputError(f"{where}: training.{tkey} is not a field of transformers TrainingArguments")
                    training[tkey] = tval
                continue
            if name in RUN_FIELDS:
                if name in ("task_options", "grid"):
                    values.setdefault(name, {}).update(_coerce(name, value, where) or {})
                else:
                    values[name] = _coerce(name, value, where)
                continue
            if name == "warmup_ratio" and not _is_training_argument(name, ta_names):
                # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio); the
                # paper's tables and older configs say warmup_ratio
                name = "warmup_steps"
            if _is_training_argument(name, ta_names):
                if name in ("seed", "output_dir"):
                    values[name] = _coerce(name, value, where)
                else:
                    training[name] = value
                continue
            raise InputError(
                f"{where}: unknown key '{key}' (neither a lorma run setting nor a TrainingArguments field)"
            )
    values["training"] = training
    cfg = RunConfig(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: RunConfig) -> None:
    """Errors for settings that are wrong on their face, before any model or data is touched."""
    trainable_method(cfg.method)
    if cfg.side not in ("pre", "post", "auto"):
        raise InputError(f"unknown side '{cfg.side}'; expected 'pre', 'post' or 'auto'")
    if cfg.r <= 0:
        raise InputError(f"r must be a positive integer, got {cfg.r}")
    if not math.isfinite(cfg.alpha) or cfg.alpha <= 0:
        raise InputError(f"alpha must be a positive finite number, got {cfg.alpha}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 < cfg.eval_split < 1.0:
        raise InputError(f"eval_split must be in (0, 1), got {cfg.eval_split}")
    if cfg.max_seq_length <= 0:
        raise InputError(f"max_seq_length must be positive, got {cfg.max_seq_length}")
    if cfg.problem_type not in (None, "classification", "regression"):
        raise InputError(f"problem_type must be 'classification' or 'regression', got '{cfg.problem_type}'")
    if cfg.class_weights not in (None, *CLASS_WEIGHTS):
        raise InputError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, got '{cfg.class_weights}'")
    if cfg.head_learning_rate is not None and cfg.head_learning_rate != "same":
        try:
            head = float(cfg.head_learning_rate)
        except ValueError:
            head = math.nan
        if not math.isfinite(head) or head <= 0:
            raise InputError(f"head_learning_rate must be a positive finite number or 'same', got "
                              f"'{cfg.head_learning_rate}'")
    if cfg.eval_on not in ("eval", "validation"):
        raise InputError(f"eval_on must be 'eval' or 'validation', got '{cfg.eval_on}'")
    if not 0.0 < cfg.validation_split < 1.0:
        raise InputError(f"validation_split must be in (0, 1), got {cfg.validation_split}")
    if cfg.tune_folds is not None and not 1 <= cfg.tune_folds <= MAX_TUNE_FOLDS:
        raise InputError(f"tune_folds must be from 1 (one validation split) to {MAX_TUNE_FOLDS}, got {cfg.tune_folds}")
    if cfg.validation_fold is not None:
        if cfg.tune_folds is None or cfg.tune_folds < 2:
            raise InputError(f"validation_fold {cfg.validation_fold} needs tune_folds of 2 or more (the number of "
                             f"folds), got {cfg.tune_folds}")
        if not 1 <= cfg.validation_fold <= cfg.tune_folds:
            raise InputError(f"validation_fold must be from 1 to tune_folds ({cfg.tune_folds}), got "
                             f"{cfg.validation_fold}")
    if cfg.track_rank is not None and cfg.track_rank <= 0:
        raise InputError(f"track_rank must be a positive number of steps, got {cfg.track_rank}")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise InputError(f"{key} must be positive, got {value}")
    validate_training(cfg.training)


# Numeric TrainingArguments checked before anything runs: Trainer accepts some nonsense silently (max_steps 0
# trains a step, a negative max_steps is ignored and 3 epochs run, a NaN learning rate trains to NaN).
# name -> (kind, lowest, lowest allowed?, highest or None); kind "int" or "float"
_TRAINING_BOUNDS: dict[str, tuple[str, float, bool, float | None]] = {
    "max_steps": ("int", 1, True, None),
    "num_train_epochs": ("float", 0, False, None),
    "learning_rate": ("float", 0, False, None),
    "per_device_train_batch_size": ("int", 1, True, None),
    "per_device_eval_batch_size": ("int", 1, True, None),
    "gradient_accumulation_steps": ("int", 1, True, None),
    "save_total_limit": ("int", 1, True, None),
    "dataloader_num_workers": ("int", 0, True, None),
    "warmup_steps": ("float", 0, True, None),
    "weight_decay": ("float", 0, True, None),
    "max_grad_norm": ("float", 0, True, None),
    "label_smoothing_factor": ("float", 0, True, 1),
    "logging_steps": ("float", 0, False, None),
    "save_steps": ("float", 0, False, None),
    "eval_steps": ("float", 0, False, None),
}


def validate_training(training: dict[str, Any]) -> None:
    """Errors for TrainingArguments values that are not numbers, not finite, or out of range."""
    for name, (kind, low, low_ok, high) in _TRAINING_BOUNDS.items():
        if name not in training or training[name] is None or (name == "learning_rate" and training[name] == AUTO):
            continue
        value = training[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value}")
        if kind == "int" and not float(value).is_integer():
            raise InputError(f"{name} must be a whole number, got {value}")
        if value < low or (value == low and not low_ok) or (high is not None and value >= high):
            bound = f">= {low:g}" if low_ok else f"> {low:g}"
            bound += f" and < {high:g}" if high is not None else ""
            hint = " (leave it out to train --num-train-epochs epochs)" if name == "max_steps" else ""
            raise InputError(f"{name} must be {bound}, got {value}{hint}")


def dump_yaml(values: dict[str, Any]) -> str:
    """YAML text of a config dict, keys in field order."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
