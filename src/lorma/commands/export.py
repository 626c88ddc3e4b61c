"""``lorma export``: write a trained LoRMA adapter in a format serving stacks load (peft LoRA).

    lorma export runs/a exported/a --format lora                       # LoRMA+: exact
    lorma export runs/pi exported/pi --format lora --rank 64 --allow-approximate
    lorma export runs/pi exported/pi --format lora --max-error 0.05 --allow-approximate
    lorma export runs/a exported/a --format lora --serving vllm        # checked against vLLM's loader
    lorma export runs/a exported/a --format lora --serving llamacpp --modules-to-save separate
    lorma export runs/a exported/a --format gguf                       # llama.cpp's LoRA file: adapter.gguf

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

--format gguf writes the same adapter as llama.cpp's LoRA GGUF file (OUT_DIR/adapter.gguf, what llama.cpp's
convert_lora_to_gguf.py writes from the --serving llamacpp export, and checked by its rules), for llama-cli /
llama-server --lora and Ollama's ADAPTER, with no llama.cpp checkout. A LoRMA_pi adapter is served exactly by
merging it (lorma merge) and converting the merged model as a base model.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lorma.plumbing.errors import InputError
from lorma.runs.adapters import MODEL_CLASS_HELP

if TYPE_CHECKING:
    pass

FORMATS = ("lora", "gguf")
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
    parser.add_argument("--format", default="lora", choices=FORMATS, help="Adapter format to write: a peft LoRA "
                        "adapter (lora, the default) or llama.cpp's LoRA GGUF file (gguf).")
    parser.add_argument("--base-model", default=None, help="Base model (default: the one recorded with the adapter).")
    parser.add_argument("--model-class", default=None, metavar="CLASS", help=MODEL_CLASS_HELP)
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


def run(args: argparse.Namespace) -> int:
    from lorma.plumbing.quiet import quiet_libraries

    quiet_libraries()
    from lorma.export.lora import (
        EXPORT_REPORT_FILE,
        MODULES_TO_SAVE_FILE,
        MODULES_TO_SAVE_NOTE,
        ExportError,
        format_table,
        vllm_max_lora_rank,
    )

    try:
        from lorma.recipes.export import export_adapter

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
            model_class=args.model_class,
            format=args.format,
        )
    except ExportError as err:
        if err.modules:  # a refused lossy export: show what it would have been, module by module
            print(format_table(err.modules))
        raise InputError(str(err)) from None
    print(exported.table())
    kind = "exact (to float32 rounding)" if exported.exact else (
        f"approximate (largest relative error {exported.max_relative_error:.3g})"
    )
    what = f"llama.cpp LoRA GGUF ({', '.join(exported.files)})" if exported.format == "gguf" else "LoRA adapter"
    print(f"{what} (r={exported.config.r}) written to {out}: {kind}; per-module report in "
          f"{out / EXPORT_REPORT_FILE}")
    if exported.separate:
        print(f"modules trained in full written apart to {out / MODULES_TO_SAVE_FILE}: merge them into the base "
              f"model before serving ({out / MODULES_TO_SAVE_NOTE} says how)")
    base = exported.config.base_model_name_or_path or "BASE_MODEL"
    if exported.serving == "vllm":
        print(f"serve with: vllm serve {base} --enable-lora --max-lora-rank {vllm_max_lora_rank(exported.config.r)} "
              f"--lora-modules NAME={out}")
    elif exported.format == "gguf":
        print(f"serve with: llama-cli -m BASE.gguf --lora {out / exported.files[0]} (Ollama: ADAPTER in a Modelfile)")
    elif exported.serving == "llamacpp":
        print(f"convert with llama.cpp: python convert_lora_to_gguf.py {out} --base {base} --outtype f32 "
              "(--base: the base model's directory, its config.json)")
    return 0
