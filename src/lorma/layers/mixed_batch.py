"""Mixed-adapter batches: a different LoRMA adapter per row of one batch (peft's ``adapter_names=[...]``).

``model(**batch, adapter_names=["a", "__base__", "b", ...])`` and ``model.generate(..., adapter_names=[...])`` run
row ``i`` through adapter ``adapter_names[i]`` (``"__base__"``: no adapter), which is what running that row alone
with only that adapter active gives: a server answers requests for several adapters in one batch. It is peft's
convention for LoRA (``peft.tuners.lora.layer.LoraLayer._mixed_batch_forward``); the keyword reaches each adapted
layer through forward pre-hooks that :meth:`lorma.model.LormaModel._enable_peft_forward_hooks` registers for the
duration of one forward or generate call.

In a layer the base runs once on the whole batch. Each adapter's rows get its transform: on the post side the
rows of the input are transformed before the base layer runs, on the pre side the rows of its output after. So the
cost is one base matmul plus each adapter's own work on its rows; nothing is merged.

Inference only, as in peft: refused in training mode, with merged adapters (whose weight already holds one
adapter), for adapter names that no layer has, for a list whose length is not the batch's, and for variants whose
output depends on more than one adapter's rows (:attr:`lorma.variants.LormaVariant.mixed_batch`: DoRMA, whose
norm is of the weight it transforms, as peft refuses DoRA).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..variants.base import AdaptedLayer

#: the name peft uses for "no adapter" in ``adapter_names``
BASE_ROW = "__base__"


def row_groups(adapter_names: Sequence[str]) -> dict[str, list[int]]:
    """Adapter name -> the rows that use it, in order of first appearance (a stable order for the computation)."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return groups


def check_adapter_names(adapter_names: Any, where: str) -> list[str]:
    """``adapter_names`` as a list of strings, or a ``TypeError`` naming what was given instead."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            f"{where}: adapter_names must be a list with one adapter name (or {BASE_ROW!r}) per row of the batch, "
            f"got {type(adapter_names).__name__}"
        )
    bad = [name for name in adapter_names if not isinstance(name, str)]
    if bad:
        raise TypeError(f"{where}: adapter_names must hold strings, got {bad[0]!r}")
    return list(adapter_names)


def check_batch_length(adapter_names: Sequence[str], batch: int, where: str) -> None:
    if len(adapter_names) != batch:
        raise ValueError(
            f"{where}: adapter_names has {len(adapter_names)} names but the batch has {batch} rows "
            "(one name per row; '__base__' for a row without adapter)"
        )


def mixed_batch_forward(
    layer: AdaptedLayer, x: torch.Tensor, adapter_names: Sequence[str], *args: Any, **kwargs: Any
) -> torch.Tensor:
    """One adapted layer's output when row ``i`` of ``x`` uses adapter ``adapter_names[i]``.

    Rows of an adapter this layer does not have, and ``"__base__"`` rows, get the base layer's output. For each
    adapter the variant's own activation-side hooks are used (:meth:`LormaVariant.before_base` on its rows of the
    input, :meth:`LormaVariant.after_base` on its rows of the output), which is what the layer's forward computes
    with that adapter alone active; the folded forms it may choose instead compute the same map.
    """
    where = f"module {layer.module_name!r}"
    check_batch_length(adapter_names, len(x), where)
    if layer.merged:
        raise ValueError(
            f"{where}: adapter_names cannot be used while adapters {layer.merged_adapters} are merged into the "
            "weight; call unmerge_adapter() first"
        )
    groups = {
        name: rows for name, rows in row_groups(adapter_names).items() if name != BASE_ROW and name in layer.lorma_A
    }
    for name in groups:
        variant = layer.lorma_variant[name]
        if not variant.mixed_batch:
            raise ValueError(
                f"{where}: adapter {name!r} is a {variant.name!r} adapter, which cannot serve mixed batches "
                "(its output depends on the whole weight it transforms); activate it alone instead"
            )
    base = layer.get_base_layer()
    if not groups:
        return base(x, *args, **kwargs)
    index = {name: torch.tensor(rows, device=x.device) for name, rows in groups.items()}

    x_in = x
    for name, rows in index.items():
        part = x.index_select(0, rows)
        transformed = layer.lorma_variant[name].before_base(layer, name, part)
        if transformed is not part:
            x_in = x_in.index_copy(0, rows, transformed.to(x_in.dtype))
    result = base(x_in, *args, **kwargs)
    for name, rows in index.items():
        variant = layer.lorma_variant[name]
        part = variant.after_base(layer, name, x_in.index_select(0, rows), result.index_select(0, rows))
        result = result.index_copy(0, rows, part.to(result.dtype))
    return result


def adapter_names_pre_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], adapter_names: list[str]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A forward pre-hook (``with_kwargs=True``) that passes ``adapter_names`` to the module's forward."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The encoder of an encoder-decoder transformers model, ``None`` for other models.

    transformers 5 gives every model a ``get_encoder`` that returns the model itself when it has no encoder.
    """
    get_encoder = getattr(model, "get_encoder", None)
    if get_encoder is None:
        return None
    encoder = get_encoder()
    return None if encoder is model else encoder


