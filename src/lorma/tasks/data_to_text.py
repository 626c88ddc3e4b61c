"""Data-to-text generation (E2E, WebNLG, DART; paper Tables 3, 13, 16) with causal LMs.

Training pairs are ``prompt + target``: the prompt is the linearised input (an E2E MR or a triple set)
and the target one reference followed by EOS; labels are -100 on the prompt (and padding) so that the
loss is on the reference tokens only. Label smoothing is TrainingArguments' ``label_smoothing_factor``
(the presets in ``configs/nlg`` set Table 16's values).

Evaluation: the held-out loss (Trainer), then beam search on a merged copy of the model over the
held-out *inputs* (one prediction per input), with predictions written one per line and the
reference groups beside them (blank-line separated, the layout ``lorma evaluate`` reads), and the
task's metrics (:mod:`lorma.tasks.nlg_metrics`), by default from the official scorers the paper used
(which need Java; checked before training starts).

Task options (``task_options`` in the YAML, all optional): ``skip_bad`` (drop malformed records and
report how many), ``gguf_file`` (load ``model`` from a GGUF file in that folder, dequantised to fp32),
``num_beams``, ``length_penalty``, ``no_repeat_ngram_size``, ``max_new_tokens``,
``generation_batch_size`` (default: the paper's decoding, :data:`PAPER_DECODING`),
``max_generate_samples`` (decode only the first N held-out inputs), ``generate`` (false: loss only),
``scorer`` (``official``, the default, or ``approximate``: no Java, not comparable with published numbers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorma.tasks.base import Task, register_task
from lorma.tasks.decoding import (
    PAPER_DECODING,
    DecodingConfig,
    generate_texts,
    merged_copy,
    one_line,
    write_lines_atomic,
)
from lorma.tasks.readers import DataFormatError, DataToTextExample, ReadResult, read_data_to_text

__all__ = [
    "DATA_TO_TEXT_PROMPT",
    "CausalLMGenerationTask",
    "DataToTextTask",
    "build_data_to_text_prompt",
    "clean_generation",
    "encode_pair",
    "evaluate_data_to_text",
    "load_causal_lm",
]

#: prompt around a linearised input; the model continues it with the text
DATA_TO_TEXT_PROMPT = "Data: {source}\nText:"


def build_data_to_text_prompt(source: str) -> str:
    """The prompt for one linearised input."""
    return DATA_TO_TEXT_PROMPT.format(source=source)


def clean_generation(text: str) -> str:
    """A generation cut at its first newline (the prompt format ends a text there), on one line."""
    return one_line(text.strip().split("\n", 1)[0])


def encode_pair(tokenizer: Any, prompt: str, target: str, max_length: int) -> dict[str, list[int]]:
    """Token ids of ``prompt`` + ``target`` + EOS, with labels -100 on the prompt.

    Prompt and target are tokenized separately, so that the prompt's tokens are exactly those that
    generation later sees (a joint tokenization could merge tokens across the boundary). When the pair
    is longer than ``max_length``, the target is cut first; at least one target token is kept.
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        target_ids.append(tokenizer.eos_token_id)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(prompt_ids) > max_length - 1:
        prompt_ids = prompt_ids[: max_length - 1]
    target_ids = target_ids[: max_length - len(prompt_ids)]
    return {
        "input_ids": prompt_ids + target_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
        "labels": [-100] * len(prompt_ids) + target_ids,
    }


