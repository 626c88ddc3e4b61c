"""Hotswap: replace a loaded LoRMA adapter's weights in place with another adapter's, also under ``torch.compile``.

peft's ``peft.utils.hotswap.hotswap_adapter`` does this for LoRA and refuses every other method
(``check_hotswap_configs_compatible``: "Hotswapping only supports LORA"); its state-dict swap reads LoRA's config
fields (``lora_alpha``, ``use_rslora``) and ``nn.Linear`` sub-modules. This module is its LoRMA counterpart:
:func:`hotswap_adapter` reads an adapter directory, :func:`hotswap_adapter_from_state_dict` takes tensors.

The swapped adapter computes what a fresh load of the new adapter computes. Nothing the forward reads from Python
changes: the tensors are copied into the parameters already there (same objects, shapes, dtypes, devices), and the
scaling ``s = alpha / r`` of the loaded adapter stays. A compiled model therefore does not recompile: its guards
are on those Python values and on the tensors' metadata, never on their contents.

Different ``alpha`` or a smaller rank are still exact, with no tensor-valued scaling (peft needs
``prepare_model_for_compiled_hotswap`` for that): every built-in inflation depends on ``A``, ``B``, ``s`` only
through ``s B A`` (:attr:`lorma.inflations.Inflation.scaled_product_only`), so the new ``(A', B', s')`` is stored
as ``A = [A'; 0]``, ``B = [B' s'/s, 0]`` at the loaded rank and scaling: the same transform up to one rounding of
``B``. A larger rank than the loaded one would change the shapes, and is refused.

Refused before anything changes, each with a message naming what differs: an adapter that is merged, a checkpoint
of another method, another inflation or variant, other target modules, another side or other fused parts on a
module, other shapes, a larger rank, another dropout, or modules_to_save of other shapes.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from peft.utils.other import ModulesToSaveWrapper, get_pattern_key
from peft.utils.save_and_load import load_peft_weights
from torch import nn

from ..config import DEFAULT_FUSED_PARTS, LormaConfig
from ..layers.base import LormaLayer

# keys of a saved adapter start with the PeftModel's path to the base model
SAVED_PREFIX = "base_model.model."


def hotswap_adapter(
    model: nn.Module,
    adapter_dir: str | Path,
    adapter_name: str = "default",
    torch_device: str | torch.device | None = None,
) -> None:
    """Replace the weights of the loaded adapter ``adapter_name`` with those saved in ``adapter_dir``, in place.

    ``model`` is the ``PeftModel`` (or ``torch.compile`` of it) that holds the adapter; ``adapter_dir`` a LoRMA
    adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as ``save_pretrained`` writes).
    The adapter keeps its name, its active state and its loaded ``r`` / ``alpha`` (the new ones are folded into
    the tensors, exactly); ``model.peft_config[adapter_name]`` is left as it was, so saving afterwards writes an
    adapter equivalent to the new one in the loaded adapter's ``r`` and ``alpha``.
    """
    folder = Path(adapter_dir)
    config = LormaConfig.from_pretrained(str(folder))
    device = torch_device if torch_device is not None else _adapter_device(model, adapter_name)
    state_dict = load_peft_weights(str(folder), device=str(device))
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: LormaConfig
) -> None:
    """Replace the weights of the loaded adapter ``adapter_name`` with ``state_dict``, in place.

    ``state_dict`` is in the form an adapter is saved in (``get_peft_model_state_dict(model, adapter_name=...)``,
    or the contents of ``adapter_model.safetensors``): keys without the adapter's name, such as
    ``base_model.model.<module>.lorma_A``. ``config`` is that adapter's :class:`LormaConfig`. Every check runs
    before any tensor is written.
    """
    plan = _plan(model, state_dict, adapter_name, config)
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value)


# ---------------------------------------------------------------------------------------------- the checks
def _plan(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str, config: LormaConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(parameter, new value)`` for every tensor to write, after checking everything; raises on any mismatch."""
    where = f"LoRMA hotswap of adapter {adapter_name!r}"
    if not isinstance(config, LormaConfig):
        raise ValueError(f"{where}: the new adapter is a {type(config).__name__}, not a LoRMA adapter")
    inner = _base_model(model)
    loaded_config = _loaded_config(model, adapter_name)
    # by their path in the model, which is what the saved keys hold (for nested expert-parameter wrappers it is
    # not their module_name: lorma.layers.experts)
    layers = {
        path: m for path, m in inner.named_modules() if isinstance(m, LormaLayer) and adapter_name in m.lorma_A
    }
    if not layers:
        raise ValueError(f"{where}: no LoRMA layer of this model holds an adapter of that name")
    merged = sorted(name for name, m in layers.items() if adapter_name in m.merged_adapters)
    if merged:
        raise ValueError(
            f"{where}: it is merged into the weights of {merged[:3]}; call unmerge_adapter() first "
            "(unmerging after a swap would restore the wrong weights)"
        )
    for field in ("inflation", "variant", "dropout"):
        old, new = getattr(loaded_config, field), getattr(config, field)
        if old != new:
            raise ValueError(f"{where}: the loaded adapter has {field}={old!r}, the new one {field}={new!r}")
    if config.variant is not None:
        raise ValueError(
            f"{where}: adapters with a variant ({config.variant!r}) have more than A and B to swap; load the new "
            "adapter with load_adapter() instead"
        )

    saved = {k.removeprefix(SAVED_PREFIX): v for k, v in state_dict.items()}
    lorma_keys = {k for k in saved if re.search(r"\.lorma_[^.]+$", k)}
    saved_modules = {k.rpartition(".lorma_")[0] for k in lorma_keys}
    missing, unexpected = sorted(set(layers) - saved_modules), sorted(saved_modules - set(layers))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} modules it adapts are not in the new adapter (first: {missing[0]!r})")
        if unexpected:
            problems.append(f"{len(unexpected)} modules of the new adapter are not adapted by the loaded one "
                            f"(first: {unexpected[0]!r})")
        raise ValueError(f"{where}: the adapters target different modules: " + "; ".join(problems))
    expected = {f"{name}.lorma_{p}" for name in layers for p in ("A", "B")}
    if lorma_keys != expected:
        odd = sorted(lorma_keys ^ expected)[0]
        raise ValueError(f"{where}: the new adapter should hold lorma_A and lorma_B for each module; {odd!r} "
                         f"is {'missing' if odd in expected else 'not one of them'}")

    config = _with_default_fused_parts(config, inner)
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, layer in layers.items():
        plan += _layer_plan(layer, adapter_name, config, saved[f"{name}.lorma_A"], saved[f"{name}.lorma_B"], where)
    plan += _modules_to_save_plan(inner, adapter_name, {k: v for k, v in saved.items() if k not in lorma_keys}, where)
    return plan


