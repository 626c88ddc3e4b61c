"""Loading a saved adapter onto its base model (the one recorded with it, or one given), as ``lorma merge``,
``lorma export`` and ``lorma analyze`` all do: the base model's shapes are checked against what the adapter was
trained on before any weight is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.plumbing.fileio import read_json
from lorma.runs.layout import RUN_INFO_FILE, check_adapter_dir

#: the transformers class of each peft ``task_type``: how the base model of an adapter without a lorma run record
#: is rebuilt (its saved keys carry the task model's prefixes, e.g. ``bert.``, which a plain AutoModel lacks)
PEFT_TASK_MODEL_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def base_model_config(base: str) -> dict[str, Any] | None:
    """The base model's ``config.json`` when it is a local directory (read without transformers), else None."""
    path = Path(base) / "config.json"
    return read_json(path) if path.is_file() else None


def base_model_of(adapter: Path, adapter_config: dict[str, Any], base_model: str | None) -> tuple[str, dict[str, Any]]:
    """The base model to load (given, else recorded at training, else peft's record) and the run's record."""
    run_info = read_json(adapter / RUN_INFO_FILE) if (adapter / RUN_INFO_FILE).is_file() else {}
    base = base_model or run_info.get("base_model") or adapter_config.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{adapter}: the base model is not recorded; give --base-model")
    if base_model is None and Path(base).is_absolute() and not Path(base).exists():
        raise InputError(f"the recorded base model {base} does not exist any more; give --base-model")
    recorded = run_info.get("base_fingerprint")
    local_config = base_model_config(base)
    if recorded and local_config is not None:
        from lorma.runs.fingerprints import model_fingerprint

        _check_fingerprint(adapter, base, recorded, model_fingerprint(local_config))
    return base, run_info


def load_adapter_model(adapter: Path, base_model: str | None = None) -> tuple[Any, str]:
    """The adapter of ``adapter`` (a peft adapter directory) on its base model (or ``base_model``), unmerged.

    The adapter's files and the base model's shapes (its recorded fingerprint) are checked before anything is
    loaded; the base model is loaded with the task's head (from the run's ``lorma_run.json``), or for an adapter
    trained elsewhere as the class of its peft ``task_type``. Returns the ``PeftModel`` and the base model's path
    or name.
    """
    adapter_config = check_adapter_dir(adapter)
    base, run_info = base_model_of(adapter, adapter_config, base_model)

    from lorma.plumbing.quiet import known_warnings_ignored, quiet_libraries
    from lorma.runs.fingerprints import model_fingerprint

    quiet_libraries()
    from peft import PeftModel
    from transformers import AutoConfig

    import lorma  # noqa: F401  (registers the LORMA peft type before the adapter is loaded)
    from lorma.tasks.base import task_class

    recorded = run_info.get("base_fingerprint")
    if recorded and base_model_config(base) is None:  # a hub name: its config comes through transformers
        try:
            base_config = AutoConfig.from_pretrained(base)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load base model '{base}': {str(err).splitlines()[0]}") from None
        _check_fingerprint(adapter, base, recorded, model_fingerprint(base_config))
    task_name = run_info.get("task")
    try:
        if task_name:  # a lorma train run: the task rebuilds its model (head size, labels) as it was trained
            model = task_class(task_name).load_model_for_merge(base, run_info.get("model_info", {}))
        else:  # an adapter trained elsewhere: the transformers class of its peft task_type
            import transformers

            class_name = PEFT_TASK_MODEL_CLASSES.get(str(adapter_config.get("task_type")), "AutoModel")
            model = getattr(transformers, class_name).from_pretrained(base)
        with known_warnings_ignored():  # peft's deprecated transformers call, not the user's
            peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise InputError(f"cannot load adapter {adapter} on base model '{base}': "
                          f"{str(err).strip().splitlines()[0]}") from None
    return peft_model, base


def _check_fingerprint(adapter: Path, base: str, recorded: dict[str, Any], found: dict[str, Any]) -> None:
    """Refuse a base model whose type or shapes differ from those the adapter was trained on.

    Keys absent from ``found`` are not compared: a raw ``config.json`` names some sizes by the model's own
    keys only (GPT-2's ``n_embd``, which transformers' config object also shows as ``hidden_size``).
    """
    diffs = [f"{k} {recorded[k]} vs {found[k]}" for k in recorded if k in found and found[k] != recorded[k]]
    if diffs:
        raise InputError(f"adapter {adapter} was trained on another base model than '{base}' ({'; '.join(diffs)})")
