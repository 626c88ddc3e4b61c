"""Whole tensors from sharded parameters: FSDP2 (``DTensor``) and DeepSpeed ZeRO-3 (partitioned ``ds_id`` params).

ZeRO-3 keeps only this rank's partition of a parameter (its ``.data`` is empty) except around the forward (and
backward) of the module that owns it, where DeepSpeed's hooks gather it. A LoRMA layer holds ``A`` and ``B`` in
``ParameterDict`` children whose forward never runs, and reads the frozen ``base_layer.weight`` outside the base
layer's own forward (the pi / none weight fold, the fused post-side correction, merging). So the LoRMA layers are
marked as ZeRO-3 leaf modules (:func:`prepare_zero3`: the whole layer is gathered around its own forward), the
reads go through :func:`full_weight`, and merging into a sharded weight is refused (:func:`refuse_sharded_write`:
merge the saved adapter in one process). FSDP2 (``fully_shard``) unshards every parameter of a wrapped block for
that block's forward, so with the decoder layers wrapped (``configs/distributed/fsdp.yaml``) the forward reads
plain tensors; a base layer wrapped on its own, or a parameter outside a forward (saving, a digest), is a
``DTensor`` that :func:`full_weight` / :func:`full_tensor` gather. Every gather is a collective: all ranks call
these functions in the same order.

Nothing here imports DeepSpeed unless a parameter is a DeepSpeed one, so the module is free to import.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["full_tensor", "full_weight", "is_sharded", "model_is_sharded", "prepare_zero3", "refuse_sharded_write",
           "trainable_state_dict"]


def _is_zero3(param: Any) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _is_dtensor(param: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(param, DTensor)


def is_sharded(param: Any) -> bool:
    """Whether ``param`` is an FSDP2 ``DTensor`` or a ZeRO-3 partitioned parameter."""
    return _is_dtensor(param) or _is_zero3(param)


def model_is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is sharded (then saving and digests must gather)."""
    return any(is_sharded(p) for p in model.parameters())


def prepare_zero3(model: torch.nn.Module) -> int:
    """Mark every LoRMA layer as a ZeRO-3 *leaf* module (DeepSpeed's ``set_z3_leaf_modules``); returns how many.

    ZeRO-3 gathers a module's own parameters around its forward. A LoRMA layer keeps ``A`` and ``B`` in
    ``ParameterDict`` children whose forward never runs, and reads the base weight outside the base layer's
    forward (the pi / none weight fold, the fused post-side correction); as a leaf, the whole layer (base weight,
    bias, ``A``, ``B``) is gathered around the LoRMA layer's forward and again for its backward. Call it before
    ``deepspeed.initialize`` (HF Trainer calls that in ``train``); harmless without DeepSpeed ZeRO-3.
    """
    from deepspeed.utils import set_z3_leaf_modules

    # a LoRMA layer by its peft adapter names, not by class: lorma.layer imports this module (it sits below it)
    classes = sorted({type(m) for m in model.modules() if "lorma_A" in getattr(type(m), "adapter_layer_names", ())},
                     key=lambda c: c.__name__)
    return len(set_z3_leaf_modules(model, classes, raise_if_not_found=False)) if classes else 0


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole value of ``param``, detached (a copy when it had to be gathered; collective then)."""
    if _is_dtensor(param):
        return param.detach().full_tensor()
    if _is_zero3(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    return param.detach()


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """A frozen weight to compute with, whole.

    A plain weight, one FSDP2 has unsharded for the block's forward, or a ZeRO-3 weight DeepSpeed has gathered
    (a LoRMA layer marked by :func:`prepare_zero3`, inside its forward or backward) is returned as it is, so that
    autograd keeps the parameter itself. An FSDP2 ``DTensor`` (a base layer wrapped on its own) is gathered with
    ``full_tensor``, a differentiable collective; a partitioned ZeRO-3 weight outside a forward is gathered and
    copied.
    """
    if _is_dtensor(weight):
        return weight.full_tensor()
    if _is_zero3(weight) and weight.data.numel() == 0:
        return full_tensor(weight)
    return weight


def refuse_sharded_write(weight: torch.Tensor, module_name: str) -> None:
    """A one-line error before merging into (or unmerging from) a sharded weight: a merge there would change one
    rank's shard, or a gathered copy DeepSpeed throws away. Merge the saved adapter in one process instead."""
    if is_sharded(weight):
        raise RuntimeError(f"module {module_name!r}: its weight is sharded (FSDP2 / ZeRO-3); merging needs the whole "
                           "weight in one process: save the adapter and run `lorma merge` (or merge before sharding)")


def trainable_state_dict(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """``{name: whole tensor on the CPU}`` of the (trainable) parameters, in ``named_parameters`` order, gathered
    where sharded. Collective under sharding: call it on every rank."""
    return {name: full_tensor(param).cpu() for name, param in model.named_parameters()
            if param.requires_grad or not trainable_only}
