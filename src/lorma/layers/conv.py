"""LoRMA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: the transform acts on channels.

A convolution's weight ``W0`` is ``(out, in, *kernel)``; write ``K`` for the number of kernel positions. At every
output position the convolution is a linear map of the input patch (``in x K`` values) to the ``out`` channels, so
LoRMA's two sides are the two channel axes (docs/conv-and-embeddings.md gives the formulas and why):

- ``pre``: ``I(BA)`` (``out x out``) on the output channels, ``W = I(BA) W0`` with ``W0`` seen as ``(out, in * K)``
  (its "``nn.Linear`` layout" here). On activations: the base convolution runs once, then
  ``y = I(BA) (y0 - b) + b`` at every output position; the bias is never multiplied.
- ``post``: ``I(BA)`` (``in x in``) on the input channels, ``W[:, :, k] = W0[:, :, k] I(BA)`` at every kernel
  position ``k``. Every inflation's ``I(BA)`` is a linear map of the channel vector, and padding (zeros, reflect,
  replicate, circular) only copies or zeroes values channel by channel, so ``conv(x, W) = conv(I(BA) x, W0)`` with
  ``I(BA)`` applied at every input position (a 1x1 map) before the unchanged base convolution: exact for any
  stride, dilation, padding and padding mode.

Everything else is the Linear layer's: :class:`ConvVariant` translates between the convolution's geometry and the
``(d, r)`` algebra of :class:`lorma.variants.LormaVariant` (channel axis moved last for the activation forms;
the weight laid out with the transformed axis as columns for merging), and the inflation objects
(:mod:`lorma.inflations`) do the math, including the exact Woodbury unmerge of ``plus``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..functional import Pair
from ..plumbing.sharding import full_weight
from ..variants import LormaVariant
from .base import FloatWeight, LormaLayer

#: the base layers this module adapts
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def kernel_positions(base: nn.Module) -> int:
    """``K``: the number of kernel positions of a convolution (``prod(kernel_size)``)."""
    return math.prod(base.kernel_size)


def input_channels_as_columns(weight: torch.Tensor, positions: int) -> torch.Tensor:
    """``(out, in * K)`` -> ``(out * K, in)``: one row per (output channel, kernel position), the input channels as
    columns, so that the post side's ``W0[:, :, k] I(BA)`` for every ``k`` is one right product ``rows @ I(BA)``."""
    out = weight.shape[0]
    return weight.reshape(out, -1, positions).transpose(1, 2).reshape(out * positions, -1)


def input_channels_back(rows: torch.Tensor, positions: int) -> torch.Tensor:
    """The inverse of :func:`input_channels_as_columns`: ``(out * K, in)`` -> ``(out, in * K)``."""
    inp = rows.shape[1]
    return rows.reshape(-1, positions, inp).transpose(1, 2).reshape(-1, inp * positions)


def _channel_axis(t: torch.Tensor, base: nn.Module) -> int:
    """The channel axis of a convolution's input or output: 1 for a batch, 0 for an unbatched input."""
    return t.dim() - len(base.kernel_size) - 1


