"""Approximate NLG metrics (``scorer="approximate"``): hand-computed CIDEr-D, ROUGE-L and TER, grouping of
references by input, WordNet offline. The official scorers: test_nlg_official_e2e.py, test_nlg_generation_eval.py."""

from __future__ import annotations

import math
import shutil

import pytest

from lorma.scoring import data_to_text as nm
from lorma.scoring import wordnet


def _wordnet_or_skip() -> None:
    try:
        nm.load_wordnet()
    except nm.WordNetUnavailableError as err:  # only when the data is genuinely not installed
        pytest.skip(f"WordNet data unavailable: {err}")


# ---------------------------------------------------------------------------------------------- CIDEr-D


def test_cider_d_worked_example_exact_and_partial_match() -> None:
    # Two inputs, so N = 2 and every n-gram found in exactly one input's references has idf ln 2; the
    # candidate-only n-grams ("d", "c d") have df 0 -> max(1, 0) = 1 -> idf ln 2 as well.
    # Input 1: candidate == reference: cosine 1 for n = 1, 2; no 3- or 4-grams (norm 0 -> 0).
    #   CIDEr-D = 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Input 2: "c d" vs "c e": n = 1 vectors {c: L, d: L} and {c: L, e: L}: dot L^2, norms sqrt(2) L
    #   each -> 1/2; n = 2 nothing shared -> CIDEr-D = 10 * 0.5 / 4 = 1.25.
    score = nm.cider_d(["a b", "c d"], [["a b"], ["c e"]])
    assert score == pytest.approx((5.0 + 1.25) / 2)


def test_cider_d_worked_example_length_penalty() -> None:
    # Input 1: candidate "a b c" (3 tokens) vs reference "a b" (2 tokens): Gaussian penalty
    # exp(-(3-2)^2 / (2 * 6^2)) = exp(-1/72). All idf are ln 2 (N = 2, df <= 1).
    # n = 1: cand {a, b, c}, ref {a, b}: dot 2 L^2 / (sqrt(3) L * sqrt(2) L) = 2 / sqrt(6)
    # n = 2: cand {ab, bc}, ref {ab}: L^2 / (sqrt(2) L * L) = 1 / sqrt(2); n = 3, 4: reference has none.
    # Input 2: "x" vs "y": nothing shared -> 0.
    one = 10.0 * math.exp(-1.0 / 72.0) * (2.0 / math.sqrt(6.0) + 1.0 / math.sqrt(2.0)) / 4.0
    assert nm.cider_d(["a b c", "x"], [["a b"], ["y"]]) == pytest.approx(one / 2)


def test_cider_d_worked_example_clipping_and_multiple_references() -> None:
    # Input 1: candidate "a a" vs references "a b" and "b b": the count of "a" in the candidate (2) is
    # clipped to the reference's (1): n = 1 with "a b": min(2L, L) * L / (2L * sqrt(2) L) = 1/(2 sqrt 2);
    # with "b b": nothing shared. The sum over references is divided by m = 2 references.
    # n = 2: "a a" shares no bigram. So CIDEr-D = 10 * (1 / (2 sqrt 2)) / 2 / 4.
    # Input 2 ("z" vs "w") adds 0; the mean over 2 inputs halves it.
    one = 10.0 * (1.0 / (2.0 * math.sqrt(2.0))) / 2.0 / 4.0
    assert nm.cider_d(["a a", "z"], [["a b", "b b"], ["w"]]) == pytest.approx(one / 2)


def test_cider_d_ngrams_in_every_input_carry_no_weight() -> None:
    # "the" is in both inputs' references: idf = ln(2/2) = 0, so matching only "the" scores 0.
    assert nm.cider_d(["the x", "the y"], [["the a"], ["the b"]]) == pytest.approx(0.0)
    # ... and a perfect match still scores 10 * (sum of per-n cosines) / 4 with the zero weights left out:
    # n = 1 vectors {the: 0, a: L} -> cosine 1; n = 2 {the a: L} -> 1; so 10 * 2 / 4 = 5 per input.
    assert nm.cider_d(["the a", "the b"], [["the a"], ["the b"]]) == pytest.approx(5.0)


def test_cider_d_is_case_insensitive_and_tokenizes_punctuation() -> None:
    assert nm.cider_d(["The end.", "x"], [["the end ."], ["y"]]) == pytest.approx(
        nm.cider_d(["the end .", "x"], [["the end ."], ["y"]])
    )


# ------------------------------------------------------------------------------ ROUGE-L, TER, BLEU, NIST


def test_rouge_l_hand_computed_best_reference() -> None:
    # LCS("the cat sat on mat", "the cat on the mat") = "the cat on mat" = 4 tokens: P = R = 4/5, F = 0.8.
    # The second reference shares nothing; the best reference counts.
    assert nm.rouge_l(["the cat sat on mat"], [["a dog", "the cat on the mat"]]) == pytest.approx(80.0)


def test_ter_hand_computed() -> None:
    # one substitution over a 4-word reference
    assert nm.ter(["a b c d"], [["a b x d"]]) == pytest.approx(25.0)
    # the closest of the references counts (both have 4 words, so the length normaliser is 4)
    assert nm.ter(["a b c d"], [["a b x d", "a b c d"]]) == pytest.approx(0.0)


def test_bleu_uses_every_reference_of_its_own_input_only() -> None:
    preds = ["the pub is near the river .", "it serves cheap french food ."]
    refs = [["a pub by the water .", "the pub is near the river ."], ["it serves cheap french food ."]]
    assert nm.bleu(preds, refs) == pytest.approx(100.0)
    # the same predictions against swapped groups: nothing lines up any more
    assert nm.bleu(preds, [refs[1], refs[0]]) < 30.0


