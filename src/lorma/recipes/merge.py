"""``lorma merge``: fold a trained adapter into its base model and save a plain transformers model.

After merging, ``W = I(BA) W0`` (or ``W0 + BA`` for LoRA) is an ordinary weight: the saved model loads
with ``AutoModelFor...from_pretrained`` and has no adapter and no inference overhead.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorma.recipes.config import RecipeError
from lorma.recipes.train import RUN_INFO_FILE, _replace_dir, model_fingerprint


def resolve_adapter_dir(path: str) -> Path:
    """Accept the adapter directory itself or a run directory holding ``adapter/``."""
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"adapter directory not found: {p}")
    if (p / "adapter_config.json").is_file():
        return p
    if (p / "adapter" / "adapter_config.json").is_file():
        return p / "adapter"
    if (p / "model" / "config.json").is_file():
        raise RecipeError(f"{p} is a run of a non-adapter method (full / bitfit / head-only): its model/ is "
                          "already a plain transformers model")
    raise RecipeError(f"{p}: no adapter_config.json (not a peft adapter directory)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RecipeError(f"{path}: cannot read ({err})") from None


def load_adapter_model(adapter: Path, base_model: str | None = None) -> tuple[Any, str]:
    """The adapter of ``adapter`` (a peft adapter directory) on its base model (or ``base_model``), unmerged.

    The base model is loaded with the task's head (from the run's ``lorma_run.json``) and checked against the
    fingerprint recorded at training time. Returns the ``PeftModel`` and the base model's path or name.
    """
    adapter_config = _read_json(adapter / "adapter_config.json")
    run_info = _read_json(adapter / RUN_INFO_FILE) if (adapter / RUN_INFO_FILE).is_file() else {}
    base = base_model or run_info.get("base_model") or adapter_config.get("base_model_name_or_path")
    if not base:
        raise RecipeError(f"{adapter}: the base model is not recorded; give --base-model")

    from peft import PeftModel
    from transformers import AutoConfig

    import lorma  # noqa: F401  (registers the LORMA peft type before the adapter is loaded)
    from lorma.tasks.base import task_class

    try:
        base_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise RecipeError(f"cannot load base model '{base}': {str(err).splitlines()[0]}") from None
    recorded = run_info.get("base_fingerprint")
    if recorded:
        found = model_fingerprint(base_config)
        diffs = [f"{k} {recorded[k]} vs {found.get(k)}" for k in recorded if found.get(k) != recorded[k]]
        if diffs:
            raise RecipeError(f"adapter {adapter} was trained on another base model than '{base}' "
                              f"({'; '.join(diffs)})")
    task_name = run_info.get("task")
    cls = task_class(task_name) if task_name else None
    try:
        if cls is not None:
            model = cls.load_model_for_merge(base, run_info.get("model_info", {}))
        else:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(base)
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise RecipeError(f"cannot load adapter {adapter} on base model '{base}': "
                          f"{str(err).strip().splitlines()[0]}") from None
    return peft_model, base


def merge_adapter(adapter_dir: str, out_dir: str, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter of ``adapter_dir`` into its base model (or ``base_model``) and save to ``out_dir``."""
    adapter = resolve_adapter_dir(adapter_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RecipeError(f"output directory {out} exists and is not empty; give --overwrite")
    peft_model, base = load_adapter_model(adapter, base_model)
    from transformers import AutoTokenizer

    merged = peft_model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(tmp))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
