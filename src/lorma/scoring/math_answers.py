"""Final answers in math text: finding them, normalising them, comparing them, and accuracy (paper Table 4).

Written here, by hand, because no maintained offline package does this for free text (the usual ones are
research scripts). The gold answer of a record is GSM8K's text after ``####`` or MATH's last ``\\boxed{X}``
(used by :mod:`lorma.tasks.readers.math_problems`). A model's answer is taken from, in order,
``The answer is: X`` (MetaMathQA's closing line), the last ``\\boxed{X}``, the last ``#### X``, and
finally the last number in the text. Answers are compared after :func:`normalize_answer` (commas in
numbers, ``$...$``, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac ab``,
``\\text{units}``, degrees, percent and trailing periods) either as exact rationals (``0.5`` equals
``\\frac{1}{2}``) or, when not numbers, as the normalised strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = [
    "MathScore",
    "answers_match",
    "boxed_answer",
    "closing_brace",
    "extract_answer",
    "gsm8k_answer",
    "normalize_answer",
    "parse_number",
    "score_math",
]


def gsm8k_answer(answer_field: str) -> str | None:
    """The final answer of a GSM8K ``answer`` field: the text after the last ``####``."""
    if "####" not in answer_field:
        return None
    final = answer_field.rsplit("####", 1)[1].strip()
    return final or None


def closing_brace(text: str, pos: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``text[pos]`` (nested braces counted), or None."""
    depth = 0
    for i in range(pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces matched.

    Also accepts the brace-less form ``\\boxed 5``. Returns None when there is none.
    """
    best: str | None = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        pos = match.end()
        if pos < len(text) and text[pos] == "{":
            end = closing_brace(text, pos)
            if end is not None:
                best = text[pos + 1 : end].strip()
        elif match.group(0).endswith(" "):
            word = re.match(r"[^\s$]+", text[pos:])
            if word:
                best = word.group(0)
    return best


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_UNIT_WORDS = (
    "dollars|dollar|cents|cent|units|unit|inches|inch|feet|foot|meters|meter|metres|metre|cm|mm|km|kg|g|"
    "miles|mile|hours|hour|minutes|minute|seconds|second|days|day|weeks|week|years|year|degrees|degree|"
    "percent|pounds|pound|square|sq|mph|people|students|apples"
)


def _strip_braces_command(text: str, command: str) -> str:
    r"""Replace ``\command{X}`` by ``X`` (one level of balanced braces)."""
    out = []
    i = 0
    key = "\\" + command
    while True:
        j = text.find(key, i)
        if j < 0 or not re.match(r"\s*\{", text[j + len(key) :]):
            out.append(text[i:] if j < 0 else text[i : j + len(key)])
            if j < 0:
                break
            i = j + len(key)
            continue
        out.append(text[i:j])
        k = text.index("{", j + len(key))
        m = closing_brace(text, k)
        if m is None:  # unbalanced: keep the rest as it is
            out.append(text[k:])
            break
        out.append(text[k + 1 : m])
        i = m + 1
    return "".join(out)


def _read_group(text: str, pos: int) -> tuple[str, int] | None:
    """One TeX argument at ``pos`` (spaces skipped): ``{...}`` with balanced braces, or one character."""
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text):
        return None
    if text[pos] != "{":
        return (text[pos], pos + 1) if text[pos].isalnum() else None
    end = closing_brace(text, pos)
    return None if end is None else (text[pos + 1 : end], end + 1)