def test_bleu_accepts_groups_of_different_sizes() -> None:
    preds = ["one two three four five", "six seven eight nine ten"]
    refs = [["one two three four five"], ["x", "y", "six seven eight nine ten"]]
    assert nm.bleu(preds, refs) == pytest.approx(100.0)


def test_nist_matches_nltk_and_survives_short_outputs() -> None:
    from nltk.translate.nist_score import corpus_nist

    preds = ["the cat sat on the mat today", "a dog barks loudly at night"]
    refs = [["the cat sat on a mat today"], ["the dog barks at night", "a dog barks loudly at night"]]
    expected = corpus_nist(
        [[r.split() for r in g] for g in refs], [p.split() for p in preds], n=5
    )
    assert nm.nist(preds, refs) == pytest.approx(expected)
    # every prediction shorter than 5 tokens: nltk alone divides by zero; the orders present are summed
    short = nm.nist(["a b", "c"], [["a b"], ["c d"]])
    assert short == pytest.approx(corpus_nist([[["a", "b"]], [["c", "d"]]], [["a", "b"], ["c"]], n=2))
    assert nm.nist(["", ""], [["a"], ["b"]]) == 0.0


def test_misaligned_inputs_name_both_counts() -> None:
    with pytest.raises(nm.MetricDataError, match=r"preds.txt has 2 prediction\(s\) but refs.txt has 3 input"):
        nm.score_data_to_text("dart", ["a", "b"], [["a"], ["b"], ["c"]], ["bleu"], "preds.txt", "refs.txt")
    with pytest.raises(nm.MetricDataError, match="input 2 has no reference"):
        nm.bleu(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="unknown metric"):
        nm.score_data_to_text("e2e", ["a"], [["a"]], ["blue"])


# ----------------------------------------------------------------------------------------------- METEOR


def test_meteor_uses_wordnet_synonyms() -> None:
    _wordnet_or_skip()
    # "car" and "auto" share a WordNet synset (and Porter stemming leaves both as they are); "cat" does
    # not: the synonym matches as well as the exact word, the other word does not match at all
    with_synonym = nm.meteor(["the car is red"], [["the auto is red"]])
    without = nm.meteor(["the cat is red"], [["the auto is red"]])
    exact = nm.meteor(["the auto is red"], [["the auto is red"]])
    assert with_synonym == pytest.approx(exact)
    assert without < with_synonym - 20


def test_meteor_best_reference_and_average() -> None:
    _wordnet_or_skip()
    from nltk.translate.meteor_score import meteor_score

    wn = nm.load_wordnet()
    preds = ["the cat sat on the mat", "dogs run fast"]
    refs = [["a cat was sitting on the mat", "the cat sat on the mat"], ["the dog runs quickly"]]
    per_input = [
        meteor_score([nm.tokenize(r) for r in g], nm.tokenize(p), wordnet=wn) for p, g in zip(preds, refs)
    ]
    assert nm.meteor(preds, refs) == pytest.approx(100.0 * sum(per_input) / 2)


def test_meteor_without_wordnet_names_the_missing_data(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(wordnet, "DEBIAN_WORDNET_DIR", tmp_path / "no-wordnet")
    monkeypatch.setenv("LORMA_WORDNET_DIR", str(tmp_path / "also-missing"))

    def no_nltk_data() -> None:
        raise LookupError("Resource wordnet not found")

    monkeypatch.setattr(wordnet, "_nltk_wordnet", no_nltk_data)
    nm.load_wordnet.cache_clear()
    try:
        with pytest.raises(nm.WordNetUnavailableError, match="wordnet-base") as info:
            nm.score_data_to_text("e2e", ["a"], [["a"]], scorer="approximate")
        assert "also-missing" in str(info.value) and "no-wordnet" in str(info.value)
    finally:
        nm.load_wordnet.cache_clear()


def test_wordnet_from_a_folder_named_by_env(tmp_path, monkeypatch) -> None:
    if not (wordnet.DEBIAN_WORDNET_DIR / "data.noun").is_file():
        pytest.skip("Debian wordnet-base is not installed")
    folder = tmp_path / "dict"
    folder.mkdir()
    for f in wordnet.DEBIAN_WORDNET_DIR.iterdir():
        if f.is_file():
            shutil.copyfile(f, folder / f.name)  # copies: nltk refuses links that lead out of the folder
    monkeypatch.setenv("LORMA_WORDNET_DIR", str(folder))
    nm.load_wordnet.cache_clear()
    try:
        wn = nm.load_wordnet()
        assert any("auto" in s.lemma_names() for s in wn.synsets("car"))
    finally:
        nm.load_wordnet.cache_clear()


def test_task_metric_sets() -> None:
    _wordnet_or_skip()
    scores = nm.score_data_to_text("e2e", ["the pub is cheap ."], [["the pub is cheap ."]], scorer="approximate")
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert scores["bleu"] == pytest.approx(100.0) and scores["rouge_l"] == pytest.approx(100.0)
    scores = nm.score_data_to_text("webnlg", ["x y z"], [["x y z"]], scorer="approximate")
    assert set(scores) == {"bleu", "meteor", "ter"} and scores["ter"] == pytest.approx(0.0)
    # the approximate scorers compute every metric for every task (TER for E2E too)
    assert nm.score_data_to_text("e2e", ["a b"], [["a b"]], ["ter"], scorer="approximate") == {"ter": 0.0}
