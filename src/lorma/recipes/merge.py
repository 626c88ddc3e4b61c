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
from lorma.runs.adapters import base_model_of, check_model_class, load_adapter_model
from lorma.runs.layout import find_adapter, notify
from lorma.runs.paths import check_not_input, check_output_location


def merge_adapter(adapter_dir: str, out_dir: str, base_model: str | None = None, overwrite: bool = False,
                  model_class: str | None = None) -> Path:
    """Merge the adapter of ``adapter_dir`` into its base model (or ``base_model``) and save to ``out_dir``.

    ``model_class`` names the transformers class to rebuild the base model as, for an adapter that records none.
    The tokenizer is copied from the adapter directory, else the base model; when neither has one the model is
    still merged, and a note says so.
    """
    found = find_adapter(Path(adapter_dir))
    adapter = found.path
    out = Path(out_dir)
    check_output_location(out, "OUT_DIR")
    check_model_class(model_class)
    base, _ = base_model_of(adapter, found.config, base_model)
    check_not_input(out, {"ADAPTER_DIR": adapter_dir if found.run_dir is None else adapter,
                          "--base-model" if base_model else "(the base model)": base},
                    replacing=True, flag="OUT_DIR", containers={"ADAPTER_DIR (a run)": found.run_dir})
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output directory {out} exists and is not empty; give --overwrite")
    loaded = load_adapter_model(adapter, base_model, model_class)
    tokenizer, tokenizer_note = _tokenizer(adapter, loaded.base)
    merged = loaded.model.merge_and_unload()
    with staged_directory(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    if loaded.new_weights:
        notify(f"{', '.join(loaded.new_weights[:4])}{' ...' if len(loaded.new_weights) > 4 else ''} of the merged "
               f"model ({loaded.model_class}) are newly initialized: neither the base model nor the adapter holds "
               "them (peft saves a task head with modules_to_save or a task_type such as SEQ_CLS), so they are not "
               "the ones trained")
    if tokenizer_note:
        notify(tokenizer_note)
    return out


def _tokenizer(adapter: Path, base: str) -> tuple[object | None, str | None]:
    """The tokenizer to save with the merged model (the adapter's, else the base model's) or None and why not."""
    from transformers import AutoTokenizer

    source = str(adapter) if (adapter / "tokenizer_config.json").is_file() else base
    try:
        return AutoTokenizer.from_pretrained(source), None
    except (OSError, ValueError, TypeError, KeyError):
        why = (f"neither the adapter ({adapter}) nor the base model ({base}) holds one" if source == base
               else f"the one in {adapter} does not load")
        return None, f"no tokenizer copied: {why}; save one beside the merged model before using it"
