"""The peft tuner layer: LoRMA around an ``nn.Linear`` or a transformers ``Conv1D``.

The math lives in :mod:`lorma.functional`; this module holds the parameters (``lorma_A`` / ``lorma_B`` per
adapter name, as peft's LoRA holds ``lora_A`` / ``lora_B``), picks the cheapest way to apply them, and
implements peft's merge / unmerge / multi-adapter protocol.

Forward, for the active adapters in order (the same composition that merging them in that order gives):
post-side transforms act on the input, in reverse order (``W0 I1 I2 x`` applies ``I2`` first), then the base
layer runs once, then pre-side transforms act on its output without its bias (``I2 I1 (W0 x) + b``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import functional as LF

# Above this (estimated) condition number of I + sBA, merging a ``plus`` adapter keeps a copy of the weight instead
# of trusting the Woodbury inverse to restore it on unmerge.
_WOODBURY_MAX_CONDITION = 100.0


class LormaLayer(BaseTunerLayer):
    """State and math shared by LoRMA layers (one ``A``, ``B`` pair per adapter name; per part if fused)."""

    adapter_layer_names: tuple[str, ...] = ("lorma_A", "lorma_B")
    other_param_names: tuple[str, ...] = (
        "r",
        "alpha",
        "scaling",
        "inflation",
        "side",
        "fused",
        "lorma_dropout",
    )

    def __init__(self, base_layer: nn.Module, module_name: str = "", fan_in_fan_out: bool = False) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.inflation: dict[str, str] = {}
        self.side: dict[str, str] = {}
        # adapter -> (num_parts, [adapted part indices]) for fused projections, None otherwise
        self.fused: dict[str, tuple[int, list[int]] | None] = {}
        self.lorma_dropout = nn.ModuleDict({})
        self.lorma_A = nn.ParameterDict({})
        self.lorma_B = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # exact copies of the weight before a merge that cannot be undone by algebra (pi, none, or an
        # ill-conditioned plus); dropped on unmerge
        self._weights_before_merge: dict[str, torch.Tensor] = {}
        self.cast_input_dtype_enabled = True

        base = self.get_base_layer()
        if isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        elif hasattr(base, "in_features") and hasattr(base, "out_features"):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = fan_in_fan_out
        else:
            raise ValueError(
                f"module {module_name!r}: LoRMA adapts nn.Linear and transformers Conv1D layers, "
                f"got {type(base).__name__}"
            )

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
    ) -> None:
        """Add (or replace) the adapter ``adapter_name`` on this layer."""
        where = f"module {self.module_name!r}"
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{where}: r must be a positive integer, got {r!r}")
        if inflation not in LF.INFLATIONS:
            raise ValueError(f"{where}: unknown inflation {inflation!r}; expected one of {LF.INFLATIONS}")
        if side not in LF.SIDES:
            raise ValueError(f"{where}: unknown side {side!r}; expected one of {LF.SIDES}")
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
        d = self.transform_size_for(side, fused)
        if r > d:
            warnings.warn(
                f"LoRMA {where}: r={r} is larger than the transform size d={d} ({side} side): "
                "over-parameterized, not wrong",
                stacklevel=3,
            )

        self.r[adapter_name] = r
        self.alpha[adapter_name] = float(alpha)
        self.scaling[adapter_name] = float(alpha) / r
        self.inflation[adapter_name] = inflation
        self.side[adapter_name] = side
        self.fused[adapter_name] = fused
        self.lorma_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()

        lead = (len(fused[1]),) if fused is not None else ()
        A = torch.empty(*lead, r, d, dtype=torch.float32)
        B = torch.empty(*lead, d, r, dtype=torch.float32)
        self._initialize(A, B, inflation, self.scaling[adapter_name], init_weights)
        # created in float32 whatever the base dtype, so that the identity initialisation is computed exactly;
        # peft's autocast_adapter_dtype=False then rounds them once to a half-precision base's dtype
        # (LormaModel._cast_adapter_dtype), the default keeps float32
        device = self._base_device()
        self.lorma_A[adapter_name] = nn.Parameter(A.to(device))
        self.lorma_B[adapter_name] = nn.Parameter(B.to(device))
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @staticmethod
    def _initialize(A: torch.Tensor, B: torch.Tensor, inflation: str, scaling: float, identity: bool) -> None:
        """Fill ``A`` and ``B`` in place (2-D, or 3-D with one slice per fused part)."""
        if A.dim() == 3:
            for a, b in zip(A, B):
                LormaLayer._initialize(a, b, inflation, scaling, identity)
            return
        with torch.no_grad():
            if not identity:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            elif inflation == "plus":  # I + s B A with B = 0: exactly I (LoRA's init)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.zeros_(B)
            elif inflation == "pi":  # BA = ones in column 0 (times 1/s); pi moves row i's one to column i
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
                B[:, 0] = 1.0
                A.zero_()
                A[0, 0] = 1.0
                root = math.sqrt(scaling)
                A.div_(root)
                B.div_(root)
            else:  # none: rank <= r, cannot be I; start from the projection onto B's columns
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
                A.copy_(torch.linalg.pinv(B) / scaling)

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
        for params in (self.lorma_A, self.lorma_B):
            if adapter_name in params and params[adapter_name].device.type != "meta":
                params[adapter_name] = params[adapter_name].to(target)

    def _base_device(self) -> torch.device:
        weight = getattr(self.get_base_layer(), "weight", None)
        return weight.device if weight is not None and weight.device.type != "meta" else torch.device("cpu")

    # ------------------------------------------------------------------ weights
    def _base_weight_linear(self) -> torch.Tensor:
        """``W0`` (or the current merged weight) in ``nn.Linear`` layout ``(d_out, d_in)``."""
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def _set_base_weight_linear(self, weight_linear: torch.Tensor) -> None:
        base_weight = self.get_base_layer().weight
        new = weight_linear.T if self.fan_in_fan_out else weight_linear
        base_weight.data = new.to(base_weight.dtype).contiguous()

    def _part_slice(self, adapter: str, part: int) -> slice:
        num_parts = self.fused[adapter][0]
        size = self.out_features // num_parts
        return slice(part * size, (part + 1) * size)

    def _pairs(self, adapter: str) -> list[tuple[slice | None, torch.Tensor, torch.Tensor]]:
        """``(output rows, A, B)`` per transform of this adapter: one, or one per adapted fused part."""
        A, B = self.lorma_A[adapter], self.lorma_B[adapter]
        if self.fused[adapter] is None:
            return [(None, A, B)]
        return [(self._part_slice(adapter, p), A[i], B[i]) for i, p in enumerate(self.fused[adapter][1])]

    @torch.no_grad()
    def get_transform(self, adapter: str) -> torch.Tensor:
        """The dense ``I(BA)`` of an adapter, float32: ``(d, d)``, or ``(parts, d, d)`` for a fused layer."""
        A, B = self.lorma_A[adapter].float(), self.lorma_B[adapter].float()
        return LF.inflate(A, B, self.inflation[adapter], self.scaling[adapter])

    def _delta_for(self, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        """What merging ``adapter`` adds to ``weight`` (Linear layout, float), computed without ``W - W0``."""
        side, inflation, s = self.side[adapter], self.inflation[adapter], self.scaling[adapter]
        delta = weight if self.fused[adapter] is None else torch.zeros_like(weight)
        for rows, A, B in self._pairs(adapter):
            w = weight if rows is None else weight[rows]
            A, B = A.to(weight.dtype), B.to(weight.dtype)
            if inflation == "plus":  # low rank: never build d x d
                part = s * (B @ (A @ w)) if side == "pre" else s * ((w @ B) @ A)
            else:
                part = LF.dense_delta_weight(w, LF.inflate(A, B, inflation, s), side)
            if rows is None:
                delta = part
            else:
                delta[rows] = part
        return delta

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``W - W0`` that merging ``adapter`` into the current base weight adds, ``nn.Linear`` layout, fp32."""
        return self._delta_for(adapter, self._base_weight_linear().detach().float())

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into the base weight: ``W <- I(BA) W`` (pre) or ``W I(BA)`` (post)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lorma_A:
                continue
            current = self._base_weight_linear().detach()
            work = current.float() if current.dtype in (torch.float16, torch.bfloat16) else current
            merged = work + self._delta_for(adapter, work)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"module {self.module_name!r}: merging adapter {adapter!r} gives non-finite weights; "
                    "the adapter seems broken (nothing was changed)"
                )
            if not self._woodbury_restores(adapter):
                self._weights_before_merge[adapter] = self.get_base_layer().weight.data.clone()
            self._set_base_weight_linear(merged)
            self.merged_adapters.append(adapter)

    def _woodbury_restores(self, adapter: str) -> bool:
        """Whether unmerging ``adapter`` can be done exactly by algebra (plus, well-conditioned, full precision)."""
        if self.inflation[adapter] != "plus":
            return False
        if self.get_base_layer().weight.dtype in (torch.float16, torch.bfloat16):
            return False  # the merged weight was rounded: only a copy gives W0 back bit for bit
        s = self.scaling[adapter]
        for _, A, B in self._pairs(adapter):
            a64, b64 = A.detach().double().cpu(), B.detach().double().cpu()
            core = torch.eye(A.shape[0], dtype=torch.float64) + s * (a64 @ b64)
            # I + sBA has eigenvalue 1 on the complement of B's columns and the eigenvalues of core on them;
            # this estimates its condition number, the factor by which unmerging amplifies rounding
            sv = torch.linalg.svdvals(core)
            estimate = max(1.0, sv.max().item()) / min(1.0, sv.min().item()) if sv.min() > 0 else float("inf")
            if not math.isfinite(estimate) or estimate > _WOODBURY_MAX_CONDITION:
                return False
        return True

    def unmerge(self) -> None:
        """Undo the merges, last merged first: a saved copy where kept, else the Woodbury inverse."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lorma_A:
                continue
            saved = self._weights_before_merge.pop(adapter, None)
            if saved is not None:
                self.get_base_layer().weight.data = saved
                continue
            weight = self._base_weight_linear().detach()
            restored = weight.clone()
            s, side = self.scaling[adapter], self.side[adapter]
            for rows, A, B in self._pairs(adapter):
                w = weight if rows is None else weight[rows]
                A, B = A.detach().to(w.dtype), B.detach().to(w.dtype)
                if rows is None:
                    restored = LF.unmerge_plus(w, A, B, s, side)
                else:
                    restored[rows] = LF.unmerge_plus(w, A, B, s, side)
            self._set_base_weight_linear(restored)

    # ------------------------------------------------------------------ forward
    def _dropout_active(self, adapter: str) -> bool:
        module = self.lorma_dropout[adapter]
        return isinstance(module, nn.Dropout) and module.training and module.p > 0

    def _delta(
        self, adapter: str, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, shift: torch.Tensor | None
    ) -> torch.Tensor:
        """``(I(BA) - I) drop(h - shift)``: the adapter path, the only place dropout acts."""
        s, inflation = self.scaling[adapter], self.inflation[adapter]
        if self._dropout_active(adapter):
            source = h if shift is None else h - shift
            source = self.lorma_dropout[adapter](source)
            shift = None
        else:
            source = h
        if inflation == "plus":
            return LF.plus_delta(source, A, B, s, shift)
        if shift is not None:
            source = source - shift
        if inflation == "none":  # s BA is rank r: apply it as s B (A h), never as a d x d matrix
            return F.linear(F.linear(source, A) * s, B) - source
        limit = LF.DENSE_BYTES_LIMIT
        if limit is not None and LF.dense_transform_bytes(A.shape[-1]) > limit:
            # a d x d transform above the limit (LLaMA-3-8B up/gate, pre side: 822 MB): the FFT path, in
            # token chunks, bounded memory
            return LF.apply_pi_bounded(source, A, B, s) - source
        return F.linear(source, LF.inflate(A, B, inflation, s)) - source

    def _apply_transform(self, adapter: str, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``I(BA)`` applied to activations ``h`` (output or input side); ``bias`` is kept out of the product."""
        A = self.lorma_A[adapter]
        hc = self._cast_input_dtype(h, A.dtype)
        shift = self._cast_input_dtype(bias, A.dtype)
        if self.fused[adapter] is None:
            return (hc + self._delta(adapter, hc, A, self.lorma_B[adapter], shift)).to(h.dtype)
        chunks = list(hc.split(self.out_features // self.fused[adapter][0], dim=-1))
        for i, part in enumerate(self.fused[adapter][1]):
            part_shift = None if shift is None else shift[self._part_slice(adapter, part)]
            chunks[part] = chunks[part] + self._delta(
                adapter, chunks[part], A[i], self.lorma_B[adapter][i], part_shift
            )
        return torch.cat(chunks, dim=-1).to(h.dtype)

    def _fused_post_correction(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Post side on fused parts: part ``p`` of the output gets ``W0_p (I_p x - x)`` added."""
        A = self.lorma_A[adapter]
        xc = self._cast_input_dtype(x, A.dtype)
        weight = self._base_weight_linear()
        chunks = list(result.split(self.out_features // self.fused[adapter][0], dim=-1))
        for i, part in enumerate(self.fused[adapter][1]):
            dx = self._delta(adapter, xc, A[i], self.lorma_B[adapter][i], None)
            rows = self._part_slice(adapter, part)
            chunks[part] = chunks[part] + F.linear(dx.to(weight.dtype), weight[rows]).to(result.dtype)
        return torch.cat(chunks, dim=-1)

    def _folded_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
        """For one dense (pi / none) transform, fold it into the weight when that costs fewer flops."""
        if self.inflation[adapter] == "plus" or self.fused[adapter] is not None or self._dropout_active(adapter):
            return None
        base = self.get_base_layer()
        if not isinstance(base, (nn.Linear, Conv1D)):
            return None
        A = self.lorma_A[adapter]
        side = self.side[adapter]
        d = self.out_features if side == "pre" else self.in_features
        d_other = self.in_features if side == "pre" else self.out_features
        n_tokens = x.numel() // max(self.in_features, 1)
        needs_grad = torch.is_grad_enabled() and A.requires_grad
        if LF.choose_dense_strategy(n_tokens, d, d_other, needs_grad) != "weight":
            return None
        transform = LF.inflate(A, self.lorma_B[adapter], self.inflation[adapter], self.scaling[adapter])
        weight = self._base_weight_linear().to(A.dtype)
        folded = LF.merge_weight(weight, transform, side)
        bias = self._cast_input_dtype(base.bias, A.dtype)
        return F.linear(self._cast_input_dtype(x, A.dtype), folded, bias).to(x.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lorma_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if len(active) == 1 and not args and not kwargs:
            folded = self._folded_forward(active[0], x)
            if folded is not None:
                return folded

        post = [a for a in active if self.side[a] == "post"]
        pre = [a for a in active if self.side[a] == "pre"]
        fused_post = [a for a in post if self.fused[a] is not None]
        if fused_post and len(post) > 1:
            raise ValueError(
                f"module {self.module_name!r}: a post-side adapter on fused parts ({fused_post[0]!r}) cannot be "
                "active together with other post-side adapters"
            )
        x_in = x
        for adapter in reversed(post):
            if self.fused[adapter] is None:
                x_in = self._apply_transform(adapter, x_in, None)
        result = self.base_layer(x_in, *args, **kwargs)
        for adapter in fused_post:
            result = self._fused_post_correction(adapter, x_in, result)
        bias = getattr(self.get_base_layer(), "bias", None)
        for adapter in pre:
            result = self._apply_transform(adapter, result, bias)
        return result

    def __repr__(self) -> str:
        return "lorma." + super().__repr__()


class Linear(nn.Module, LormaLayer):
    """LoRMA around an ``nn.Linear`` (or a ``Conv1D``, whose weight is stored transposed)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        module_name: str = "",
        fan_in_fan_out: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LormaLayer.__init__(self, base_layer, module_name=module_name, fan_in_fan_out=fan_in_fan_out)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return LormaLayer.forward(self, x, *args, **kwargs)
