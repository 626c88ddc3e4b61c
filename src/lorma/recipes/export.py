"""Exporting the LoRMA adapter of a run (or adapter) directory as a peft LoRA adapter: what ``lorma export`` does.

Here, not in :mod:`lorma.export`, because it reads a run directory (:mod:`lorma.runs`): the library module stays
below the runs; this module checks the paths and the serving loader's rules before anything is loaded, then calls
:func:`lorma.export.lora_export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorma.export.lora import LoraExport


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
    model_class: str | None = None,
    format: str = "lora",
) -> tuple[LoraExport, Path]:
    """``lorma export``: the LoRMA adapter of a run (or adapter) directory, written as a LoRA adapter to ``out_dir``.

    ``model_class`` names the transformers class to rebuild the base model as, for an adapter that records none.
    ``format="gguf"``: llama.cpp's LoRA GGUF file (:mod:`lorma.export.gguf`), checked as ``serving="llamacpp"``.
    """
    from lorma.export.lora import (
        ExportError,
        ServingFacts,
        check_options,
        check_serving,
        lora_export,
        saved_module_sizes,
    )
    from lorma.runs.adapters import base_model_config, base_model_of, check_model_class, load_adapter_model
    from lorma.runs.layout import adapter_weights_file, find_adapter
    from lorma.runs.paths import check_not_input, check_output_location

    if format not in ("lora", "gguf"):
        raise ExportError(f"--format must be lora or gguf, got {format!r}")
    if format == "gguf":  # llama.cpp's file: its loader's rules, and the gguf package to write it
        from lorma.export.gguf import check_gguf_available

        if serving not in (None, "llamacpp"):
            raise ExportError(f"--format gguf is llama.cpp's adapter file; --serving {serving} does not apply to it")
        serving = "llamacpp"
        check_gguf_available()
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
    check_model_class(model_class)
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
    loaded = load_adapter_model(adapter, base_model, model_class)
    exported = lora_export(
        loaded.model, "default", rank=rank, max_error=max_error, allow_approximate=allow_approximate,
        serving=serving, modules_to_save=modules_to_save,
    )
    exported.source["adapter"] = str(adapter)
    writer = None
    if format == "gguf":
        from lorma.export.gguf import gguf_writer_for

        hparams = loaded.model.base_model.model.config.to_dict()
        hparams["architectures"] = [exported.source.get("architecture")]
        writer = gguf_writer_for(exported, hparams, out.resolve().name)
        exported.format = "gguf"
    return exported, exported.save(out, overwrite=overwrite, writer=writer)


def tensor_sizes(weights: Path) -> dict[str, int]:
    """``{key: number of elements}`` of a saved adapter's tensors; a safetensors file's header only is read."""
    import math

    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            return {key: math.prod(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118 (not a dict)
    import torch

    return {key: value.numel() for key, value in torch.load(weights, map_location="cpu", weights_only=True).items()}
