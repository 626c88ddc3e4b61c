"""Loading a saved adapter onto its base model (the one recorded with it, or one given), as ``lorma merge``,
``lorma export`` and ``lorma analyze`` all do.

Any peft adapter is accepted, however it was made: by ``lorma train`` (its ``lorma_run.json`` says which task
rebuilds the model), or by hand with ``get_peft_model`` (peft records the model class through ``task_type``, or
without one through ``auto_mapping.base_model_class``). The base model must be rebuilt as the class the adapter
was trained on: the saved keys carry that class's module names (``bert.encoder...`` for a classifier,
``encoder...`` for a bare ``BertModel``), and a classifier's head has the size the adapter saved. What can be
checked before the weights are loaded is (the base model's recorded shapes, the class, every saved tensor's
module in a model built on the meta device); after loading, every saved tensor must have landed unchanged and
every adapted module must have been given its tensors, or the command refuses: a model the adapter did not go
into is never merged, exported or measured.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.plumbing.fileio import read_json
from lorma.runs.layout import RUN_INFO_FILE, adapter_weights_file, check_adapter_dir

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

#: the flag that names the class when the adapter does not (shared by the commands that load an adapter)
MODEL_CLASS_FLAG = "--model-class"
MODEL_CLASS_HELP = ("The transformers class to rebuild the base model as (e.g. AutoModelForCausalLM, "
                    "AutoModelForSequenceClassification, AutoModel), for an adapter whose adapter_config.json "
                    "records neither task_type nor auto_mapping (default: the class the adapter records; for a "
                    "`lorma train` run, its task's model).")

_PEFT_PREFIX = "base_model.model."


@dataclass
class LoadedAdapter:
    """A saved adapter on its base model: the ``PeftModel`` (adapter ``default``, unmerged), the base model's path
    or name, the class it was loaded as and why, and the base model's weights that neither its checkpoint nor the
    adapter held (newly initialized: a task head the adapter did not save)."""

    model: Any
    base: str
    model_class: str
    class_source: str
    new_weights: list[str] = field(default_factory=list)


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


def check_model_class(name: str | None) -> None:
    """Refuse a ``--model-class`` that is not a transformers model class, before anything is loaded."""
    if name is not None:
        _transformers_class(name, MODEL_CLASS_FLAG)


def _transformers_class(name: str, source: str) -> Any:
    """The transformers class ``name`` (an Auto class or a model class); an error naming ``source`` otherwise."""
    import transformers

    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained") \
            or not (hasattr(cls, "from_config") or hasattr(cls, "_from_config")):
        raise InputError(f"{source} {name!r} is not a transformers model class (e.g. AutoModelForCausalLM, "
                         "AutoModelForSequenceClassification, LlamaForCausalLM)")
    return cls


def model_class_of(adapter: Path, adapter_config: dict[str, Any], model_class: str | None) -> tuple[Any, str]:
    """The transformers class to rebuild the base model as, and where that choice came from (for messages).

    ``--model-class`` when given; else peft's record: ``task_type`` (a ``PeftModelFor...``), else
    ``auto_mapping`` (peft writes the class itself when there is no task type). An adapter that records neither
    (saved by an older peft, or written by another tool) is refused with the flag that supplies the class.
    """
    if model_class is not None:
        return _transformers_class(model_class, MODEL_CLASS_FLAG), MODEL_CLASS_FLAG
    task_type = adapter_config.get("task_type")
    if task_type is not None:
        name = PEFT_TASK_MODEL_CLASSES.get(str(task_type))
        if name is None:
            raise InputError(f"{adapter}: task_type {task_type!r} in adapter_config.json is not one lorma knows "
                             f"({', '.join(PEFT_TASK_MODEL_CLASSES)}); give {MODEL_CLASS_FLAG}")
        return _transformers_class(name, "task_type"), f"its task_type {task_type}"
    mapping = adapter_config.get("auto_mapping")
    if isinstance(mapping, dict) and isinstance(mapping.get("base_model_class"), str):
        name, library = mapping["base_model_class"], str(mapping.get("parent_library") or "")
        if not library.startswith("transformers."):
            raise InputError(f"{adapter}: the adapter was trained on {name} from {library or 'an unnamed library'}, "
                             f"not a transformers model lorma can rebuild; give {MODEL_CLASS_FLAG} (a transformers "
                             "class that loads the base model with the same module names)")
        return _transformers_class(name, "auto_mapping.base_model_class"), f"its auto_mapping ({name})"
    raise InputError(f"{adapter}: adapter_config.json records neither task_type nor auto_mapping.base_model_class, "
                     f"so the class the adapter was trained on is unknown; give {MODEL_CLASS_FLAG} (e.g. "
                     "AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModel)")


def saved_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a saved adapter's tensors; of a safetensors file only the header is read."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118 (not a dict)
    import torch

    loaded = torch.load(weights, map_location="cpu", weights_only=True)
    return {key: tuple(value.shape) for key, value in loaded.items()}


def _module_of(key: str, prefix: str) -> tuple[str, bool]:
    """The model module a saved key belongs to (peft's prefix stripped), and whether it is an adapter tensor
    (``...query.lorma_A``, ``...q_proj.lora_A.weight``) rather than a module trained in full (``classifier.weight``)."""
    parts = key.removeprefix(_PEFT_PREFIX).split(".")
    for i, part in enumerate(parts):
        # ``...lm_head.base_layer.weight``: the base weight of an adapted embedding-like layer, which peft saves
        # with the adapter (``save_embedding_layers``) and loads into its wrapper: it belongs to the adapted module
        if part.startswith(prefix) or part == "base_layer":
            return ".".join(parts[:i]), True
    return ".".join(parts[:-1]), False


def _plan_base_model(cls: Any, config: Any, shapes: dict[str, tuple[int, ...]], prefix: str, where: str) -> int | None:
    """Check the saved tensors against the class built on the meta device (no weights read) and return the number
    of labels the adapter's head was saved with, when it differs from the base config's (else None).

    Every saved tensor must name a module of the class (else the class is not the one trained). A module trained
    in full (a task head) whose saved shape differs from the built one only in its first dimension, by the
    config's ``num_labels``, is a head of another size: the base model is then built with the saved size.
    """
    import torch

    build = getattr(cls, "from_config", None) or cls._from_config
    try:
        with torch.device("meta"):
            skeleton = build(config)
    except (ValueError, TypeError, AttributeError, KeyError, OSError) as err:
        raise InputError(f"cannot build {where}: {str(err).strip().splitlines()[0]}") from None
    modules = dict(skeleton.named_modules())
    params = dict(skeleton.named_parameters())
    params.update(dict(skeleton.named_buffers()))
    strays = sorted(key for key in shapes if _module_of(key, prefix)[0] not in modules)
    if strays:
        raise InputError(f"{len(strays)} of the adapter's {len(shapes)} tensors name modules that {where} does "
                         f"not have (first: {strays[0]}): the adapter was trained on another model class or base "
                         f"model; give {MODEL_CLASS_FLAG} or --base-model")
    num_labels = getattr(config, "num_labels", None)
    sizes = set()
    for key, shape in shapes.items():
        module, is_adapter = _module_of(key, prefix)
        name = key.removeprefix(_PEFT_PREFIX)
        if is_adapter or name not in params or tuple(params[name].shape) == shape:
            continue
        built = tuple(params[name].shape)
        if num_labels and built and built[0] == num_labels and shape and shape[1:] == built[1:]:
            sizes.add(shape[0])
            continue
        raise InputError(f"the adapter saved {name} with shape {shape}, but {where} has {built}: the adapter was "
                         "trained on another base model")
    if len(sizes) > 1:
        raise InputError(f"the adapter's saved heads disagree on the number of labels ({sorted(sizes)})")
    return sizes.pop() if sizes else None


def _load_base_model(base: str, cls: Any, source: str, shapes: dict[str, tuple[int, ...]], prefix: str,
                     saved_modules: set[str]) -> tuple[Any, list[str]]:
    """The base model as ``cls``, its head sized as the adapter saved it; refused when the weights of a module the
    adapter adapts are missing from the checkpoint (transformers would fill them at random, e.g. a class whose
    backbone has another name than the checkpoint's). Returns the model and the weights that were newly
    initialized otherwise (a head the adapter did not save): a merged model holds them as they were drawn."""
    from transformers import AutoConfig

    where = f"base model '{base}' as {cls.__name__} (the class from {source})"
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load base model '{base}': {str(err).strip().splitlines()[0]}") from None
    num_labels = _plan_base_model(cls, config, shapes, prefix, where)
    kwargs: dict[str, Any] = {}
    if num_labels is not None:  # the head the adapter saved replaces the checkpoint's (if it had one)
        kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    try:
        model, info = cls.from_pretrained(base, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise InputError(f"cannot load {where}: {str(err).strip().splitlines()[0]}") from None
    mismatched = {item[0] if isinstance(item, tuple) else item for item in info.get("mismatched_keys") or ()}
    fresh = sorted(set(info.get("missing_keys") or ()) | mismatched)
    adapted = {_module_of(key, prefix)[0] for key in shapes if _module_of(key, prefix)[1]}

    def covered(name: str) -> bool:  # saved with the adapter: the adapter's copy replaces it
        return any(name == m or name.startswith(f"{m}.") for m in saved_modules)

    def transformed(name: str) -> bool:  # the weight W0 of an adapted module: its update I(BA) W0 depends on it
        return any(name.startswith(f"{m}.") for m in adapted)

    fresh = [name for name in fresh if not covered(name)]
    broken = [name for name in fresh if transformed(name)]
    if broken:
        raise InputError(f"{where}: {len(broken)} weights of the modules the adapter adapts are not in the checkpoint "
                         f"(first: {broken[0]}), so they would be random: the checkpoint is not a model of this "
                         f"class; give --base-model the model the adapter was trained on, or {MODEL_CLASS_FLAG}")
    return model, fresh


def load_adapter_model(adapter: Path, base_model: str | None = None, model_class: str | None = None) -> LoadedAdapter:
    """The adapter of ``adapter`` (a peft adapter directory) on its base model (or ``base_model``), unmerged.

    The adapter's files and the base model's shapes (its recorded fingerprint) are checked before anything is
    loaded; the base model is loaded with the task's head (from the run's ``lorma_run.json``), or for an adapter
    made elsewhere as the class peft recorded (or ``model_class``). Every saved tensor must land in the model
    unchanged, and every adapted module must get its tensors: otherwise an error names the first that did not.
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
    weights = adapter_weights_file(adapter)
    shapes = saved_tensor_shapes(weights)
    prefix = _tuner_prefix(str(adapter_config.get("peft_type")))
    saved_modules = {_module_of(key, prefix)[0] for key in shapes if not _module_of(key, prefix)[1]}
    task_name = run_info.get("task")
    new_weights: list[str] = []
    if task_name and model_class is None:  # a lorma train run: the task rebuilds its model (head size, labels)
        class_name, source = f"the {task_name} task's model", f"{adapter / RUN_INFO_FILE}"
        try:
            model = task_class(task_name).load_model_for_merge(base, run_info.get("model_info", {}))
        except (OSError, ValueError, RuntimeError) as err:
            raise InputError(f"cannot load base model '{base}': {str(err).strip().splitlines()[0]}") from None
    else:
        cls, source = model_class_of(adapter, adapter_config, model_class)
        class_name = cls.__name__
        model, new_weights = _load_base_model(base, cls, source, shapes, prefix, saved_modules)
    try:
        with warnings.catch_warnings(), known_warnings_ignored():  # peft's deprecated transformers call
            # what peft only warns about is refused below, naming the tensors
            warnings.filterwarnings("ignore", message=".*missing adapter keys", category=UserWarning)
            peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise InputError(f"cannot load adapter {adapter} onto base model '{base}' (as {class_name}, from {source}): "
                         f"{str(err).strip().splitlines()[0]}") from None
    _check_landed(adapter, weights, peft_model, f"base model '{base}' as {class_name} (from {source})")
    return LoadedAdapter(peft_model, base, class_name, source, new_weights)


def _tuner_prefix(peft_type: str) -> str:
    """The prefix of the adapter's own parameter names (``lorma_``, ``lora_``) for peft type ``peft_type``."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    import lorma  # noqa: F401  (LORMA is registered with peft on import)

    return str(PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type.upper(), "lora_"))


def _check_landed(adapter: Path, weights: Path, peft_model: Any, where: str) -> None:
    """Refuse a loaded adapter that did not land whole: every saved tensor must be in the model unchanged, and every
    adapter tensor of the model must come from the file (peft loads with ``strict=False`` and only warns, which
    leaves an adapted module at its initial value, or a merge that changes nothing)."""
    import torch
    from peft import get_peft_model_state_dict

    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        saved = load_file(str(weights))
    else:
        saved = torch.load(str(weights), map_location="cpu", weights_only=True)
    loaded = get_peft_model_state_dict(peft_model, adapter_name="default")
    missing = sorted(set(loaded) - set(saved))
    strays = sorted(set(saved) - set(loaded))
    problems = []
    if strays:
        problems.append(f"{len(strays)} of its {len(saved)} tensors match no module of {where} (first: {strays[0]})")
    if missing:
        problems.append(f"{len(missing)} adapter tensors of the model are not in the file (first: {missing[0]})")
    if problems:
        raise InputError(f"adapter {adapter} did not load whole: {'; '.join(problems)}; nothing was written")
    for key, value in saved.items():
        if tuple(loaded[key].shape) != tuple(value.shape) or not torch.equal(
                loaded[key].detach().to("cpu", value.dtype), value):
            raise InputError(f"adapter {adapter}: saved tensor {key} did not load into {where} unchanged")


def _check_fingerprint(adapter: Path, base: str, recorded: dict[str, Any], found: dict[str, Any]) -> None:
    """Refuse a base model whose type or shapes differ from those the adapter was trained on.

    Keys absent from ``found`` are not compared: a raw ``config.json`` names some sizes by the model's own
    keys only (GPT-2's ``n_embd``, which transformers' config object also shows as ``hidden_size``).
    """
    diffs = [f"{k} {recorded[k]} vs {found[k]}" for k in recorded if k in found and found[k] != recorded[k]]
    if diffs:
        raise InputError(f"adapter {adapter} was trained on another base model than '{base}' ({'; '.join(diffs)})")