def load_causal_lm(model_path: str, gguf_file: str | None = None) -> Any:
    """``AutoModelForCausalLM`` from a folder or hub name, or from a GGUF file (dequantised to fp32).

    A GGUF model keeps transformers' quantizer record after dequantisation; it is dropped so that
    peft, merging and ``save_pretrained`` treat the model as the plain fp32 model it is.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if gguf_file:
        model = AutoModelForCausalLM.from_pretrained(model_path, gguf_file=gguf_file, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        return model
    return AutoModelForCausalLM.from_pretrained(model_path)


def _decoding_from_options(task: str, options: dict[str, Any]) -> DecodingConfig:
    base = PAPER_DECODING.get(task, DecodingConfig())
    return base.with_overrides(
        num_beams=options.get("num_beams"),
        length_penalty=options.get("length_penalty"),
        no_repeat_ngram_size=options.get("no_repeat_ngram_size"),
        max_new_tokens=options.get("max_new_tokens"),
        batch_size=options.get("generation_batch_size"),
    )


def evaluate_data_to_text(
    model: Any,
    tokenizer: Any,
    task: str,
    examples: list[DataToTextExample],
    decoding: DecodingConfig,
    output_prefix: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    scorer: str = "official",
) -> tuple[dict[str, float], list[str]]:
    """Beam search on a merged copy of ``model`` for every input, then the task's metrics (``scorer``:
    see :func:`lorma.tasks.nlg_metrics.score_data_to_text`).

    With ``output_prefix``, writes ``<prefix>.predictions.txt`` (one per line) and
    ``<prefix>.references.txt`` (groups separated by blank lines) so that ``lorma evaluate`` can
    score the files again.
    """
    from lorma.tasks.nlg_metrics import check_scoring_setup, score_data_to_text

    check_scoring_setup(task, None, scorer)  # Java missing: fail before the beam search, not after
    if not examples:
        raise ValueError("no inputs to generate for")
    missing = [ex.line for ex in examples if not ex.references]
    if missing:
        raise ValueError(f"{len(missing)} input(s) have no references (first at line {missing[0]})")
    merged = merged_copy(model)
    prompts = [build_data_to_text_prompt(ex.source) for ex in examples]
    raw = generate_texts(merged, tokenizer, prompts, decoding, progress=progress, description=f"{task} beam search")
    predictions = [clean_generation(t) for t in raw]
    references = [list(ex.references) for ex in examples]
    if output_prefix is not None:
        prefix = Path(output_prefix)
        write_lines_atomic(prefix.with_name(prefix.name + ".predictions.txt"), predictions, overwrite)
        ref_lines: list[str] = []
        for k, group in enumerate(references):
            if k:
                ref_lines.append("")
            ref_lines.extend(one_line(r) for r in group)
        write_lines_atomic(prefix.with_name(prefix.name + ".references.txt"), ref_lines, overwrite)
    return score_data_to_text(task, predictions, references, scorer=scorer), predictions


@dataclass
class _Pairs:
    """Tokenized training pairs as columns (built into a datasets.Dataset)."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: list[list[int]]

    def to_dataset(self) -> Any:
        from datasets import Dataset

        return Dataset.from_dict(
            {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}
        )


