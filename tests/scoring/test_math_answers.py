"""Math answer extraction and comparison, accuracy, and ``lorma evaluate`` for GSM8K / MATH."""

from __future__ import annotations

import json

import pytest

from lorma.cli import main
from lorma.scoring.data_to_text import MetricDataError
from lorma.scoring.math_answers import answers_match, extract_answer, normalize_answer, parse_number, score_math


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("1,000", "1000"),
        ("$1,000.00", "1000"),
        ("1,234,567", "1234567"),
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{1}{2}", r"\frac12"),
        (r"\tfrac34", "0.75"),
        (r"-\frac{2}{3}", "-2/3"),
        (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}"),
        (r"\left( 3, 4 \right)", "(3,4)"),
        ("18 dollars", "18"),
        (r"10\text{ cm}", "10"),
        (r"10 \mbox{ inches}", "10"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"50\%", "50"),
        ("x = 5", "5"),
        ("5.", "5"),
        ("18.00", "18"),
        ("$\\$18$", "18"),
        (r"\text{(A)}", "(A)"),
        (r"\sqrt2", r"\sqrt{2}"),
        ("  7  ", "7"),
        ("3/6", "1/2"),
    ],
)
def test_equal_answers_written_differently(predicted: str, gold: str) -> None:
    assert answers_match(predicted, gold), (normalize_answer(predicted), normalize_answer(gold))


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("2", "3"),
        ("0.333", "1/3"),  # exact rationals: a rounded decimal is not the fraction
        ("(1,2)", "12"),  # a tuple's comma is not a digit-group comma
        ("1,2", "12"),
        (r"\sqrt{2}", "2"),
        ("", "0"),
        (None, "5"),
        ("-5", "5"),
    ],
)
def test_different_answers(predicted: str | None, gold: str) -> None:
    assert not answers_match(predicted, gold)


def test_parse_number() -> None:
    assert parse_number("3/4") == parse_number("0.75")
    assert parse_number("-(3)/(4)") is not None and parse_number("-(3)/(4)") < 0
    assert parse_number("x") is None and parse_number("1/0") is None


@pytest.mark.parametrize(
    ("text", "task", "expected"),
    [
        ("He earns $18 per day, so 18*7 = 126.\nThe answer is: 126", "gsm8k", "126"),
        ("Reasoning...\n#### 1,234", "gsm8k", "1,234"),
        ("There are 3 cats and 4 dogs, 7 in all.", "gsm8k", "7"),
        ("So the total is $18.50.", "gsm8k", "18.50"),
        ("The answer is: $18 per day.", "gsm8k", "18"),
        (r"We get \boxed{42}.", "gsm8k", "42"),
        (r"Thus the answer is $\boxed{\frac{1}{2}}$.", "math", r"\frac{1}{2}"),
        (r"so $x = \boxed{(1, 2)}$ and more text \boxed{3}", "math", "3"),
        ("The final answer is \\frac{3}{4}.", "math", "\\frac{3}{4}"),
        ("The answer is: \\sqrt{2}\nThen something", "math", "\\sqrt{2}"),
        ("no answer words, but 12 and 15", "math", "15"),
        ("nothing at all", "gsm8k", None),
        ("nothing at all", "math", None),
    ],
)
def test_extract_answer(text: str, task: str, expected: str | None) -> None:
    assert extract_answer(text, task) == expected


def test_score_math_counts_and_alignment() -> None:
    outputs = ["So 4.\nThe answer is: 4", r"\boxed{0.5}", "I think 7"]
    score = score_math("math", outputs, ["4", r"\frac12", "8"])
    assert (score.correct, score.total) == (2, 3)
    assert score.accuracy == pytest.approx(200 / 3)
    assert score.extracted == ["4", "0.5", "7"]
    with pytest.raises(MetricDataError, match=r"out.txt has 3 prediction\(s\) but gold.jsonl has 2 problem"):
        score_math("gsm8k", outputs, ["4", "5"], "out.txt", "gold.jsonl")


def test_lorma_evaluate_gsm8k(tmp_path, capsys) -> None:
    refs = tmp_path / "test.jsonl"
    refs.write_text(
        "\n".join(
            json.dumps({"question": q, "answer": f"work\n#### {a}"})
            for q, a in [("q1", "1,200"), ("q2", "7"), ("q3", "3")]
        )
        + "\n"
    )
    preds = tmp_path / "preds.txt"
    preds.write_text("It is 1200 dollars. The answer is: 1200\nThe answer is: 8\n#### 3\n")
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--task", "gsm8k", "--predictions", str(preds), "--references", str(refs),
                 "--output", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["scores"]["correct"] == 2 and saved["scores"]["total"] == 3
    assert "accuracy" in capsys.readouterr().out
    # never overwrite an existing output unless asked
    assert main(["evaluate", "--task", "gsm8k", "--predictions", str(preds), "--references", str(refs),
                 "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    # plain gold answers, one per line, and a count mismatch
    gold = tmp_path / "gold.txt"
    gold.write_text("1200\n8\n")
    assert main(["evaluate", "--task", "math", "--predictions", str(preds), "--references", str(gold)]) == 2
    err = capsys.readouterr().err
    assert "has 3 prediction(s) but" in err and "gold.txt has 2 problem(s)" in err


def test_lorma_evaluate_bad_reference_line(tmp_path, capsys) -> None:
    refs = tmp_path / "test.jsonl"
    refs.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{broken\n")
    preds = tmp_path / "p.txt"
    preds.write_text("1\n")
    assert main(["evaluate", "--task", "gsm8k", "--predictions", str(preds), "--references", str(refs)]) == 2
    assert "test.jsonl:2: invalid JSON" in capsys.readouterr().err
    assert main(["evaluate", "--task", "gsm8k", "--predictions", str(preds), "--references", str(refs),
                 "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 malformed record(s) (lines 2)" in out
