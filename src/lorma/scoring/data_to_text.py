"""Data-to-text metrics with references grouped by input: the official scorers, and approximations.

Each input has a *group* of references (E2E: all rows with the same MR), and every metric compares a
prediction with its whole group. :func:`score_data_to_text` picks the implementation:

* ``scorer="official"`` (the default): what the paper's numbers were computed with (LoRA's NLG example).
  E2E: the E2E NLG Challenge scorer (:mod:`lorma.scoring.e2e_official`); WebNLG and DART: LoRA's
  decode step and WebNLG's GenerationEval (:mod:`lorma.scoring.generation_eval`). METEOR, and for E2E
  ROUGE-L and CIDEr, run Java (:mod:`lorma.scoring.java`): without it they stop with
  :class:`~lorma.scoring.java.JavaUnavailableError`, which says what to install.
* ``scorer="approximate"``: each metric's definition computed with maintained Python libraries, no Java,
  *not comparable with published numbers* (:data:`APPROXIMATE_LABEL` says so wherever they are reported):

  * BLEU: ``sacrebleu.corpus_bleu`` (13a tokenisation, case-sensitive, multi-reference), 0-100.
  * TER: ``sacrebleu``'s TER against all references (edits to the closest one), 0-100 (lower is better).
  * NIST: ``nltk.translate.nist_score.corpus_nist`` (n = 5) on 13a tokens, case-sensitive.
  * METEOR: ``nltk.translate.meteor_score.meteor_score`` per input (best over its references; exact,
    Porter-stem and WordNet-synonym matching, lower-cased), averaged over inputs, 0-100. It needs
    WordNet: read from the Debian package ``wordnet-base`` (``/usr/share/wordnet``), or from a folder
    named by ``$LORMA_WORDNET_DIR``, or from nltk's own ``wordnet`` data if installed.
  * ROUGE-L: ``rouge_score`` (its tokeniser lower-cases and drops punctuation), F1 of the LCS, the best
    reference per input (``score_multi``), averaged over inputs, 0-100.
  * CIDEr-D: written here (see :func:`cider_d`), raw scale (about 0-10).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from lorma.scoring.wordnet import WordNetUnavailableError, load_wordnet

# load_wordnet and WordNetUnavailableError (lorma.scoring.wordnet) are re-exported: callers of METEOR meet them here
__all__ = [
    "APPROXIMATE_LABEL",
    "SCORERS",
    "TASK_METRICS",
    "MetricDataError",
    "WordNetUnavailableError",
    "bleu",
    "check_aligned",
    "cider_d",
    "load_wordnet",
    "meteor",
    "nist",
    "rouge_l",
    "score_data_to_text",
    "scorer_label",
    "ter",
    "tokenize",
]

#: metrics reported per task (the paper's Tables 3 and 13)
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "e2e": ("bleu", "nist", "meteor", "rouge_l", "cider"),
    "dart": ("bleu", "meteor", "ter"),
    "webnlg": ("bleu", "meteor", "ter"),
}

#: ``official``: the paper's scorers (the default); ``approximate``: maintained Python libraries, no Java
SCORERS = ("official", "approximate")
APPROXIMATE_LABEL = (
    "approximate (sacrebleu BLEU/TER, nltk NIST/METEOR, rouge-score ROUGE-L, CIDEr-D written here): "
    "not comparable with published numbers"
)


class MetricDataError(ValueError):
    """Predictions and references that cannot be scored together (counts differ, a group is empty)."""


def check_aligned(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    predictions_name: str = "predictions",
    references_name: str = "references",
) -> None:
    """Raise :class:`MetricDataError` unless there is one prediction per non-empty reference group."""
    if len(predictions) != len(references):
        raise MetricDataError(
            f"{predictions_name} has {len(predictions)} prediction(s) but {references_name} has "
            f"{len(references)} input(s) with references; they must line up one to one"
        )
    if not predictions:
        raise MetricDataError(f"{predictions_name} and {references_name} are empty: nothing to score")
    for i, group in enumerate(references):
        if not group:
            raise MetricDataError(f"{references_name}: input {i + 1} has no reference")


@lru_cache(maxsize=1)
def _tokenizer13a() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    """sacrebleu's 13a tokenisation (the WMT standard), so every metric sees the same tokens."""
    toks = _tokenizer13a()(text.strip()).split()
    return [t.lower() for t in toks] if lowercase else toks