def _layer_plan(
    layer: LormaLayer, adapter: str, config: LormaConfig, new_A: torch.Tensor, new_B: torch.Tensor, where: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The new ``A`` and ``B`` of one layer in the loaded adapter's rank and scaling."""
    name = layer.module_name
    A, B = layer.lorma_A[adapter], layer.lorma_B[adapter]
    side = config.side_for(name, layer.in_features, layer.out_features,
                           layer.fused[adapter][0] if layer.fused[adapter] is not None else 1)
    if side != layer.side[adapter]:
        raise ValueError(f"{where}: module {name!r} is adapted on the {layer.side[adapter]!r} side, the new "
                         f"adapter adapts it on the {side!r} side")
    fused = config.fused_spec_for(name)
    if fused != layer.fused[adapter]:
        raise ValueError(f"{where}: module {name!r} has fused parts {layer.fused[adapter]} in the loaded adapter, "
                         f"{fused} in the new one")
    r_key = get_pattern_key(config.rank_pattern.keys(), name)
    alpha_key = get_pattern_key(config.alpha_pattern.keys(), name)
    r_new = config.rank_pattern.get(r_key, config.r)
    s_new = float(config.alpha_pattern.get(alpha_key, config.alpha)) / r_new
    lead, r_old, d = A.shape[:-2], A.shape[-2], A.shape[-1]
    if tuple(new_A.shape) != (*lead, r_new, d) or tuple(new_B.shape) != (*lead, d, r_new):
        raise ValueError(
            f"{where}: module {name!r}: the new adapter's A {tuple(new_A.shape)} and B {tuple(new_B.shape)} are not "
            f"the {(*lead, r_new, d)} and {(*lead, d, r_new)} its config (r={r_new}) and this module give"
        )
    if r_new > r_old:
        raise ValueError(
            f"{where}: module {name!r}: the new adapter has rank {r_new}, above the loaded {r_old}; swapping it in "
            "would change the tensors' shapes (and recompile a compiled model). Load the adapter of the largest "
            "rank first"
        )
    s_old = layer.scaling[adapter]
    inflation = layer.lorma_variant[adapter].inflation
    if (r_new != r_old or s_new != s_old) and not inflation.scaled_product_only:
        raise ValueError(
            f"{where}: module {name!r}: the new adapter has r={r_new}, s={s_new:g} where the loaded one has "
            f"r={r_old}, s={s_old:g}, and the {inflation.name!r} inflation does not declare scaled_product_only, "
            "so they cannot be folded into the loaded tensors"
        )
    padded_A = new_A.new_zeros((*lead, r_old, d), dtype=torch.float64)
    padded_B = new_B.new_zeros((*lead, d, r_old), dtype=torch.float64)
    padded_A[..., :r_new, :] = new_A.double()
    padded_B[..., :, :r_new] = new_B.double() * (s_new / s_old)
    return [(A, padded_A.to(A.dtype)), (B, padded_B.to(B.dtype))]


def _modules_to_save_plan(
    inner: nn.Module, adapter: str, rest: dict[str, torch.Tensor], where: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The new tensors of the adapter's modules_to_save (a classification head, say), same shapes only."""
    targets: dict[str, torch.Tensor] = {}
    for path, wrapper in inner.named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter in wrapper.modules_to_save:
            for pname, tensor in wrapper.modules_to_save[adapter].state_dict(keep_vars=True).items():
                targets[f"{path}.{pname}"] = tensor
    if set(targets) != set(rest):
        differ = sorted(set(targets) ^ set(rest))
        raise ValueError(f"{where}: the adapters' modules_to_save differ (first: {differ[0]!r})")
    plan = []
    for key, target in targets.items():
        if rest[key].shape != target.shape:
            raise ValueError(f"{where}: {key} has shape {tuple(rest[key].shape)} in the new adapter, "
                             f"{tuple(target.shape)} in the loaded one")
        plan.append((target, rest[key].to(target.dtype)))
    return plan


# ---------------------------------------------------------------------------------------------- where things are
def _base_model(model: nn.Module) -> nn.Module:
    """The transformers (or torch) model inside a ``PeftModel``, its compiled wrapper or a ``LormaModel``."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    tuner = getattr(model, "base_model", None)
    if tuner is not None and hasattr(tuner, "peft_config") and isinstance(getattr(tuner, "model", None), nn.Module):
        return tuner.model  # PeftModel -> LormaModel -> model
    if hasattr(model, "peft_config") and isinstance(getattr(model, "model", None), nn.Module):
        return model.model  # LormaModel
    return model  # a model with adapters injected by transformers' add_adapter / load_adapter


def _loaded_config(model: nn.Module, adapter_name: str) -> LormaConfig:
    model = getattr(model, "_orig_mod", model)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, dict) else []
        raise ValueError(
            f"LoRMA hotswap: the model has no adapter named {adapter_name!r} (adapters: {known}); hotswap replaces a "
            "loaded adapter, load the first one with PeftModel.from_pretrained or load_adapter"
        )
    loaded = configs[adapter_name]
    if not isinstance(loaded, LormaConfig):
        raise ValueError(f"LoRMA hotswap: adapter {adapter_name!r} is a {type(loaded).__name__}, not a LoRMA adapter")
    return loaded


def _with_default_fused_parts(config: LormaConfig, inner: nn.Module) -> LormaConfig:
    """``config`` with the model type's default fused parts when it has none (as ``get_peft_model`` fills them)."""
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if config.fused_parts is not None or model_type not in DEFAULT_FUSED_PARTS:
        return config
    config = copy.copy(config)
    config.fused_parts = {k: dict(v) for k, v in DEFAULT_FUSED_PARTS[model_type].items()}
    return config


def _adapter_device(model: nn.Module, adapter_name: str) -> torch.device:
    for module in _base_model(model).modules():
        if isinstance(module, LormaLayer) and adapter_name in module.lorma_A:
            return module.lorma_A[adapter_name].device
    return torch.device("cpu")


__all__ = ["hotswap_adapter", "hotswap_adapter_from_state_dict"]
