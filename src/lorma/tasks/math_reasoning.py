"""Math reasoning (paper Table 4): MetaMathQA training, GSM8K / MATH accuracy with greedy decoding.

Answer extraction and comparison are written here, by hand, because no maintained offline package does
it for free text (the usual ones are research scripts): a model's answer is taken from, in order,
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

from lorma.tasks.readers import closing_brace

__all__ = [
    "MATH_PROMPT",
    "MathScore",
    "answers_match",
    "build_math_prompt",
    "extract_answer",
    "normalize_answer",
    "parse_number",
    "score_math",
]

#: the prompt around a question, for training and evaluation alike (the model learns to continue it
#: with MetaMathQA's step-by-step response that ends in "The answer is: X")
MATH_PROMPT = "Question: {question}\n\nStep-by-step answer:\n"


def build_math_prompt(question: str) -> str:
    """The prompt for ``question`` (whitespace at the ends removed)."""
    return MATH_PROMPT.format(question=question.strip())


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
    from lorma.tasks.readers import boxed_answer

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
    from lorma.tasks.nlg_metrics import MetricDataError

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


# --------------------------------------------------------------------------------------------------
# The training task (``lorma train --task gsm8k|math``)
# --------------------------------------------------------------------------------------------------


def _register_math_task() -> None:
    """Define and register the task here, so that importing the extraction helpers stays light."""
    from pathlib import Path

    from lorma.tasks.base import register_task
    from lorma.tasks.data_to_text import CausalLMGenerationTask
    from lorma.tasks.decoding import generate_texts, merged_copy, one_line, write_lines_atomic
    from lorma.tasks.readers import MathExample, ReadResult, read_math_eval, read_metamathqa

    @register_task("gsm8k", "math")
    class MathTask(CausalLMGenerationTask):
        """MetaMathQA-format ``--train-file``; ``--eval-file`` in GSM8K (or MATH) format for accuracy.

        The held-out loss is on a split of the training data (``eval_split``); accuracy is greedy
        decoding on the eval file (``max_generate_samples`` of them), answers extracted as above.
        """

        def read_train(self, path: str) -> ReadResult[MathExample]:
            return self._read(lambda p: read_metamathqa(p, self.skip_bad), path, "train file")

        def read_eval(self, path: str) -> ReadResult[MathExample]:
            return self._read(lambda p: read_math_eval(self.name, p, self.skip_bad), path, "eval file")

        def build_datasets(self, tokenizer: Any) -> tuple[Any, Any]:
            # the loss is held out from the MetaMathQA data; the eval file is for accuracy only
            if not hasattr(self, "_train"):
                self.check_inputs()
            eval_file = self._eval
            self._eval = None
            try:
                train, held_out = super().build_datasets(tokenizer)
            finally:
                self._eval = eval_file
            items = list(eval_file.items) if eval_file is not None else []
            limit = self.options.get("max_generate_samples")
            self._generation_items = items[: int(limit)] if limit else items
            return train, held_out

        def training_pairs(self, items: list[MathExample]) -> list[tuple[str, str]]:
            return [(build_math_prompt(ex.question), ex.response.strip()) for ex in items]

        def generation_eval(
            self, model: Any, tokenizer: Any, items: list[MathExample], prefix: Path | None
        ) -> dict[str, float]:
            merged = merged_copy(model)
            prompts = [build_math_prompt(ex.question) for ex in items]
            raw = generate_texts(merged, tokenizer, prompts, self.decoding(), description=f"{self.name} greedy")
            # a model may go on to invent the next question: keep its first answer; score the one-line form
            # that is written, so that `lorma evaluate` on the files gives the same accuracy
            outputs = [one_line(o.split("\nQuestion:", 1)[0]) for o in raw]
            score = score_math(self.name, outputs, [ex.answer for ex in items])
            if prefix is not None:
                # the run's output directory is guarded by the recipe (--overwrite / --resume)
                write_lines_atomic(prefix.with_name(prefix.name + ".predictions.txt"), outputs, overwrite=True)
                write_lines_atomic(prefix.with_name(prefix.name + ".references.txt"),
                                   [one_line(ex.answer) for ex in items], overwrite=True)
            return {"accuracy": score.accuracy}

    globals()["MathTask"] = MathTask


_register_math_task()
