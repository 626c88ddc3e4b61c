"""Whole tensors from sharded parameters: FSDP2 (``DTensor``) and DeepSpeed ZeRO-3 (partitioned ``ds_id`` params).

Under ZeRO-3 a parameter holds only this rank's partition (its ``.data`` is empty) except around the forward of
the module that owns it, where DeepSpeed's hooks gather it. LoRMA reads the frozen ``base_layer.weight`` outside
the base layer's own forward in a few places (the pi / none weight fold, the fused post-side correction, merging),
so those reads go through :func:`full_weight` and the writes of merging through :func:`modifiable`, which use
DeepSpeed's own ``GatheredParameters``. FSDP2 (``fully_shard``) unshards every parameter of a wrapped block for
that block's whole forward, so with the decoder layers wrapped (``configs/distributed/fsdp.yaml``) the reads in
a forward see plain tensors; outside a forward (saving, a digest) a parameter is a ``DTensor`` and
:func:`full_tensor` gathers it. Every gather is a collective: all ranks call these functions in the same order.

Nothing here imports DeepSpeed unless a parameter is a DeepSpeed one, so the module is free to import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["full_tensor", "full_weight", "is_sharded", "model_is_sharded", "modifiable", "trainable_state_dict"]


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
    """A frozen weight to compute with outside its module's forward.

    A ZeRO-3 partitioned weight is gathered and copied (the copy stays valid for backward, after DeepSpeed has
    freed the gathered buffer); a plain weight, or one FSDP2 has unsharded for the block's forward, is returned
    as it is (no copy). A ``DTensor`` outside a forward is gathered.
    """
    return full_tensor(weight) if is_sharded(weight) else weight


@contextlib.contextmanager
def modifiable(weight: torch.Tensor) -> Iterator[None]:
    """Around an in-place change of ``weight`` (merging): under ZeRO-3 the whole weight is gathered, changed on
    rank 0 and re-partitioned from rank 0's value on exit; otherwise nothing happens."""
    if _is_zero3(weight):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            yield
        return
    if _is_dtensor(weight):
        raise RuntimeError("merging into an FSDP2-sharded weight is not supported: save the adapter and merge it "
                           "in one process (lorma merge), or merge before sharding")
    yield


def trainable_state_dict(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """``{name: whole tensor on the CPU}`` of the (trainable) parameters, in ``named_parameters`` order, gathered
    where sharded. Collective under sharding: call it on every rank."""
    return {name: full_tensor(param).cpu() for name, param in model.named_parameters()
            if param.requires_grad or not trainable_only}
