"""The official WebNLG / DART scores: LoRA's decode step, then WebNLG's GenerationEval (``eval.py -nr 6``).

LoRA's NLG example (and so the LoRMA paper, Table 13) scores WebNLG and DART in two steps:

1. ``gpt2_decode.py --tokenize --lower`` writes outputs and references lower-cased and split at every
   non-word character (``re.split(r"(\\W)")``), at most 6 references per input (fewer are padded with the
   first one): :func:`lora_decode_text`, :data:`NUM_REFS`.
2. GenerationEval ``eval.py -nr 6 -m bleu,meteor,ter`` on those files:

   * BLEU: ``multi-bleu-detok.perl`` on the files as written (mteval-v13a's internal tokenization,
     case-sensitive, closest reference length, no smoothing): :func:`multi_bleu_detok`, written here
     because it is a Perl script and no maintained package reproduces it (sacrebleu's 13a tokenizer and
     zero-count handling differ). The script prints it to 2 decimals; the value here is unrounded.
   * METEOR 1.5 (``-l en -norm -r 6``) on the texts re-tokenized by nltk's word tokenizer:
     :func:`lorma.scoring.java.meteor_file_score`.
   * TER: ``pyter.ter`` (the ``pyter3`` package) on the nltk-tokenized texts, the best reference per
     input, averaged. GenerationEval reads its files with ``read().split("\\n")``, so the newline that
     ends each file adds one empty input scored 1.0: the published TER is (sum + 1) / (N + 1). That is
     reproduced here, so that the numbers compare with published ones (:func:`generation_eval_ter`).

Scales: BLEU, METEOR and TER on 0-100 (GenerationEval prints METEOR and TER as fractions; TER is lower
is better).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "GENERATION_EVAL_LABEL",
    "GENERATION_EVAL_METRICS",
    "NUM_REFS",
    "generation_eval_meteor",
    "generation_eval_ter",
    "lora_decode_text",
    "multi_bleu_detok",
    "nltk_word_tokenize",
    "score_generation_eval",
]

GENERATION_EVAL_LABEL = (
    "official GenerationEval (WebNLG 2020, as LoRA runs it: gpt2_decode --tokenize --lower, eval.py -nr 6; "
    "multi-bleu-detok BLEU, METEOR 1.5, pyter TER)"
)
GENERATION_EVAL_METRICS = ("bleu", "meteor", "ter")
#: ``gpt2_decode.py --ref_num 6`` / ``eval.py -nr 6``: references kept per input
NUM_REFS = 6

_NON_WORD = re.compile(r"(\W)")
# multi-bleu-detok.perl's tokenization (mteval-v13a's). Perl reads the files as bytes, so its \s is ASCII
# whitespace only; re.ASCII gives Python the same classes. Its other classes are ASCII ranges already.
_DETOK_RULES = tuple(
    (re.compile(pattern, re.ASCII), repl)
    for pattern, repl in (
        (r"<skipped>", ""),
        (r"-\n", ""),
        (r"\n", " "),
        (r"&quot;", '"'),
        (r"&amp;", "&"),
        (r"&lt;", "<"),
        (r"&gt;", ">"),
    )
)
_DETOK_PUNCT = tuple(
    (re.compile(pattern, re.ASCII), repl)
    for pattern, repl in (
        (r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 "),
        (r"([^0-9])([\.,])", r"\1 \2 "),
        (r"([\.,])([^0-9])", r" \1 \2"),
        (r"([0-9])(-)", r"\1 \2 "),
        (r"\s+", " "),
    )
)
_ASCII_SPACE = re.compile(r"\s+", re.ASCII)


def lora_decode_text(text: str) -> str:
    """A text as ``gpt2_decode.py --tokenize --lower`` writes it: stripped, lower-cased, split at every
    non-word character, single spaces. Applying it twice changes nothing."""
    parts = _NON_WORD.split(text.strip().lower())
    return " ".join(" ".join(parts).split())


def _detok_tokens(text: str) -> list[str]:
    for pattern, repl in _DETOK_RULES:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _DETOK_PUNCT:
        text = pattern.sub(repl, text)
    return [t for t in _ASCII_SPACE.split(text) if t]


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def multi_bleu_detok(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) as ``multi-bleu-detok.perl`` computes it (no ``-lc``: case-sensitive).

    Clipped n-gram hits (n = 1..4) against the largest count in any one reference; effective reference
    length: the closest in length, the shorter on a tie; brevity penalty exp(1 - r/c) when c < r. An
    order without a single hit makes BLEU 0 (the script's log of 0 is -9999999999). Where the script
    stops without a score (no reference words, or no output words at all) this returns 0.
    """
    correct = [0] * 5
    total = [0] * 5
    hyp_len = ref_len = 0
    for hyp_text, group in zip(hypotheses, references):
        hyp = _detok_tokens(hyp_text)
        refs = [_detok_tokens(r) for r in group]
        closest_diff, closest_len = 9999, 9999
        for ref in refs:
            diff = abs(len(hyp) - len(ref))
            if diff < closest_diff or (diff == closest_diff and len(ref) < closest_len):
                closest_diff, closest_len = diff, len(ref)
        hyp_len += len(hyp)
        ref_len += closest_len
        for n in range(1, 5):
            clip: Counter[tuple[str, ...]] = Counter()
            for ref in refs:
                for gram, count in _ngrams(ref, n).items():
                    clip[gram] = max(clip[gram], count)
            for gram, count in _ngrams(hyp, n).items():
                total[n] += count
                correct[n] += min(count, clip[gram])
    if ref_len == 0 or hyp_len == 0:
        return 0.0
    precisions = [correct[n] / total[n] if total[n] else 0.0 for n in range(1, 5)]
    if min(precisions) == 0.0:
        return 0.0
    brevity = math.exp(1.0 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
    return 100.0 * brevity * math.exp(sum(math.log(p) for p in precisions) / 4.0)


@lru_cache(maxsize=1)
def _nltk_word_tokenizer() -> Any:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def nltk_word_tokenize(text: str) -> str:
    """``" ".join(nltk.word_tokenize(text))`` as GenerationEval tokenizes for METEOR and TER.

    ``word_tokenize`` first splits sentences with nltk's Punkt model, a download this project cannot make;
    on text from :func:`lora_decode_text` (every non-word character already a token of its own) the split
    changes nothing: the word tokenizer's rules that look at a sentence's ends (a final period, an opening
    double quote) give the same tokens on the whole line. So the word tokenizer runs on the whole line.
    Its one visible effect here: double quotes become ```` `` ````, ``cannot`` becomes ``can not``.
    """
    return " ".join(_nltk_word_tokenizer().tokenize(text))


def _padded(group: Sequence[str]) -> list[str]:
    """The first :data:`NUM_REFS` references, padded with the first one (as ``gpt2_decode.py`` writes them)."""
    kept = list(group[:NUM_REFS])
    return kept + [kept[0]] * (NUM_REFS - len(kept))


def generation_eval_meteor(hypotheses_tok: Sequence[str], references_tok: Sequence[Sequence[str]]) -> float:
    """METEOR 1.5 (0-100) on tokenized texts, 6 references per input, as GenerationEval runs it."""
    from lorma.scoring.java import meteor_file_score

    return 100.0 * meteor_file_score(hypotheses_tok, [_padded(g) for g in references_tok])


def generation_eval_ter(hypotheses_tok: Sequence[str], references_tok: Sequence[Sequence[str]]) -> float:
    """TER (0-100, lower is better) as GenerationEval computes it from its files.

    Per input, the smallest ``pyter.ter`` over its (at most 6) references, 1.0 for an empty reference or
    where pyter fails (an empty reference divides by zero); the mean is over the inputs plus the empty
    input that each file's final newline adds (scored 1.0), as explained in the module doc.
    """
    import pyter

    def one(hyp: str, ref: str) -> float:
        if not ref:
            return 1.0
        try:
            return float(pyter.ter(hyp.split(), ref.split()))
        except ZeroDivisionError:  # a reference of whitespace only
            return 1.0

    scores = [min(one(hyp, ref) for ref in dict.fromkeys(group[:NUM_REFS])) for hyp, group in
              zip(hypotheses_tok, references_tok)]
    return 100.0 * (sum(scores) + 1.0) / (len(scores) + 1)


def score_generation_eval(
    predictions: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = GENERATION_EVAL_METRICS
) -> dict[str, float]:
    """The official WebNLG / DART scores named in ``metrics`` (``bleu``, ``meteor``, ``ter``)."""
    hyps = [lora_decode_text(p) for p in predictions]
    refs = [[lora_decode_text(r) for r in _padded(group)] for group in references]
    out: dict[str, float] = {}
    if "bleu" in metrics:
        out["bleu"] = multi_bleu_detok(hyps, refs)
    if "meteor" in metrics or "ter" in metrics:
        hyps_tok = [nltk_word_tokenize(h) for h in hyps]
        refs_tok = [[nltk_word_tokenize(r) for r in group] for group in refs]
        if "meteor" in metrics:
            out["meteor"] = generation_eval_meteor(hyps_tok, refs_tok)
        if "ter" in metrics:
            out["ter"] = generation_eval_ter(hyps_tok, refs_tok)
    return {m: out[m] for m in metrics}
