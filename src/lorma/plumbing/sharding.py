"""Whole tensors from sharded parameters: FSDP2 (``DTensor``) and DeepSpeed ZeRO-3 (partitioned ``ds_id`` params).

ZeRO-3 keeps only this rank's partition of a parameter (its ``.data`` is empty) except around the forward (and
backward) of the module that owns it, where DeepSpeed's hooks gather it. A LoRMA layer holds ``A`` and ``B`` in
``ParameterDict`` children whose forward never runs, and reads the frozen ``base_layer.weight`` outside the base
layer's own forward (the pi / none weight fold, the fused post-side correction). DeepSpeed covers both: its
parameter dictionaries notice a parameter read during another module's forward and gather it as an *external*
parameter of that module (``register_external_parameter``), for the forward and again for the backward. Nothing
is marked. (Marking the LoRMA layers as ZeRO-3 *leaf* modules, ``set_z3_leaf_modules``, was tried and made
training fail on size-0 tensors, for peft's LoRA layers as much as for LoRMA's: DeepSpeed 0.19.8, CPU.) Reads
outside any forward (saving, a digest) go through :func:`full_weight` / :func:`full_tensor`, and merging into a
sharded weight is refused (:func:`refuse_sharded_write`: merge the saved adapter in one process).

FSDP2 (``fully_shard``) unshards every parameter of a wrapped block for that block's forward, so with the decoder
layers wrapped (``configs/distributed/fsdp.yaml``) the forward reads plain tensors; a base layer wrapped on its
own, or a parameter outside a forward (saving, a digest), is a ``DTensor`` that :func:`full_weight` /
:func:`full_tensor` gather. Every gather is a collective: all ranks call
these functions in the same order.

Nothing here imports DeepSpeed unless a parameter is a DeepSpeed one, so the module is free to import.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["full_tensor", "full_weight", "is_sharded", "model_is_sharded", "refuse_sharded_write",
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
    (read inside a forward or backward: DeepSpeed fetches it as an external parameter) is returned as it is, so
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
