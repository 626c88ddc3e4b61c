"""``lorma compare``: several methods and seeds on one task, one results table.

The parser only; the work is in :mod:`lorma.recipes.compare`.
"""

from __future__ import annotations

import argparse
from typing import Any

from lorma.commands.run_options import add_run_options, resolve_config, wrapped


def register(subparsers: Any) -> None:
    """Add the ``compare`` subcommand."""
    from lorma.recipes.config import defaults_table
    from lorma.runs.method_registry import method_names

    compare = subparsers.add_parser(
        "compare", help="Train several methods and seeds on one task; print and save a results table.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=defaults_table(),
        description=wrapped("Runs OUTPUT_DIR/<method>/seed-<seed>/ for each method and seed, then writes results.md, "
                    "results.json and loss_curves.png in OUTPUT_DIR and prints the table (metrics mean ± std, "
                    "trainable parameters, training-loss AUC, seconds per step, majority baseline, collapsed "
                    "runs) and, for each method against the first, the difference in the main metric with 95% "
                    "intervals over seeds and over eval examples. With --tune, each method's settings are first "
                    "chosen on the training data (k-fold on small data, else a validation split; "
                    "OUTPUT_DIR/tuning/); the eval data is never read for that. For a fair comparison: "
                    "--tune learning_rate --seeds 3."),
    )
    add_run_options(compare)
    compare.add_argument("--methods", default="lora,lorma-plus,lorma-pi",
                         help=f"Comma-separated methods: {', '.join(method_names())} "
                              "[default: lora,lorma-plus,lorma-pi].")
    compare.add_argument("--seeds", type=int, default=3,
                         help="Number of seeds per method (seed, seed+1, ...) [default: 3].")
    compare.add_argument("--overwrite", action="store_true", help="Replace existing results in --output-dir.")
    compare.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``lorma compare``: several methods and seeds, one table."""
    from lorma.recipes.compare import parse_methods

    methods = parse_methods(args.methods)
    cfg = resolve_config(args)
    from lorma.plumbing.processes import is_main_process
    from lorma.recipes.compare import print_results, run_compare

    results = run_compare(cfg, methods, args.seeds, overwrite=args.overwrite)
    if is_main_process():
        print_results(results, cfg.output_dir, cfg, getattr(args, "argv", None))
    return 0
