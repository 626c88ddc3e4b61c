"""The table and verdicts of docs/variants.md from the runs of ``configs/variants.yaml``.

Reads ``RUNS/seed-*/<method>/seed-*/metrics.json`` (one ``lorma compare --seeds 1 --seed S`` per seed, so that a
finished seed is kept when a later one is cut short), prints mean +- sd over seeds per method, then each variant
against its counterparts with :func:`lorma.recipes.verdicts.compare_verdicts` (the paired interval over seeds and
the paired bootstrap over eval examples that ``lorma compare`` prints).

    python scripts/variants_table.py runs/variants
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from lorma.plumbing.fileio import read_json
from lorma.recipes.verdicts import compare_verdicts

ORDER = ["lorma-plus", "dorma-plus", "dorma-pi", "dora", "adalorma", "adalora", "dylorma", "lora"]
# (variant, the method it is judged against): its additive counterpart, and plain LoRMA+
PAIRS = [("dorma-plus", "dora"), ("dorma-plus", "lorma-plus"), ("dorma-pi", "dora"), ("adalorma", "adalora"),
         ("adalorma", "lorma-plus"), ("dylorma", "lora"), ("dylorma", "lorma-plus"), ("lorma-plus", "lora")]


def _fmt(values: list[float | None], digits: int) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.mean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="the folder holding seed-*/<method>/seed-*/")
    parser.add_argument("--metric", default="eval_macro_f1", help="the metric the verdicts are on")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {}
    dirs: dict[str, list[str]] = {}
    for path in sorted(args.runs.glob("seed-*/*/seed-*/metrics.json")):
        metrics = read_json(path)
        runs.setdefault(metrics["method"], []).append(metrics)
        dirs.setdefault(metrics["method"], []).append(str(path.parent))
    for method in runs:  # pair seed i with seed i
        order = sorted(range(len(runs[method])), key=lambda i: runs[method][i]["seed"])
        runs[method] = [runs[method][i] for i in order]
        dirs[method] = [dirs[method][i] for i in order]

    print("| method | seeds | accuracy | macro-F1 | eval loss | loss AUC | s/step | trainable params |")
    print("|---|---|---|---|---|---|---|---|")
    for method in ORDER:
        rs = runs.get(method, [])
        if not rs:
            print(f"| {method} | 0 | not run | | | | | |")
            continue
        print(f"| {method} | {len(rs)} | {_fmt([r['eval']['eval_accuracy'] for r in rs], 3)} | "
              f"{_fmt([r['eval']['eval_macro_f1'] for r in rs], 3)} | {_fmt([r['eval']['eval_loss'] for r in rs], 3)} "
              f"| {_fmt([r.get('loss_auc') for r in rs], 1)} | {_fmt([r['seconds_per_step'] for r in rs], 2)} | "
              f"{rs[0]['trainable_params']:,} |")
    first = next(iter(runs.values()), [None])[0]
    if first:
        print(f"\nmajority baseline: {first['baseline']}")
    print()
    for variant, reference in PAIRS:
        if variant in runs and reference in runs:
            pair = {reference: runs[reference], variant: runs[variant]}
            for v in compare_verdicts(pair, {m: dirs[m] for m in pair}, args.metric):
                print(f"- {v['sentence']}")


if __name__ == "__main__":
    main()
