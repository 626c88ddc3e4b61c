"""The recipe study of docs/main-job.md ("A result on your own task the first time"): why small, skewed
classification runs stayed at the label prior, and whether the new recipe learns.

Each run is an ordinary ``lorma train`` run (all-MiniLM-L6-v2, a packaged dataset of
:mod:`lorma.tasks.readers.packaged_data`) with one *recipe*: a named set of settings (below). Runs land in
``OUT/<dataset>/<recipe>/<method>/seed-<n>/``; a run with a ``metrics.json`` is not trained again, so the study
can be stopped and continued. ``--report`` prints the table: per dataset, recipe and method, how many seeds
collapsed, and macro-F1 (mean and a 95% t interval over seeds) against the majority baseline.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/recipe_study.py OUT --datasets tweets-imbalanced \\
        --recipes old,new --methods lora,lorma-plus,lorma-pi --seeds 3
    .venv/bin/python scripts/recipe_study.py OUT --report
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The recipes compared. "old" is the recipe before issue 22 as the user ran it (the family's learning rate
# 1e-3, the head at the same rate, 150 steps); the others change one thing each, then "new" is the default now.
OLD: dict[str, Any] = {"max_steps": 150, "learning_rate": 1e-3, "head_learning_rate": "same", "class_weights": "none"}
RECIPES: dict[str, dict[str, Any]] = {
    "old": OLD,
    "old-lr3e-3": {**OLD, "learning_rate": 3e-3},
    "old-balanced": {**OLD, "class_weights": "balanced"},
    "old-head5e-3": {**OLD, "head_learning_rate": 5e-3},
    "old-epochs10": {**{k: v for k, v in OLD.items() if k != "max_steps"}, "num_train_epochs": 10},
    "old-seq256": {**OLD, "max_seq_length": 256},
    "new": {},
    "new-150": {"max_steps": 150},
    "auto": {"learning_rate": "auto"},
    "auto-150": {"max_steps": 150, "learning_rate": "auto"},
}
TRAINING_KEYS = ("max_steps", "learning_rate", "num_train_epochs")


def run_config(dataset: str, recipe: str, method: str, seed: int, out: Path, data_dir: Path) -> Any:
    from lorma.recipes.config import build_config
    from lorma.recipes.demo import minilm_path
    from lorma.tasks.readers.packaged_data import write_dataset

    train, test = data_dir / f"{dataset}-train.csv", data_dir / f"{dataset}-test.csv"
    if not (train.is_file() and test.is_file()):
        train, test = write_dataset(dataset, data_dir)
    settings: dict[str, Any] = {
        "model": minilm_path(), "train_file": str(train), "eval_file": str(test), "method": method,
        "seed": seed, "output_dir": str(out / dataset / recipe / method / f"seed-{seed}"),
        "training": {"save_strategy": "no", "report_to": "none", "eval_strategy": "no"},
    }
    from lorma.recipes.config import RUN_FIELDS

    for key, value in RECIPES[recipe].items():
        if key not in RUN_FIELDS and key not in TRAINING_KEYS:
            raise SystemExit(f"recipe {recipe}: '{key}' is not a setting of this version of lorma")
        if key in TRAINING_KEYS:
            settings["training"][key] = value
        else:
            settings[key] = value
    return build_config(settings, {}, source=f"recipe {recipe}")


def train_all(args: argparse.Namespace) -> None:
    from lorma.plumbing.errors import InputError
    from lorma.recipes.train import run_training

    out = Path(args.out)
    # seeds outermost: a stopped study has every cell at the same number of seeds
    for seed in range(args.seeds):
        for dataset in args.datasets:
            for recipe in args.recipes:
                for method in args.methods:
                    cfg = run_config(dataset, recipe, method, seed, out, out / "data")
                    if (Path(cfg.output_dir) / "metrics.json").is_file():
                        continue
                    if cfg.learning_rate_auto and seed > 0:  # as lorma compare: the first seed's range test
                        first = Path(cfg.output_dir).parent / "seed-0" / "metrics.json"
                        if not first.is_file():
                            continue  # the first seed has not run yet (it comes first in a full study)
                        rates = json.loads(first.read_text())["learning_rate"]
                        cfg = dataclasses.replace(
                            cfg, training={**cfg.training, "learning_rate": rates["body"]},
                            head_learning_rate="same" if rates["head"] == rates["body"] else str(rates["head"]))
                    started = time.time()
                    try:
                        metrics = run_training(cfg, overwrite=True)
                    except InputError as err:  # another study process is training this run: leave it to it
                        if "is in use by" not in str(err):
                            raise
                        continue
                    print(json.dumps({"dataset": dataset, "recipe": recipe, "method": method, "seed": seed,
                                      "macro_f1": metrics["eval"].get("eval_macro_f1"),
                                      "collapsed": metrics.get("collapsed"),
                                      "seconds": round(time.time() - started, 1)}), flush=True)


def _interval(values: list[float]) -> str:
    from scipy import stats

    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}]"


def report(args: argparse.Namespace) -> None:
    out = Path(args.out)
    rows = []
    for path in sorted(out.glob("*/*/*/seed-*/metrics.json")):
        dataset, recipe, method = path.parts[-5:-2]
        metrics = json.loads(path.read_text())
        rows.append((dataset, recipe, method, metrics))
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for dataset, recipe, method, metrics in rows:
        groups.setdefault((dataset, recipe, method), []).append(metrics)
    print("| data | recipe | method | collapsed | macro-F1 (95% t interval) | accuracy | majority macro-F1 | lr |")
    print("|---|---|---|---|---|---|---|---|")
    for (dataset, recipe, method), runs in sorted(groups.items()):
        f1 = [float(m["eval"]["eval_macro_f1"]) for m in runs]
        acc = [float(m["eval"]["eval_accuracy"]) for m in runs]
        collapsed = sum(bool(m.get("collapsed")) for m in runs)
        base = (runs[0].get("baseline") or {}).get("eval_macro_f1", math.nan)
        rates = sorted({f"{float(m.get('learning_rate', {}).get('body', math.nan)):.2g}"
                        if isinstance(m.get("learning_rate"), dict) else "-" for m in runs})
        print(f"| {dataset} | {recipe} | {method} | {collapsed}/{len(runs)} | {_interval(f1)} | "
              f"{sum(acc) / len(acc):.3f} | {base:.3f} | {','.join(rates)} |")


def pivot(args: argparse.Namespace) -> None:
    """One row per dataset and method, one column per recipe of ``--recipes``: macro-F1 mean (and its 95% t
    interval with 2 seeds or more), collapsed runs / runs."""
    out = Path(args.out)
    print("| data | method | majority | " + " | ".join(args.recipes) + " |")
    print("|---|---|---|" + "---|" * len(args.recipes))
    for dataset in args.datasets:
        for method in args.methods:
            cells, base = [], math.nan
            for recipe in args.recipes:
                runs = [json.loads(p.read_text()) for p in sorted((out / dataset / recipe / method).glob(
                    "seed-*/metrics.json"))]
                if not runs:
                    cells.append("-")
                    continue
                base = (runs[0].get("baseline") or {}).get("eval_macro_f1", base)
                f1 = [float(m["eval"]["eval_macro_f1"]) for m in runs]
                collapsed = sum(bool(m.get("collapsed")) for m in runs)
                cells.append(f"{_interval(f1)}, {collapsed}/{len(runs)} collapsed")
            print(f"| {dataset} | {method} | {base:.3f} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--datasets", type=lambda s: s.split(","), default=["tweets-imbalanced"])
    parser.add_argument("--recipes", type=lambda s: s.split(","), default=["old", "new"])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["lora", "lorma-plus", "lorma-pi"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--report", action="store_true", help="every dataset, recipe and method found in OUT")
    parser.add_argument("--pivot", action="store_true", help="--datasets x --methods, one column per --recipes")
    args = parser.parse_args()
    if args.pivot:
        pivot(args)
    elif args.report:
        report(args)
    else:
        train_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
