"""WebNLG / DART official scores (LoRA's decode step + GenerationEval), against hand computations."""

from __future__ import annotations

import math

import pytest

from lorma.scoring import data_to_text as nm
from lorma.scoring.generation_eval import (
    GENERATION_EVAL_LABEL,
    generation_eval_ter,
    lora_decode_text,
    multi_bleu_detok,
    nltk_word_tokenize,
    score_generation_eval,
)


def test_lora_decode_step_lowercases_and_splits_every_non_word_character() -> None:
    text = "  Aarhus Airport's runway (length: 2,776.0)."
    decoded = lora_decode_text(text)
    assert decoded == "aarhus airport ' s runway ( length : 2 , 776 . 0 ) ."
    assert lora_decode_text(decoded) == decoded  # idempotent: pre-decoded files score the same
    assert lora_decode_text("Café Sicilia") == "café sicilia"  # \\W is Unicode-aware, as in Python 3


def test_nltk_word_tokenizer_on_decoded_text() -> None:
    # on decoded text, nltk's only changes: double quotes -> ``, "cannot" -> "can not"
    assert nltk_word_tokenize('he said " it cannot be " .') == "he said `` it can not be `` ."
    assert nltk_word_tokenize("the cat is on the mat .") == "the cat is on the mat ."


def test_multi_bleu_detok_by_hand() -> None:
    ref = ["the cat is on the mat"]
    # 7-token output, 6-token reference: precisions 6/7, 5/6, 4/5, 3/4, no brevity penalty (c > r)
    assert multi_bleu_detok(["the cat is on the mat today"], [ref]) == pytest.approx(100 * (3 / 7) ** 0.25)
    # a 4-token prefix: every precision 1, brevity exp(1 - 6/4)
    assert multi_bleu_detok(["the cat is on"], [ref]) == pytest.approx(100 * math.exp(1 - 6 / 4))
    # case-sensitive (no -lc): "The" does not match, and an order without any hit makes BLEU 0
    assert multi_bleu_detok(["The cat is on"], [ref]) == 0.0
    # closest reference length, the shorter on a tie (6 and 2 are both 2 away from 4): r = 2, no penalty
    assert multi_bleu_detok(["a b c d"], [["a b c d e f", "a b"]]) == pytest.approx(100.0)
    # clipping by the largest count in any one reference: "a" x4 against "a a b c": unigrams 2/4,
    # bigrams "a a" x3 clipped to 1 -> 1/3, trigrams 0/2 -> BLEU 0
    assert multi_bleu_detok(["a a a a"], [["a a b c", "a d"]]) == 0.0
    # the script stops without a score when there are no output words: 0 here
    assert multi_bleu_detok([""], [ref]) == 0.0


def test_generation_eval_ter_by_hand_including_the_final_newline_input() -> None:
    # one substitution over 4 reference words: 0.25; GenerationEval's files end with a newline, which it
    # reads as one more, empty input scored 1.0: mean (0.25 + 1) / 2
    assert generation_eval_ter(["a b c d"], [["a b x d"]]) == pytest.approx(100 * (0.25 + 1) / 2)
    # the best reference counts
    assert generation_eval_ter(["a b c d"], [["a b x d", "a b c d"]]) == pytest.approx(100 * (0 + 1) / 2)
    # pyter's shift: "b c a" -> "a b c" is one shift of "a", no edit: 1/3
    assert generation_eval_ter(["b c a"], [["a b c"]]) == pytest.approx(100 * (1 / 3 + 1) / 2)
    # an empty reference scores 1.0, as GenerationEval scores it
    assert generation_eval_ter(["a"], [[""]]) == pytest.approx(100.0)


def test_score_generation_eval_bleu_and_ter_after_the_decode_step() -> None:
    preds = ["The cat is on the mat today."]
    refs = [["the cat is on the mat."]]
    scores = score_generation_eval(preds, refs, ["bleu", "ter"])
    # decoded: "the cat is on the mat today ." (8) vs "the cat is on the mat ." (7):
    # precisions 7/8, 5/7, 4/6, 3/5 -> product 1/4; c > r. TER: one deletion over 7 words.
    assert scores["bleu"] == pytest.approx(100 * 0.25**0.25)
    assert scores["ter"] == pytest.approx(100 * (1 / 7 + 1) / 2)
    # at most 6 references per input (gpt2_decode --ref_num 6): a 7th identical reference is not seen
    seven = [[f"other {i}" for i in range(6)] + ["The cat is on the mat today."]]
    assert score_generation_eval(preds, seven, ["bleu"])["bleu"] == 0.0
    assert score_generation_eval(preds, [seven[0][-1:]], ["bleu"])["bleu"] == pytest.approx(100.0)


def test_webnlg_and_dart_default_to_generation_eval() -> None:
    assert nm.scorer_label("webnlg") == nm.scorer_label("dart") == GENERATION_EVAL_LABEL
    assert "not comparable" in nm.scorer_label("dart", "approximate")
    with pytest.raises(ValueError, match="nist: not computed by the official dart scorer"):
        nm.score_data_to_text("dart", ["a"], [["a"]], ["nist"])


@pytest.mark.slow
def test_generation_eval_meteor_identical_disjoint_and_best_reference() -> None:
    preds = ["The cat is on the mat.", "x y z"]
    refs = [["a dog barks", "The cat is on the mat."], ["a b c"]]
    # METEOR 1.5 aggregates over the corpus: identical to its best reference (one chunk, no fragmentation
    # penalty) -> 1; with a second input that has nothing in common with its one reference (the reference file
    # padded to two per input), strictly between. Each call starts the jar (10 s: its paraphrase table), so two.
    assert score_generation_eval(preds[:1], refs[:1], ["meteor"])["meteor"] == pytest.approx(100.0)
    both = score_generation_eval(preds, refs, ["meteor"])["meteor"]
    assert 0.0 < both < 100.0
