"""Math reasoning (paper Table 4): MetaMathQA training, GSM8K / MATH accuracy with greedy decoding.

The answers are found, normalised and compared by :mod:`lorma.scoring.math_answers`; this module holds the
prompt and the training task (``lorma train --task gsm8k|math``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorma.scoring.math_answers import score_math
from lorma.tasks.base import register_task
from lorma.tasks.decoding import generate_texts, merged_copy, one_line, write_lines_atomic
from lorma.tasks.generation import CausalLMGenerationTask
from lorma.tasks.readers import MathExample, ReadResult, read_math_eval, read_metamathqa

__all__ = ["MATH_PROMPT", "MathTask", "build_math_prompt"]

#: the prompt around a question, for training and evaluation alike (the model learns to continue it
#: with MetaMathQA's step-by-step response that ends in "The answer is: X")
MATH_PROMPT = "Question: {question}\n\nStep-by-step answer:\n"


def build_math_prompt(question: str) -> str:
    """The prompt for ``question`` (whitespace at the ends removed)."""
    return MATH_PROMPT.format(question=question.strip())


@register_task("gsm8k", "math")
class MathTask(CausalLMGenerationTask):
    """MetaMathQA-format ``--train-file``; ``--eval-file`` in GSM8K (or MATH) format for accuracy.

    The held-out loss is on a split of the training data (``eval_split``); accuracy is greedy decoding on the
    eval file (``max_generate_samples`` of them), answers found by :func:`lorma.scoring.math_answers.extract_answer`.
    """

    scored_by = "math"

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

    def training_examples(self, items: list[MathExample]) -> list[tuple[str, str]]:
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
