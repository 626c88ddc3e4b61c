"""Sequence classification and regression, as in GLUE: any ``AutoModelForSequenceClassification``.

Data comes as a GLUE task folder (``train.tsv`` / ``dev.tsv`` with that task's own columns), CSV / TSV /
JSONL files with text, optional text-pair and label columns, or a saved HF dataset (``load_from_disk``).
The 8 GLUE tasks are known by name, with the paper's metrics; other data gets accuracy and macro-F1
(or Pearson / Spearman for regression). Everything about the files is checked before the model loads.

The parts: :mod:`~lorma.tasks.glue` (the GLUE table), :mod:`~lorma.tasks.classification_data` (where the data comes
from), :mod:`~lorma.tasks.readers.tabular` (CSV / TSV / JSONL), :mod:`~lorma.tasks.classification_labels` and
:mod:`~lorma.scoring.classification` (the metrics); this module is the task and its class-weighted loss.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from lorma.plumbing.errors import InputError
from lorma.scoring.classification import classification_metrics, collapse_facts, is_imbalanced
from lorma.tasks.base import Task, register_task
from lorma.tasks.classification_data import read_classification_data
from lorma.tasks.classification_labels import check_labels, fit_model_labels, label_key, labels_of
from lorma.tasks.glue import GLUE_ALIASES, GLUE_TASKS, GlueSpec
from lorma.tasks.readers.tabular import Examples, read_examples

# read_examples and the GLUE table are re-exported: they were defined here first, and tests import them from here
__all__ = [
    "GLUE_ALIASES",
    "GLUE_TASKS",
    "ClassificationTask",
    "Examples",
    "GlueSpec",
    "read_examples",
    "weighted_cross_entropy",
]

HEAD_NAMES = ("pre_classifier", "classifier", "score", "classification_head")


def weighted_cross_entropy(class_weights: np.ndarray, label_smoothing: float = 0.0) -> Callable[..., Any]:
    """A ``compute_loss_func`` for HF Trainer: cross-entropy with a weight per class."""
    import torch

    weight = torch.tensor(class_weights, dtype=torch.float32)

    def loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        losses = torch.nn.functional.cross_entropy(
            logits.float(), labels, weight=weight.to(logits.device), reduction="none", label_smoothing=label_smoothing
        )
        # Trainer treats a compute_loss_func loss as already normalised over the accumulated batch: divide the
        # sum by the number of examples in it (the balanced weights average 1 over the training rows)
        if num_items_in_batch is None:
            return losses.mean()
        return losses.sum() / num_items_in_batch

    return loss


@register_task("classification", *GLUE_TASKS)
class ClassificationTask(Task):
    """GLUE-style sequence classification / regression with ``AutoModelForSequenceClassification``."""

    peft_task_type = "SEQ_CLS"
    loss_divides_by_item_count = False  # BERT-style heads average their cross-entropy (see Task)
    supports_validation = True
    supports_folds = True  # honours config.validation_fold (--tune's k-fold cross-validation)

    def __init__(self, name: str, config: Any) -> None:
        super().__init__(GLUE_ALIASES.get(name, name), config)
        self.glue: GlueSpec | None = GLUE_TASKS.get(self.name)
        self._train: Examples | None = None
        self._eval: dict[str, Examples] | None = None
        self.label_names: list[str] | None = None  # None: regression
        self.metric_names: tuple[str, ...] = ()
        # (predictions, label ids) of the last compute_metrics call, and of the final evaluation per eval set
        self._last_predictions: tuple[np.ndarray, np.ndarray] | None = None
        self._eval_outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # --- data ---------------------------------------------------------------------------------------
    @property
    def regression(self) -> bool:
        """Regression (one float output) or classification."""
        if self.config.problem_type is not None:
            return self.config.problem_type == "regression"
        return self.glue is not None and self.glue.labels is None

    def check_inputs(self) -> None:
        """Read and check all data (files, columns, labels) and the model's label set, before any training."""
        cfg = self.config
        if cfg.model is None:
            raise InputError("no model: give --model (a local directory or a hub name)")
        if cfg.eval_file is not None and cfg.train_file is None:
            raise InputError("--eval-file needs --train-file")
        train, eval_readers = read_classification_data(self.config, self.name, self.glue)
        on_validation = cfg.eval_on == "validation"
        evals = {} if on_validation else {key: read() for key, read in eval_readers.items()}
        self.label_names = labels_of(train, self.regression, self.glue, cfg.problem_type)
        check_labels(train, self.label_names)
        for examples in evals.values():
            check_labels(examples, self.label_names)
        if self.label_names is not None and len(self.label_names) < 2:
            raise InputError(f"{train.source}: only one label ({self.label_names[0]}): nothing to classify")
        self.label_names = fit_model_labels(cfg.model, self.label_names)
        rng = np.random.default_rng(cfg.split_seed)
        if not eval_readers:
            train, held_out = self._split(train, rng, cfg.eval_split)
            evals = {} if on_validation else {"": held_out}
        if cfg.max_train_samples is not None and len(train) > cfg.max_train_samples:
            train = train.subset(np.sort(rng.permutation(len(train))[: cfg.max_train_samples]))
        if on_validation:
            # carved from exactly the final runs' training rows (the same split and sub-sample as above), with
            # its own seeded generator, so that it is the same for every method and candidate
            if getattr(cfg, "validation_fold", None) is not None:  # fold i of k (--tune's cross-validation)
                train, validation = self._fold(train, cfg.tune_folds, cfg.validation_fold,
                                               np.random.default_rng([cfg.split_seed, 2]))
            else:
                train, validation = self._split(train, np.random.default_rng([cfg.split_seed, 1]),
                                                cfg.validation_split)
            evals = {"": validation}
        if cfg.max_eval_samples is not None and not on_validation:
            evals = {k: (v.subset(np.sort(rng.permutation(len(v))[: cfg.max_eval_samples]))
                         if len(v) > cfg.max_eval_samples else v) for k, v in evals.items()}
        self._train, self._eval = train, evals
        if self.glue is not None:
            self.metric_names = self.glue.metrics if not (self.regression and self.glue.labels) else ("pearson",)
        else:
            self.metric_names = ("pearson", "spearmanr", "mse") if self.regression else ("accuracy", "macro_f1")

    def _split(self, train: Examples, rng: np.random.Generator, fraction: float) -> tuple[Examples, Examples]:
        """Hold out ``fraction`` of the training data (stratified for classification when possible)."""
        from sklearn.model_selection import train_test_split

        index = np.arange(len(train))
        stratify = None
        if self.label_names is not None:
            keys = [label_key(v) for v in train.labels]
            counts = {k: keys.count(k) for k in set(keys)}
            n_held = math.ceil(fraction * len(train))
            if min(counts.values()) >= 2 and len(counts) <= min(n_held, len(train) - n_held):
                stratify = keys
        if len(train) < 4:
            raise InputError(
                f"{train.source}: {len(train)} rows are too few to hold out an eval or validation set; "
                "give --eval-file or more data"
            )
        fit, held = train_test_split(index, test_size=fraction, stratify=stratify,
                                     random_state=int(rng.integers(2**31 - 1)))
        return train.subset(np.sort(fit)), train.subset(np.sort(held))

    def fold_assignment(self, train: Examples, folds: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        """The fold (0 to ``folds - 1``) of every training row, and whether the folds are stratified.

        scikit-learn's ``StratifiedKFold`` (shuffled, seeded from ``rng``) when every label has at least ``folds``
        rows, so that each fold keeps the labels' proportions; ``KFold`` otherwise and for regression. Determined by
        the rows and the seed alone: the same folds for every method and candidate."""
        from sklearn.model_selection import KFold, StratifiedKFold

        if len(train) < 2 * folds:
            raise InputError(f"{train.source}: {len(train)} training rows are too few for {folds} folds of at least "
                             "2 rows; give fewer --tune-folds or more data")
        seed = int(rng.integers(2**31 - 1))
        keys = None if self.label_names is None else [label_key(v) for v in train.labels]
        stratified = keys is not None and min(keys.count(k) for k in set(keys)) >= folds
        splitter = (StratifiedKFold if stratified else KFold)(n_splits=folds, shuffle=True, random_state=seed)
        assignment = np.empty(len(train), dtype=int)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(train)), keys if stratified else None)):
            assignment[held] = fold
        return assignment, stratified

    def _fold(self, train: Examples, folds: int, fold: int, rng: np.random.Generator) -> tuple[Examples, Examples]:
        """Fold ``fold`` (1 to ``folds``) of the training data held out, the other folds kept for training."""
        assignment, _ = self.fold_assignment(train, folds, rng)
        held = assignment == fold - 1
        return train.subset(np.flatnonzero(~held)), train.subset(np.flatnonzero(held))

    def cross_validation_folds(self, folds: int) -> dict[str, Any]:
        """What ``folds``-fold cross-validation of the final runs' training rows holds out: ``{"rows", "fold_rows"
        (validation rows per fold), "stratified"}`` (the folds :meth:`check_inputs` carves with ``validation_fold``)."""
        if self._train is None:
            self.check_inputs()
        assert self._train is not None
        assignment, stratified = self.fold_assignment(self._train, folds,
                                                      np.random.default_rng([self.config.split_seed, 2]))
        return {"rows": len(self._train), "fold_rows": np.bincount(assignment, minlength=folds).tolist(),
                "stratified": stratified}

    def training_rows(self) -> int:
        """How many rows the final runs train on (after the eval split and ``max_train_samples``)."""
        if self._train is None:
            self.check_inputs()
        assert self._train is not None
        return len(self._train)

    # --- model --------------------------------------------------------------------------------------
    def _model_kwargs(self) -> dict[str, Any]:
        if self.label_names is None:
            return {"num_labels": 1, "problem_type": "regression"}
        return {
            "num_labels": len(self.label_names),
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {name: i for i, name in enumerate(self.label_names)},
            "problem_type": "single_label_classification",
        }

    def load_model(self, tokenizer: Any) -> Any:
        """``AutoModelForSequenceClassification`` with the data's labels; the new head is noted for saving."""
        from transformers import AutoModelForSequenceClassification

        if self._train is None:
            self.check_inputs()
        kwargs = self._model_kwargs()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.config.model, output_loading_info=True, **kwargs
            )
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load model '{self.config.model}': {str(err).splitlines()[0]}") from None
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self._head = self._find_head(model, info.get("missing_keys", []))
        self.model_info = {
            "model_class": "AutoModelForSequenceClassification",
            "model_kwargs": {k: v for k, v in kwargs.items() if k not in ("id2label", "label2id")},
            "label_names": self.label_names,
            "head_modules": self._head,
        }
        return model

    @staticmethod
    def _find_head(model: Any, missing_keys: list[str]) -> list[str]:
        """Names of the head modules: those the checkpoint did not have (newly initialised), else known names.

        Newly initialised weights are the head whatever the architecture calls it (BERT's ``classifier``,
        Llama's ``score``, DeBERTa's ``pooler`` + ``classifier``); a checkpoint that already has a trained
        head has no missing keys, and then the usual names are used.
        """
        prefix = getattr(model, "base_model_prefix", "")
        names: set[str] = set()
        for key in missing_keys:
            parts = key.split(".")[:-1]
            if not parts:
                continue
            names.add(".".join(parts[:2]) if parts[0] == prefix and len(parts) > 1 else parts[0])
        if not names:
            names = {n for n in HEAD_NAMES if hasattr(model, n)}
        if not names:
            raise InputError(f"cannot find the classification head of {type(model).__name__}; "
                              "name it with --modules-to-save")
        return sorted(names)

    def head_module_names(self, model: Any) -> list[str]:
        """The classification head (found at load time)."""
        return list(getattr(self, "_head", None) or self._find_head(model, []))

    @classmethod
    def load_model_for_merge(cls, model_path: str, model_info: dict[str, Any]) -> Any:
        """The base model with the same head shape and labels as at training time."""
        from transformers import AutoModelForSequenceClassification

        kwargs = dict(model_info.get("model_kwargs", {}))
        labels = model_info.get("label_names")
        if labels is not None:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
        try:
            return AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
        # transformers' report of the mismatch went to its (quieted) log: load again to learn what differs
        _, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
        shown = "; ".join(f"{key} is {tuple(theirs)} there but {tuple(ours)} here"
                          for key, theirs, ours in sorted(info.get("mismatched_keys", []), reverse=True)[:3])
        what = f"{len(labels)} labels ({', '.join(labels)})" if labels is not None else "a regression head"
        raise InputError(f"base model '{model_path}' has a task head of another size than the adapter's, made for "
                          f"{what} ({shown}); merge into the base model the adapter was trained on")

    # --- datasets -----------------------------------------------------------------------------------
    def _to_dataset(self, examples: Examples, tokenizer: Any) -> Any:
        from datasets import Dataset

        if self.label_names is None:
            labels: list[Any] = [float(v) for v in examples.labels]
        else:
            index = {name: i for i, name in enumerate(self.label_names)}
            labels = [index[label_key(v)] for v in examples.labels]
        columns: dict[str, list[Any]] = {"text": examples.texts, "labels": labels}
        if examples.pairs is not None:
            columns["text_pair"] = examples.pairs
        ds = Dataset.from_dict(columns)
        max_length = self.config.max_seq_length

        def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
            return tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=max_length)

        drop = [c for c in ds.column_names if c != "labels"]
        # datasets fingerprints a map by hashing the function with everything it closes over, the whole tokenizer
        # included (dill): about half of a small run's start-up. The data is in memory (no cache file is named by
        # it), so a fingerprint of what determines the result is given instead: the input data's own fingerprint,
        # the tokenizer (class, name, vocabulary size) and the truncation length.
        fingerprint = hashlib.sha256("|".join(map(str, (
            getattr(ds, "_fingerprint", ""), type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
            len(tokenizer), max_length, examples.pairs is not None))).encode()).hexdigest()[:32]
        return ds.map(tokenize, batched=True, remove_columns=drop, desc="tokenizing", new_fingerprint=fingerprint)

    def build_datasets(self, tokenizer: Any) -> tuple[Any, Any]:
        """Tokenized train and eval datasets (eval: a dict for MNLI's matched / mismatched)."""
        if self._train is None or self._eval is None:
            self.check_inputs()
        assert self._train is not None and self._eval is not None
        train = self._to_dataset(self._train, tokenizer)
        evals = {k: self._to_dataset(v, tokenizer) for k, v in self._eval.items()}
        if list(evals) == [""]:
            return train, evals[""]
        return train, evals

    def data_collator(self, tokenizer: Any) -> Any:
        """Dynamic padding to the longest sequence of each batch."""
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    # --- metrics ------------------------------------------------------------------------------------
    def _predictions(self, logits: Any) -> np.ndarray:
        logits = logits[0] if isinstance(logits, tuple) else logits
        logits = np.asarray(logits)
        return logits.reshape(-1) if self.label_names is None else logits.argmax(axis=-1)

    def compute_metrics(self, eval_pred: Any) -> dict[str, float]:
        """The task's metrics (GLUE's by name; accuracy and macro-F1 otherwise)."""
        predictions = self._predictions(eval_pred.predictions)
        labels = np.asarray(eval_pred.label_ids)
        self._last_predictions = (predictions, labels)
        return classification_metrics(self.metric_names, predictions, labels)

    def evaluate(self, trainer: Any, eval_dataset: Any) -> dict[str, float]:
        """Trainer's evaluation of each eval set, keeping its predictions (for collapse checks and verdicts)."""
        sets = eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}
        out: dict[str, float] = {}
        self._eval_outputs = {}
        for key, dataset in sets.items():
            if dataset is None:
                continue
            self._last_predictions = None
            out.update(trainer.evaluate(dataset, metric_key_prefix=f"eval_{key}" if key else "eval"))
            if self._last_predictions is not None:
                self._eval_outputs[key] = self._last_predictions
        return out

    @property
    def metric_for_best_model(self) -> str | None:  # type: ignore[override]
        """The main metric: the paper's for a GLUE task; macro-F1 for other classification data (every class
        weighs the same, so a model that predicts the majority class cannot look good), Pearson for regression."""
        if self.glue is not None or not self.metric_names:
            return self.metric_names[0] if self.metric_names else None
        return "pearson" if self.regression else "macro_f1"

    def main_metric_reason(self) -> str:
        """Why :attr:`metric_for_best_model` is the main metric (one clause, for tables and logs)."""
        if self.glue is not None:
            return f"the metric the paper reports for {self.name}"
        if self.regression:
            return "regression: correlation with the labels"
        return "every class weighs the same, so predicting the majority class scores low"

    def eval_predictions(self) -> dict[str, dict[str, list[Any]]] | None:
        """The final evaluation's predictions and labels per eval set (class ids, or floats for regression)."""
        if not self._eval_outputs:
            return None
        return {key: {"predictions": predictions.tolist(), "labels": labels.tolist()}
                for key, (predictions, labels) in self._eval_outputs.items()}

    def _train_ids(self) -> np.ndarray:
        """The training rows' class ids (classification only)."""
        assert self.label_names is not None and self._train is not None
        index = {name: i for i, name in enumerate(self.label_names)}
        return np.array([index[label_key(v)] for v in self._train.labels])

    def collapse_report(self) -> dict[str, Any] | None:
        """Whether the final evaluation collapsed (:func:`~lorma.scoring.classification.collapse_facts`);
        ``None`` before an evaluation."""
        if not self._eval_outputs or self._train is None:
            return None
        train_ids = self._train_ids() if self.label_names is not None else None
        return collapse_facts(self.label_names, train_ids, self._eval_outputs)

    def loss_function(self) -> Callable[..., Any] | None:
        """With balanced class weights, a cross-entropy that weighs class c by n / (K n_c) on this run's training
        rows (scikit-learn's "balanced" weights), so that the rare classes count as much as the common one;
        ``None`` (the model's own loss) otherwise.

        ``class_weights: auto`` balances when the training labels are skewed
        (:func:`~lorma.scoring.classification.is_imbalanced`) and says why in ``class_weights_reason``."""
        setting = self.config.class_weighting()
        self.class_weights_reason = None
        if setting == "none" or (setting == "auto" and self.label_names is None):
            return None
        if self.label_names is None:
            raise InputError("--class-weights applies to classification; this task is regression")
        if self._train is None:
            self.check_inputs()
        from sklearn.utils.class_weight import compute_class_weight

        train_ids = self._train_ids()
        counts = np.bincount(train_ids, minlength=len(self.label_names))
        share, majority = float(counts.max() / counts.sum()), self.label_names[int(counts.argmax())]
        if setting == "auto":
            if not is_imbalanced(share, len(self.label_names)):
                return None
            self.class_weights_reason = (f"class weights balanced because the labels are skewed: '{majority}' is "
                                         f"{share:.0%} of the {counts.sum()} training rows (--class-weights none "
                                         "turns this off)")
        present = np.unique(train_ids)
        weights = np.ones(len(self.label_names))  # a class without training rows is never a target
        weights[present] = compute_class_weight("balanced", classes=present, y=train_ids)
        self.class_weights = {name: float(w) for name, w in zip(self.label_names, weights)}
        smoothing = float(self.config.training.get("label_smoothing_factor", 0.0) or 0.0)
        return weighted_cross_entropy(weights, smoothing)

    def baseline_metrics(self) -> dict[str, float] | None:
        """Always predicting the training data's most frequent label, scored on the eval data."""
        if self.label_names is None or self._train is None or self._eval is None:
            return None
        index = {name: i for i, name in enumerate(self.label_names)}
        majority = int(np.bincount(self._train_ids(), minlength=len(self.label_names)).argmax())
        out: dict[str, float] = {}
        for key, examples in self._eval.items():
            ids = np.array([index[label_key(v)] for v in examples.labels])
            prefix = f"eval_{key}_" if key else "eval_"
            scores = classification_metrics(self.metric_names, np.full_like(ids, majority), ids)
            out.update({prefix + k: v for k, v in scores.items()})
        return out

    def data_summary(self) -> dict[str, Any]:
        """Sizes and labels of the data in use (for metrics.json)."""
        return {
            "train_rows": len(self._train) if self._train is not None else None,
            "eval_rows": {k or "eval": len(v) for k, v in (self._eval or {}).items()},
            "labels": self.label_names,
        }