def _keep_layout(new: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``new`` contiguous if ``reference`` was (moving the channel axis back leaves a strided view, which a user's
    ``.view()`` downstream would refuse); a channels-last ``reference`` keeps its layout."""
    return new.contiguous() if reference.is_contiguous() else new


class ConvWeight(FloatWeight):
    """A convolution's weight as the adapter math reads and writes it: ``(out, in * K)``, the output channels as
    rows (the pre side's layout; :class:`ConvVariant` rearranges it for the post side)."""

    def __init__(self) -> None:
        super().__init__(fan_in_fan_out=False)

    def read(self, base: nn.Module) -> torch.Tensor:
        return full_weight(base.weight).flatten(1)

    def write(self, base: nn.Module, weight_linear: torch.Tensor) -> None:
        base.weight.data = weight_linear.reshape(base.weight.shape).to(base.weight.dtype).contiguous()


class ConvVariant(LormaVariant):
    """Plain LoRMA on a convolution: the channel geometry around :class:`LormaVariant`'s math.

    Activation forms run with the channel axis moved last (where the Linear math expects features); merging and
    unmerging see the weight with the transformed axis as columns of a matrix: ``(out, in * K)`` on the pre side,
    ``(out * K, in)`` on the post side.
    """

    # ------------------------------------------------------------------ forward
    def before_base(self, layer: Any, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """Post side: ``I(BA)`` on the input channels at every position (before any padding, which commutes)."""
        if layer.side[adapter] != "post":
            return x
        axis = _channel_axis(x, layer.get_base_layer())
        moved = super().before_base(layer, adapter, x.movedim(axis, -1))
        return _keep_layout(moved.movedim(-1, axis), x)

    def after_base(self, layer: Any, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Pre side: ``I(BA) (y0 - b) + b`` on the output channels at every output position."""
        if layer.side[adapter] != "pre":
            return result
        axis = _channel_axis(result, layer.get_base_layer())
        moved = super().after_base(layer, adapter, x, result.movedim(axis, -1))
        return _keep_layout(moved.movedim(-1, axis), result)

    def low_rank_post_forward(self, layer: Any, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """Not for convolutions: the post-side update ``W0[:, :, k] s B A`` has rank up to ``r K``, not ``r``."""
        return None

    def folded_forward(self, layer: Any, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """One convolution with ``W + delta_weight(W)``, folded this step, when the inflation's flop count prefers it
        (a dense ``pi`` / ``none`` transform on many positions); ``None`` to run the activation forms.

        The count is the Linear layer's with a convolution's sizes: ``n`` positions the transform would act on
        (the input's on the post side; the output's, estimated as the input's over the strides, on the pre side)
        and the weight's other axis (``in * K`` on the pre side, ``out * K`` on the post side).
        """
        if self._dropout_active(layer, adapter):
            return None
        A = layer.lorma_A[adapter]
        base = layer.get_base_layer()
        positions = kernel_positions(base)
        n_in = x.numel() // max(layer.in_features, 1)
        if layer.side[adapter] == "pre":
            d, d_other, n = layer.out_features, layer.in_features * positions, max(1, n_in // math.prod(base.stride))
        else:
            d, d_other, n = layer.in_features, layer.out_features * positions, n_in
        needs_grad = torch.is_grad_enabled() and A.requires_grad
        if self.inflation.strategy(n, d, d_other, needs_grad) != "weight":
            return None
        weight = layer.weight_linear().to(A.dtype)
        folded = (weight + self.delta_weight(layer, adapter, weight)).reshape(base.weight.shape)
        bias = layer._cast_input_dtype(base.bias, A.dtype)
        return base._conv_forward(layer._cast_input_dtype(x, A.dtype), folded, bias).to(x.dtype)

    # ------------------------------------------------------------------ merge / unmerge
    def delta_weight(self, layer: Any, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """What merging adds to ``weight`` (``(out, in * K)``): ``(I(BA) - I) W0`` or ``W0[:, :, k] (I(BA) - I)``."""
        if layer.side[adapter] == "pre":
            return super().delta_weight(layer, adapter, weight)
        positions = kernel_positions(layer.get_base_layer())
        rows = input_channels_as_columns(weight, positions)
        return input_channels_back(super().delta_weight(layer, adapter, rows), positions)

    def unmerge(self, layer: Any, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """``W0`` from the merged ``weight`` (``(out, in * K)``), by the inflation's inverse in the side's layout."""
        if layer.side[adapter] == "pre":
            return super().unmerge(layer, adapter, weight)
        positions = kernel_positions(layer.get_base_layer())
        rows = input_channels_as_columns(weight, positions)
        return input_channels_back(super().unmerge(layer, adapter, rows), positions)

    def lora_factors(self, layer: Any, adapter: str, weight: torch.Tensor) -> Pair | None:
        """Pre side: LoRA's convolution factors (``(out, r)`` and ``(r, in * K)``); post side ``None`` (not rank r)."""
        if layer.side[adapter] != "pre":
            return None
        return super().lora_factors(layer, adapter, weight)


class Conv(nn.Module, LormaLayer):
    """LoRMA around an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` (``groups=1``).

    ``in_features`` / ``out_features`` are the channel counts: the sizes of the post- and pre-side transforms.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, module_name: str = "", **kwargs: Any) -> None:
        super().__init__()
        LormaLayer.__init__(self, base_layer, module_name=module_name)
        base = self.get_base_layer()
        if base.groups != 1:
            # a transform of all channels mixes the groups: the merged layer would no longer be a grouped
            # convolution (pre: I(BA) conv_g(x) needs every group's input for every output channel)
            raise ValueError(
                f"module {module_name!r} is a {type(base).__name__} with groups={base.groups}: LoRMA transforms all "
                "its channels, which mixes the groups, so it could not be merged into a grouped convolution; only "
                "groups=1 convolutions are adapted (remove it from target_modules)"
            )
        self.base_weight = ConvWeight()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def transform_sizes_of(self, base: nn.Module) -> tuple[int, int] | None:
        if isinstance(base, CONV_TYPES):
            return base.in_channels, base.out_channels
        return None

    def update_layer(self, adapter_name: str, r: int, alpha: float, inflation: str, side: str, **kwargs: Any) -> None:
        """As :meth:`LormaLayer.update_layer`, with the convolution's geometry (:class:`ConvVariant`)."""
        refuse_linear_only_options(self.module_name, type(self.get_base_layer()).__name__, kwargs)
        super().update_layer(adapter_name, r, alpha, inflation, side, **kwargs)
        # the layer made a plain LormaVariant (and initialised A, B with it, as ConvVariant would); same inflation
        self.lorma_variant[adapter_name] = ConvVariant(self.lorma_variant[adapter_name].inflation)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return LormaLayer.forward(self, x, *args, **kwargs)


def refuse_linear_only_options(module_name: str, kind: str, options: dict[str, Any]) -> None:
    """Refuse, naming the module, the options that exist for Linear layers only: fused parts and variants."""
    if options.get("fused") is not None:
        raise ValueError(f"module {module_name!r} is a {kind}: fused_parts apply to Linear / Conv1D projections only")
    if options.get("variant") is not None:
        raise ValueError(
            f"module {module_name!r} is a {kind}: LoRMA variants ({options['variant']!r}) adapt Linear / Conv1D "
            "layers only; use plain LoRMA (variant=None) here or leave the module out of target_modules"
        )
