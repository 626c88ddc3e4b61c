"""The official E2E NLG Challenge scores: what tuetschek/e2e-metrics ``measure_scores.py -p`` prints.

The E2E scorer (the one LoRA's NLG example, and so the LoRMA paper, runs) computes:

* BLEU and NIST with its Python port of mteval-v13a (``-p``): mteval's internal tokenization, n-grams
  compared lower-cased, every reference of an input at once; NIST up to 5-grams. Written here
  (:func:`mteval_bleu`, :func:`mteval_nist`): no maintained package reproduces that port's numbers
  (sacrebleu's BLEU differs in its brevity penalty and zero-count handling, nltk's NIST in the
  information weights), and the published E2E numbers come from it.
* METEOR 1.5 (``-l en -norm``, English paraphrase table), ROUGE-L (beta 1.2, best reference per input)
  and CIDEr (pycocoevalcap's ``Cider``: TF-IDF over the reference groups of the scored set, counts
  clipped, Gaussian length penalty), all from pycocoevalcap, after Stanford's PTB tokenizer with
  punctuation removed (:mod:`lorma.scoring.java`).

Scales: BLEU, METEOR and ROUGE-L are returned on 0-100 (the official scorer prints fractions: 72.0312
here is its 0.7203), NIST and CIDEr as printed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "E2E_METRICS",
    "E2E_SCORER_LABEL",
    "coco_scores",
    "mteval_bleu",
    "mteval_nist",
    "mteval_tokenize",
    "score_e2e_official",
]

E2E_SCORER_LABEL = (
    "official E2E (e2e-metrics 2017, measure_scores.py -p: mteval-v13a BLEU/NIST lower-cased, METEOR 1.5, "
    "pycocoevalcap ROUGE-L/CIDEr after the PTB tokenizer)"
)
#: what the official E2E scorer reports, in its order
E2E_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
#: the metrics that run Java (the PTB tokenizer first, then METEOR 1.5 for METEOR)
JAVA_METRICS = frozenset({"meteor", "rouge_l", "cider"})

# mteval-v13a's tokenization, as the E2E scorer's port applies it (Python ``re`` semantics)
_MTEVAL_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl)
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
_MTEVAL_PUNCT = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
    (re.compile(r"\s+"), " "),
)
# NIST's length-penalty constant: a candidate 2/3 of the reference length loses half its score
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2
_TINY, _SMALL = 1e-15, 1e-9  # the port's floors for a zero n-gram hit count / candidate length


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's internal tokenization, lower-cased (the E2E scorer compares n-grams lower-cased).

    As in the scorer's port, an empty text is one empty token (so it counts as length 1).
    """
    for pattern, repl in _MTEVAL_RULES:
        text = pattern.sub(repl, text)
    text = f" {text} "
    for pattern, repl in _MTEVAL_PUNCT:
        text = pattern.sub(repl, text)
    return [tok.lower() for tok in text.strip().split(" ")]


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: Sequence[Sequence[str]], n: int) -> Counter[tuple[str, ...]]:
    """Per n-gram, its largest count in any one reference (the clipping limit)."""
    merged: Counter[tuple[str, ...]] = Counter()
    for ref in refs:
        for gram, count in _ngrams(ref, n).items():
            merged[gram] = max(merged[gram], count)
    return merged


