"""The generic causal-LM generation task: what the data-to-text, math and chat tasks share.

A subclass reads its files (:meth:`CausalLMGenerationTask.read_train` / ``read_eval``), says what one
training row is made of (:meth:`~CausalLMGenerationTask.training_examples`) and how it is tokenized
(:meth:`~CausalLMGenerationTask.encode_example`: by default a ``(prompt, target)`` pair with labels -100 on the
prompt), and scores generations (:meth:`~CausalLMGenerationTask.generation_eval`). Loading the model (also
from a GGUF file), holding out whole inputs, the collator and the final evaluation are here.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.tasks.base import Task
from lorma.tasks.decoding import PAPER_DECODING, DecodingConfig
from lorma.tasks.readers import DataFormatError, ReadResult

__all__ = [
    "CausalLMGenerationTask",
    "TokenizedColumns",
    "decoding_from_options",
    "encode_pair",
    "gguf_parsed_once",
    "load_causal_lm",
    "load_causal_lm_tokenizer",
    "save_gguf_as_checkpoint",
]


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


_GGUF_LOCK = threading.RLock()
_gguf_shared = False  # an outer block of this thread (the lock's holder) shares them already


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Inside this block each GGUF file is parsed once, and gguf's tensor-name map built once per architecture.

    transformers 5 parses a GGUF file again for the config, for the weights and for the tokenizer (gguf-py's reader
    walks every vocabulary entry in Python: about 8 s a time for SmolLM2-135M on this machine), and builds gguf's
    ``TensorNameMap`` again for every module of the model (397 times for SmolLM2). Both are functions of their
    arguments alone, and transformers only reads what they return, so one of each is shared: what is loaded is the
    same (the checkpoint :func:`save_gguf_as_checkpoint` writes is byte-identical; 36 s -> 12 s). Written here
    because transformers' GGUF loader takes a path, never a parsed file. The two names are put back on the ``gguf``
    module when the outermost block ends; blocks nest, and one thread at a time holds them.
    """
    global _gguf_shared
    try:
        import gguf
    except ImportError:  # transformers' GGUF loader says what to install
        yield
        return
    with _GGUF_LOCK:
        if _gguf_shared:  # nested: the outer block restores gguf when it ends
            yield
            return
        reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        parsed: dict[tuple[str, str], Any] = {}

        def parse_once(path: str | os.PathLike[str], mode: str = "r") -> Any:
            key = (os.path.realpath(path), mode)
            if key not in parsed:
                parsed[key] = reader(path, mode)
            return parsed[key]

        gguf.GGUFReader, gguf.get_tensor_name_map = parse_once, functools.lru_cache(maxsize=None)(name_map)
        _gguf_shared = True
        try:
            yield
        finally:
            _gguf_shared = False
            gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def load_causal_lm(model_path: str, gguf_file: str | None = None) -> Any:
    """``AutoModelForCausalLM`` from a folder or hub name, or from a GGUF file (dequantised to fp32).

    A GGUF model keeps transformers' quantizer record after dequantisation; it is dropped so that
    peft, merging and ``save_pretrained`` treat the model as the plain fp32 model it is.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if gguf_file:
        with gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(model_path, gguf_file=gguf_file, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        return model
    return AutoModelForCausalLM.from_pretrained(model_path)


def load_causal_lm_tokenizer(model_path: str, gguf_file: str | None = None) -> Any:
    """``AutoTokenizer`` from a folder or hub name, or from the vocabulary inside a GGUF file."""
    from transformers import AutoTokenizer

    if gguf_file:
        with gguf_parsed_once():
            return AutoTokenizer.from_pretrained(model_path, gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(model_path)


def save_gguf_as_checkpoint(model_path: str, gguf_file: str, out: Path) -> Path:
    """The model and tokenizer of a GGUF file, dequantised to fp32 and saved as a plain checkpoint in ``out``.

    Loading from GGUF dequantises in Python and parses the file's vocabulary (about 12 s for SmolLM2-135M here, model
    and tokenizer, with the file parsed once for both: :func:`gguf_parsed_once`); loading the checkpoint takes under
    a second. A process that loads a GGUF model more than once converts it once, here, and loads the checkpoint
    after (what the study does with the packaged SmolLM2)."""
    with gguf_parsed_once():
        load_causal_lm(model_path, gguf_file).save_pretrained(out)
        load_causal_lm_tokenizer(model_path, gguf_file).save_pretrained(out)
    return out


def decoding_from_options(task: str, options: dict[str, Any]) -> DecodingConfig:
    """The paper's decoding for ``task`` (greedy for others), with the decoding ``task_options`` given."""
    base = PAPER_DECODING.get(task, DecodingConfig())
    return base.with_overrides(
        num_beams=options.get("num_beams"),
        length_penalty=options.get("length_penalty"),
        no_repeat_ngram_size=options.get("no_repeat_ngram_size"),
        max_new_tokens=options.get("max_new_tokens"),
        batch_size=options.get("generation_batch_size"),
    )