class CausalLMGenerationTask(Task):
    """Shared parts of the generation tasks: causal LM loading, prompt-masked pairs, the collator.

    Subclasses implement :meth:`read_train`, :meth:`read_eval`, :meth:`training_pairs`, and
    :meth:`generation_eval`.
    """

    peft_task_type = "CAUSAL_LM"

    def __init__(self, name: str, config: Any) -> None:
        super().__init__(name, config)
        self._tokenizer: Any = None
        self._generation_items: list[Any] = []

    # --- options -------------------------------------------------------------------------------------
    @property
    def options(self) -> dict[str, Any]:
        return dict(self.config.task_options or {})

    @property
    def skip_bad(self) -> bool:
        return bool(self.options.get("skip_bad", False))

    def decoding(self) -> DecodingConfig:
        return _decoding_from_options(self.name, self.options)

    def _error(self, message: str) -> Exception:
        from lorma.recipes.config import RecipeError

        return RecipeError(message)

    def _read(self, reader: Any, path: str, what: str) -> ReadResult[Any]:
        try:
            result = reader(path)
        except DataFormatError as err:
            raise self._error(f"{what}: {err}") from None
        message = result.skip_message()
        if message:
            print(f"lorma train: {message}")
        if not result.items:
            raise self._error(f"{what} {path}: no usable records")
        return result

    # --- Task interface ------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        cfg = self.config
        if not cfg.model:
            raise self._error(f"task '{self.name}' needs --model (a causal LM folder or hub name)")
        if not cfg.train_file:
            raise self._error(f"task '{self.name}' needs --train-file")
        self._train = self.read_train(cfg.train_file)
        self._eval = self.read_eval(cfg.eval_file) if cfg.eval_file else None
        decoding = self.decoding()
        if decoding.num_beams < 1 or decoding.max_new_tokens < 1 or decoding.batch_size < 1:
            raise self._error(f"task_options: decoding settings must be >= 1, got {decoding}")

    def data_summary(self) -> dict[str, Any]:
        """Counts for ``metrics.json``: inputs, pairs and skipped records of the files read."""
        summary: dict[str, Any] = {}
        if hasattr(self, "_train"):
            summary["train_records"] = len(self._train.items)
            summary["train_skipped"] = self._train.skipped
        if getattr(self, "_eval", None) is not None:
            summary["eval_records"] = len(self._eval.items)
            summary["eval_skipped"] = self._eval.skipped
        summary["generated_inputs"] = len(self._generation_items)
        return summary

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        gguf = self.options.get("gguf_file")
        kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(self.config.model, **kwargs)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def load_model(self, tokenizer: Any) -> Any:
        gguf = self.options.get("gguf_file")
        model = load_causal_lm(self.config.model, gguf)
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model_info = {"auto_class": "AutoModelForCausalLM", "gguf_file": gguf}
        return model

    @classmethod
    def load_model_for_merge(cls, model_path: str, model_info: dict[str, Any]) -> Any:
        return load_causal_lm(model_path, model_info.get("gguf_file"))

    def data_collator(self, tokenizer: Any) -> Any:
        from transformers import DataCollatorForSeq2Seq

        # pads input_ids with the pad token and labels with -100 (so padding is never a target)
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def build_datasets(self, tokenizer: Any) -> tuple[Any, Any]:
        if not hasattr(self, "_train"):
            self.check_inputs()
        self._tokenizer = tokenizer
        train_items = list(self._train.items)
        if self._eval is not None:
            eval_items = list(self._eval.items)
        else:  # hold out whole inputs, so that no input is both trained on and scored
            rng = random.Random(self.config.split_seed)
            order = list(range(len(train_items)))
            rng.shuffle(order)
            n_eval = max(1, int(round(len(order) * self.config.eval_split)))
            if n_eval >= len(order):
                raise self._error(f"{self.config.train_file}: too few inputs ({len(order)}) to hold some out")
            held = set(order[:n_eval])
            eval_items = [x for i, x in enumerate(train_items) if i in held]
            train_items = [x for i, x in enumerate(train_items) if i not in held]
        if self.config.max_train_samples:
            train_items = train_items[: self.config.max_train_samples]
        if self.config.max_eval_samples:
            eval_items = eval_items[: self.config.max_eval_samples]
        limit = self.options.get("max_generate_samples")
        self._generation_items = eval_items[: int(limit)] if limit else eval_items
        train = self._tokenize(tokenizer, self.training_pairs(train_items))
        held_out = self._tokenize(tokenizer, self.training_pairs(eval_items))
        return train.to_dataset(), held_out.to_dataset()

    def _tokenize(self, tokenizer: Any, pairs: list[tuple[str, str]]) -> _Pairs:
        cols = _Pairs([], [], [])
        for prompt, target in pairs:
            enc = encode_pair(tokenizer, prompt, target, self.config.max_seq_length)
            cols.input_ids.append(enc["input_ids"])
            cols.attention_mask.append(enc["attention_mask"])
            cols.labels.append(enc["labels"])
        return cols

    def evaluate(self, trainer: Any, eval_dataset: Any) -> dict[str, float]:
        out = super().evaluate(trainer, eval_dataset)
        if not self.options.get("generate", True) or not self._generation_items:
            return out
        tokenizer = self._tokenizer if self._tokenizer is not None else trainer.processing_class
        prefix = Path(self.config.output_dir) / f"{self.name}_eval" if self.config.output_dir else None
        metrics = self.generation_eval(trainer.model, tokenizer, self._generation_items, prefix)
        out.update({f"eval_{k}": float(v) for k, v in metrics.items()})
        return out

    # --- per task ------------------------------------------------------------------------------------
    def read_train(self, path: str) -> ReadResult[Any]:
        raise NotImplementedError

    def read_eval(self, path: str) -> ReadResult[Any]:
        raise NotImplementedError

    def training_pairs(self, items: list[Any]) -> list[tuple[str, str]]:
        raise NotImplementedError

    def generation_eval(self, model: Any, tokenizer: Any, items: list[Any], prefix: Path | None) -> dict[str, float]:
        raise NotImplementedError