def _tokenized(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """mteval tokens of every output and every reference."""
    return [mteval_tokenize(p) for p in predictions], [[mteval_tokenize(r) for r in g] for g in references]


def mteval_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU (0-100) as the E2E scorer's mteval-v13a port computes it.

    Clipped n-gram hits against all references of each input; the effective reference length per input
    is the reference closest in length (the shorter one on a tie); brevity penalty exp(1 - r/c) when
    c <= r. Candidate n-gram totals are ``len - n + 1`` per input, negative for inputs shorter than n,
    exactly as the port sums them; a zero hit count becomes 1e-15 (BLEU is then tiny, never undefined).
    """
    hyps, refs = _tokenized(predictions, references)
    hits = [0] * max_n
    totals = [0] * max_n
    ref_len = 0
    for hyp, group in zip(hyps, refs):
        for i in range(max_n):
            clip = _max_ref_counts(group, i + 1)
            hits[i] += sum(min(count, clip[gram]) for gram, count in _ngrams(hyp, i + 1).items())
            totals[i] += len(hyp) - i
        ref_len += len(min(group, key=lambda r: (abs(len(r) - len(hyp)), len(r))))
    brevity = 1.0
    if totals[0] <= ref_len:
        brevity = math.exp(1.0 - ref_len / (float(totals[0]) if totals[0] else 1e-5))
    log_precision = sum(math.log(max(h, _TINY) / max(t, _SMALL)) for h, t in zip(hits, totals))
    return 100.0 * brevity * math.exp(log_precision / max_n)


def mteval_nist(predictions: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST (n = 5) as the E2E scorer's mteval-v13a port computes it.

    Information weight of an n-gram w1..wn: log2(count(w1..wn-1) / count(w1..wn)) over every reference
    of the corpus (for unigrams the numerator is the total number of reference words). Per order, the
    information of the clipped hits divided by the candidate n-gram total (``len - n + 1`` per input, as
    in BLEU), summed over orders, times the length penalty exp(-beta log^2(c / r)) with r the sum over
    inputs of the mean reference length. An order with a zero candidate total (the port divides by zero
    there) adds nothing.
    """
    hyps, refs = _tokenized(predictions, references)
    ref_counts: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(max_n + 1)]
    for group in refs:
        for ref in group:
            ref_counts[0][()] += len(ref)
            for n in range(1, max_n + 1):
                ref_counts[n].update(_ngrams(ref, n))

    def info(gram: tuple[str, ...]) -> float:
        count = ref_counts[len(gram)].get(gram, 0)
        return math.log2(ref_counts[len(gram) - 1][gram[:-1]] / count) if count else 0.0

    hit_info = [0.0] * max_n
    totals = [0] * max_n
    avg_ref_len = 0.0
    for hyp, group in zip(hyps, refs):
        for i in range(max_n):
            totals[i] += len(hyp) - i
            clip = _max_ref_counts(group, i + 1)
            hit_info[i] += sum(info(g) * min(c, clip[g]) for g, c in _ngrams(hyp, i + 1).items() if clip[g])
        avg_ref_len += sum(len(r) for r in group) / float(len(group))
    score = sum(h / t for h, t in zip(hit_info, totals) if t)
    ratio = totals[0] / avg_ref_len if avg_ref_len else 0.0
    if ratio >= 1:
        penalty = 1.0
    elif ratio <= 0:
        penalty = 0.0
    else:
        penalty = math.exp(-_NIST_BETA * math.log(ratio) ** 2)
    return penalty * score


def coco_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[str] = ("meteor", "rouge_l", "cider"),
) -> dict[str, float]:
    """METEOR 1.5, ROUGE-L and CIDEr as the E2E scorer's pycocoevalcap computes them (after the PTB
    tokenizer; references and outputs tokenized in two separate runs, as there)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from lorma.scoring.java import meteor_stdio_score, ptb_tokenize

    flat_refs = [r for group in references for r in group]
    tok_flat = iter(ptb_tokenize(flat_refs))
    gts = {i: [next(tok_flat) for _ in group] for i, group in enumerate(references)}
    res = {i: [h] for i, h in enumerate(ptb_tokenize(predictions))}
    out: dict[str, float] = {}
    if "meteor" in metrics:
        out["meteor"] = 100.0 * meteor_stdio_score([res[i][0] for i in res], [gts[i] for i in gts])
    if "rouge_l" in metrics:
        out["rouge_l"] = 100.0 * float(Rouge().compute_score(gts, res)[0])
    if "cider" in metrics:
        out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out


def score_e2e_official(
    predictions: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str] = E2E_METRICS
) -> dict[str, float]:
    """The official E2E scores named in ``metrics`` (see the module doc for scales).

    Outputs and references are stripped as the scorer reads them from its files.
    """
    preds = [p.strip() for p in predictions]
    refs = [[r.strip() for r in group] for group in references]
    out: dict[str, float] = {}
    if "bleu" in metrics:
        out["bleu"] = mteval_bleu(preds, refs)
    if "nist" in metrics:
        out["nist"] = mteval_nist(preds, refs)
    java_metrics = [m for m in metrics if m in JAVA_METRICS]
    if java_metrics:
        out.update(coco_scores(preds, refs, java_metrics))
    return {m: out[m] for m in metrics}
