"""A LoRMA adapter as a standard peft LoRA adapter, for the serving stacks that load LoRA adapters only.

vLLM, TGI, llama.cpp and multi-adapter servers load peft LoRA adapters (``adapter_config.json`` with
``peft_type: LORA``, ``lora_A`` / ``lora_B`` tensors), and a LoRA update is ``W - W0 = s_L B_L A_L``. For every
adapted module this writes factors with ``B_L A_L = W - W0`` of the LoRMA adapter (at ``lora_alpha = r``, so
``s_L = 1``):

- ``plus`` (LoRMA+): exact, rank ``r`` (:func:`lorma.functional.plus_weight_update`): pre side
  ``B_L = s B``, ``A_L = A W0``; post side ``B_L = s W0 B``, ``A_L = A``. A fused projection (GPT-2's
  ``c_attn``) gets one block per adapted part, zero rows for the parts that are not adapted: rank
  ``r x parts``.
- ``pi`` / ``none``: ``W - W0`` is full rank in general (paper Table 15), so the factors are its truncated SVD
  at a rank the user gives, or the smallest rank per module whose relative error
  ``||dW - B_L A_L||_F / ||dW||_F`` stays within a bound the user gives. Lossy, so refused unless asked for.

All modules share one rank (the largest; smaller ones are padded with zeros, which changes nothing) and no
``rank_pattern`` / ``alpha_pattern`` is written: the plainest form of a LoRA adapter, so that loaders which read
only ``r`` and ``lora_alpha`` load it too. ``modules_to_save`` (a classification head, say) are
copied as they are. The result loads with plain peft, without ``lorma`` installed.

``serving="vllm"`` / ``"llamacpp"`` (``lorma export --serving``) also checks the export against what that loader
accepts, before any factor is computed, and keeps ``modules_to_save`` out of the adapter (refused, or written to a
separate file with ``modules_to_save="separate"``): see :func:`check_serving` for each rule and where it comes
from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers.pytorch_utils import Conv1D

from ..inflations import get_inflation
from ..layers.base import LormaLayer
from ..model import LormaModel
from ..variants import DyLormaVariant, LormaVariant, get_variant
from .threads import map_modules

EXPORT_REPORT_FILE = "lorma_export.json"
#: peft's prefix for LoRMA's own tensors (``lorma_A``, ``lorma_B``, a variant's ``lorma_...``); every other tensor of
#: a saved adapter belongs to a module trained in full (``modules_to_save``)
ADAPTER_PREFIX = LormaModel.prefix
# a truncation whose relative error is at most this is exact to float32 rounding (the factors are stored in fp32)
EXACT_RELATIVE_ERROR = 1e-6


@dataclass
class ModuleExport:
    """How one adapted module was exported."""

    module: str
    rank: int  # rank of its LoRA factors (before the zero padding to the adapter's common rank)
    relative_error: float  # ||dW - B_L A_L||_F / ||dW||_F, dW = W - W0 of the LoRMA adapter
    method: str  # "exact" (plus) or "svd" (pi / none)


class ExportError(ValueError):
    """The adapter cannot be exported as asked (the message says why and what to give instead).

    ``modules``: for a refused lossy export, what each module's export would have been.
    """

    def __init__(self, message: str, modules: list[ModuleExport] | None = None) -> None:
        super().__init__(message)
        self.modules = modules or []


@dataclass
class LoraExport:
    """An exported LoRA adapter: its peft config, its tensors (peft's saved key names), and the per-module report."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    modules: list[ModuleExport]
    source: dict[str, Any] = field(default_factory=dict)
    serving: str | None = None  # the loader it was checked for (``--serving``)
    #: with ``modules_to_save="separate"``: the trained modules' tensors under the base model's own parameter names
    separate: dict[str, torch.Tensor] = field(default_factory=dict)
    #: what :meth:`save` wrote the adapter as: "lora" (a peft adapter) or "gguf" (llama.cpp's LoRA file)
    format: str = "lora"
    #: the files the adapter was written to, relative to the output directory (set by :meth:`save`)
    files: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    @property
    def exact(self) -> bool:
        """Every module's update reproduced to float32 rounding."""
        return self.max_relative_error <= EXACT_RELATIVE_ERROR

    def report(self) -> dict[str, Any]:
        """What ``lorma_export.json`` holds."""
        report = {
            "format": self.format,
            "source": self.source,
            "r": self.config.r,
            "exact": self.exact,
            "max_relative_error": self.max_relative_error,
            "modules": [asdict(m) for m in self.modules],
        }
        if self.files:
            report["files"] = list(self.files)
        if self.serving is not None:
            report["serving"] = self.serving
            if self.serving == "vllm":
                report["vllm_max_lora_rank"] = vllm_max_lora_rank(self.config.r)
            if self.separate:
                report["modules_to_save_file"] = MODULES_TO_SAVE_FILE
                report["modules_to_save"] = saved_module_sizes(
                    {k: v.numel() for k, v in self.separate.items()}, self.source.get("modules_to_save") or ()
                )
        return report

    def table(self) -> str:
        """The per-module rank and relative error, as printed by ``lorma export``."""
        return format_table(self.modules)

    def save(self, out_dir: str | os.PathLike[str], overwrite: bool = False,
             writer: Callable[[Path], list[str]] | None = None) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``lorma_export.json`` atomically.

        With modules kept apart (``separate``): also ``modules_to_save.safetensors`` and the note on merging them.
        ``writer``: writes the adapter in another format into the staging directory instead of the peft files and
        returns the names it wrote (:func:`lorma.export.gguf.gguf_writer_for`: llama.cpp's GGUF).
        """
        from safetensors.torch import save_file

        from ..plumbing.fileio import atomic_write_json, atomic_write_text, staged_directory

        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise ExportError(f"output directory {out} exists and is not empty; give --overwrite")
        with staged_directory(out) as tmp:  # an existing directory is replaced only once the new one is complete
            if writer is not None:
                self.files = writer(tmp)
            else:
                self.config.save_pretrained(str(tmp))
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict.items()}
                save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            if self.separate:
                separate = {k: v.detach().to("cpu").contiguous() for k, v in self.separate.items()}
                save_file(separate, str(tmp / MODULES_TO_SAVE_FILE), metadata={"format": "pt"})
                atomic_write_text(tmp / MODULES_TO_SAVE_NOTE, self.modules_to_save_note())
            atomic_write_json(tmp / EXPORT_REPORT_FILE, self.report())
        return out

    def modules_to_save_note(self) -> str:
        """``MODULES_TO_SAVE.md``: what the separate file holds and how to put it into the base model."""
        sizes = saved_module_sizes({k: v.numel() for k, v in self.separate.items()},
                                   self.source.get("modules_to_save") or ())
        loader = SERVING_LOADERS.get(self.serving or "", "the serving stack")
        model_class = self.source.get("architecture") or "AutoModel"
        lines = [
            "# Modules trained in full, kept out of the LoRA adapter",
            "",
            f"The LoRMA adapter trained these modules in full (`modules_to_save`), and {loader} loads only the",
            "`lora_A` / `lora_B` tensors of an adapter, so `lorma export` wrote them here instead:",
            "",
            *[f"- `{name}`: {count:,} parameters" for name, count in sorted(sizes.items())],
            "",
            f"`{MODULES_TO_SAVE_FILE}` holds them under the base model's own parameter names. The adapter is",
            "only the model that was trained once they replace the base model's tensors: load the base model",
            "(with the options it was trained with, e.g. a classifier's num_labels), load this file into it, save",
            "it, and serve that model with the adapter:",
            "",
            "```python",
            "from safetensors.torch import load_file",
            f"from transformers import {model_class}",
            "",
            f'model = {model_class}.from_pretrained("{self.config.base_model_name_or_path or "BASE_MODEL"}")',
            f'result = model.load_state_dict(load_file("{MODULES_TO_SAVE_FILE}"), strict=False)',
            "assert not result.unexpected_keys, result.unexpected_keys  # every tensor found its place",
            'model.save_pretrained("base-with-trained-modules")',
            "```",
            "",
            "then serve `base-with-trained-modules` (and convert it, for llama.cpp) with this adapter.",
            "",
        ]
        return "\n".join(lines)


def format_table(modules: list[ModuleExport]) -> str:
    """One line per module: name, rank, relative error of its update, how it was exported."""
    width = max([len("module")] + [len(m.module) for m in modules])
    lines = [f"{'module':<{width}}  rank  relative error  method"]
    lines += [f"{m.module:<{width}}  {m.rank:>4}  {m.relative_error:>14.3e}  {m.method}" for m in modules]
    return "\n".join(lines)


def _truncated_svd(
    delta: torch.Tensor, rank: int | None, max_error: float | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(U, V, relative error)`` with ``U V`` the best approximation of ``delta`` (Eckart-Young) at the chosen rank.

    The rank is ``rank`` (capped at the matrix's size) or the smallest whose relative Frobenius error is at most
    ``max_error``. The singular values are split evenly between the factors (``U sqrt(S)``, ``sqrt(S) V^T``), as a
    LoRA trained from there would want them balanced.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    energy = s.square()
    total = energy.sum()
    if total == 0:
        return delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0, delta.shape[1]), 0.0
    # tail[k] = energy left out when keeping k singular values (k = 0 .. n)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    errors = (tail / total).clamp_min(0).sqrt()
    if rank is not None:
        k = min(rank, s.numel())
    else:
        k = int(torch.nonzero(errors <= max_error)[0].item())
    root = s[:k].sqrt()
    return u[:, :k] * root, root.unsqueeze(1) * vh[:k], float(errors[k])


def _module_factors(
    key: str, layer: LormaLayer, adapter: str, rank: int | None, max_error: float | None
) -> tuple[torch.Tensor, torch.Tensor, ModuleExport]:
    """LoRA factors ``(B_L, A_L)`` (``nn.Linear`` layout, float64) of one module's update, and its report line."""
    weight = layer.weight_linear().detach().double()
    variant = layer.lorma_variant[adapter]
    factors = variant.lora_factors(layer, adapter, weight)  # the inflation's exact factors, when it has them
    if factors is not None:
        b_lora, a_lora = factors
        return b_lora, a_lora, ModuleExport(key, a_lora.shape[0], 0.0, "exact")
    delta = variant.delta_weight(layer, adapter, weight)  # (I(BA) - I) W0 or W0 (I(BA) - I), zero rows elsewhere
    b_lora, a_lora, error = _truncated_svd(delta, rank, max_error)
    return b_lora, a_lora, ModuleExport(key, a_lora.shape[0], error, "svd")


# ------------------------------------------------------------------ serving loaders: what vLLM and llama.cpp accept

#: ``--serving`` values and the loader each names
SERVING_LOADERS: dict[str, str] = {"vllm": "vLLM", "llamacpp": "llama.cpp"}
#: ``--modules-to-save``: what a serving export does with modules trained in full
MODULES_TO_SAVE_CHOICES = ("refuse", "separate")
MODULES_TO_SAVE_FILE = "modules_to_save.safetensors"
MODULES_TO_SAVE_NOTE = "MODULES_TO_SAVE.md"
#: the values vLLM's ``--max-lora-rank`` takes (vllm/config/lora.py, ``MaxLoRARanks``); an adapter's ``r`` must be at
#: most the server's value (vllm/lora/peft_helper.py, ``validate_legal``)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: the Hugging Face architectures llama.cpp's converter reads as its Llama model (convert_hf_to_gguf.py /
#: conversion/llama.py: ``LlamaModel``, gguf ``MODEL_ARCH.LLAMA``), text-only and dense (no experts)
LLAMACPP_ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")
#: the modules of those models that the converter maps to GGUF tensors (gguf's tensor_mapping.py, the table
#: convert_lora_to_gguf.py maps each ``lora_A`` / ``lora_B`` pair's base tensor with); ``lm_head`` separately
LLAMA_PROJECTION = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
OUTPUT_HEAD = "lm_head"


@dataclass
class ServingFacts:
    """What the serving rules are checked on.

    The command reads them from the adapter's files and the base model's ``config.json`` before loading anything
    (``layers`` and ``tied_head`` unknown then); :func:`lora_export` from the loaded model, before computing factors.
    """

    architecture: str | None  # the base model's Hugging Face architecture (``config.json``'s ``architectures[0]``)
    saved: dict[str, int]  # modules trained in full (modules_to_save) -> their number of parameters
    layers: dict[str, str] | None = None  # adapted module -> "linear" or "conv1d"
    tied_head: bool = False  # the output head shares its weight with the token embeddings
    rank: int | None = None  # the export's LoRA rank, where known
    tied_saved: dict[str, str] = field(default_factory=dict)  # saved module -> the base parameter it shares


def is_adapter_key(key: str) -> bool:
    """Whether a saved adapter's tensor is one of LoRMA's own (any part of its name starts with ``lorma_``)."""
    return any(part.startswith(ADAPTER_PREFIX) for part in key.split("."))


def is_base_layer_key(key: str) -> bool:
    """Whether a saved tensor is the base weight of an adapted layer (peft's ``base_layer``), not a trained one.

    peft saves the base weights of an adapted ``embed_tokens`` / ``lm_head`` with the adapter (its
    ``save_embedding_layers="auto"``, for resized vocabularies); vLLM (utils.py ``is_base_embedding_weights``) and
    llama.cpp's converter (``.base_layer.weight``) skip them, and so does a serving export.
    """
    return "base_layer" in key.split(".")


def saved_module_sizes(numels: Mapping[str, int], entries: Iterable[str]) -> dict[str, int]:
    """``{module: parameters}`` of the modules trained in full, from a saved adapter's tensors (peft's key names).

    ``numels`` maps each tensor's key (``base_model.model.<module>.<param>``) to its size; LoRMA's own tensors
    (``lorma_...``) are skipped. A tensor belongs to the shortest module path that names a ``modules_to_save``
    entry (peft matches an entry as the module's name or its dotted suffix); one that names none stays whole.
    """
    names = tuple(entries)
    sizes: dict[str, int] = {}
    for key, numel in numels.items():
        if is_adapter_key(key) or is_base_layer_key(key):
            continue
        parts = key.removeprefix("base_model.model.").split(".")
        module = ".".join(parts[:-1])
        for end in range(1, len(parts)):
            path = ".".join(parts[:end])
            if any(path == n or path.endswith("." + n) for n in names):
                module = path
                break
        sizes[module] = sizes.get(module, 0) + int(numel)
    return sizes


def _listing(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{name} ({count:,} parameters)" for name, count in sorted(sizes.items()))


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest value of vLLM's ``--max-lora-rank`` that serves an adapter of rank ``rank`` (None: none does)."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)


def check_serving(serving: str, facts: ServingFacts, modules_to_save: str = "refuse") -> None:
    """Refuse, with an :class:`ExportError` naming the modules and the loader's rule, what ``serving`` cannot load.

    Rules (the loaders' own source files):

    - both: an adapter holds ``lora_A`` / ``lora_B`` tensors only. vLLM refuses ``modules_to_save`` (peft_helper.py
      ``_validate_features``: None, or in recent versions ``["classifier", "score"]`` of classification models) and
      any other tensor name (utils.py ``parse_fine_tuned_lora_name``); llama.cpp's convert_lora_to_gguf.py stops at
      any tensor that is not ``lora_A`` / ``lora_B`` (a trained ``embed_tokens`` / ``lm_head`` included). Modules
      trained in full are refused, or with ``modules_to_save="separate"`` written beside the adapter to be merged
      into the base model, which is only exact if they share no weight with another base module (tied embeddings).
    - vLLM: LoRA on the linear layers of models that implement it (utils.py ``get_supported_lora_modules``); its
      GPT-2 family, whose transformers layers are ``Conv1D``, does not (models/gpt2.py: ``GPT2LMHeadModel`` is not
      ``SupportsLoRA``). ``r`` at most the server's ``--max-lora-rank``, itself at most 512 (config/lora.py).
    - llama.cpp: the base model's architecture must be one the converter maps (``--base`` gives it its
      ``config.json``), each adapted module one of its GGUF tensors, and an adapted ``lm_head`` not tied to the
      token embeddings (the converter raises "lm_head is present in adapter, but is ignored in base model").
    """
    if serving not in SERVING_LOADERS:
        raise ExportError(f"--serving must be one of {sorted(SERVING_LOADERS)}, got {serving!r}")
    if modules_to_save not in MODULES_TO_SAVE_CHOICES:
        raise ExportError(f"--modules-to-save must be one of {list(MODULES_TO_SAVE_CHOICES)}, got {modules_to_save!r}")
    loader = SERVING_LOADERS[serving]
    where = f"--serving {serving}"
    if serving == "llamacpp" and facts.architecture is not None and facts.architecture not in LLAMACPP_ARCHITECTURES:
        raise ExportError(
            f"{where}: the base model is a {facts.architecture}; llama.cpp's convert_lora_to_gguf.py converts "
            f"adapters of the Llama-family models its converter maps ({', '.join(LLAMACPP_ARCHITECTURES)}) here; "
            "export without --serving for peft-based servers, or merge the adapter (lorma merge)"
        )
    layers = facts.layers or {}
    conv = sorted(key for key, kind in layers.items() if kind != "linear")
    if conv:
        raise ExportError(
            f"{where}: {len(conv)} adapted module(s) are transformers Conv1D layers (GPT-2 style): {', '.join(conv)}; "
            f"{loader} serves LoRA on nn.Linear layers here (vLLM's GPT-2 model has no LoRA support); export "
            "without --serving for peft-based servers, or merge the adapter (lorma merge)"
        )
    if serving == "llamacpp":
        unmapped = sorted(key for key in layers if not (LLAMA_PROJECTION.fullmatch(key) or key == OUTPUT_HEAD))
        if unmapped:
            raise ExportError(
                f"{where}: llama.cpp's converter maps the Llama projections (q/k/v/o_proj, gate/up/down_proj under "
                f"model.layers.N) and lm_head to GGUF tensors, not {', '.join(unmapped)}"
            )
        if OUTPUT_HEAD in layers and facts.tied_head:
            raise ExportError(
                f"{where}: {OUTPUT_HEAD} is adapted but tied to the token embeddings, and llama.cpp's converter "
                "refuses an adapted lm_head of a model that ties it (it has no tensor of its own in GGUF); leave "
                "lm_head out of target_modules, or merge the adapter (lorma merge)"
            )
    if facts.rank is not None:
        check_serving_rank(serving, facts.rank)
    if facts.saved and modules_to_save == "refuse":
        raise ExportError(
            f"{where}: the adapter trains whole modules (modules_to_save), which {loader} does not load from an "
            f"adapter, so they would be dropped: {_listing(facts.saved)}; give --modules-to-save separate to write "
            f"them to {MODULES_TO_SAVE_FILE} beside the adapter, to merge into the base model (the note "
            f"{MODULES_TO_SAVE_NOTE} there says how)"
        )
    if facts.tied_saved:
        pairs = sorted(facts.tied_saved.items())
        shared = ", ".join(f"{module} shares its weight with {other}" for module, other in pairs)
        raise ExportError(
            f"{where}: {shared} in the base model (tied weights), so no merge of the trained copy into the base "
            "model keeps the other module unchanged; merge the adapter instead (lorma merge)"
        )


def check_serving_rank(serving: str, rank: int) -> None:
    """vLLM serves ranks up to its largest ``--max-lora-rank`` (512); llama.cpp has no bound."""
    if serving == "vllm" and vllm_max_lora_rank(rank) is None:
        raise ExportError(
            f"--serving vllm: the export's rank {rank} is above the largest --max-lora-rank vLLM takes "
            f"({VLLM_MAX_LORA_RANKS[-1]}, vllm/config/lora.py); give a smaller --rank / larger --max-error"
        )


def serving_facts(model: torch.nn.Module, layers: list[tuple[str, LormaLayer]], saved: dict[str, int]) -> ServingFacts:
    """The facts of a loaded model (the base model inside the peft wrappers) and its adapted ``layers``."""
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    head, embeddings = _base(model, "get_output_embeddings"), _base(model, "get_input_embeddings")
    tied_head = head is not None and embeddings is not None and head.weight is embeddings.weight
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    tied_saved = {}
    for key, module in model.named_modules():
        original = getattr(module, "original_module", None) if isinstance(module, AuxiliaryTrainingWrapper) else None
        for param in original.parameters() if original is not None else ():
            others = [n for n in names.get(id(param), []) if not n.startswith(key + ".")]
            if others:
                tied_saved[key] = others[0].replace(".base_layer.", ".")
    kinds = {key: "conv1d" if isinstance(layer.get_base_layer(), Conv1D) else "linear" for key, layer in layers}
    return ServingFacts(architectures[0], saved, kinds, tied_head, tied_saved=tied_saved)


def _base(model: torch.nn.Module, getter: str) -> torch.nn.Module | None:
    """The model's input or output embedding module, unwrapped from a LoRMA layer or peft's module wrapper."""
    module = getattr(model, getter, lambda: None)()
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if isinstance(module, AuxiliaryTrainingWrapper):
        module = module.original_module
    return module if isinstance(getattr(module, "weight", None), torch.Tensor) else None


def lora_export(
    model: Any,
    adapter_name: str = "default",
    rank: int | None = None,
    max_error: float | None = None,
    allow_approximate: bool = False,
    serving: str | None = None,
    modules_to_save: str = "refuse",
) -> LoraExport:
    """The LoRA adapter equivalent to LoRMA adapter ``adapter_name`` of ``model`` (a peft model with LoRMA).

    ``plus`` adapters are exported exactly (``rank`` / ``max_error`` do not apply to them). ``pi`` / ``none``
    need ``rank`` or ``max_error`` (one of them) and, when the truncation loses more than float32 rounding,
    ``allow_approximate=True``; otherwise an :class:`ExportError` says how far from exact each module would be.

    ``serving`` (``"vllm"`` / ``"llamacpp"``): checked against that loader's rules (:func:`check_serving`) before
    any factor is computed; modules trained in full are refused, or with ``modules_to_save="separate"`` returned
    apart (:attr:`LoraExport.separate`), never in the adapter.
    """
    peft_model = model if isinstance(model, PeftModel) else None
    tuner = model.base_model if peft_model is not None else model
    configs = getattr(tuner, "peft_config", {})
    if adapter_name not in configs:
        raise ExportError(f"no adapter named {adapter_name!r} (have {sorted(configs)})")
    config = configs[adapter_name]
    inflation = getattr(config, "inflation", None)
    if inflation is None:
        raise ExportError(f"adapter {adapter_name!r} is a {config.peft_type} adapter, not a LoRMA one")
    if getattr(config, "target_parameters", None):
        raise ExportError(
            f"adapter {adapter_name!r} adapts expert parameters (target_parameters), which lorma export does not "
            "write as LoRA; merge it (lorma merge) to serve it"
        )
    variant = getattr(config, "variant", None)
    check_options(adapter_name, inflation, rank, max_error, variant)

    layers = [
        (key, m) for key, m in tuner.model.named_modules() if isinstance(m, LormaLayer) and adapter_name in m.lorma_A
    ]
    if not layers:
        raise ExportError(f"adapter {adapter_name!r} adapts no module of this model")
    other = [(key, type(m.get_base_layer()).__name__) for key, m in layers
             if not isinstance(m.get_base_layer(), (torch.nn.Linear, Conv1D))]
    if other:
        raise ExportError(
            f"module {other[0][0]!r} is a {other[0][1]}: lorma export writes LoRA adapters for Linear / Conv1D layers "
            "only (LoRMA's convolution and embedding layers are not exported); merge the adapter instead "
            "(lorma merge, or merge_and_unload)"
        )
    if any(m.merged for _, m in layers):
        raise ExportError("the adapter is merged into the base weights (W0 is not available): unmerge it first")
    others = {}  # what peft saves beside LoRMA's tensors, under its key names
    if peft_model is not None:
        peft_state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        others = {k: v for k, v in peft_state.items() if not is_adapter_key(k)}
    trained = {k: v for k, v in others.items() if not is_base_layer_key(k)}  # modules_to_save
    saved_entries = list(dict.fromkeys(config.modules_to_save)) if config.modules_to_save else []
    if serving is not None:  # every rule the model shows, before any work
        saved = saved_module_sizes({k: v.numel() for k, v in trained.items()}, saved_entries)
        facts = serving_facts(tuner.model, layers, saved)
        facts.rank = rank
        check_serving(serving, facts, modules_to_save)
    nested = [layer.lorma_variant[adapter_name] for _, layer in layers if variant == DyLormaVariant.name]
    if nested and rank is not None and rank > config.r:  # DyLoRMA: the rank-b truncation, exact up to r
        raise ExportError(f"adapter {adapter_name!r}: --rank {rank} is above the DyLoRMA adapter's r={config.r}")
    previous = [v.inference_rank for v in nested]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: list[ModuleExport] = []
    conv1d = False
    try:
        for v in nested:
            v.inference_rank = rank if rank is not None else v.inference_rank
        # the modules in parallel, each single-threaded where it can be: an SVD's threads spin at barriers on a
        # busy machine (lorma.export.threads)
        results = map_modules(
            lambda item: _module_factors(item[0], item[1], adapter_name, None if nested else rank, max_error),
            layers, [layer.get_base_layer().weight.numel() for _, layer in layers],
        )
        for (key, layer), (b_lora, a_lora, line) in zip(layers, results):
            factors[key] = (b_lora, a_lora)
            modules.append(line)
            conv1d = conv1d or isinstance(layer.get_base_layer(), Conv1D)
    finally:
        for v, before in zip(nested, previous):
            v.inference_rank = before

    lossy = [m for m in modules if m.relative_error > EXACT_RELATIVE_ERROR]
    if lossy and not allow_approximate:
        worst = max(lossy, key=lambda m: m.relative_error)
        raise ExportError(
            f"this export is lossy: {len(lossy)} of {len(modules)} modules lose more than float32 rounding "
            f"(worst {worst.module}: relative error {worst.relative_error:.3g} at rank {worst.rank}), because a "
            f"{inflation!r} adapter's update is full rank and LoRA keeps only the top singular directions; give "
            "--allow-approximate to write it anyway, or a larger --rank / smaller --max-error; to serve it exactly, "
            "merge it (lorma merge) and serve or convert the merged model (llama.cpp: convert_hf_to_gguf.py)",
            modules,
        )

    common_rank = max(1, max(m.rank for m in modules))
    state: dict[str, torch.Tensor] = {}
    for key, (b_lora, a_lora) in factors.items():
        pad = common_rank - a_lora.shape[0]
        b_full = torch.cat([b_lora, b_lora.new_zeros(b_lora.shape[0], pad)], dim=1)
        a_full = torch.cat([a_lora, a_lora.new_zeros(pad, a_lora.shape[1])], dim=0)
        state[f"base_model.model.{key}.lora_A.weight"] = a_full.float().contiguous()
        state[f"base_model.model.{key}.lora_B.weight"] = b_full.float().contiguous()
    separate: dict[str, torch.Tensor] = {}
    if serving is None:  # modules_to_save (a trained head), under the key names peft saves them with
        state.update({key: value.detach().clone() for key, value in others.items()})
    else:  # kept out of the adapter (check_serving refused them unless "separate"): the base model's names
        separate = {key.removeprefix("base_model.model."): value.detach().clone() for key, value in trained.items()}
        check_serving_rank(serving, common_rank)
    targets = _lora_targets(config, tuner.model, set(factors))
    if serving is not None and isinstance(targets, str):  # a regex: the loaders read lists of module names
        targets = sorted(factors)

    lora_config = LoraConfig(
        r=common_rank,
        lora_alpha=common_rank,
        target_modules=targets,
        lora_dropout=float(config.dropout),
        fan_in_fan_out=conv1d,
        bias="none",
        modules_to_save=saved_entries if saved_entries and serving is None else None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    source = {"inflation": inflation, "side": config.side, "r": config.r, "alpha": config.alpha}
    if serving is not None:
        source["architecture"] = facts.architecture
    if separate:
        source["modules_to_save"] = saved_entries
    return LoraExport(config=lora_config, state_dict=state, modules=modules, source=source, serving=serving,
                      separate=separate)


def check_options(
    adapter_name: str, inflation: str, rank: int | None, max_error: float | None, variant: str | None = None
) -> None:
    """Refuse options that do not fit the adapter's inflation (and variant), before any work.

    A DyLoRMA adapter (nested ranks) takes ``--rank b`` as the truncation to export, exactly; a variant that merges
    its own way (DoRMA's per-row rescaling) has a full-rank update whatever the inflation.
    """
    if rank is not None and max_error is not None:
        raise ExportError("give --rank or --max-error, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ExportError(f"--rank must be a positive integer, got {rank!r}")
    if max_error is not None and not (isinstance(max_error, (int, float)) and 0 <= max_error < 1):
        raise ExportError(f"--max-error must be a relative error in [0, 1), got {max_error!r}")
    try:
        exact_kind = get_inflation(inflation).exact_lora_export
        variant_cls = get_variant(variant)
    except ValueError as err:
        raise ExportError(f"adapter {adapter_name!r}: {err}") from None
    if variant_cls is DyLormaVariant:
        if max_error is not None:
            raise ExportError(f"adapter {adapter_name!r} is DyLoRMA (nested ranks): --rank b picks the rank to "
                              "export exactly; --max-error does not apply")
        return
    kind = f"inflation {inflation!r}"
    own_merge = variant_cls.delta_weight is not LormaVariant.delta_weight
    if own_merge and variant_cls.lora_factors is LormaVariant.lora_factors:
        exact_kind, kind = False, f"{kind} with variant {variant!r}"
    if exact_kind and (rank is not None or max_error is not None):
        raise ExportError(
            f"adapter {adapter_name!r} has {kind} (LoRMA+): its update is exactly a rank-r LoRA "
            "update and is exported as such; --rank / --max-error apply to adapters with a full-rank update "
            "(pi, none)"
        )
    if not exact_kind and rank is None and max_error is None:
        raise ExportError(
            f"adapter {adapter_name!r} has {kind}: its update W - W0 is full rank, so a LoRA "
            "adapter can only approximate it (a truncated SVD per module); give --rank K or --max-error E, "
            "and --allow-approximate, or serve it exactly by merging it (lorma merge) and serving or converting the "
            "merged model (llama.cpp: convert_hf_to_gguf.py)"
        )


def _lora_targets(config: Any, model: torch.nn.Module, adapted: set[str]) -> list[str] | str:
    """The LoRMA config's target spec if, under LoRA's matching, it selects exactly the adapted modules; else names.

    The short spec (``["q_proj", "v_proj"]``) is what serving stacks expect; the full module names are the
    fallback when a spec (a regex, say) would select other modules of the base model under LoRA.
    """
    spec = config.target_modules
    if spec is None:
        return sorted(adapted)
    probe = LoraConfig(
        target_modules=spec if isinstance(spec, str) else sorted(spec),
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    # module names as the plain base model has them: skip what peft's wrappers hold inside
    wrappers = [key for key, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    names = [key for key, _ in model.named_modules() if key and not any(key.startswith(w + ".") for w in wrappers)]
    matched = {key for key in names if check_target_module_exists(probe, key)}
    if matched != adapted:
        return sorted(adapted)
    return probe.target_modules if isinstance(probe.target_modules, str) else sorted(probe.target_modules)
