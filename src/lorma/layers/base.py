"""What every LoRMA layer is: :class:`LormaLayer`, the peft tuner layer that the layers of this package specialise
(``linear.py``: ``nn.Linear`` / ``Conv1D``, ``conv.py``, ``embedding.py``, ``experts.py``, ``bnb.py``).

This module holds the parameters (``lorma_A`` / ``lorma_B`` per adapter name, as peft's LoRA holds ``lora_A`` /
``lora_B``) and implements peft's merge / unmerge / multi-adapter protocol. What an adapter computes is asked of
its variant object (:class:`lorma.variants.LormaVariant`: plain LoRMA unless ``LormaConfig.variant`` names
another), which holds the adapter's inflation (:mod:`lorma.inflations`); the math is in :mod:`lorma.functional`.
How the base weight is read and written is asked of :attr:`LormaLayer.base_weight` (:class:`FloatWeight` here;
a quantized base has its own, :class:`lorma.layers.bnb.QuantizedWeight`).

Forward, for the active adapters in order (the same composition that merging them in that order gives):
post-side transforms act on the input, in reverse order (``W0 I1 I2 x`` applies ``I2`` first), then the base
layer runs once, then pre-side transforms act on its output without its bias (``I2 I1 (W0 x) + b``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..functional import SIDES
from ..inflations import DEFAULT_FFT_CHUNK_BYTES, DEFAULT_MAX_DENSE_BYTES, get_inflation
from ..plumbing.sharding import full_weight, refuse_sharded_write
from ..variants import LormaVariant, get_variant
from .mixed_batch import mixed_batch_forward


class FloatWeight:
    """The weight of a float base layer as the adapter math reads and writes it: ``nn.Linear`` layout.

    The counterpart for a bitsandbytes 4/8-bit base is :class:`lorma.layers.bnb.QuantizedWeight`; a layer's merge and
    unmerge go through these methods only, so that the quantized layer differs in this object alone.
    """

    #: the forward may read ``W0`` as a float matrix (to fold a transform into it, or for fused post-side parts)
    readable_in_forward = True

    def __init__(self, fan_in_fan_out: bool) -> None:
        self.fan_in_fan_out = fan_in_fan_out

    def read(self, base: nn.Module) -> torch.Tensor:
        """``W`` ``(d_out, d_in)``: a view of the parameter (transposed for ``Conv1D``), in its dtype; gathered whole
        when it is sharded (FSDP2 / ZeRO-3 outside the base layer's forward:
        :func:`lorma.plumbing.sharding.full_weight`)."""
        weight = full_weight(base.weight)
        return weight.T if self.fan_in_fan_out else weight

    def work_copy(self, base: nn.Module) -> torch.Tensor:
        """``W`` to merge into, detached: float32 for a half-precision weight (merging in half would round twice)."""
        weight = self.read(base).detach()
        return weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight

    def write(self, base: nn.Module, weight_linear: torch.Tensor) -> None:
        """Store ``weight_linear`` (``nn.Linear`` layout) as the base weight, in the base weight's dtype."""
        new = weight_linear.T if self.fan_in_fan_out else weight_linear
        base.weight.data = new.to(base.weight.dtype).contiguous()

    def exact_after_merge(self, base: nn.Module) -> bool:
        """Whether a merged weight keeps full precision, so an exact inverse can give ``W0`` back bit for bit."""
        return base.weight.dtype not in (torch.float16, torch.bfloat16)

    def snapshot(self, base: nn.Module) -> torch.Tensor:
        """What :meth:`restore` needs to put the current weight back exactly."""
        return base.weight.data.clone()

    def restore(self, base: nn.Module, snapshot: torch.Tensor) -> None:
        base.weight.data = snapshot

    def before_merge(self, module_name: str) -> None:
        """Called once before a merge changes the weight (a quantized base warns here)."""