def batch_size_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward or generate call, read from its ``input_ids`` / ``inputs_embeds`` (or first
    positional tensor), ``None`` if there is none to read."""
    for key in ("input_ids", "inputs_embeds", "input_features", "pixel_values"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        return int(args[0].shape[0])
    return None


def install_adapter_names(
    model: nn.Module,
    layer_type: type,
    peft_config: dict[str, Any],
    adapter_names: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> list[torch.utils.hooks.RemovableHandle]:
    """Check a mixed batch's ``adapter_names`` against the model and the call, then hand it to every layer.

    ``model`` is the tuner's model, ``layer_type`` its adapted layers' class, ``args`` / ``kwargs`` those of the
    forward or generate call (for the batch size and ``num_beams``). Every check runs before anything is
    registered, so bad input leaves the model as it was. Returns the hook handles, to remove after the call.
    """
    where = "LoRMA mixed batch"
    names = check_adapter_names(adapter_names, where)
    if model.training:
        raise ValueError(f"{where}: adapter_names is for inference; call model.eval() first")
    batch = batch_size_of(args, kwargs)
    if batch is not None:
        check_batch_length(names, batch, where)
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    known = set().union(*(m.lorma_A.keys() for m in layers)) if layers else set()
    unknown = sorted({n for n in names if n != BASE_ROW} - known)
    if unknown:
        raise ValueError(
            f"{where}: no adapted layer has adapter(s) {unknown}; known adapters: {sorted(known)} "
            f"(and {BASE_ROW!r} for none)"
        )
    merged = sorted({a for m in layers for a in m.merged_adapters})
    if merged:
        raise ValueError(
            f"{where}: adapters {merged} are merged into the weights; call unmerge_adapter() before passing "
            "adapter_names"
        )
    for name in sorted(set(names) - {BASE_ROW}):
        variant = getattr(peft_config.get(name), "variant", None)
        refused = [m for m in layers if name in m.lorma_variant and not m.lorma_variant[name].mixed_batch]
        if refused:
            raise ValueError(
                f"{where}: adapter {name!r} is a {variant!r} adapter, which cannot serve mixed batches (its output "
                "depends on the whole weight it transforms); activate it alone instead"
            )
        # layers that see something else than the batch's rows (MoE experts see routed tokens: lorma.layers.experts)
        refused = [m for m in layers if name in m.lorma_A and not getattr(m, "mixed_batch", True)]
        if refused:
            raise ValueError(
                f"{where}: adapter {name!r} adapts {refused[0].module_name!r}, which does not see the batch's rows "
                "(expert parameters see routed tokens); activate it alone instead"
            )

    beams = kwargs.get("num_beams")
    if beams is None and kwargs.get("generation_config") is not None:
        beams = getattr(kwargs["generation_config"], "num_beams", None)
    per_row = names
    if isinstance(beams, int) and beams > 1:  # generate repeats each row num_beams times (consecutively)
        per_row = [name for name in names for _ in range(beams)]

    def hook_all(modules: Any, rows: list[str]) -> list[torch.utils.hooks.RemovableHandle]:
        return [
            module.register_forward_pre_hook(partial(adapter_names_pre_hook, adapter_names=rows), with_kwargs=True)
            for module in modules
            # modules_to_save wrappers take adapter_names too (peft mixes their rows itself)
            if isinstance(module, (layer_type, AuxiliaryTrainingWrapper))
        ]

    handles = hook_all(model.modules(), per_row)
    encoder = encoder_of(model)
    if per_row is not names and encoder is not None:
        # an encoder-decoder's encoder sees the rows once; its hooks, registered later, run later and win
        handles += hook_all(encoder.modules(), names)
    return handles
