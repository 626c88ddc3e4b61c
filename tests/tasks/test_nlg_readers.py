"""Readers of E2E / DART / WebNLG / GSM8K / MATH / MetaMathQA files: grouping, file:line errors, skip_bad."""

from __future__ import annotations

import json

import pytest

from lorma.scoring.math_answers import boxed_answer
from lorma.tasks import readers as rd


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------------- E2E


def test_e2e_csv_groups_references_by_mr_in_first_seen_order(tmp_path) -> None:
    f = _write(
        tmp_path / "dev.csv",
        'mr,ref\n'
        '"name[Aromi], food[Chinese]",Aromi serves Chinese food.\n'
        '"name[Cotto], area[riverside]","Cotto is by the\nriver."\n'
        '"name[Aromi], food[Chinese]",  Aromi is a  Chinese place.\n',
    )
    result = rd.read_e2e(f)
    assert [ex.source for ex in result.items] == ["name[Aromi], food[Chinese]", "name[Cotto], area[riverside]"]
    assert result.items[0].references == ("Aromi serves Chinese food.", "Aromi is a Chinese place.")
    assert result.items[1].references == ("Cotto is by the river.",)  # whitespace, newlines collapsed
    assert [ex.line for ex in result.items] == [2, 3]
    assert result.skipped == 0


def test_e2e_csv_without_ref_column_gives_inputs_only(tmp_path) -> None:
    f = _write(tmp_path / "test.csv", 'MR\n"name[A], food[B]"\n"name[C]"\n')
    result = rd.read_e2e(f)
    assert [ex.references for ex in result.items] == [(), ()]


def test_e2e_csv_bad_row_names_the_line_after_a_multiline_field(tmp_path) -> None:
    f = _write(
        tmp_path / "train.csv",
        'mr,ref\n'
        '"name[A]","first line\nsecond line"\n'  # lines 2-3
        '"name[B]",ok\n'  # line 4
        '"name[C]",too,many\n',  # line 5
    )
    with pytest.raises(rd.DataFormatError, match=r"train.csv:5: row has 3 fields, the header has 2"):
        rd.read_e2e(f)
    result = rd.read_e2e(f, skip_bad=True)
    assert result.skipped == 1 and result.skipped_lines == [5]
    assert len(result.items) == 2
    assert "skipped 1 malformed record(s) (lines 5)" in (result.skip_message() or "")


def test_e2e_csv_header_and_empty_fields(tmp_path) -> None:
    with pytest.raises(rd.DataFormatError, match=r"x.csv:1: CSV header .* has no 'mr' column"):
        rd.read_e2e(_write(tmp_path / "x.csv", "meaning,ref\na,b\n"))
    with pytest.raises(rd.DataFormatError, match=r"y.csv:3: empty 'ref' field"):
        rd.read_e2e(_write(tmp_path / "y.csv", "mr,ref\nname[A],fine\nname[B],\n"))


def test_e2e_separator_lines(tmp_path) -> None:
    f = _write(tmp_path / "train.txt", "name[A]||A is here.\n\nname[A]||Here is A.\nname[B] || B.\n")
    result = rd.read_e2e(f)
    assert [(ex.source, ex.references) for ex in result.items] == [
        ("name[A]", ("A is here.", "Here is A.")),
        ("name[B]", ("B.",)),
    ]
    bad = _write(tmp_path / "bad.txt", "name[A]||A.\nname[B] B.\nname[C]||x||y\n||empty mr\n")
    with pytest.raises(rd.DataFormatError, match=r"bad.txt:2: expected one 'MR\|\|reference' separator, found 0"):
        rd.read_e2e(bad)
    result = rd.read_e2e(bad, skip_bad=True)
    assert result.skipped == 3 and result.skipped_lines == [2, 3, 4] and len(result.items) == 1


