"""Chat / instruction tuning of a causal LM (``lorma train --task chat``): the model's own chat template, loss on
the assistant's tokens only.

Data (``--train-file``, optional ``--eval-file``; JSON Lines, a JSON list, or one object per line):

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: a conversation of any
  length; every assistant turn is a target;
* ``{"prompt": "...", "response": "..."}`` (column names from ``task_options.prompt_column`` /
  ``response_column``, optional ``system``): one user turn and one assistant turn.

Masks: the conversation is rendered with the chat template turn by turn. For each assistant turn the prefix
up to it is rendered with ``add_generation_prompt=True`` and the prefix including it without; the assistant's
part is the difference (its text and the template's end-of-turn marker, so the model learns to stop). Each part
is tokenized on its own (``add_special_tokens=False``, as ``apply_chat_template`` tokenizes), so that the tokens
before an assistant turn are exactly those generation later sees. Labels are the ids on assistant parts and
-100 elsewhere: the system prompt, user turns and the template's role headers never count. A template whose
rendering of a longer conversation does not extend the rendering of a shorter one (some templates drop earlier
reasoning) cannot be masked this way and is refused with the record's line. trl's ``assistant_only_loss`` needs
``{% generation %}`` markers in the template, which most published templates (SmolLM2's among them) lack; this
way works with any template that renders conversations prefix by prefix.

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

Real data offline: :func:`chatterbot_conversations` reads the English part of the ``chatterbot-corpus`` package
(PyPI; BSD): ~900 distinct conversations after removing duplicates, 80 of them multi-turn. ``python -m
lorma.tasks.chat DIR`` writes it as ``DIR/train.jsonl`` and ``DIR/test.jsonl``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorma.tasks.base import register_task
from lorma.tasks.decoding import DecodingConfig
from lorma.tasks.generation import CausalLMGenerationTask
from lorma.tasks.readers.records import BadLine, Collector, DataFormatError, ReadResult, iter_records, read_text

__all__ = [
    "BEFORE_TRAINING_FILE",
    "ChatExample",
    "ChatTask",
    "SAMPLES_FILE",
    "chatterbot_conversations",
    "encode_conversation",
    "heldout_nll",
    "read_chat",
    "resolve_chat_template",
]

ROLES = ("system", "user", "assistant")
#: where the step-0 evaluation is kept, in the run directory (read back on --resume)
BEFORE_TRAINING_FILE = "eval_before_training.json"
#: generated replies to held-out conversations, in the run directory
SAMPLES_FILE = "chat_samples.jsonl"


@dataclass(frozen=True)
class ChatExample:
    """One conversation: ``messages`` as ``{"role", "content"}`` dicts, and the file and line it starts on."""

    messages: tuple[dict[str, str], ...]
    line: int
    path: str = ""


def _messages_problem(messages: Any) -> str | None:
    """What is wrong with a ``messages`` list, or None."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {'role', 'content'} objects"
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"message {k} must be an object with a string 'content'"
        if message.get("role") not in ROLES:
            return f"message {k} has role {message.get('role')!r}; expected one of {', '.join(ROLES)}"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return "the conversation has no non-empty assistant turn to train on"
    return None


def read_chat(path: str | Path, skip_bad: bool = False, prompt_column: str = "prompt",
              response_column: str = "response", system_column: str = "system") -> ReadResult[ChatExample]:
    """Conversations from ``messages`` records or prompt/response records (see the module docstring)."""
    p, text = read_text(path)
    col: Collector[ChatExample] = Collector(p, skip_bad)
    for record, line in iter_records(text, p):
        if isinstance(record, BadLine):
            col.bad(line, record.problem)
            continue
        if not isinstance(record, dict):
            col.bad(line, f"expected a JSON object, found {type(record).__name__}")
            continue
        if "messages" in record:
            messages = record["messages"]
        elif isinstance(record.get(prompt_column), str) and isinstance(record.get(response_column), str):
            messages = [{"role": "user", "content": record[prompt_column]},
                        {"role": "assistant", "content": record[response_column]}]
            if isinstance(record.get(system_column), str) and record[system_column].strip():
                messages.insert(0, {"role": "system", "content": record[system_column]})
        else:
            col.bad(line, f"a chat record needs 'messages', or string fields {prompt_column!r} and "
                          f"{response_column!r}")
            continue
        problem = _messages_problem(messages)
        if problem:
            col.bad(line, problem)
            continue
        clean = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        col.result.items.append(ChatExample(clean, line, str(p)))
    return col.result