def _frac_to_slash(text: str) -> str:
    r"""``\frac{a}{b}`` -> ``(a)/(b)`` and ``\frac12`` -> ``(1)/(2)``, nested fractions too."""
    out = []
    i = 0
    while True:
        j = text.find("\\frac", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        num = _read_group(text, j + 5)
        den = _read_group(text, num[1]) if num else None
        if num is None or den is None:  # not a well-formed fraction: leave it
            out.append(text[i : j + 5])
            i = j + 5
            continue
        out.append(text[i:j])
        out.append(f"({_frac_to_slash(num[0])})/({_frac_to_slash(den[0])})")
        i = den[1]


def _drop_redundant_parens(text: str) -> str:
    """``(3)/(4)`` -> ``3/4`` where a parenthesis holds a plain number or name."""
    text = re.sub(r"\((-?\\sqrt\{[\w.]+\})\)", r"\1", text)
    return re.sub(r"\((-?[\w.]+)\)", r"\1", text)


def normalize_answer(answer: str) -> str:
    """A canonical string for an answer, so that equal answers written differently compare equal."""
    s = answer.strip()
    s = re.sub(r"\\boxed\s*\{(.*)\}", r"\1", s) if s.startswith("\\boxed") else s
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("~", " ")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\displaystyle", "")
    # trailing units written as \text{...} / \mbox{...} (kept when they are the whole answer)
    stripped = re.sub(r"\s*\\(?:text|mbox|textbf|mathrm)\s*\{[^{}]*\}\s*$", "", s)
    if stripped.strip():
        s = stripped
    for cmd in ("text", "mbox", "textbf", "mathrm", "mathbf"):
        s = _strip_braces_command(s, cmd)
    s = s.strip().rstrip(".").strip()
    # "x = 5" -> "5" (a single variable being assigned)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    # trailing unit words after a number: "18 dollars" -> "18"
    s = re.sub(rf"^({_NUMBER})\s*(?:{_UNIT_WORDS})\b.*$", r"\1", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = _frac_to_slash(s)
    s = s.replace(" ", "")
    # digit-group commas: only when the whole answer is one such number, so "(1,2)" stays a tuple
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = _drop_redundant_parens(s)
    if re.fullmatch(r"-?\d+\.\d*", s):  # "18.00" -> "18", "0.50" -> "0.5"
        s = s.rstrip("0").rstrip(".") if "." in s else s
    return s


def parse_number(answer: str) -> Fraction | None:
    """An exact rational for a normalised answer that is a number or ``a/b``; None otherwise."""
    s = answer
    m = re.fullmatch(r"(-?)\(?(-?[\d.]+)\)?/\(?([\d.]+)\)?", s)
    try:
        if m:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
            return -value if m.group(1) else value
        if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(predicted: str | None, gold: str) -> bool:
    """Whether a predicted final answer equals the gold one (see the module docstring)."""
    if predicted is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(gold)
    if not a:
        return False
    if a == b:
        return True
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


def _last_number(text: str) -> str | None:
    found = re.findall(_NUMBER, text.replace("$", " "))
    found = [f for f in found if re.search(r"\d", f)]
    return found[-1].rstrip(",") if found else None


def extract_answer(text: str, task: str = "gsm8k") -> str | None:
    """The final answer in a model's output (None when there is none).

    Order: ``The answer is: X``, ``\\boxed{X}``, ``#### X``, then (GSM8K only, or MATH when nothing
    else is there) the last number. For GSM8K, whose answers are numbers, the last number inside the
    found answer is kept (``$18 per day.`` -> ``18``).
    """
    found: str | None = None
    marker = list(re.finditer(r"[Tt]he (?:final )?answer is:?\s*", text))
    if marker:
        rest = text[marker[-1].end() :].strip()
        if rest.startswith("\\boxed") or rest.startswith("$\\boxed"):
            found = boxed_answer(rest)
        else:
            # up to the end of the line or of the sentence ("... is: 5. Next question" on one line)
            first = re.split(r"\n|\.\s+(?=[A-Z])", rest, maxsplit=1)[0].strip()
            found = re.sub(r"\.\s*$", "", first) or None
    if found is None:
        found = boxed_answer(text)
    if found is None and "####" in text:
        found = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip() or None
    if task == "gsm8k":
        # GSM8K answers are numbers: keep a found answer that is one, else its last number
        if found is not None and parse_number(normalize_answer(found)) is not None:
            return found
        return _last_number(found if found is not None else text)
    if found is None:
        return _last_number(text)
    return found


@dataclass(frozen=True)
class MathScore:
    """Accuracy (0-100) with its counts, and the extracted answers for inspection."""

    accuracy: float
    correct: int
    total: int
    extracted: list[str | None]

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total}


def score_math(
    task: str,
    predictions: Sequence[str],
    gold_answers: Sequence[str],
    predictions_name: str = "predictions",
    references_name: str = "references",
) -> MathScore:
    """Accuracy of model outputs against gold final answers (checked to line up first)."""
    from lorma.scoring.data_to_text import MetricDataError

    if task not in ("gsm8k", "math"):
        raise ValueError(f"unknown math task {task!r}; known: ['gsm8k', 'math']")
    if len(predictions) != len(gold_answers):
        raise MetricDataError(
            f"{predictions_name} has {len(predictions)} prediction(s) but {references_name} has "
            f"{len(gold_answers)} problem(s); they must line up one to one"
        )
    if not predictions:
        raise MetricDataError(f"{predictions_name} and {references_name} are empty: nothing to score")
    extracted = [extract_answer(p, task) for p in predictions]
    correct = sum(answers_match(e, g) for e, g in zip(extracted, gold_answers))
    return MathScore(100.0 * correct / len(predictions), correct, len(predictions), extracted)
