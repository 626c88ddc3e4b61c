"""``lorma export``: write a trained LoRMA adapter in a format serving stacks load (peft LoRA).

    lorma export runs/a exported/a --format lora                       # LoRMA+: exact
    lorma export runs/pi exported/pi --format lora --rank 64 --allow-approximate
    lorma export runs/pi exported/pi --format lora --max-error 0.05 --allow-approximate

LoRMA+ (plus) adapters export exactly: W - W0 = s B (A W0) (pre) or s (W0 B) A (post) is a rank-r LoRA update.
LoRMA_pi and none adapters have a full-rank update: the export is its truncated SVD per module, at --rank K or
at the smallest rank per module within --max-error E (relative Frobenius error of W - W0); such a lossy export
is refused unless --allow-approximate is given. The per-module rank and relative error are printed and
written to lorma_export.json in OUT_DIR. The adapter loads with plain peft (PeftModel.from_pretrained) and in
anything that loads peft LoRA adapters, without lorma installed.
"""

from __future__ import annotations

import argparse
from typing import Any

from lorma.cli import LormaCLIError

FORMATS = ("lora",)


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand."""
    parser = subparsers.add_parser(
        "export",
        help="Write a LoRMA adapter as a standard peft LoRA adapter (for vLLM, TGI, llama.cpp, ...).",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_OR_ADAPTER", help="A run directory (with adapter/) or an adapter "
                        "directory (adapter_config.json).")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Where to write the exported adapter.")
    parser.add_argument("--format", default="lora", choices=FORMATS, help="Adapter format to write (default lora).")
    parser.add_argument("--base-model", default=None, help="Base model (default: the one recorded with the adapter).")
    parser.add_argument("--rank", type=int, default=None, help="pi / none: LoRA rank of every module.")
    parser.add_argument("--max-error", type=float, default=None, help="pi / none: per module, the smallest rank "
                        "whose relative error ||dW - B A||_F / ||dW||_F is at most this (e.g. 0.05).")
    parser.add_argument("--allow-approximate", action="store_true", help="Write a lossy (truncated) export.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUT_DIR.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorma.recipes.train import quiet_libraries

    quiet_libraries()
    from lorma.export import EXPORT_REPORT_FILE, ExportError, export_adapter, format_table

    try:
        exported, out = export_adapter(
            args.source,
            args.out_dir,
            base_model=args.base_model,
            rank=args.rank,
            max_error=args.max_error,
            allow_approximate=args.allow_approximate,
            overwrite=args.overwrite,
        )
    except ExportError as err:
        if err.modules:  # a refused lossy export: show what it would have been, module by module
            print(format_table(err.modules))
        raise LormaCLIError(str(err)) from None
    print(exported.table())
    kind = "exact (to float32 rounding)" if exported.exact else (
        f"approximate (largest relative error {exported.max_relative_error:.3g})"
    )
    print(f"LoRA adapter (r={exported.config.r}) written to {out}: {kind}; per-module report in "
          f"{out / EXPORT_REPORT_FILE}")
    return 0