def test_missing_file_and_bad_encoding(tmp_path) -> None:
    with pytest.raises(rd.DataFormatError, match="nope.txt: no such file"):
        rd.read_e2e(tmp_path / "nope.txt")
    f = tmp_path / "latin.txt"
    f.write_bytes(b"name[A]||ok\nname[B]||caf\xe9\n")
    with pytest.raises(rd.DataFormatError, match=r"latin.txt:2: not valid UTF-8"):
        rd.read_e2e(f)


# ------------------------------------------------------------------------------------------------- DART


def test_dart_records_linearised_with_line_numbers(tmp_path) -> None:
    records = [
        {"tripleset": [["Mars_Hotel", "LOCATION", "\"Paris\""]], "annotations": [{"text": "Mars Hotel is in Paris."}]},
        {"tripleset": [["A", "p", "B"], ["A", "q", "C"]], "annotations": [{"text": "x"}, {"text": "y"}]},
    ]
    f = _write(tmp_path / "dart.json", json.dumps(records, indent=2))
    result = rd.read_dart(f)
    assert result.items[0].source == "Mars Hotel : LOCATION : Paris"
    assert result.items[1].source == "A : p : B | A : q : C"
    assert result.items[1].references == ("x", "y")
    lines = f.read_text().splitlines()
    assert lines[result.items[1].line - 1].strip() == "{"  # the record's opening brace
    assert result.items[0].line == 2


def test_dart_bad_record_and_bad_json(tmp_path) -> None:
    text = json.dumps(
        [{"tripleset": [["a", "b", "c"]], "annotations": []}, {"tripleset": [["a", "b"]], "annotations": []}],
        indent=1,
    )
    f = _write(tmp_path / "d.json", text)
    second = text.splitlines().index(" {", 2) + 1
    with pytest.raises(rd.DataFormatError, match=rf"d.json:{second}: each triple in 'tripleset' must be a list of 3"):
        rd.read_dart(f)
    assert rd.read_dart(f, skip_bad=True).skipped == 1
    broken = _write(tmp_path / "broken.json", '[\n {"tripleset": [["a","b","c"]]},\n {"tripleset": [}\n]')
    with pytest.raises(rd.DataFormatError, match=r"broken.json:3: invalid JSON"):
        rd.read_dart(broken, skip_bad=True)  # a broken JSON list cannot be skipped past
    not_list = _write(tmp_path / "obj.json", '{"tripleset": 1}')
    with pytest.raises(rd.DataFormatError, match="obj.json:1: 'tripleset' must be a non-empty list"):
        rd.read_dart(not_list)


# ----------------------------------------------------------------------------------------------- WebNLG


def test_webnlg_entries_good_lexicalisations_and_lines(tmp_path) -> None:
    data = {
        "entries": [
            {"1": {"category": "Airport", "size": "1",
                   "modifiedtripleset": [{"subject": "Aarhus_Airport", "property": "cityServed", "object": "Aarhus"}],
                   "lexicalisations": [{"lex": "Aarhus Airport serves Aarhus.", "comment": "good"},
                                       {"lex": "bad one", "comment": "toFix"}]}},
            {"2": {"category": "Food",
                   "modifiedtripleset": [{"subject": "Bacon", "property": "country", "object": "\"UK\""}],
                   "lexicalisations": [{"lex": "Only lex.", "comment": "toFix"}]}},
            {"3": {"category": "Food", "modifiedtripleset": [], "lexicalisations": []}},
        ],
        "meta": "after",
    }
    f = _write(tmp_path / "webnlg.json", json.dumps(data, indent=2))
    with pytest.raises(rd.DataFormatError) as info:
        rd.read_webnlg(f)
    lines = f.read_text().splitlines()
    assert "non-empty list of {subject, property, object}" in str(info.value)
    assert '"3"' in lines[info.value.line] or '"3"' in lines[info.value.line - 1]
    result = rd.read_webnlg(f, skip_bad=True)
    assert result.skipped == 1
    first, second = result.items
    assert first.source == "Aarhus Airport : cityServed : Aarhus" and first.category == "Airport"
    assert first.references == ("Aarhus Airport serves Aarhus.",)
    assert second.source == "Bacon : country : UK"
    assert second.references == ("Only lex.",)  # no "good" one: all are kept rather than none