def resolve_chat_template(tokenizer: Any, given: str | None, model: str | None) -> None:
    """Set ``tokenizer.chat_template`` from ``given`` (a file or the template text) or keep the model's own;
    a one-line error when there is neither."""
    from lorma.errors import InputError

    if given:
        candidate = Path(given)
        if "{" not in given and not candidate.is_file():
            raise InputError(f"task_options.chat_template: no such file {given}")
        tokenizer.chat_template = candidate.read_text(encoding="utf-8") if "{" not in given else given
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"model {model} has no chat template; give one with --task-option chat_template=FILE "
                          "(a Jinja file, e.g. the template of the model family it was trained from)")


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_assistant_part)`` pieces, in order (see the module
    docstring); ValueError when the template does not render prefix by prefix."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True) if k else ""
        with_turn = _render(tokenizer, messages[: k + 1], False)
        if not before.startswith(done) or not with_turn.startswith(before):
            raise ValueError("the chat template's rendering of a conversation does not extend the rendering of "
                             f"its first {k} message(s); loss masks cannot be cut at assistant turn {k}")
        if before != done:
            segments.append((before[len(done):], False))
        segments.append((with_turn[len(before):], True))
        done = with_turn
    full = _render(tokenizer, messages, False)
    if not full.startswith(done):
        raise ValueError("the chat template renders the whole conversation differently from its prefixes")
    if full != done:
        segments.append((full[len(done):], False))
    return segments


def encode_conversation(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (ids on assistant parts, -100 elsewhere) of one
    conversation, cut at ``max_length`` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_assistant in chat_segments(tokenizer, messages):
        part = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.extend(part)
        labels.extend(part if is_assistant else [-100] * len(part))
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def heldout_nll(model: Any, dataset: Any, collator: Any, batch_size: int, description: str) -> dict[str, float]:
    """Mean negative log-likelihood per target token (labels != -100) over ``dataset``, its perplexity, and the
    number of target tokens. Every process computes it on the whole set (forward passes of a sharded model are
    collective, so all ranks must take part); the result is the same on each."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from lorma.processes import is_main_process

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


def chatterbot_conversations(language: str = "english") -> list[list[dict[str, str]]]:
    """The conversations of the ``chatterbot-corpus`` package (``pip install --no-deps chatterbot-corpus``),
    duplicates removed, turns alternating user / assistant (an unanswered last turn is dropped)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no chatterbot-corpus files in {folder}")
    seen: set[tuple[str, ...]] = set()
    conversations: list[list[dict[str, str]]] = []
    for file in files:
        for turns in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations", []):
            texts = tuple(str(t).strip() for t in turns)
            texts = texts[: len(texts) // 2 * 2]
            if not texts or not all(texts) or texts in seen:
                continue
            seen.add(texts)
            conversations.append([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)])
    return conversations


def write_chatterbot_jsonl(folder: str | Path, test_fraction: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """``train.jsonl`` and ``test.jsonl`` of :func:`chatterbot_conversations` in ``folder`` (a seeded split)."""
    from lorma.fileio import atomic_write_text

    conversations = chatterbot_conversations()
    random.Random(seed).shuffle(conversations)
    n_test = max(1, round(len(conversations) * test_fraction))
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, part in zip(paths, (conversations[n_test:], conversations[:n_test])):
        atomic_write_text(path, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in part))
    return paths


def _before_training_callback(task: ChatTask) -> Any:
    """A TrainerCallback evaluating the held-out set at step 0 (on a resumed run: read back from the run)."""
    from transformers import TrainerCallback

    from lorma.fileio import atomic_write_json, read_json
    from lorma.processes import is_main_process

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
        from lorma.fileio import atomic_write_text
        from lorma.processes import is_main_process, world_size
        from lorma.tasks.decoding import generate_texts, merged_copy

        contexts, references = [], []
        for example in items:
            messages = list(example.messages)
            last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
            contexts.append(messages[:last])
            references.append(messages[last]["content"])
        prompts = [_render(tokenizer, c, True) for c in contexts]
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