class LormaLayer(BaseTunerLayer):
    """State shared by LoRMA layers (one ``A``, ``B`` pair per adapter name; per part if fused)."""

    adapter_layer_names: tuple[str, ...] = ("lorma_A", "lorma_B")
    other_param_names: tuple[str, ...] = (
        "r",
        "alpha",
        "scaling",
        "inflation",
        "side",
        "fused",
        "lorma_dropout",
        "lorma_variant",
    )

    def __init__(self, base_layer: nn.Module, module_name: str = "", fan_in_fan_out: bool = False) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.inflation: dict[str, str] = {}  # the inflation's name (its object is lorma_variant[adapter].inflation)
        self.side: dict[str, str] = {}
        # adapter -> (num_parts, [adapted part indices]) for fused projections, None otherwise
        self.fused: dict[str, tuple[int, list[int]] | None] = {}
        self.lorma_dropout = nn.ModuleDict({})
        self.lorma_A = nn.ParameterDict({})
        self.lorma_B = nn.ParameterDict({})
        self.lorma_variant: dict[str, LormaVariant] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # what restores the weight before a merge that cannot be undone by algebra (pi, none, an ill-conditioned
        # plus, a half-precision or quantized weight); dropped on unmerge
        self._weights_before_merge: dict[str, Any] = {}
        self.cast_input_dtype_enabled = True

        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            # a ZeRO-3 partitioned weight keeps its real shape in ds_shape
            self.in_features, self.out_features = getattr(base.weight, "ds_shape", base.weight.shape)
            fan_in_fan_out = True
        elif hasattr(base, "in_features") and hasattr(base, "out_features"):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif (sizes := self.transform_sizes_of(base)) is not None:
            self.in_features, self.out_features = sizes
        else:
            raise ValueError(
                f"module {module_name!r}: LoRMA adapts nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and "
                f"nn.Embedding layers, got {type(base).__name__}"
            )
        self.fan_in_fan_out = fan_in_fan_out
        self.base_weight = FloatWeight(fan_in_fan_out)

    def transform_sizes_of(self, base: nn.Module) -> tuple[int, int] | None:
        """``(d_in, d_out)``, the sizes of the post- and pre-side transforms, for a base layer that is neither an
        ``nn.Linear`` nor a ``Conv1D``; ``None`` if this class does not adapt it. Overridden by the convolution and
        embedding layers (:mod:`lorma.layers.conv`, :mod:`lorma.layers.embedding`)."""
        return None

    # ------------------------------------------------------------------ construction
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        inflation: str,
        side: str,
        dropout: float = 0.0,
        init_weights: bool = True,
        fused: tuple[int, list[int]] | None = None,
        inference_mode: bool = False,
        max_dense_bytes: int | None = DEFAULT_MAX_DENSE_BYTES,
        fft_chunk_bytes: int = DEFAULT_FFT_CHUNK_BYTES,
        variant: str | None = None,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` on this layer."""
        where = f"module {self.module_name!r}"
        inflation_cls, variant_cls = self._checked_classes(where, r, inflation, variant, side)
        if fused is not None:
            num_parts, parts = fused
            if self.out_features % num_parts != 0:
                raise ValueError(
                    f"{where}: its output size {self.out_features} does not divide into {num_parts} equal fused parts"
                )
            if any(not 0 <= p < num_parts for p in parts):
                raise ValueError(f"{where}: fused parts {parts} out of range for {num_parts} parts")
            if side == "post" and not isinstance(self.get_base_layer(), (nn.Linear, Conv1D)):
                raise ValueError(f"{where}: post-side fused parts need a plain Linear/Conv1D base layer")
            fused = (int(num_parts), sorted(int(p) for p in parts))
        self._add_adapter(adapter_name, where, r=r, alpha=alpha, inflation=inflation, side=side,
                          d=self.transform_size_for(side, fused), fused=fused, dropout=dropout,
                          lead=(len(fused[1]),) if fused is not None else (), init_weights=init_weights,
                          variant=variant_cls(inflation_cls(max_dense_bytes=max_dense_bytes,
                                                            fft_chunk_bytes=fft_chunk_bytes)))
        self._move_adapter_to_device_of_base_layer(adapter_name, self._base_device())
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @staticmethod
    def _checked_classes(where: str, r: Any, inflation: str, variant: str | None, side: str) -> tuple[type, type]:
        """The inflation and variant classes of an adapter about to be added, after checking ``r`` and ``side``
        (errors name ``where``: the module or parameter)."""
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{where}: r must be a positive integer, got {r!r}")
        try:
            inflation_cls, variant_cls = get_inflation(inflation), get_variant(variant)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if side not in SIDES:
            raise ValueError(f"{where}: unknown side {side!r}; expected one of {SIDES}")
        return inflation_cls, variant_cls

    def _add_adapter(self, adapter_name: str, where: str, *, r: int, alpha: float, inflation: str, side: str, d: int,
                     fused: tuple[int, list[int]] | None, dropout: float, lead: tuple[int, ...], init_weights: bool,
                     variant: Any) -> None:
        """Record a checked adapter and create its factors ``A`` ``(*lead, r, d)`` and ``B`` ``(*lead, d, r)``
        (``lead``: one transform per fused part, or per expert), initialised by its ``variant``."""
        variant.inflation.check_size(d, where)
        if r > d:
            warnings.warn(
                f"LoRMA {where}: r={r} is larger than the transform size d={d} ({side} side): "
                "over-parameterized, not wrong",
                stacklevel=4,
            )
        self.r[adapter_name] = r
        self.alpha[adapter_name] = float(alpha)
        self.scaling[adapter_name] = float(alpha) / r
        self.inflation[adapter_name] = inflation
        self.side[adapter_name] = side
        self.fused[adapter_name] = fused
        self.lorma_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        self.lorma_variant[adapter_name] = variant
        # created in float32 on the CPU whatever the base dtype, so that the identity initialisation is computed
        # exactly; peft's autocast_adapter_dtype=False then rounds them once to a half-precision base's dtype
        # (LormaModel._cast_adapter_dtype), the default keeps float32
        self.lorma_A[adapter_name] = nn.Parameter(torch.empty(*lead, r, d, dtype=torch.float32))
        self.lorma_B[adapter_name] = nn.Parameter(torch.empty(*lead, d, r, dtype=torch.float32))
        variant.init(self, adapter_name, init_weights)

    def adapter_parameters(self, name: str) -> nn.ParameterDict:
        """The per-adapter parameter dict ``name`` (``"lorma_..."``), created on first use, for a variant's tensors.

        Registering it in this layer's ``adapter_layer_names`` makes peft train, save, load, move and delete it
        with ``lorma_A`` / ``lorma_B`` (peft's DoRA extends its layer the same way).
        """
        if not name.startswith("lorma_"):
            raise ValueError(f"adapter parameter dicts are named 'lorma_...' (peft's prefix for LoRMA), got {name!r}")
        if name not in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
            self.adapter_layer_names = (*self.adapter_layer_names, name)
        return getattr(self, name)

    def transform_size_for(self, side: str, fused: tuple[int, list[int]] | None) -> int:
        """``d`` of the square transform: the (part of the) output on the pre side, the input on the post."""
        if side == "post":
            return self.in_features
        return self.out_features // fused[0] if fused is not None else self.out_features

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move an adapter to the base layer's device, keeping its dtype.

        peft's version also casts to a half-precision base's dtype; peft calls it when loading with
        ``low_cpu_mem_usage=True``, which would round float32 weights before ``autocast_adapter_dtype`` casts them
        back up. The dtype is decided by ``autocast_adapter_dtype`` alone (``LormaModel._cast_adapter_dtype``).
        """
        weight = getattr(self.get_base_layer(), "weight", None)
        target = device if device is not None else getattr(weight, "device", None)
        if target is None or torch.device(target).type == "meta":
            return
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            if adapter_name in params and params[adapter_name].device.type != "meta":
                params[adapter_name] = params[adapter_name].to(target)

    def _base_device(self) -> torch.device:
        weight = getattr(self.get_base_layer(), "weight", None)
        return weight.device if weight is not None and weight.device.type != "meta" else torch.device("cpu")

    # ------------------------------------------------------------------ weights
    def weight_linear(self) -> torch.Tensor:
        """The base layer's weight (``W0``, or the merged weight) in ``nn.Linear`` layout ``(d_out, d_in)``."""
        return self.base_weight.read(self.get_base_layer())

    def part_slice(self, adapter: str, part: int) -> slice:
        """The output rows of fused part ``part``."""
        size = self.out_features // self.fused[adapter][0]
        return slice(part * size, (part + 1) * size)

    def get_transform(self, adapter: str) -> torch.Tensor:
        """The dense ``I(BA)`` of an adapter, float32: ``(d, d)``, or ``(parts, d, d)`` for a fused layer."""
        return self.lorma_variant[adapter].transform(self, adapter)

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``W - W0`` that merging ``adapter`` into the current base weight adds, ``nn.Linear`` layout, fp32."""
        return self.lorma_variant[adapter].delta_weight(self, adapter, self.weight_linear().detach().float())

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base weight: ``W <- I(BA) W`` (pre) or ``W I(BA)`` (post)."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lorma_A]
        base = self.get_base_layer()
        if adapter_names:
            refuse_sharded_write(base.weight, self.module_name)
            self.base_weight.before_merge(self.module_name)
        for adapter in adapter_names:
            variant = self.lorma_variant[adapter]
            work = self.base_weight.work_copy(base)
            merged = work + variant.delta_weight(self, adapter, work)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"module {self.module_name!r}: merging adapter {adapter!r} gives non-finite weights; "
                    "the adapter seems broken (nothing was changed)"
                )
            if not (self.base_weight.exact_after_merge(base) and variant.unmerges_exactly(self, adapter)):
                self._weights_before_merge[adapter] = self.base_weight.snapshot(base)
            self.base_weight.write(base, merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo the merges, last merged first: a kept copy where there is one, else the variant's exact inverse."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        refuse_sharded_write(base.weight, self.module_name)
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lorma_A:
                continue
            saved = self._weights_before_merge.pop(adapter, None)
            if saved is not None:
                self.base_weight.restore(base, saved)
                continue
            weight = self.weight_linear().detach()
            self.base_weight.write(base, self.lorma_variant[adapter].unmerge(self, adapter, weight))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # one adapter per row of the batch (peft's keyword; lorma.layers.mixed_batch)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return mixed_batch_forward(self, x, adapter_names, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lorma_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1 and not args and not kwargs:
            variant = self.lorma_variant[active[0]]
            whole = variant.folded_forward(self, active[0], x)
            if whole is None:
                whole = variant.low_rank_post_forward(self, active[0], x)
            if whole is not None:
                return whole

        post = [a for a in active if self.side[a] == "post"]
        fused_post = [a for a in post if self.fused[a] is not None]
        if fused_post and len(post) > 1:
            raise ValueError(
                f"module {self.module_name!r}: a post-side adapter on fused parts ({fused_post[0]!r}) cannot be "
                "active together with other post-side adapters"
            )
        # post side first, nearest to W0: W = I_pre,n ... I_pre,1 W0 I_post,1 ... I_post,m
        order = post + [a for a in active if self.side[a] != "post"]
        x_in = x
        for adapter in reversed(order):
            x_in = self.lorma_variant[adapter].before_base(self, adapter, x_in)
        result = self.base_layer(x_in, *args, **kwargs)
        for adapter in order:
            result = self.lorma_variant[adapter].after_base(self, adapter, x_in, result)
        return result

    def __repr__(self) -> str:
        return "lorma." + super().__repr__()

