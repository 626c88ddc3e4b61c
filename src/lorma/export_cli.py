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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorma.cli import LormaCLIError

if TYPE_CHECKING:
    from lorma.export import LoraExport

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


def export_adapter(
    source: str,
    out_dir: str,
    base_model: str | None = None,
    rank: int | None = None,
    max_error: float | None = None,
    allow_approximate: bool = False,
    overwrite: bool = False,
) -> tuple[LoraExport, Path]:
    """``lorma export``: the LoRMA adapter of a run (or adapter) directory, written as a LoRA adapter to ``out_dir``.

    Here, not in :mod:`lorma.export`, because it reads a run directory (:mod:`lorma.recipes`): the library module
    stays below the recipes."""
    from lorma.export import ExportError, check_options, lora_export
    from lorma.recipes.merge import load_adapter_model
    from lorma.recipes.rundir import check_not_input, check_output_location, find_adapter

    found = find_adapter(Path(source))  # the adapter's files checked, and a run's adapter/ consistent with it
    adapter, recorded = found.path, found.config
    out = Path(out_dir)
    check_output_location(out, "OUT_DIR")
    # never onto its own input: replacing the run (or a folder holding the adapter) would delete it
    check_not_input(out, {"RUN_OR_ADAPTER": adapter}, replacing=True, flag="OUT_DIR",
                    containers={"RUN_OR_ADAPTER (a run)": found.run_dir})
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"output directory {out} exists and is not empty; give --overwrite")
    if recorded.get("peft_type") != "LORMA":
        raise ExportError(f"{adapter} holds a {recorded.get('peft_type')} adapter, not a LoRMA one (nothing to export)")
    check_options("default", str(recorded.get("inflation")), rank, max_error, recorded.get("variant"))
    peft_model, _ = load_adapter_model(adapter, base_model)
    exported = lora_export(
        peft_model, "default", rank=rank, max_error=max_error, allow_approximate=allow_approximate
    )
    exported.source["adapter"] = str(adapter)
    return exported, exported.save(out, overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
    from lorma.recipes.train import quiet_libraries

    quiet_libraries()
    from lorma.export import EXPORT_REPORT_FILE, ExportError, format_table

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
