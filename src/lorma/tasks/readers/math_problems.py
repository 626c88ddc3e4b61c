"""Readers of the math-reasoning formats (paper Table 4).

* GSM8K: JSONL ``{"question", "answer"}``, final answer after ``####``.
* MATH: ``{"problem", "solution"}`` (JSONL, JSON list or one object), answer in ``\\boxed{}``.
* MetaMathQA: a JSON list (or JSONL) of ``{"query", "response", "type"}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorma.scoring.math_answers import boxed_answer, gsm8k_answer
from lorma.tasks.readers.records import Collector, ReadResult, iter_objects, read_text, str_field

__all__ = ["MathExample", "read_gsm8k", "read_math", "read_math_eval", "read_metamathqa"]


@dataclass(frozen=True)
class MathExample:
    """A math problem: the prompt text, the target response (training) and the gold final answer."""

    question: str
    response: str
    answer: str
    line: int
    kind: str = ""


def read_gsm8k(path: str | Path, skip_bad: bool = False) -> ReadResult[MathExample]:
    """Read GSM8K JSONL (``question``, ``answer`` with the final answer after ``####``)."""
    p, text = read_text(path)
    col: Collector[MathExample] = Collector(p, skip_bad)
    for record, line in iter_objects(text, p, col):
        question, answer = str_field(record, "question"), str_field(record, "answer")
        if not question or answer is None:
            col.bad(line, "a GSM8K record needs string fields 'question' and 'answer'")
            continue
        final = gsm8k_answer(answer)
        if final is None:
            col.bad(line, "the 'answer' field has no final answer after '####'")
            continue
        col.result.items.append(MathExample(question, answer, final, line, "gsm8k"))
    return col.result


def read_math(path: str | Path, skip_bad: bool = False) -> ReadResult[MathExample]:
    """Read MATH records (``problem``, ``solution`` with ``\\boxed{}``; an ``answer`` field wins)."""
    p, text = read_text(path)
    col: Collector[MathExample] = Collector(p, skip_bad)
    for record, line in iter_objects(text, p, col):
        problem, solution = str_field(record, "problem"), str_field(record, "solution")
        if not problem or solution is None:
            col.bad(line, "a MATH record needs string fields 'problem' and 'solution'")
            continue
        final = str_field(record, "answer") or boxed_answer(solution)
        if not final:
            col.bad(line, "the 'solution' field has no \\boxed{...} answer")
            continue
        kind = str_field(record, "type") or "math"
        col.result.items.append(MathExample(problem, solution, final, line, kind))
    return col.result


def read_math_eval(task: str, path: str | Path, skip_bad: bool = False) -> ReadResult[MathExample]:
    """Read an evaluation file for ``task`` (``gsm8k`` or ``math``)."""
    if task == "gsm8k":
        return read_gsm8k(path, skip_bad)
    if task == "math":
        return read_math(path, skip_bad)
    raise ValueError(f"unknown math task {task!r}; known: ['gsm8k', 'math']")


def read_metamathqa(path: str | Path, skip_bad: bool = False) -> ReadResult[MathExample]:
    """Read MetaMathQA training data (``query``, ``response``, optional ``type``).

    The gold answer is what follows the last ``The answer is:`` in the response (empty if none:
    training needs only the response).
    """
    p, text = read_text(path)
    col: Collector[MathExample] = Collector(p, skip_bad)
    for record, line in iter_objects(text, p, col):
        query, response = str_field(record, "query"), str_field(record, "response")
        if not query or not response:
            col.bad(line, "a MetaMathQA record needs non-empty string fields 'query' and 'response'")
            continue
        final = ""
        marker = re.findall(r"The answer is:?\s*(.+)", response)
        if marker:
            final = marker[-1].strip()
        col.result.items.append(MathExample(query, response, final, line, str_field(record, "type") or ""))
    return col.result

