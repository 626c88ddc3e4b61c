"""Chat templates and the assistant-only labels of a conversation (``--task chat``).

The conversation is rendered with the tokenizer's chat template turn by turn. For each assistant turn the prefix
up to it is rendered with ``add_generation_prompt=True`` and the prefix including it without; the assistant's
part is the difference (its text and the template's end-of-turn marker, so the model learns to stop). Each part
is tokenized on its own (``add_special_tokens=False``, as ``apply_chat_template`` tokenizes), so that the tokens
before an assistant turn are exactly those generation later sees. Labels are the ids on assistant parts and
-100 elsewhere: the system prompt, user turns and the template's role headers never count. A template whose
rendering of a longer conversation does not extend the rendering of a shorter one (some templates drop earlier
reasoning) cannot be masked this way and is refused with the record's line. trl's ``assistant_only_loss`` needs
``{% generation %}`` markers in the template, which most published templates (SmolLM2's among them) lack; this
way works with any template that renders conversations prefix by prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["chat_segments", "encode_conversation", "render_conversation", "resolve_chat_template"]


def resolve_chat_template(tokenizer: Any, given: str | None, model: str | None) -> None:
    """Set ``tokenizer.chat_template`` from ``given`` (a file or the template text) or keep the model's own;
    a one-line error when there is neither."""
    from lorma.plumbing.errors import InputError

    if given:
        candidate = Path(given)
        if "{" not in given and not candidate.is_file():
            raise InputError(f"task_options.chat_template: no such file {given}")
        tokenizer.chat_template = candidate.read_text(encoding="utf-8") if "{" not in given else given
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"model {model} has no chat template; give one with --task-option chat_template=FILE "
                          "(a Jinja file, e.g. the template of the model family it was trained from)")


def render_conversation(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The conversation as the template renders it (with the assistant header after it: ``generation_prompt``)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def chat_segments(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, is_assistant_part)`` pieces, in order (see the module
    docstring); ValueError when the template does not render prefix by prefix."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_conversation(tokenizer, messages[:k], True) if k else ""
        with_turn = render_conversation(tokenizer, messages[: k + 1], False)
        if not before.startswith(done) or not with_turn.startswith(before):
            raise ValueError("the chat template's rendering of a conversation does not extend the rendering of "
                             f"its first {k} message(s); loss masks cannot be cut at assistant turn {k}")
        if before != done:
            segments.append((before[len(done):], False))
        segments.append((with_turn[len(before):], True))
        done = with_turn
    full = render_conversation(tokenizer, messages, False)
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
