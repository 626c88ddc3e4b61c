"""Chat data for ``--task chat``: conversations from JSON Lines (or a JSON list), with file-and-line errors.

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: a conversation of any
  length; every assistant turn is a target;
* ``{"prompt": "...", "response": "..."}`` (other column names by argument, optional ``system``): one user turn and
  one assistant turn.

Real data offline: :func:`chatterbot_conversations` reads the English part of the ``chatterbot-corpus`` package
(PyPI; BSD): ~900 distinct conversations after removing duplicates, 80 of them multi-turn;
:func:`write_chatterbot_jsonl` writes them in the ``messages`` format (``python -m lorma.tasks.chat DIR``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorma.tasks.readers.records import Collector, ReadResult, iter_objects, read_text

__all__ = ["ROLES", "ChatExample", "chatterbot_conversations", "read_chat", "write_chatterbot_jsonl"]

ROLES = ("system", "user", "assistant")


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
    for record, line in iter_objects(text, p, col):
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
    from lorma.plumbing.fileio import atomic_write_text

    conversations = chatterbot_conversations()
    random.Random(seed).shuffle(conversations)
    n_test = max(1, round(len(conversations) * test_fraction))
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, part in zip(paths, (conversations[n_test:], conversations[:n_test])):
        atomic_write_text(path, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in part))
    return paths
