"""delta W = W - W0 per adapted module, from a live peft model or from a saved adapter plus its base model.

Deltas come from the adapters' own ``get_delta_weight`` (what merging would add): LoRMA's
``LormaLayer.get_delta_weight`` and peft's ``LoraLayer.get_delta_weight``, so the analysis measures
exactly what the methods apply. Every delta is returned in ``nn.Linear`` layout ``(d_out, d_in)``
(LoRA's delta of a transformers ``Conv1D`` comes in the stored, transposed layout and is turned back),
as a float32 CPU tensor, keyed by the module's name without peft's ``base_model.model.`` prefix so that
runs of different methods on the same base model line up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModuleDelta", "extract_deltas", "load_adapter_model", "resolve_base_model"]


@dataclass
class ModuleDelta:
    """One module's delta W and what produced it."""

    delta: Any  # torch.Tensor (d_out, d_in), float32, CPU
    method: str  # "lorma" or "lora"
    r: int
    adapter: str
    inflation: str | None = None  # LoRMA only
    side: str | None = None  # LoRMA only


def extract_deltas(model: Any, adapter: str | None = None) -> dict[str, ModuleDelta]:
    """delta W of every LoRMA or LoRA layer in ``model`` for ``adapter`` (default: the active one)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from lorma.layers.base import LormaLayer
    from lorma.runs.rank_log import module_key

    out: dict[str, ModuleDelta] = {}
    for name, module in model.named_modules():
        if isinstance(module, LormaLayer):
            names = list(module.lorma_A)
        elif isinstance(module, LoraLayer):
            names = list(module.lora_A)
        else:
            continue
        chosen = adapter if adapter is not None else _active(module, names)
        if chosen is None or chosen not in names:
            continue
        with torch.no_grad():
            if isinstance(module, LormaLayer):
                delta = module.get_delta_weight(chosen).detach().float().cpu()
                out[module_key(name)] = ModuleDelta(
                    delta, "lorma", int(module.r[chosen]), chosen, module.inflation[chosen], module.side[chosen]
                )
            else:
                if getattr(module, "use_dora", {}).get(chosen, False):
                    raise ValueError(
                        f"module {module_key(name)!r}: DoRA adapter {chosen!r}: its weight update is not "
                        f"lora's get_delta_weight alone (magnitude rescaling); not supported here"
                    )
                delta = module.get_delta_weight(chosen).detach().float().cpu()
                if delta.dim() != 2:
                    continue  # LoRA on embeddings / convolutions: not a Linear delta W
                if getattr(module, "fan_in_fan_out", False):
                    delta = delta.T.contiguous()
                out[module_key(name)] = ModuleDelta(delta, "lora", int(module.r[chosen]), chosen)
    if not out:
        raise ValueError(
            "the model has no LoRMA or LoRA layers"
            + (f" with an adapter named {adapter!r}" if adapter is not None else "")
        )
    return out


def _active(module: Any, names: list[str]) -> str | None:
    active = [a for a in getattr(module, "active_adapters", []) if a in names]
    if active:
        return active[0]
    return names[0] if len(names) == 1 else None


def resolve_base_model(adapter_dir: str | os.PathLike[str], base_model: str | None, hint: str | None = None) -> str:
    """The base model directory: given, else a run's config ``hint``, else the adapter's own record.

    Only local directories are accepted (nothing is downloaded); a missing one is an error that says
    where the path came from.
    """
    from lorma.runs.layout import read_adapter_config

    if base_model is not None:
        source, path = "--base-model", base_model
    elif hint is not None:
        source, path = "the run's config", hint
    else:
        recorded = read_adapter_config(Path(adapter_dir)).get("base_model_name_or_path")
        if not recorded:
            raise ValueError(f"{adapter_dir}: the adapter does not record its base model; pass --base-model DIR")
        source, path = f"{adapter_dir}/adapter_config.json (base_model_name_or_path)", recorded
    if not Path(path).is_dir():
        raise FileNotFoundError(f"base model {path!r} (from {source}) is not a local directory; pass --base-model DIR")
    return str(path)


def load_adapter_model(adapter_dir: str | os.PathLike[str], base_model: str, model_class: str | None = None) -> Any:
    """The base model with the saved adapter loaded, float32, eval mode: rebuilt as ``lorma merge`` rebuilds it.

    :func:`lorma.runs.adapters.load_adapter_model` checks the adapter's files and the base model's recorded
    shapes, rebuilds the base model as the class the adapter was trained on (the task recorded by ``lorma train``,
    else peft's record, else ``model_class``), and refuses an adapter whose saved tensors did not all land
    unchanged: a tensor that matched nothing would leave that adapter at its initial value and every measurement
    silently wrong.
    """
    from lorma.runs.adapters import load_adapter_model as load_as_merge_does

    model = load_as_merge_does(Path(adapter_dir), base_model, model_class).model
    return model.float().eval()