@dataclass
class TokenizedColumns:
    """Tokenized training rows as columns (built into a datasets.Dataset)."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    labels: list[list[int]]

    def to_dataset(self) -> Any:
        from datasets import Dataset

        return Dataset.from_dict(
            {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}
        )


class CausalLMGenerationTask(Task):
    """Shared parts of the generation tasks: causal LM loading, held-out split, tokenization, the collator.

    Subclasses implement :meth:`read_train`, :meth:`read_eval`, :meth:`training_examples` and
    :meth:`generation_eval`. One training row is made by :meth:`encode_example` from one item of
    :meth:`training_examples`: by default a ``(prompt, target)`` pair with the loss on the target
    (:func:`encode_pair`); a task whose rows have another shape (a conversation whose every assistant turn is
    a target) overrides it.
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
        """The decoding settings: the paper's for this task (:data:`PAPER_DECODING`), with ``task_options``
        overrides."""
        return decoding_from_options(self.name, self.options)

    def _error(self, message: str) -> Exception:
        return InputError(message)

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
        tokenizer = load_causal_lm_tokenizer(self.config.model, self.options.get("gguf_file"))
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
        train = self._tokenize(tokenizer, self.training_examples(train_items), "training")
        held_out_examples = self.training_examples(eval_items)
        loss_limit = self.options.get("max_loss_samples")  # the held-out loss's pairs (decoding keeps every input)
        if loss_limit:
            held_out_examples = held_out_examples[: int(loss_limit)]
        held_out = self._tokenize(tokenizer, held_out_examples, "held-out")
        return train.to_dataset(), held_out.to_dataset()

    def _tokenize(self, tokenizer: Any, examples: list[Any], what: str) -> TokenizedColumns:
        """Every example through :meth:`encode_example`; an error when none is left."""
        cols = TokenizedColumns([], [], [])
        for example in examples:
            enc = self.encode_example(tokenizer, example)
            if enc is None:
                continue
            cols.input_ids.append(enc["input_ids"])
            cols.attention_mask.append(enc.get("attention_mask", [1] * len(enc["input_ids"])))
            cols.labels.append(enc["labels"])
        if examples and not cols.input_ids:
            raise self._error(f"no {what} example keeps a target token within max_seq_length="
                              f"{self.config.max_seq_length}")
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

    def training_examples(self, items: list[Any]) -> list[Any]:
        """What the rows are made of, from the records read: by default ``(prompt, target)`` pairs."""
        raise NotImplementedError

    def encode_example(self, tokenizer: Any, example: Any) -> dict[str, list[int]] | None:
        """One training row from one item of :meth:`training_examples`: ``input_ids`` and ``labels`` (-100 where
        there is no loss; ``attention_mask`` optional), or None to leave the example out (e.g. every target
        token cut by ``max_seq_length``). The default encodes a ``(prompt, target)`` pair with :func:`encode_pair`.
        """
        prompt, target = example
        return encode_pair(tokenizer, prompt, target, self.config.max_seq_length)

    def generation_eval(self, model: Any, tokenizer: Any, items: list[Any], prefix: Path | None) -> dict[str, float]:
        raise NotImplementedError
