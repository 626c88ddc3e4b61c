"""``lorma merge``: fold an adapter into its base model and save a plain transformers model.

The parser only; the work is in :mod:`lorma.recipes.merge`.
"""

from __future__ import annotations

import argparse
from typing import Any

from lorma.runs.adapters import MODEL_CLASS_HELP


def register(subparsers: Any) -> None:
    """Add the ``merge`` subcommand."""
    fmt = argparse.HelpFormatter
    merge = subparsers.add_parser(
        "merge", help="Fold an adapter into its base model; save a plain transformers model.", formatter_class=fmt,
        description="Loads the base model recorded with the adapter (or --base-model), merges the adapter "
                    "(W = I(BA) W0 for LoRMA) and saves model + tokenizer with save_pretrained.",
    )
    merge.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="An adapter directory, or a run directory "
                                                                  "holding adapter/.")
    merge.add_argument("out_dir", metavar="OUT_DIR", help="Where to save the merged model.")
    merge.add_argument("--base-model", default=None, help="Base model to merge into (default: the one recorded "
                                                          "with the adapter).")
    merge.add_argument("--model-class", default=None, metavar="CLASS", help=MODEL_CLASS_HELP)
    merge.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT_DIR.")
    merge.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``lorma merge``: adapter + base -> one plain transformers model."""
    from lorma.recipes.merge import merge_adapter

    out = merge_adapter(args.adapter_dir, args.out_dir, base_model=args.base_model, overwrite=args.overwrite,
                        model_class=args.model_class)
    print(f"merged model saved to {out} (load it with transformers' from_pretrained)")
    return 0
