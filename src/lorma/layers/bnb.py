"""QLoRMA: LoRMA on a bitsandbytes 4-bit (``Linear4bit``, nf4 / fp4) or 8-bit (``Linear8bitLt``) base layer.

As QLoRA in peft: the frozen weight stays quantized and the forward never dequantizes it. The activation-side
forms do all the work: on the ``pre`` side the quantized layer computes ``W0 x + b`` and the transform acts
on its output (bias kept out); on the ``post`` side the transform acts on ``x`` before the quantized layer.
The adapters stay fp32. The dense "fold into the weight" strategy of the float layer is never used here
(it would need ``W0`` in floating point every step).

The quantized layer differs from the float one only in how its weight is read and written
(:class:`QuantizedWeight` against :class:`lorma.layers.base.FloatWeight`). Merging dequantizes ``W0``, merges in fp32
and re-quantizes (the weight stays 4/8-bit: merge_and_unload gives a quantized model, with the rounding of one
more quantization). Unmerging restores the original quantized weight object bit for bit (it is kept at merge
time). To get a float model instead, call ``merge_and_unload(dequantize=True)`` on the peft model
(:meth:`lorma.model.LormaModel.merge_and_unload`): each quantized base is replaced by an ``nn.Linear`` holding the
dequantized weight before merging, so the merged weight is ``I(BA) deq(W0)`` without a second rounding.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
from peft.utils.integrations import dequantize_bnb_weight
from torch import nn

from .base import FloatWeight, LormaLayer


def is_bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def quantized_kind(module: nn.Module) -> str | None:
    """``"4bit"``, ``"8bit"`` or ``None`` for a (possibly wrapped) layer, without importing bitsandbytes needlessly."""
    if not is_bnb_available():
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def unpack_cpu_inference_layout(base: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking of a 4-bit weight, in place, if it happened.

    On CPUs with AVX512-BF16, the first eval-mode, no-grad forward of a ``Linear4bit`` repacks its weight for a
    faster kernel; from then on its output is cut from autograd (no gradient reaches the layer's input, so no
    adapter before it would train) and the bytes are no longer what ``dequantize_4bit`` reads. bitsandbytes'
    own inverse (``_convert_weight_packed_for_cpu_inverse``) was measured here to give a weight 60% off on
    SmolLM2's q_proj, so it is not used: the packed kernel itself is exact, so the layer is applied to the
    identity to read ``W0`` back, and ``W0`` is quantized again in the normal layout. The result equals the
    original up to the bf16 rounding of the block scales that the repacking itself applied (0.3% measured).
    """
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    d_in = base.in_features
    with torch.no_grad():
        eye = torch.eye(d_in, dtype=state.dtype, device=base.weight.device)
        columns = type(base).forward(base, eye)  # row j = W0 e_j + b (bypassing hooks: this runs inside one)
        if base.bias is not None:
            columns = columns - base.bias.to(columns.dtype)
        weight = columns.T.float().contiguous()
    base.weight = quantize_like(base, weight)


def _autograd_path_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: keep a ``Linear4bit`` in the layout that has autograd (and that merging can read)."""
    module.support_avx512bf16_for_cpu = False
    unpack_cpu_inference_layout(module)


def keep_autograd_path(model: nn.Module) -> int:
    """Hook every bitsandbytes ``Linear4bit`` of ``model`` (adapted or not) so that training reaches all adapters.

    A frozen 4-bit layer that was repacked for CPU inference passes no gradient to its input, which would
    silently stop training of every adapter before it (see :func:`unpack_cpu_inference_layout`). With the hook,
    every forward uses bitsandbytes' autograd-capable layout (restoring it first if the weight was repacked
    before the adapter was added); the price is bitsandbytes' CPU inference kernel, not used in such a model.
    Returns the number of layers hooked (idempotent).
    """
    if not is_bnb_available():
        return 0
    import bitsandbytes as bnb

    hooked = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not getattr(module, "_lorma_hooked", False):
            module.register_forward_pre_hook(_autograd_path_hook)
            module._lorma_hooked = True
            hooked += 1
    return hooked


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """``W0`` of a bitsandbytes layer in fp32, ``nn.Linear`` layout ``(d_out, d_in)``."""
    weight = base.weight
    if quantized_kind(base) == "4bit":
        unpack_cpu_inference_layout(base)
        weight = base.weight
        return dequantize_bnb_weight(weight, state=weight.quant_state).float()
    state = base.state
    if state.SCB is None:
        state.SCB = weight.SCB
    return dequantize_bnb_weight(weight, state=state).float()


def quantize_like(base: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A new quantized parameter holding ``weight`` (fp32, Linear layout), with ``base``'s quantization settings."""
    import bitsandbytes as bnb

    old = base.weight
    device = old.device
    if quantized_kind(base) == "4bit":
        new = bnb.nn.Params4bit(
            weight.to("cpu"),
            requires_grad=False,
            quant_type=old.quant_type,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
            module=base,
        )
        return new.to(device)  # moving a not-yet-quantized Params4bit to a device quantizes it
    return bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights).to(device)


