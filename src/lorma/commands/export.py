"""``lorma export``: write a trained LoRMA adapter in a format serving stacks load (peft LoRA).

    lorma export runs/a exported/a --format lora                       # LoRMA+: exact
    lorma export runs/pi exported/pi --format lora --rank 64 --allow-approximate
    lorma export runs/pi exported/pi --format lora --max-error 0.05 --allow-approximate
    lorma export runs/a exported/a --format lora --serving vllm        # checked against vLLM's loader
    lorma export runs/a exported/a --format lora --serving llamacpp --modules-to-save separate

LoRMA+ (plus) adapters export exactly: W - W0 = s B (A W0) (pre) or s (W0 B) A (post) is a rank-r LoRA update.
LoRMA_pi and none adapters have a full-rank update: the export is its truncated SVD per module, at --rank K or
at the smallest rank per module within --max-error E (relative Frobenius error of W - W0); such a lossy export
is refused unless --allow-approximate is given. The per-module rank and relative error are printed and
written to lorma_export.json in OUT_DIR. The adapter loads with plain peft (PeftModel.from_pretrained) and in
anything that loads peft LoRA adapters, without lorma installed.

--serving vllm|llamacpp checks the export against that loader's rules before any work (Linear layers, the
architectures llama.cpp converts, vLLM's largest rank) and writes one uniform r with lora_alpha = r and only
lora_A / lora_B tensors: modules trained in full (modules_to_save) are refused, naming them, or with
--modules-to-save separate written to modules_to_save.safetensors beside the adapter, to merge into the base model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorma.errors import InputError

if TYPE_CHECKING:
    from lorma.export import LoraExport

FORMATS = ("lora",)
# the choices of --serving and --modules-to-save (lorma.export.SERVING_LOADERS / MODULES_TO_SAVE_CHOICES, which
# test_export checks these against: the parser is built without importing torch)
SERVING_CHOICES = ("vllm", "llamacpp")
MODULES_TO_SAVE_CHOICES = ("refuse", "separate")


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
    parser.add_argument("--serving", default=None, choices=sorted(SERVING_CHOICES), help="Check and write the "
                        "adapter for this loader (vLLM's LoRA loader, llama.cpp's convert_lora_to_gguf.py).")
    parser.add_argument("--modules-to-save", default=None, choices=MODULES_TO_SAVE_CHOICES, help="With --serving: "
                        "modules trained in full are refused (default), or written to modules_to_save.safetensors "
                        "beside the adapter (separate), to merge into the base model.")
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
    serving: str | None = None,
    modules_to_save: str | None = None,
) -> tuple[LoraExport, Path]:
    """``lorma export``: the LoRMA adapter of a run (or adapter) directory, written as a LoRA adapter to ``out_dir``.

    Here, not in :mod:`lorma.export`, because it reads a run directory (:mod:`lorma.recipes`): the library module
    stays below the recipes."""
    from lorma.export import ExportError, ServingFacts, check_options, check_serving, lora_export, saved_module_sizes
    from lorma.runs.adapters import base_model_config, base_model_of, load_adapter_model
    from lorma.runs.layout import adapter_weights_file, find_adapter
    from lorma.runs.paths import check_not_input, check_output_location

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
    if modules_to_save is not None and serving is None:
        raise ExportError("--modules-to-save applies to --serving exports (a plain export keeps modules_to_save in "
                          "the adapter, as peft loads them)")
    modules_to_save = modules_to_save or "refuse"
    if serving is not None:  # what the files show (trained modules, the base's architecture), before loading
        base, _ = base_model_of(adapter, recorded, base_model)
        base_config = base_model_config(base) or {}
        sizes = tensor_sizes(adapter_weights_file(adapter))
        check_serving(serving, ServingFacts(
            architecture=(base_config.get("architectures") or [None])[0],
            saved=saved_module_sizes(sizes, recorded.get("modules_to_save") or ()),
            rank=rank,
        ), modules_to_save)
    peft_model, _ = load_adapter_model(adapter, base_model)
    exported = lora_export(
        peft_model, "default", rank=rank, max_error=max_error, allow_approximate=allow_approximate,
        serving=serving, modules_to_save=modules_to_save,
    )
    exported.source["adapter"] = str(adapter)
    return exported, exported.save(out, overwrite=overwrite)


def tensor_sizes(weights: Path) -> dict[str, int]:
    """``{key: number of elements}`` of a saved adapter's tensors; a safetensors file's header only is read."""
    import math

    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            return {key: math.prod(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118 (not a dict)
    import torch

    return {key: value.numel() for key, value in torch.load(weights, map_location="cpu", weights_only=True).items()}


def run(args: argparse.Namespace) -> int:
    from lorma.quiet import quiet_libraries

    quiet_libraries()
    from lorma.export import (
        EXPORT_REPORT_FILE,
        MODULES_TO_SAVE_FILE,
        MODULES_TO_SAVE_NOTE,
        ExportError,
        format_table,
        vllm_max_lora_rank,
    )

    try:
        exported, out = export_adapter(
            args.source,
            args.out_dir,
            base_model=args.base_model,
            rank=args.rank,
            max_error=args.max_error,
            allow_approximate=args.allow_approximate,
            overwrite=args.overwrite,
            serving=args.serving,
            modules_to_save=args.modules_to_save,
        )
    except ExportError as err:
        if err.modules:  # a refused lossy export: show what it would have been, module by module
            print(format_table(err.modules))
        raise InputError(str(err)) from None
    print(exported.table())
    kind = "exact (to float32 rounding)" if exported.exact else (
        f"approximate (largest relative error {exported.max_relative_error:.3g})"
    )
    print(f"LoRA adapter (r={exported.config.r}) written to {out}: {kind}; per-module report in "
          f"{out / EXPORT_REPORT_FILE}")
    if exported.separate:
        print(f"modules trained in full written apart to {out / MODULES_TO_SAVE_FILE}: merge them into the base "
              f"model before serving ({out / MODULES_TO_SAVE_NOTE} says how)")
    base = exported.config.base_model_name_or_path or "BASE_MODEL"
    if exported.serving == "vllm":
        print(f"serve with: vllm serve {base} --enable-lora --max-lora-rank {vllm_max_lora_rank(exported.config.r)} "
              f"--lora-modules NAME={out}")
    elif exported.serving == "llamacpp":
        print(f"convert with llama.cpp: python convert_lora_to_gguf.py {out} --base {base} --outtype f32 "
              "(--base: the base model's directory, its config.json)")
    return 0