@register_task("e2e", "webnlg", "dart")
class DataToTextTask(CausalLMGenerationTask):
    """E2E / WebNLG / DART: ``--train-file`` and ``--eval-file`` in the task's format (see readers)."""

    @property
    def scorer(self) -> str:
        """``task_options.scorer``: ``official`` (the default) or ``approximate``."""
        return str(self.options.get("scorer", "official"))

    def check_inputs(self) -> None:
        super().check_inputs()
        if self.options.get("generate", True):  # fail before training if the texts could not be scored
            from lorma.tasks.nlg_java import JavaUnavailableError, OfficialScorerError
            from lorma.tasks.nlg_metrics import WordNetUnavailableError, check_scoring_setup

            try:
                check_scoring_setup(self.name, None, self.scorer)
            except (ValueError, JavaUnavailableError, OfficialScorerError, WordNetUnavailableError) as err:
                raise self._error(f"task_options.scorer={self.scorer}: {err}") from None

    def data_summary(self) -> dict[str, Any]:
        """The counts of the files read, and what computed the scores."""
        from lorma.tasks.nlg_metrics import scorer_label

        summary = super().data_summary()
        if self.options.get("generate", True):
            summary["scorer"] = scorer_label(self.name, self.scorer)
        return summary

    def read_train(self, path: str) -> ReadResult[DataToTextExample]:
        result = self._read(lambda p: read_data_to_text(self.name, p, self.skip_bad), path, "train file")
        if not any(ex.references for ex in result.items):
            raise self._error(f"train file {path}: no references to train on")
        return result

    def read_eval(self, path: str) -> ReadResult[DataToTextExample]:
        result = self._read(lambda p: read_data_to_text(self.name, p, self.skip_bad), path, "eval file")
        missing = [ex.line for ex in result.items if not ex.references]
        if missing:
            raise self._error(f"eval file {path}:{missing[0]}: input without references (cannot be scored)")
        return result

    def training_pairs(self, items: list[DataToTextExample]) -> list[tuple[str, str]]:
        return [(build_data_to_text_prompt(ex.source), " " + ref) for ex in items for ref in ex.references]

    def generation_eval(
        self, model: Any, tokenizer: Any, items: list[DataToTextExample], prefix: Path | None
    ) -> dict[str, float]:
        # the run's output directory is guarded by the recipe (--overwrite / --resume): files in it are the run's
        from lorma.tasks.nlg_metrics import scorer_label

        metrics, _ = evaluate_data_to_text(
            model, tokenizer, self.name, items, self.decoding(), prefix, overwrite=True, scorer=self.scorer
        )
        label = scorer_label(self.name, self.scorer)
        print(f"lorma train: {self.name} scores from the {label}")
        if prefix is not None:
            summary = prefix.with_name(prefix.name + ".metrics.json")
            from lorma.fileio import atomic_write_json

            atomic_write_json(summary, {"scorer": label, "scores": metrics})
        return metrics
