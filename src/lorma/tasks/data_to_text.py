"""Data-to-text generation (E2E, WebNLG, DART; paper Tables 3, 13, 16) with causal LMs.

Training pairs are ``prompt + target`` (:class:`lorma.tasks.generation.CausalLMGenerationTask`): the prompt is
the linearised input (an E2E MR or a triple set) and the target one reference followed by EOS; labels are -100 on
the prompt (and padding) so that the loss is on the reference tokens only. Label smoothing is TrainingArguments'
``label_smoothing_factor`` (the presets in ``configs/nlg`` set Table 16's values).

Evaluation: the held-out loss (Trainer), then beam search on a merged copy of the model over the
held-out *inputs* (one prediction per input), with predictions written one per line and the
reference groups beside them (blank-line separated, the layout ``lorma evaluate`` reads), and the
task's metrics (:mod:`lorma.scoring.data_to_text`), by default from the official scorers the paper used
(which need Java; checked before training starts).

Task options (``task_options`` in the YAML, all optional): ``skip_bad`` (drop malformed records and
report how many), ``gguf_file`` (load ``model`` from a GGUF file in that folder, dequantised to fp32),
``num_beams``, ``length_penalty``, ``no_repeat_ngram_size``, ``max_new_tokens``,
``generation_batch_size`` (default: the paper's decoding, :data:`lorma.tasks.decoding.PAPER_DECODING`),
``max_generate_samples`` (decode only the first N held-out inputs), ``generate`` (false: loss only),
``scorer`` (``official``, the default, or ``approximate``: no Java, not comparable with published numbers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorma.tasks.base import register_task
from lorma.tasks.decoding import DecodingConfig, generate_texts, merged_copy, one_line, write_lines_atomic
from lorma.tasks.generation import CausalLMGenerationTask, encode_pair, load_causal_lm
from lorma.tasks.readers import DataToTextExample, ReadResult, read_data_to_text

# CausalLMGenerationTask, encode_pair and load_causal_lm (lorma.tasks.generation) are re-exported: they were
# defined here first, and tests and subclasses import them from here
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
    see :func:`lorma.scoring.data_to_text.score_data_to_text`).

    With ``output_prefix``, writes ``<prefix>.predictions.txt`` (one per line) and
    ``<prefix>.references.txt`` (groups separated by blank lines) so that ``lorma evaluate`` can
    score the files again.
    """
    from lorma.scoring.data_to_text import check_scoring_setup, score_data_to_text

    check_scoring_setup(task, None, scorer)  # Java missing: fail before decoding, not after
    if not examples:
        raise ValueError("no inputs to generate for")
    missing = [ex.line for ex in examples if not ex.references]
    if missing:
        raise ValueError(f"{len(missing)} input(s) have no references (first at line {missing[0]})")
    merged = merged_copy(model)
    prompts = [build_data_to_text_prompt(ex.source) for ex in examples]
    how = f"beam {decoding.num_beams}" if decoding.num_beams > 1 else "greedy"
    raw = generate_texts(merged, tokenizer, prompts, decoding, progress=progress,
                         description=f"{task} decoding ({how})")
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


@register_task("e2e", "webnlg", "dart")
class DataToTextTask(CausalLMGenerationTask):
    """E2E / WebNLG / DART: ``--train-file`` and ``--eval-file`` in the task's format (see readers)."""

    scored_by = "data_to_text"

    @property
    def scorer(self) -> str:
        """``task_options.scorer``: ``official`` (the default) or ``approximate``."""
        return str(self.options.get("scorer", "official"))

    def check_inputs(self) -> None:
        super().check_inputs()
        if self.options.get("generate", True):  # fail before training if the texts could not be scored
            from lorma.scoring.data_to_text import WordNetUnavailableError, check_scoring_setup
            from lorma.scoring.java import JavaUnavailableError, OfficialScorerError

            try:
                check_scoring_setup(self.name, None, self.scorer)
            except (ValueError, JavaUnavailableError, OfficialScorerError, WordNetUnavailableError) as err:
                raise self._error(f"task_options.scorer={self.scorer}: {err}") from None

    def data_summary(self) -> dict[str, Any]:
        """The counts of the files read, and what computed the scores."""
        from lorma.scoring.data_to_text import scorer_label

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

    def training_examples(self, items: list[DataToTextExample]) -> list[tuple[str, str]]:
        return [(build_data_to_text_prompt(ex.source), " " + ref) for ex in items for ref in ex.references]

    def generation_eval(
        self, model: Any, tokenizer: Any, items: list[DataToTextExample], prefix: Path | None
    ) -> dict[str, float]:
        # the run's output directory is guarded by the recipe (--overwrite / --resume): files in it are the run's
        from lorma.scoring.data_to_text import scorer_label

        metrics, _ = evaluate_data_to_text(
            model, tokenizer, self.name, items, self.decoding(), prefix, overwrite=True, scorer=self.scorer
        )
        label = scorer_label(self.name, self.scorer)
        print(f"lorma train: {self.name} scores from the {label}")
        if prefix is not None:
            summary = prefix.with_name(prefix.name + ".metrics.json")
            from lorma.plumbing.fileio import atomic_write_json

            atomic_write_json(summary, {"scorer": label, "scores": metrics})
        return metrics