def _ref_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference index; shorter groups are padded with None."""
    width = max(len(g) for g in references)
    return [[g[k] if k < len(g) else None for g in references] for k in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = False) -> float:
    """Corpus BLEU (0-100), multi-reference, via sacrebleu."""
    from sacrebleu.metrics import BLEU

    check_aligned(predictions, references)
    return float(BLEU(lowercase=lowercase).corpus_score(list(predictions), _ref_streams(references)).score)


def ter(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER (0-100, lower is better), multi-reference, via sacrebleu."""
    from sacrebleu.metrics import TER

    check_aligned(predictions, references)
    return float(TER().corpus_score(list(predictions), _ref_streams(references)).score)


def nist(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 5) -> float:
    """Corpus NIST (n = 5) via nltk, on 13a tokens."""
    from nltk.translate.nist_score import corpus_nist

    check_aligned(predictions, references)
    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in group] for group in references]
    # nltk divides by the number of hypothesis n-grams of each order and fails when a whole corpus has
    # none of some order (every prediction shorter than n). Such an order adds nothing to the NIST sum
    # (mteval skips it), so the sum is taken over the orders that occur.
    longest = max(len(h) for h in hyps)
    if longest == 0:
        return 0.0
    return float(corpus_nist(refs, hyps, n=min(n, longest)))


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """ROUGE-L F1 (0-100): per input the best reference, then the mean over inputs."""
    from rouge_score import rouge_scorer

    check_aligned(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = 0.0
    for pred, group in zip(predictions, references):
        total += scorer.score_multi(list(group), pred)["rougeL"].fmeasure
    return 100.0 * total / len(predictions)


# --------------------------------------------------------------------------------------------------
# METEOR (WordNet from lorma.scoring.wordnet, offline)
# --------------------------------------------------------------------------------------------------


def meteor(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """METEOR (0-100): nltk's per-input score against all its references, averaged over inputs."""
    from nltk.translate.meteor_score import meteor_score

    check_aligned(predictions, references)
    wordnet = load_wordnet()
    total = 0.0
    for pred, group in zip(predictions, references):
        total += meteor_score([tokenize(r) for r in group], tokenize(pred), wordnet=wordnet)
    return 100.0 * total / len(predictions)


# --------------------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------------------


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def cider_d(
    predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> float:
    """CIDEr-D (Vedantam et al., 2015), the mean over inputs.

    Written by hand because no maintained package computes it offline (pycocoevalcap needs Java for
    its tokenizer and is unmaintained). Definition used, per input with candidate c and references
    s_1..s_m, lower-cased 13a tokens:

    * g^n(x)_k = count of n-gram k in x times idf_k, idf_k = log(N / max(1, df_k)), N the number of
      inputs, df_k the number of inputs whose reference group contains k (so idf comes from the
      references of the scored corpus, as in the CIDEr-D paper's evaluation);
    * CIDEr-D_n = (10 / m) sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
      * sum_k min(g^n(c)_k, g^n(s_j)_k) g^n(s_j)_k / (||g^n(c)|| ||g^n(s_j)||), with l the length in
      tokens and 0 where a norm is 0;
    * CIDEr-D = (1 / max_n) sum_{n=1..max_n} CIDEr-D_n.
    """
    check_aligned(predictions, references)
    cands = [tokenize(p, lowercase=True) for p in predictions]
    refs = [[tokenize(r, lowercase=True) for r in group] for group in references]
    n_inputs = len(cands)
    df: Counter[tuple[str, ...]] = Counter()
    for group in refs:
        seen: set[tuple[str, ...]] = set()
        for r in group:
            for n in range(1, max_n + 1):
                seen.update(_ngrams(r, n))
        df.update(seen)
    log_n = math.log(n_inputs)

    def vector(tokens: list[str], n: int) -> tuple[dict[tuple[str, ...], float], float]:
        vec = {g: tf * (log_n - math.log(max(1, df[g]))) for g, tf in _ngrams(tokens, n).items()}
        return vec, math.sqrt(sum(v * v for v in vec.values()))

    total = 0.0
    for cand, group in zip(cands, refs):
        score = 0.0
        for n in range(1, max_n + 1):
            vc, norm_c = vector(cand, n)
            per_ref = 0.0
            for r in group:
                vr, norm_r = vector(r, n)
                if norm_c == 0.0 or norm_r == 0.0:
                    continue
                dot = sum(min(v, vr[g]) * vr[g] for g, v in vc.items() if g in vr)
                penalty = math.exp(-((len(cand) - len(r)) ** 2) / (2.0 * sigma**2))
                per_ref += penalty * dot / (norm_c * norm_r)
            score += 10.0 * per_ref / len(group)
        total += score / max_n
    return total / n_inputs


# --------------------------------------------------------------------------------------------------

_METRIC_FUNCS = {
    "bleu": bleu,
    "nist": nist,
    "meteor": meteor,
    "rouge_l": rouge_l,
    "cider": cider_d,
    "ter": ter,
}


def _official_metrics(task: str) -> tuple[str, ...]:
    from lorma.scoring.e2e_official import E2E_METRICS
    from lorma.scoring.generation_eval import GENERATION_EVAL_METRICS

    return E2E_METRICS if task == "e2e" else GENERATION_EVAL_METRICS


def scorer_label(task: str, scorer: str = "official") -> str:
    """What computes ``task``'s numbers under ``scorer``: printed and saved beside every score."""
    _check_task_and_scorer(task, scorer)
    if scorer == "approximate":
        return APPROXIMATE_LABEL
    if task == "e2e":
        from lorma.scoring.e2e_official import E2E_SCORER_LABEL

        return E2E_SCORER_LABEL
    from lorma.scoring.generation_eval import GENERATION_EVAL_LABEL

    return GENERATION_EVAL_LABEL


def _check_task_and_scorer(task: str, scorer: str) -> None:
    if task not in TASK_METRICS:
        raise ValueError(f"unknown data-to-text task {task!r}; known: {sorted(TASK_METRICS)}")
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; expected one of: {', '.join(SCORERS)}")


def check_scoring_setup(task: str, metrics: Sequence[str] | None = None, scorer: str = "official") -> tuple[str, ...]:
    """The metrics that will be computed, after checking that they can be (before any slow work).

    Raises ``ValueError`` for an unknown task, scorer or metric (or one the official scorer of ``task``
    does not compute), :class:`~lorma.scoring.java.JavaUnavailableError` when the official scorer needs
    Java and there is none, :class:`WordNetUnavailableError` when approximate METEOR has no WordNet.
    """
    _check_task_and_scorer(task, scorer)
    chosen = tuple(metrics) if metrics else TASK_METRICS[task]
    unknown = [m for m in chosen if m not in _METRIC_FUNCS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(_METRIC_FUNCS)}")
    if scorer == "official":
        official = _official_metrics(task)
        outside = [m for m in chosen if m not in official]
        if outside:
            raise ValueError(
                f"{', '.join(outside)}: not computed by the official {task} scorer ({', '.join(official)}); "
                "`--scorer approximate` computes it, not comparable with published numbers"
            )
        from lorma.scoring.e2e_official import JAVA_METRICS
        from lorma.scoring.java import find_java

        needs_java = JAVA_METRICS if task == "e2e" else {"meteor"}
        if any(m in needs_java for m in chosen):
            find_java()
    elif "meteor" in chosen:
        load_wordnet()
    return chosen


def score_data_to_text(
    task: str,
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] | None = None,
    predictions_name: str = "predictions",
    references_name: str = "references",
    scorer: str = "official",
) -> dict[str, float]:
    """The metrics of ``task`` (or the named ``metrics``) for aligned predictions and reference groups.

    ``scorer="official"`` computes them as the paper did (see the module doc; :func:`scorer_label` names
    it), ``"approximate"`` with Python libraries only. Alignment, metric names and what the scorer needs
    (Java, WordNet) are checked once, up front, with the file names in the message.
    """
    chosen = check_scoring_setup(task, metrics, scorer)
    check_aligned(predictions, references, predictions_name, references_name)
    if scorer == "approximate":
        return {name: _METRIC_FUNCS[name](predictions, references) for name in chosen}
    if task == "e2e":
        from lorma.scoring.e2e_official import score_e2e_official

        return score_e2e_official(predictions, references, chosen)
    from lorma.scoring.generation_eval import score_generation_eval

    return score_generation_eval(predictions, references, chosen)