class QuantizedWeight:
    """The weight of a bitsandbytes 4/8-bit base as the adapter math reads and writes it (see ``FloatWeight``).

    Read: dequantized to fp32 (merging, ``get_delta_weight``, export). Write: quantized again with the base's
    settings. Never read in the forward. A merge always keeps the quantized weight it replaces, so that
    unmerging puts it back bit for bit (re-quantization rounds: no algebra can give ``W0`` back).
    """

    readable_in_forward = False

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def read(self, base: nn.Module) -> torch.Tensor:
        return dequantized_weight(base)

    def work_copy(self, base: nn.Module) -> torch.Tensor:
        return dequantized_weight(base)

    def write(self, base: nn.Module, weight_linear: torch.Tensor) -> None:
        base.weight = quantize_like(base, weight_linear.detach().float())
        if self.kind == "8bit":  # the layer caches the int8 matrix and its scales in its state
            base.state.CB = None
            base.state.SCB = None

    def exact_after_merge(self, base: nn.Module) -> bool:
        return False

    def snapshot(self, base: nn.Module) -> dict[str, Any]:
        snap: dict[str, Any] = {"weight": base.weight}
        if self.kind == "8bit":
            snap["CB"], snap["SCB"] = base.state.CB, base.state.SCB
        return snap

    def restore(self, base: nn.Module, snapshot: dict[str, Any]) -> None:
        base.weight = snapshot["weight"]
        if self.kind == "8bit":
            base.state.CB, base.state.SCB = snapshot["CB"], snapshot["SCB"]

    def before_merge(self, module_name: str) -> None:
        warnings.warn(
            f"module {module_name!r}: merging into a {self.kind} weight re-quantizes it (one more rounding); "
            "merge_and_unload(dequantize=True) gives a float model instead",
            stacklevel=3,
        )


class QuantLinear(nn.Module, LormaLayer):
    """LoRMA around a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``: the float layer with a :class:`QuantizedWeight`.

    The forward is the float layer's activation-side forward (the variant never folds, as the weight is not
    readable in forward); merge and unmerge go through the quantized weight object.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, module_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        LormaLayer.__init__(self, base_layer, module_name=module_name, fan_in_fan_out=False)
        kind = quantized_kind(self.get_base_layer())
        if kind is None:
            raise ValueError(f"module {module_name!r}: QuantLinear needs a bitsandbytes Linear4bit/Linear8bitLt")
        self.base_weight = QuantizedWeight(kind)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    @property
    def quant_kind(self) -> str | None:
        """``"4bit"``, ``"8bit"``, or ``None`` once :meth:`dequantize_base` has replaced the base."""
        return getattr(self.base_weight, "kind", None)

    def update_layer(self, adapter_name: str, r: int, alpha: float, inflation: str, side: str, **kwargs: Any) -> None:
        if side == "post" and kwargs.get("fused") is not None:
            raise ValueError(
                f"module {self.module_name!r}: a post-side adapter on fused parts of a quantized layer would "
                "need W0 dequantized in every forward; use side='pre' or adapt the whole layer"
            )
        super().update_layer(adapter_name, r=r, alpha=alpha, inflation=inflation, side=side, **kwargs)

    def dequantize_base(self) -> None:
        """Replace the quantized base layer by an fp32 ``nn.Linear`` holding ``deq(W0)`` (and the bias)."""
        if self.merged:
            raise ValueError(f"module {self.module_name!r}: unmerge before dequantizing the base layer")
        base = self.get_base_layer()
        weight = dequantized_weight(base)
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias.float())
        linear.requires_grad_(False)
        self.base_layer = linear
        self.base_weight = FloatWeight(fan_in_fan_out=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return LormaLayer.forward(self, x, *args, **kwargs)

    def __repr__(self) -> str:
        return "lorma.layers.bnb." + nn.Module.__repr__(self)


def module_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers as stored (packed 4-bit weights count as stored)."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    total = sum(seen.values())
    # 4-bit quantization state (absmax, code) lives outside the parameters
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for name in ("absmax", "code"):
                t = getattr(state, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
            nested = getattr(state, "state2", None)
            if nested is not None:
                total += sum(t.numel() * t.element_size() for t in (nested.absmax, nested.code))
    return total
