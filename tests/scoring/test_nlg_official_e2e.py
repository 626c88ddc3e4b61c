"""The official E2E scorer: its published outputs on ../shared/data/nlg to 4 decimals, mteval by hand, no Java.

The reference numbers are what tuetschek/e2e-metrics ``measure_scores.py -p`` prints on these files
(../shared/data/nlg/README.md): BLEU, METEOR and ROUGE-L as fractions there, 0-100 here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorma.scoring import data_to_text as nm
from lorma.scoring.e2e_official import E2E_SCORER_LABEL, mteval_bleu, mteval_nist, mteval_tokenize
from lorma.tasks.readers import read_predictions, read_reference_groups

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "nlg"
if not DATA.is_dir():  # a worktree below the main checkout's parent
    DATA = Path("/work/shared/data/nlg")

# measure_scores.py -p on (output, references): BLEU, NIST, METEOR, ROUGE_L, CIDEr as it prints them
OFFICIAL = {
    ("e2e_example_output.txt", "e2e_example_refs.txt"): (0.7203, 7.7889, 0.4801, 0.7910, 2.3039),
    ("e2e_valid_firstref_output.txt", "e2e_valid_otherrefs.txt"): (0.6056, 8.6309, 0.4495, 0.6545, 1.8831),
}


@pytest.mark.slow
@pytest.mark.parametrize("files", list(OFFICIAL), ids=["example", "valid-firstref"])
def test_official_e2e_scores_equal_the_scorers_printed_output(files) -> None:
    output, refs = files
    scores = nm.score_data_to_text(
        "e2e", read_predictions(DATA / output), read_reference_groups(DATA / refs), scorer="official"
    )
    printed = (
        round(scores["bleu"] / 100, 4),
        round(scores["nist"], 4),
        round(scores["meteor"] / 100, 4),
        round(scores["rouge_l"] / 100, 4),
        round(scores["cider"], 4),
    )
    assert printed == OFFICIAL[files]


def test_mteval_tokenization_and_lower_casing() -> None:
    # punctuation split off, period/comma kept inside numbers, dash after a digit split, lower-cased
    assert mteval_tokenize("Price: £20-25, rated 4.5 (Good).") == [
        "price", ":", "£20", "-", "25", ",", "rated", "4.5", "(", "good", ")", "."
    ]
    assert mteval_tokenize("A &amp; B") == ["a", "&", "b"]
    assert mteval_tokenize("") == [""]  # the port's empty text is one empty token


def test_mteval_bleu_by_hand() -> None:
    # candidate "the cat sat on the mat" (6 tokens) vs one reference "the cat is on the mat" (6 tokens):
    # unigram hits: the x2, cat, on, mat = 5/6; bigrams: "the cat", "on the", "the mat" = 3/5;
    # trigrams: "on the mat" = 1/4; 4-grams: 0/3 -> floored to 1e-15/3. c = r: brevity 1.
    expected = math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(1e-15 / 3)) / 4)
    assert mteval_bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(100 * expected)
    # case is ignored; the closest reference length (shorter on a tie) sets the brevity penalty:
    # candidate of 4 tokens, references of 6 and 2 tokens (both 2 away): r = 2 < c, no penalty
    assert mteval_bleu(["A B C D"], [["a b c d e f", "a b"]]) == pytest.approx(
        100 * math.exp((math.log(4 / 4) + math.log(3 / 3) + math.log(2 / 2) + math.log(1 / 1)) / 4)
    )
    # a short candidate: c = 2 < r = 4 -> exp(1 - 4/2); candidate n-gram totals 2, 1, 0, -1 as the port sums
    short = mteval_bleu(["a b"], [["a b c d"]])
    expected = math.exp(1 - 4 / 2) * math.exp(
        (math.log(2 / 2) + math.log(1 / 1) + math.log(1e-15 / 1e-9) + math.log(1e-15 / 1e-9)) / 4
    )
    assert short == pytest.approx(100 * expected)


def test_mteval_nist_by_hand() -> None:
    # One input, candidate "a b c d e f", reference "a b c d e f g" (7 words). Information weights from
    # the reference: each unigram log2(7 / 1); each longer n-gram log2(count(prefix) / count) = log2(1) = 0.
    # Order 1: 6 log2(7) / 6 candidate unigrams; orders 2-5: 0. Length penalty exp(-beta log^2(6/7)),
    # beta = -ln 0.5 / ln^2 1.5 (a candidate 2/3 of the reference length keeps half its score).
    beta = -math.log(0.5) / math.log(1.5) ** 2
    assert math.exp(-beta * math.log(2 / 3) ** 2) == pytest.approx(0.5)
    expected = math.exp(-beta * math.log(6 / 7) ** 2) * math.log2(7)
    assert mteval_nist(["a b c d e f"], [["a b c d e f g"]]) == pytest.approx(expected)
    # references are counted over the whole corpus: "x" is in the references of two inputs, 4 words in all:
    # info(x) = log2(4/2) = 1, info(y) = info(z) = log2(4/1) = 2, info(x y) = info(x z) = log2(2/1) = 1.
    # Up to bigrams: order 1 (1 + 2 + 1 + 2) / 4 candidate unigrams, order 2 (1 + 1) / 2; lengths equal.
    assert mteval_nist(["x y", "x z"], [["x y"], ["x z"]], max_n=2) == pytest.approx(6 / 4 + 2 / 2)
    # an order with no candidate n-grams at all (the port divides by zero) adds nothing: here orders 3-5
    assert mteval_nist(["x y", "x z"], [["x y"], ["x z"]]) == pytest.approx(
        6 / 4 + 2 / 2 + 0.0 / -2 + 0.0 / -4
    )


def test_official_bleu_and_nist_need_no_java(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    scores = nm.score_data_to_text("e2e", ["the pub is cheap ."], [["the pub is cheap ."]], ["bleu", "nist"])
    assert scores["bleu"] == pytest.approx(100.0)


def test_official_scorer_refuses_metrics_it_does_not_compute() -> None:
    with pytest.raises(ValueError, match="ter: not computed by the official e2e scorer.*--scorer approximate"):
        nm.score_data_to_text("e2e", ["a"], [["a"]], ["bleu", "ter"])
    with pytest.raises(ValueError, match="unknown scorer 'offical'"):
        nm.score_data_to_text("e2e", ["a"], [["a"]], ["bleu"], scorer="offical")


def _evaluate_without_java(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """``lorma evaluate`` in a fresh process whose PATH has no java."""
    preds, refs = tmp_path / "preds.txt", tmp_path / "refs.txt"
    preds.write_text("the pub is cheap .\n")
    refs.write_text("the pub is cheap .\nit is a cheap pub .\n")
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from lorma.cli import main; sys.exit(main(sys.argv[1:]))",
         "evaluate", "--task", "e2e", "--predictions", str(preds),
         "--references", str(refs), *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_missing_java_is_a_clear_error_and_approximate_is_labelled(tmp_path) -> None:
    (tmp_path / "empty-bin").mkdir()
    done = _evaluate_without_java(tmp_path)
    assert done.returncode == 2, done.stderr
    assert "no `java` on PATH" in done.stderr and "default-jre-headless" in done.stderr
    assert "--scorer approximate" in done.stderr and "Traceback" not in done.stderr
    done = _evaluate_without_java(tmp_path, "--scorer", "approximate", "--metrics", "bleu,nist,rouge_l,cider")
    assert done.returncode == 0, done.stderr
    assert "scorer: approximate" in done.stdout and "not comparable with published numbers" in done.stdout
    assert "bleu" in done.stdout and "cider" in done.stdout


def test_evaluate_prints_and_saves_the_official_label(tmp_path, capsys) -> None:
    from lorma.cli import main

    preds, refs, out = tmp_path / "preds.txt", tmp_path / "refs.txt", tmp_path / "scores.json"
    preds.write_text("the pub is cheap .\n")
    refs.write_text("the pub is cheap .\n")
    assert main(["evaluate", "--task", "e2e", "--predictions", str(preds), "--references", str(refs),
                 "--metrics", "bleu,nist", "--output", str(out)]) == 0
    assert f"scorer: {E2E_SCORER_LABEL}" in capsys.readouterr().out
    import json

    saved = json.loads(out.read_text())
    assert saved["scorer"] == E2E_SCORER_LABEL and saved["scores"]["bleu"] == pytest.approx(100.0)


def test_training_without_java_stops_before_any_work_unless_approximate(tmp_path, monkeypatch) -> None:
    from lorma.plumbing.errors import InputError
    from lorma.recipes.config import build_config
    from lorma.tasks.base import get_task

    train = tmp_path / "train.txt"
    train.write_text("name[A]||A is a pub .\nname[B]||B is a cafe .\nname[C]||C is cheap .\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here

    def task(options: dict) -> object:
        return get_task(build_config(flag_values={
            "task": "e2e", "model": "unused-before-the-check", "train_file": str(train), "task_options": options,
        }))

    with pytest.raises(InputError, match="scorer=official: .*no `java` on PATH.*default-jre-headless"):
        task({}).check_inputs()
    with pytest.raises(InputError, match="unknown scorer 'exact'"):
        task({"scorer": "exact"}).check_inputs()
    approximate = task({"scorer": "approximate", "generate": True})
    try:
        approximate.check_inputs()
    except InputError as err:  # only the approximate METEOR's WordNet may be missing
        assert "WordNet" in str(err)
    else:
        assert "not comparable" in approximate.data_summary()["scorer"]
    task({"generate": False}).check_inputs()  # nothing to score: no Java needed


def test_compare_and_train_summaries_name_the_scorer() -> None:
    from lorma.commands.train import format_run_summary
    from lorma.recipes.compare import format_markdown

    stat = {"mean": 60.5, "std": 0.0, "n": 1}
    results = {
        "task": "e2e", "model": "m", "seeds": [0], "baseline": None, "data": {"scorer": E2E_SCORER_LABEL},
        "methods": {"lora": {"metrics": {"eval_bleu": stat}, "trainable_params": 10, "loss_auc": stat,
                             "seconds_per_step": stat, "run_dirs": ["runs/x"]}},
    }
    assert f"Scores computed by the {E2E_SCORER_LABEL}." in format_markdown(results)
    run = {"method": "lora", "task": "e2e", "seed": 0, "global_step": 1, "trainable_params": 10,
           "total_params": 20, "eval": {"eval_bleu": 60.5}, "data": {"scorer": E2E_SCORER_LABEL}}
    assert f"scorer: {E2E_SCORER_LABEL}" in format_run_summary(run, "runs/x")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_the_meteor_jvm_is_kept_for_the_next_call_and_a_forked_copy_leaves_it() -> None:
    import gc

    from lorma.scoring import java

    hypotheses = ["the cat sat on the mat", "a dog ran"]
    references = [["the cat is on the mat", "a cat sat on a mat"], ["the dog runs"]]
    first = java.meteor_stdio_score(hypotheses, references)
    assert java._kept_meteor is not None
    owner, kept = java._kept_meteor
    assert owner == os.getpid() and kept.meteor_p.poll() is None
    assert java.meteor_stdio_score(hypotheses[:1], references[:1]) != first  # another corpus, its own EVAL
    assert java.meteor_stdio_score(hypotheses, references) == first
    assert java._kept_meteor[1] is kept  # no second JVM
    child = os.fork()
    if child == 0:  # a forked copy, dropped and collected: its __del__ closes and kills, but only its own
        java._kept_meteor = None
        del kept
        gc.collect()
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert status == 0
    assert kept.meteor_p.poll() is None and java._kept_meteor[1] is kept
    assert java.meteor_stdio_score(hypotheses, references) == first


def test_a_meteor_jvm_that_stops_answering_is_an_error_and_is_not_kept() -> None:
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    from lorma.scoring import java
    from lorma.scoring.java import OfficialScorerError

    # in place of the JVM, a process that is alive but has closed its output, as a JVM that died mid-answer has
    dead = Meteor.__new__(Meteor)
    dead.meteor_p = subprocess.Popen(["sh", "-c", "exec 1>&-; echo gone >&2; exec sleep 60"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dead.lock = threading.Lock()
    before = java._kept_meteor
    java._kept_meteor = (os.getpid(), dead)
    try:
        with pytest.raises(OfficialScorerError, match="METEOR 1.5 failed .*gone"):
            java.meteor_stdio_score(["a cat"], [["the cat"]])
        assert dead.meteor_p.wait(timeout=10) is not None  # ended, not left running
        assert not dead.lock.locked() and java._kept_meteor is None  # the next call starts a new JVM
    finally:
        dead.meteor_p.kill()
        java._kept_meteor = before
