"""``lorma merge``: fold a trained adapter into its base model and save a plain transformers model.

After merging, ``W = I(BA) W0`` (or ``W0 + BA`` for LoRA) is an ordinary weight: the saved model loads
with ``AutoModelFor...from_pretrained`` and has no adapter and no inference overhead.

Everything that can be checked without loading a model is checked first (the adapter's files, the run it comes
from, the base model's shapes, where the output goes); the output directory is written beside its final place
and moved there only when complete, and it can never be the adapter, its run or the base model.
"""

from __future__ import annotations

from pathlib import Path

from lorma.plumbing.errors import InputError
from lorma.plumbing.fileio import staged_directory
from lorma.runs.adapters import base_model_of, load_adapter_model
from lorma.runs.layout import find_adapter
from lorma.runs.paths import check_not_input, check_output_location


def merge_adapter(adapter_dir: str, out_dir: str, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter of ``adapter_dir`` into its base model (or ``base_model``) and save to ``out_dir``."""
    found = find_adapter(Path(adapter_dir))
    adapter = found.path
    out = Path(out_dir)
    check_output_location(out, "OUT_DIR")
    base, _ = base_model_of(adapter, found.config, base_model)
    check_not_input(out, {"ADAPTER_DIR": adapter_dir if found.run_dir is None else adapter,
                          "--base-model" if base_model else "(the base model)": base},
                    replacing=True, flag="OUT_DIR", containers={"ADAPTER_DIR (a run)": found.run_dir})
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output directory {out} exists and is not empty; give --overwrite")
    peft_model, base = load_adapter_model(adapter, base_model)
    from transformers import AutoTokenizer

    merged = peft_model.merge_and_unload()
    with staged_directory(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(tmp))
    return out


