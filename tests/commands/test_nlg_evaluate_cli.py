"""``lorma evaluate`` for the data-to-text tasks: every references layout, mismatches, outputs."""

from __future__ import annotations

import json

import pytest

from lorma.cli import main
from lorma.scoring import data_to_text as nm


def _wordnet_or_skip() -> None:
    try:
        nm.load_wordnet()
    except nm.WordNetUnavailableError as err:
        pytest.skip(f"WordNet data unavailable: {err}")


PREDS = ["Aromi serves Chinese food .", "Cotto is a pub by the river ."]
GROUPS = [["Aromi is a Chinese restaurant .", "Aromi serves Chinese food ."], ["Cotto is a riverside pub ."]]


def _evaluate(tmp_path, task: str, refs_file, extra: list[str] | None = None) -> dict:
    preds = tmp_path / "preds.txt"
    preds.write_text("\n".join(PREDS) + "\n")
    out = tmp_path / f"scores-{refs_file.name}.json"
    code = main(["evaluate", "--task", task, "--predictions", str(preds), "--references", str(refs_file),
                 "--output", str(out), "--overwrite", *(extra or [])])
    assert code == 0
    return json.loads(out.read_text())["scores"]


def test_e2e_csv_separator_and_blank_line_layouts_agree(tmp_path) -> None:
    _wordnet_or_skip()
    csv_file = tmp_path / "test.csv"
    csv_file.write_text(
        "mr,ref\n"
        + "".join(f'"{mr}","{ref}"\n' for mr, group in zip(["name[Aromi]", "name[Cotto]"], GROUPS) for ref in group)
    )
    sep_file = tmp_path / "test.txt"
    sep_file.write_text(
        "".join(f"{mr}||{ref}\n" for mr, group in zip(["name[Aromi]", "name[Cotto]"], GROUPS) for ref in group)
    )
    blank_file = tmp_path / "refs.txt"
    blank_file.write_text("\n\n".join("\n".join(g) for g in GROUPS) + "\n")
    # the layouts are what is tested here: the official BLEU and NIST (no Java) and the approximate set
    official = ["--metrics", "bleu,nist"]
    expected = nm.score_data_to_text("e2e", PREDS, GROUPS, ["bleu", "nist"])
    for layout in (csv_file, sep_file, blank_file):
        assert _evaluate(tmp_path, "e2e", layout, official) == pytest.approx(expected)
    approximate = nm.score_data_to_text("e2e", PREDS, GROUPS, scorer="approximate")
    for layout in (csv_file, blank_file):
        scores = _evaluate(tmp_path, "e2e", layout, ["--scorer", "approximate"])
        assert scores == pytest.approx(approximate)
    assert set(approximate) == {"bleu", "nist", "meteor", "rouge_l", "cider"}


def test_dart_json_references_and_metric_subset(tmp_path) -> None:
    dart = tmp_path / "dart.json"
    dart.write_text(json.dumps([
        {"tripleset": [["Aromi", "food", "Chinese"]], "annotations": [{"text": t} for t in GROUPS[0]]},
        {"tripleset": [["Cotto", "area", "riverside"]], "annotations": [{"text": t} for t in GROUPS[1]]},
    ]))
    scores = _evaluate(tmp_path, "dart", dart, ["--metrics", "bleu,ter", "--scorer", "approximate"])
    assert scores == pytest.approx({"bleu": nm.bleu(PREDS, GROUPS), "ter": nm.ter(PREDS, GROUPS)})
    from lorma.scoring.generation_eval import score_generation_eval

    scores = _evaluate(tmp_path, "dart", dart, ["--metrics", "bleu,ter"])  # official by default
    assert scores == pytest.approx(score_generation_eval(PREDS, GROUPS, ["bleu", "ter"]))


def test_count_mismatch_names_both_files_and_counts(tmp_path, capsys) -> None:
    preds = tmp_path / "preds.txt"
    preds.write_text("one\ntwo\nthree\n")
    refs = tmp_path / "refs.txt"
    refs.write_text("a\nb\n\nc\n")
    assert main(["evaluate", "--task", "webnlg", "--predictions", str(preds), "--references", str(refs)]) == 2
    err = capsys.readouterr().err
    assert "preds.txt has 3 prediction(s) but" in err and "refs.txt has 2 input(s)" in err


def test_malformed_reference_file_and_skip_bad(tmp_path, capsys) -> None:
    refs = tmp_path / "refs.txt"
    refs.write_text("name[A]||A is a pub near the river.\nname[B] without separator\nname[C]||C is cheap and good.\n")
    preds = tmp_path / "preds.txt"
    preds.write_text("A is a pub near the river.\nC is cheap and good.\n")
    assert main(["evaluate", "--task", "e2e", "--predictions", str(preds), "--references", str(refs),
                 "--metrics", "bleu"]) == 2
    assert "refs.txt:2: expected one 'MR||reference' separator" in capsys.readouterr().err
    assert main(["evaluate", "--task", "e2e", "--predictions", str(preds), "--references", str(refs),
                 "--metrics", "bleu", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 malformed record(s) (lines 2)" in out and "100.0000" in out


def test_e2e_inputs_without_references_are_refused(tmp_path, capsys) -> None:
    refs = tmp_path / "test.csv"
    refs.write_text("mr\nname[A]\n")
    preds = tmp_path / "preds.txt"
    preds.write_text("A.\n")
    assert main(["evaluate", "--task", "e2e", "--predictions", str(preds), "--references", str(refs)]) == 2
    assert "test.csv:2: input without references" in capsys.readouterr().err


def test_unknown_metric_and_missing_files(tmp_path, capsys) -> None:
    preds = tmp_path / "preds.txt"
    preds.write_text("A.\n")
    assert main(["evaluate", "--task", "dart", "--predictions", str(preds), "--references",
                 str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    refs = tmp_path / "r.txt"
    refs.write_text("A.\n")
    assert main(["evaluate", "--task", "dart", "--predictions", str(preds), "--references", str(refs),
                 "--metrics", "bleu,rouge"]) == 2
    assert "unknown metric(s) ['rouge']" in capsys.readouterr().err
