"""Tied weights: one parameter held by several modules (transformers' ``tie_word_embeddings``, or any model that
assigns one module's weight to another).

Merging writes a layer's weight in place, so it changes every module that holds the same parameter. LoRMA handles
that by the parameter's identity, not by module names (peft's ``ensure_weight_tying`` for LoRA matches the names
``embed_tokens`` / ``lm_head``; GPT-2's ``wte`` is missed there):

- ``LormaConfig(ensure_weight_tying=True)``: every ``nn.Linear`` that shares an adapted embedding's weight is wrapped
  in :class:`lorma.layers.embedding.TiedLinear`, which applies the embedding's transform transposed; merged and
  unmerged models compute the same, and the weights stay tied (:func:`tie_output_layers`).
- otherwise merging an adapted layer whose weight another module also holds is refused (:func:`refuse_shared_merges`):
  the other module would change too, and the unmerged model does not adapt it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

from peft.tuners.tuners_utils import BaseTunerLayer, _get_submodules
from torch import nn

from .base import LormaLayer
from .embedding import Embedding, TiedLinear


def _weight_of(module: nn.Module) -> nn.Parameter | None:
    """The parameter a module holds directly as ``weight`` (not a wrapper's forwarded property)."""
    return module._parameters.get("weight") if isinstance(module, nn.Module) else None


def _holders(model: nn.Module, weight: nn.Parameter) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` holding ``weight`` directly (base layers included)."""
    for name, module in model.named_modules(remove_duplicate=False):
        if _weight_of(module) is weight:
            yield name, module


def _wrapper_name(name: str) -> str:
    """The name peft's targeting sees: a base layer's name without its ``.base_layer`` suffixes."""
    while name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


def tied_embedding_names(model: nn.Module, target: nn.Module) -> list[str]:
    """Names (as targeted) of the ``nn.Embedding`` modules whose weight is ``target``'s, other than ``target``."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    weight = _weight_of(base)
    if weight is None:
        return []
    return [
        _wrapper_name(name)
        for name, module in _holders(model, weight)
        if module is not base and isinstance(module, nn.Embedding)
    ]


def tie_output_layers(model: nn.Module, adapter_name: str, replace: Callable[..., None]) -> list[str]:
    """Wrap every ``nn.Linear`` sharing the weight of an :class:`Embedding` adapted by ``adapter_name`` in a
    :class:`TiedLinear` (or tie an existing one to this adapter); the names tied. ``replace`` is the tuner's
    ``_replace_module(parent, child_name, new_module, child)``."""
    tied: list[str] = []
    embeddings = [
        (name, m) for name, m in model.named_modules() if isinstance(m, Embedding) and adapter_name in m.lorma_A
    ]
    for _, embedding in embeddings:
        base = embedding.get_base_layer()
        for name, holder in list(_holders(model, base.weight)):
            if holder is base:
                continue
            parent, child, child_name = _get_submodules(model, name)
            if isinstance(parent, TiedLinear):
                parent.tie(adapter_name, embedding)
                tied.append(_wrapper_name(name))
            elif isinstance(parent, BaseTunerLayer):
                raise ValueError(
                    f"module {_wrapper_name(name)!r} shares its weight with the embedding {embedding.module_name!r} "
                    f"and already has adapters of its own: adapter {adapter_name!r} (ensure_weight_tying=True) "
                    "cannot tie it; adapt tied layers either through the tie or on their own, not both"
                )
            else:
                replace(parent, child_name, TiedLinear(child, embedding, adapter_name, module_name=name), child)
                tied.append(name)
    return tied


def shared_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, list[str]]:
    """Adapted layers (with adapter ``adapter_name``, or any) whose weight is held by other modules that merging it
    would change unasked (not the :class:`TiedLinear` layers that follow it): name -> those modules' names.

    One pass over the model's modules, whatever the number of adapted layers."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    followers: set[tuple[int, int]] = set()  # (id of the followed layer, id of the follower's base layer)
    for name, module in model.named_modules(remove_duplicate=False):
        weight = _weight_of(module)
        if weight is not None:
            holders.setdefault(id(weight), []).append((name, module))
        if isinstance(module, TiedLinear):
            followers.add((id(module.source), id(module.get_base_layer())))
    found: dict[str, list[str]] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LormaLayer) or not layer.lorma_A:
            continue
        if adapter_name is not None and adapter_name not in layer.lorma_A:
            continue
        base = layer.get_base_layer()
        weight = _weight_of(base)
        if weight is None:
            continue
        others = [
            _wrapper_name(holder_name)
            for holder_name, holder in holders[id(weight)]
            if holder is not base and (id(layer), id(holder)) not in followers
        ]
        if others:
            found[name] = others
    return found


def warn_shared(model: nn.Module, adapter_name: str) -> None:
    """Warn, when an adapter is made, that merging it will be refused (:func:`refuse_shared_merges`)."""
    for name, others in shared_layers(model, adapter_name).items():
        warnings.warn(
            f"LoRMA: adapted module {name!r} shares its weight with {others} (tied weights): the adapter works "
            "unmerged, but merging it would change those modules too and will be refused; set "
            "LormaConfig(ensure_weight_tying=True) to adapt a tied embedding's output layer through the tie",
            stacklevel=3,
        )


def refuse_shared_merges(model: nn.Module) -> None:
    """Raise, before anything is merged, if an adapted layer's weight is held by a module that does not follow it."""
    shared = shared_layers(model)
    if not shared:
        return
    name, others = next(iter(shared.items()))
    raise ValueError(
        f"cannot merge: module {name!r} shares its weight with {others} (tied weights), so merging would change "
        f"{others[0]!r} too, which the unmerged model does not adapt. Make the adapter with "
        "LormaConfig(ensure_weight_tying=True) (the output layer of tied embeddings then follows the embedding's "
        "transform, docs/conv-and-embeddings.md), or untie the weights (e.g. load the model with "
        "tie_word_embeddings=False) before adapting it"
    )
