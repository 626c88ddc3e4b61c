"""Chat / instruction tuning of a causal LM (``lorma train --task chat``): the model's own chat template, loss on
the assistant's tokens only.

Data (``--train-file``, optional ``--eval-file``): conversations, read by :mod:`lorma.tasks.readers.chat`
(``messages`` records, or prompt / response columns). Masks: :mod:`lorma.tasks.chat_template` renders each
conversation with the model's chat template and labels the assistant turns only (every one of them).

Evaluation, in ``metrics.json``: ``eval_loss_before_training`` / ``eval_perplexity_before_training`` (the model
at step 0, computed when training starts) and ``eval_loss`` / ``eval_perplexity`` (after training). The loss is
the mean negative log-likelihood per assistant token of the held-out conversations (token-weighted, so that the
perplexity is ``exp`` of it; Trainer's own ``eval_loss`` averages per batch). Then a few held-out conversations
are continued by greedy decoding (on a merged copy) and written to ``chat_samples.jsonl`` in the run directory,
with the reference reply beside each.

Task options (``--task-option KEY=VALUE``): ``chat_template`` (a Jinja file, or the template text, for a model
without one), ``prompt_column`` / ``response_column`` / ``system_column``, ``packing`` (true: each batch is one
row of concatenated conversations with per-conversation position ids, transformers'
``DataCollatorWithFlattening``; no padding, and attention never crosses a conversation), ``max_generate_samples``
(default 4; 0 for none), ``max_new_tokens`` (default 64), ``skip_bad``, ``gguf_file``. Length grouping is
Trainer's own ``--training-arg group_by_length=true``.

``python -m lorma.tasks.chat DIR`` writes the chatterbot-corpus conversations (PyPI; BSD) as ``DIR/train.jsonl``
and ``DIR/test.jsonl`` (:func:`lorma.tasks.readers.chat.write_chatterbot_jsonl`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorma.tasks.base import register_task
from lorma.tasks.chat_template import encode_conversation, render_conversation, resolve_chat_template
from lorma.tasks.decoding import DecodingConfig
from lorma.tasks.generation import CausalLMGenerationTask
from lorma.tasks.readers.chat import ChatExample, read_chat, write_chatterbot_jsonl
from lorma.tasks.readers.records import DataFormatError, ReadResult

__all__ = ["BEFORE_TRAINING_FILE", "SAMPLES_FILE", "ChatTask", "heldout_nll"]

#: where the step-0 evaluation is kept, in the run directory (read back on --resume)
BEFORE_TRAINING_FILE = "eval_before_training.json"
#: generated replies to held-out conversations, in the run directory
SAMPLES_FILE = "chat_samples.jsonl"


def heldout_nll(model: Any, dataset: Any, collator: Any, batch_size: int, description: str) -> dict[str, float]:
    """Mean negative log-likelihood per target token (labels != -100) over ``dataset``, its perplexity, and the
    number of target tokens. Every process computes it on the whole set (forward passes of a sharded model are
    collective, so all ranks must take part); the result is the same on each."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from lorma.plumbing.processes import is_main_process

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            starts = range(0, len(dataset), batch_size)
            for start in tqdm(starts, desc=description, unit="batch", disable=not is_main_process()):
                rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = {k: v.to(device) for k, v in collator(rows).items()}
                labels = batch.pop("labels")
                # no cache: with one, transformers does not isolate the conversations of a packed row
                logits = model(**batch, use_cache=False).logits.float()
                # position t predicts token t + 1 (a packed batch marks conversation starts -100 in labels)
                shifted = labels[:, 1:]
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                      ignore_index=-100, reduction="sum")
                total += float(nll)
                count += int((shifted != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the held-out conversations have no assistant tokens left after truncation")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(count)}


def _before_training_callback(task: ChatTask) -> Any:
    """A TrainerCallback evaluating the held-out set at step 0 (on a resumed run: read back from the run)."""
    from transformers import TrainerCallback

    from lorma.plumbing.fileio import atomic_write_json, read_json
    from lorma.plumbing.processes import is_main_process

    class BeforeTraining(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            saved = Path(args.output_dir).parent / BEFORE_TRAINING_FILE
            if saved.is_file():
                task.before_training = read_json(saved)
                return
            if state.global_step > 0 or task.held_out is None:
                return  # a resumed run whose step-0 numbers were never written: none rather than wrong ones
            task.before_training = task.held_out_metrics(model, "held-out loss before training")
            if is_main_process():
                atomic_write_json(saved, task.before_training)

    return BeforeTraining()


@register_task("chat")
class ChatTask(CausalLMGenerationTask):
    """Instruction / chat tuning with loss on assistant turns; held-out loss and perplexity before and after."""

    def __init__(self, name: str, config: Any) -> None:
        super().__init__(name, config)
        self.held_out: Any = None
        self.before_training: dict[str, float] | None = None

    def _read_chat(self, path: str, what: str) -> ReadResult[ChatExample]:
        o = self.options
        return self._read(lambda p: read_chat(p, self.skip_bad, str(o.get("prompt_column", "prompt")),
                                              str(o.get("response_column", "response")),
                                              str(o.get("system_column", "system"))), path, what)

    def read_train(self, path: str) -> ReadResult[ChatExample]:
        return self._read_chat(path, "train file")

    def read_eval(self, path: str) -> ReadResult[ChatExample]:
        return self._read_chat(path, "eval file")

    def decoding(self) -> DecodingConfig:
        o = self.options
        return DecodingConfig(num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0,
                              max_new_tokens=int(o.get("max_new_tokens", 64)),
                              batch_size=int(o.get("generation_batch_size", 8)))

    def check_inputs(self) -> None:
        super().check_inputs()
        given = self.options.get("chat_template")
        if given and "{" not in str(given) and not Path(str(given)).is_file():
            raise self._error(f"task_options.chat_template: no such file {given}")

    def load_tokenizer(self) -> Any:
        tokenizer = super().load_tokenizer()
        resolve_chat_template(tokenizer, self.options.get("chat_template"), self.config.model)
        return tokenizer

    def load_model(self, tokenizer: Any) -> Any:
        model = super().load_model(tokenizer)
        if self.options.get("packing"):
            # transformers isolates the conversations of a packed row (block-diagonal attention from the position
            # ids) only when the forward pass has no KV cache; a training forward makes one when use_cache is on
            model.config.use_cache = False
        return model

    def build_datasets(self, tokenizer: Any) -> tuple[Any, Any]:
        if "max_generate_samples" not in self.options:
            self.config.task_options = {**(self.config.task_options or {}), "max_generate_samples": 4}
        train, held_out = super().build_datasets(tokenizer)
        self.held_out = held_out
        return train, held_out

    def training_examples(self, items: list[ChatExample]) -> list[ChatExample]:
        return items  # a conversation is one row, every assistant turn a target

    def encode_example(self, tokenizer: Any, example: ChatExample) -> dict[str, list[int]] | None:
        try:
            enc = encode_conversation(tokenizer, list(example.messages), self.config.max_seq_length)
        except ValueError as err:
            raise self._error(f"{example.path}:{example.line}: {err}") from None
        if not any(label != -100 for label in enc["labels"]):
            return None  # every assistant token was cut by max_seq_length: nothing to learn from it
        return enc

    def data_collator(self, tokenizer: Any) -> Any:
        if self.options.get("packing"):
            from transformers import DataCollatorWithFlattening

            # one row per batch, position ids restarting at each conversation; -100 at each start so that no
            # token is predicted across a boundary
            return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
        return super().data_collator(tokenizer)

    def callbacks(self) -> list[Any]:
        return [_before_training_callback(self)]

    def held_out_metrics(self, model: Any, description: str) -> dict[str, float]:
        batch = int(self.config.training_arguments().get("per_device_eval_batch_size", 8))
        return heldout_nll(model, self.held_out, self.data_collator(self._tokenizer), batch, description)

    def evaluate(self, trainer: Any, eval_dataset: Any) -> dict[str, float]:
        if eval_dataset is None:
            return {}
        out: dict[str, float] = {}
        if self.before_training is not None:
            out.update({f"eval_{k}_before_training": v for k, v in self.before_training.items()})
        after = self.held_out_metrics(trainer.model, "held-out loss after training")
        out.update({f"eval_{k}": v for k, v in after.items()})
        if self._generation_items and int(self.options.get("max_generate_samples", 4)) > 0:
            folder = Path(trainer.args.output_dir).parent  # the run's (staged) directory
            self.generation_eval(trainer.model, self._tokenizer, self._generation_items, folder / SAMPLES_FILE)
        return out

    def generation_eval(self, model: Any, tokenizer: Any, items: list[ChatExample], prefix: Path | None
                        ) -> dict[str, float]:
        """Greedy replies to the last assistant turn of each held-out conversation, written as JSON lines."""
        from lorma.plumbing.fileio import atomic_write_text
        from lorma.plumbing.processes import is_main_process, world_size
        from lorma.tasks.decoding import generate_texts, merged_copy

        contexts, references = [], []
        for example in items:
            messages = list(example.messages)
            last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
            contexts.append(messages[:last])
            references.append(messages[last]["content"])
        prompts = [render_conversation(tokenizer, c, True) for c in contexts]
        # a sharded model stays as it is (every rank decodes the same greedy steps); one process merges a copy
        decoder = model if world_size() > 1 else merged_copy(model)
        replies = generate_texts(decoder, tokenizer, prompts, self.decoding(), progress=is_main_process(),
                                 description="chat samples", add_special_tokens=False)
        if prefix is not None and is_main_process():
            lines = [json.dumps({"messages": c, "reference": r, "generated": g.strip()}, ensure_ascii=False)
                     for c, r, g in zip(contexts, references, replies)]
            atomic_write_text(prefix, "".join(line + "\n" for line in lines))
        return {}


def main(argv: list[str] | None = None) -> int:
    """``python -m lorma.tasks.chat DIR``: write the chatterbot-corpus conversations as chat JSONL."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lorma.tasks.chat",
                                     description="Write chatterbot-corpus (English) as DIR/train.jsonl and "
                                                 "DIR/test.jsonl in the chat task's 'messages' format.")
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        train, test = write_chatterbot_jsonl(args.folder, args.test_fraction, args.seed)
    except (ImportError, FileNotFoundError, DataFormatError) as err:
        parser.error(str(err))
    print(f"wrote {train} and {test}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
