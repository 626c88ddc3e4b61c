"""The Task interface of ``lorma train``, and the registry of tasks by name.

A task turns a :class:`lorma.recipes.config.RunConfig` into everything the trainer needs: the model
(its transformers class), the datasets, the collator and the metrics. The recipes (train, compare,
merge) are written against this interface only, so a new task works with every method and command. The
config is handed in: nothing in ``lorma.tasks`` imports the recipes (which sit above the tasks).

How to add a task (e.g. ``e2e`` generation with a causal LM):

1. Create ``src/lorma/tasks/<your_module>.py`` with a subclass of :class:`Task`, decorated with
   ``@register_task("e2e")`` (several names may share one class; the name is ``self.name``).
2. Implement:

   - ``check_inputs()``: look at files and columns before anything heavy; raise
     :class:`lorma.plumbing.errors.InputError` naming the file/line/column that is wrong.
   - ``load_model(tokenizer)``: the base model (e.g. ``AutoModelForCausalLM.from_pretrained``). Record in
     ``self.model_info`` what is needed to rebuild it for ``lorma merge`` (see :meth:`Task.model_info`).
   - ``build_datasets(tokenizer)``: ``(train_dataset, eval_dataset)``, tokenized; ``eval_dataset`` may be a
     dict of named datasets (Trainer evaluates each, prefixing metrics with the name) or ``None``.
   - ``data_collator(tokenizer)``: the collator for Trainer.
   - ``compute_metrics(eval_pred)``: metrics from Trainer's predictions (or leave ``None`` and override
     :meth:`Task.evaluate`).
3. Optionally override:

   - ``evaluate(trainer, eval_dataset)``: e.g. generation with beam search and corpus BLEU (the default
     calls ``trainer.evaluate``). Return a flat ``{metric: float}`` dict, keys prefixed ``eval_``.
   - ``head_module_names(model)``: modules trained in full and saved with an adapter (a classifier
     head). Causal LMs usually return ``[]``.
   - ``callbacks()``: TrainerCallbacks added to the run (the chat task evaluates at step 0 with one).
   - ``baseline_metrics()``: a trivial baseline on the eval data (e.g. majority class), shown by compare.
   - ``peft_task_type``: the peft ``TaskType`` string (``"SEQ_CLS"``, ``"CAUSAL_LM"``).
   - ``metric_for_best_model`` / ``greater_is_better``: the main metric (``--tune`` chooses by it; the verdicts of
     ``lorma compare`` compare it).
   - ``supports_validation = True`` with ``check_inputs`` honouring ``config.eval_on == "validation"`` (train on
     the training data minus ``validation_split`` of it, evaluate on that split, never read the eval data):
     what ``--tune`` needs.
   - ``eval_predictions()``, ``collapse_report()``, ``loss_function()``: per-example predictions (for the
     bootstrap of the verdicts), whether the model collapsed to one output, a custom (e.g. class-weighted) loss.

``get_task(name)`` finds tasks in modules not yet imported by importing every module of this package
once, so a new file is all a new task needs: no table to edit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from lorma.plumbing.errors import InputError
from lorma.plumbing.named_registry import Registry


class Task:
    """One kind of training job: which model class, which data, which metrics. See the module docstring."""

    #: the peft TaskType (string) for adapters of this task, e.g. ``"SEQ_CLS"`` or ``"CAUSAL_LM"``
    peft_task_type: ClassVar[str | None] = None
    #: how ``lorma evaluate`` scores a file of this task's predictions against its references: ``"data_to_text"``
    #: (BLEU, NIST, METEOR, ROUGE-L, CIDEr, TER: :mod:`lorma.scoring.data_to_text`), ``"math"`` (answer accuracy:
    #: :mod:`lorma.scoring.math_answers`); None: not offered by ``lorma evaluate``
    scored_by: ClassVar[str | None] = None
    #: the eval metric (without ``eval_``) Trainer uses to pick the best checkpoint, if any
    metric_for_best_model: ClassVar[str | None] = None
    greater_is_better: ClassVar[bool] = True
    #: whether ``config.eval_on == "validation"`` is honoured (``--tune`` needs it)
    supports_validation: ClassVar[bool] = False
    #: whether the model's own loss divides by Trainer's ``num_items_in_batch`` (a causal LM's does). Trainer
    #: (transformers 5) passes that count to any model whose forward takes ``**kwargs`` and multiplies the loss by
    #: the number of processes, expecting a sum over the global count; a loss that is a plain mean (sequence
    #: classification) then comes out N times too large under N processes, in training (N times the step) and
    #: in eval_loss. Tasks whose loss is a mean set this False, and training turns that averaging off.
    loss_divides_by_item_count: ClassVar[bool] = True

    def __init__(self, name: str, config: Any) -> None:
        self.name = name
        self.config = config
        if getattr(config, "eval_on", "eval") == "validation" and not self.supports_validation:
            raise InputError(f"task '{name}' cannot evaluate on a validation split (eval_on / --tune): "
                              "it is supported by the classification tasks")
        #: facts about the built model that ``lorma merge`` needs to rebuild it (JSON-serialisable)
        self.model_info: dict[str, Any] = {}

    # --- must implement -------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        """Raise InputError naming the problem if data files, columns or labels are wrong. Cheap."""
        raise NotImplementedError

    def load_model(self, tokenizer: Any) -> Any:
        """The base transformers model, with its task head; fill :attr:`model_info`."""
        raise NotImplementedError

    def build_datasets(self, tokenizer: Any) -> tuple[Any, Any]:
        """``(train_dataset, eval_dataset)``: tokenized datasets (eval may be a dict of them, or None)."""
        raise NotImplementedError

    def data_collator(self, tokenizer: Any) -> Any:
        """The collator handed to Trainer."""
        raise NotImplementedError

    # --- may override ---------------------------------------------------------------------------------
    def load_tokenizer(self) -> Any:
        """The tokenizer of ``config.model`` (a pad token is added from EOS when the model has none)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def compute_metrics(self, eval_pred: Any) -> dict[str, float]:
        """Metrics from Trainer's ``EvalPrediction``; the default reports none."""
        return {}

    def has_compute_metrics(self) -> bool:
        """Whether Trainer should call :meth:`compute_metrics` (False when the subclass keeps the default)."""
        return type(self).compute_metrics is not Task.compute_metrics

    def evaluate(self, trainer: Any, eval_dataset: Any) -> dict[str, float]:
        """Final evaluation: ``trainer.evaluate`` on each eval set (flat dict, keys prefixed ``eval_``)."""
        if eval_dataset is None:
            return {}
        if isinstance(eval_dataset, dict):
            out: dict[str, float] = {}
            for key, dataset in eval_dataset.items():
                out.update(trainer.evaluate(dataset, metric_key_prefix=f"eval_{key}"))
            return out
        return dict(trainer.evaluate(eval_dataset))

    def head_module_names(self, model: Any) -> list[str]:
        """Modules trained in full (and saved with an adapter) alongside the adapter; none by default."""
        return []

    def callbacks(self) -> list[Any]:
        """TrainerCallbacks the task adds to the run (e.g. an evaluation at step 0); none by default."""
        return []

    def baseline_metrics(self) -> dict[str, float] | None:
        """A trivial baseline's eval metrics (same keys as :meth:`evaluate`), or None."""
        return None

    def main_metric_reason(self) -> str:
        """Why :attr:`metric_for_best_model` is the main metric (one clause, shown with the verdicts)."""
        return f"the main metric of task {self.name}"

    def eval_predictions(self) -> dict[str, dict[str, list[Any]]] | None:
        """``{eval set: {"predictions": [...], "labels": [...]}}`` of the final evaluation, or None."""
        return None

    def collapse_report(self) -> dict[str, Any] | None:
        """Whether the final evaluation predicts one output for every input (see the classification task)."""
        return None

    def loss_function(self) -> Callable[..., Any] | None:
        """A loss for Trainer's ``compute_loss_func``, or None for the model's own loss."""
        if getattr(self.config, "class_weights", None) not in (None, "none", "auto"):
            raise InputError(f"--class-weights applies to classification; task '{self.name}' has no classes")
        return None

    @classmethod
    def load_model_for_merge(cls, model_path: str, model_info: dict[str, Any]) -> Any:
        """Rebuild the base model recorded in ``model_info`` (for ``lorma merge``); a plain AutoModel by default."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(model_path)


# every module of lorma.tasks is imported on the first lookup that needs it, so that its @register_task runs (a
# module that fails to import is named in the "unknown task" error, not raised: the other tasks still work)
_REGISTRY: Registry[type[Task]] = Registry(Task, "task", package="lorma.tasks", skip=("base", "readers"))


def register_task(*names: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make ``lorma train --task NAME`` use this Task subclass (several names may share one)."""
    return _REGISTRY.decorator(*names)


def task_names() -> list[str]:
    """All registered task names, sorted."""
    return sorted(_REGISTRY.names())


def task_class(name: str) -> type[Task]:
    """The Task class registered under ``name``; an :class:`~lorma.plumbing.errors.UnknownNameError` (bad input)
    listing the known names otherwise."""
    return _REGISTRY.get(name)


def get_task(config: Any) -> Task:
    """The Task object for ``config.task``."""
    return task_class(config.task)(config.task, config)