def test_webnlg_without_entries(tmp_path) -> None:
    with pytest.raises(rd.DataFormatError, match="has no 'entries' list"):
        rd.read_webnlg(_write(tmp_path / "w.json", '{"meta": [1, 2]}'))


# ------------------------------------------------------------------------------------------------- math


def test_gsm8k_jsonl(tmp_path) -> None:
    f = _write(
        tmp_path / "gsm8k.jsonl",
        json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n\n"
        + json.dumps({"question": "Pay?", "answer": "It costs 1,200 dollars.\n#### 1,200"}) + "\n"
        + json.dumps({"question": "Q", "answer": "no marker"}) + "\n"
        + "{not json\n",
    )
    with pytest.raises(rd.DataFormatError, match=r"gsm8k.jsonl:4: the 'answer' field has no final answer after"):
        rd.read_gsm8k(f)
    result = rd.read_gsm8k(f, skip_bad=True)
    assert [ex.answer for ex in result.items] == ["4", "1,200"]
    assert result.skipped_lines == [4, 5]


def test_math_boxed_nested_and_single_object_file(tmp_path) -> None:
    sol = r"We get $\frac{1}{2}$, so the answer is $\boxed{\frac{\sqrt{3}}{2}}$."
    f = _write(tmp_path / "1.json", json.dumps({"problem": "P", "solution": sol, "level": "Level 2",
                                                "type": "Algebra"}, indent=2))
    [ex] = rd.read_math(f).items
    assert ex.answer == r"\frac{\sqrt{3}}{2}" and ex.kind == "Algebra" and ex.line == 1
    g = _write(tmp_path / "math.jsonl", json.dumps({"problem": "P", "solution": "no box"}) + "\n")
    with pytest.raises(rd.DataFormatError, match=r"math.jsonl:1: the 'solution' field has no \\boxed"):
        rd.read_math(g)


def test_boxed_answer_forms() -> None:
    assert boxed_answer(r"\boxed{1} then \boxed{ {2}+1 }") == "{2}+1"
    assert boxed_answer(r"so \boxed 5$.") == "5"
    assert boxed_answer(r"\fbox{x}") == "x"
    assert boxed_answer("none") is None
    assert boxed_answer(r"\boxed{unclosed") is None


def test_metamathqa(tmp_path) -> None:
    records = [
        {"query": "What is 3*4?", "response": "3*4 = 12.\nThe answer is: 12", "type": "GSM_Rephrased"},
        {"query": "", "response": "x"},
    ]
    f = _write(tmp_path / "metamath.json", json.dumps(records, indent=1))
    with pytest.raises(rd.DataFormatError, match=r"metamath.json:7: a MetaMathQA record needs non-empty"):
        rd.read_metamathqa(f)
    result = rd.read_metamathqa(f, skip_bad=True)
    assert [(ex.answer, ex.kind) for ex in result.items] == [("12", "GSM_Rephrased")]


# ------------------------------------------------------------------------------------------ plain files


def test_predictions_and_reference_groups(tmp_path) -> None:
    p = _write(tmp_path / "p.txt", "one\n\nthree\n")
    assert rd.read_predictions(p) == ["one", "", "three"]
    r = _write(tmp_path / "r.txt", "a1\na2\n\n\nb1\n\nc1\nc2\nc3")
    assert rd.read_reference_groups(r) == [("a1", "a2"), ("b1",), ("c1", "c2", "c3")]
    with pytest.raises(rd.DataFormatError, match="no references"):
        rd.read_reference_groups(_write(tmp_path / "e.txt", "\n\n"))
