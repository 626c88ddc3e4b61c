"""LoRMA on parameters: the 3-D expert weights of a mixture-of-experts block, one transform per expert.

transformers 5 stores the experts of a MoE block (Mixtral, Qwen2/3-MoE, gpt-oss, ...) as one module holding 3-D
``nn.Parameter``s, ``gate_up_proj`` and ``down_proj`` of shape ``(num_experts, ., .)``, with no ``nn.Linear`` per
expert for ``target_modules`` to find. peft's LoRA reaches them with ``LoraConfig.target_parameters`` and its
``ParamWrapper`` (``peft/tuners/lora/layer.py``); ``LormaConfig.target_parameters`` does the same for LoRMA:

    W_e = I(B_e A_e) W0_e  (side "pre")   or   W0_e I(B_e A_e)  (side "post"),   e = 1 .. num_experts,

with ``W0_e`` expert ``e``'s weight in ``nn.Linear`` layout ``(d_out, d_in)`` and ``A`` ``(num_experts, r, d)``,
``B`` ``(num_experts, d, r)`` (2-D parameters: one ``(r, d)``, ``(d, r)`` pair). Which axis is "out" is the
module's own layout: transformers marks experts that compute ``x @ W[e]`` (gpt-oss, stored ``(E, d_in, d_out)``)
with ``is_transposed = True``; the others (Mixtral, Qwen) compute ``F.linear(x, W[e])`` on ``(E, d_out, d_in)``.

How it runs: a :class:`LormaExperts` wraps the module that holds the parameter. Its forward builds the adapted
weight of every expert once (``W0 + delta``, the inflation's merge formula on the batch of experts: for LoRMA+
``s B_e (A_e W0_e)``, rank ``r`` per expert, never ``d x d``) and runs the module with it in place of the parameter
(``torch.func.functional_call``: the module's own forward, whatever experts implementation it dispatches to, reads
the adapted tensor; ``torch.compile`` traces it without a graph break). Gradients reach ``A`` and ``B`` through
the fold. Several targeted parameters of one module nest wrappers, in sorted order of their names (as peft
nests its ``ParamWrapper``s); the saved keys are ``<module>.lorma_A`` for the outermost, ``<module>.base_layer
.lorma_A`` for the next. Every adapter of a model that targets parameters must target the same ones, so that
this nesting, and the keys, are the same in every process.

Merging writes ``I(B_e A_e) W0_e`` into the parameter; unmerging is exact (Woodbury, expert by expert) for a
well-conditioned LoRMA+ transform in full precision, and restores a copy kept at merge time otherwise.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.other import get_pattern_key
from torch import nn
from torch.func import functional_call

from ..config import LormaConfig
from ..inflations import DEFAULT_FFT_CHUNK_BYTES, DEFAULT_MAX_DENSE_BYTES
from ..plumbing.sharding import refuse_sharded_write
from ..variants import LormaVariant
from .base import LormaLayer


class LormaExperts(nn.Module, LormaLayer):
    """LoRMA on one 2-D or 3-D parameter (``parameter_name``) of the module it wraps, one transform per expert.

    ``in_features`` / ``out_features`` are those of one expert in ``nn.Linear`` layout. :meth:`weight_linear`
    gives the parameter in that layout (``(E, d_out, d_in)``), so the variant's merge formula applies to the batch.
    """

    #: a row of a mixed-adapter batch is not a row here: the experts see the tokens routed to them, flattened
    mixed_batch = False

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, parameter_name: str, module_name: str = "", **kwargs: Any
    ) -> None:
        nn.Module.__init__(self)
        # the per-adapter state of LormaLayer (its __init__ reads in / out features from a Linear or Conv1D)
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.module_name = module_name
        self.r, self.alpha, self.scaling = {}, {}, {}
        self.inflation, self.side, self.fused = {}, {}, {}
        self.lorma_dropout = nn.ModuleDict({})
        self.lorma_A = nn.ParameterDict({})
        self.lorma_B = nn.ParameterDict({})
        self.lorma_variant: dict[str, LormaVariant] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._weights_before_merge: dict[str, torch.Tensor] = {}
        self.cast_input_dtype_enabled = True
        self.fan_in_fan_out = False

        param = self.get_param()
        shape = tuple(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partitioned weight keeps its shape there
        if len(shape) not in (2, 3) or not param.dtype.is_floating_point:
            raise ValueError(
                f"parameter {module_name!r}: LoRMA adapts 2-D or 3-D (num_experts, ., .) float parameters, got shape "
                f"{shape} of dtype {param.dtype}"
            )
        # transformers' experts that compute x @ W[e] say so (is_transposed): their W[e] is (d_in, d_out)
        self.is_transposed = bool(getattr(self.get_base_layer(), "is_transposed", False))
        self.out_features, self.in_features = (shape[-1], shape[-2]) if self.is_transposed else shape[-2:]
        self.num_experts = shape[0] if len(shape) == 3 else None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, **kwargs)

    # ------------------------------------------------------------------ the parameter
    def get_param(self) -> torch.Tensor:
        """The adapted parameter as the module holds it (merged or not), in its own layout."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def weight_linear(self) -> torch.Tensor:
        """The parameter in ``nn.Linear`` layout: ``(E, d_out, d_in)`` (``(d_out, d_in)`` for a 2-D one), a view."""
        param = self.get_param()
        return param.mT if self.is_transposed else param

    def _to_param_layout(self, weight_linear: torch.Tensor) -> torch.Tensor:
        return weight_linear.mT if self.is_transposed else weight_linear

    def _param_path(self) -> str:
        """The parameter's name relative to ``self.base_layer`` (through nested wrappers of the same module)."""
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, LormaExperts):
            path, module = "base_layer." + path, module.base_layer
        return path

    # ------------------------------------------------------------------ construction
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        alpha: float,
        inflation: str,
        side: str,
        init_weights: bool = True,
        inference_mode: bool = False,
        max_dense_bytes: int | None = DEFAULT_MAX_DENSE_BYTES,
        fft_chunk_bytes: int = DEFAULT_FFT_CHUNK_BYTES,
        **unused: Any,
    ) -> None:
        """Add (or replace) the adapter ``adapter_name``: ``A`` ``(E, r, d)``, ``B`` ``(E, d, r)``."""
        where = f"parameter {self.module_name!r}"
        inflation_cls, _ = self._checked_classes(where, r, inflation, None, side)
        self._add_adapter(adapter_name, where, r=r, alpha=alpha, inflation=inflation, side=side,
                          d=self.out_features if side == "pre" else self.in_features, fused=None, dropout=0.0,
                          lead=(self.num_experts,) if self.num_experts is not None else (),
                          init_weights=init_weights,  # the variant initialises expert by expert
                          variant=LormaVariant(inflation_cls(max_dense_bytes=max_dense_bytes,
                                                             fft_chunk_bytes=fft_chunk_bytes)))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """To the parameter's device, keeping the adapter's dtype (as :class:`lorma.layers.base.LormaLayer` does)."""
        target = device if device is not None else self.get_param().device
        if torch.device(target).type == "meta":
            return
        for name in self.adapter_layer_names:
            params = getattr(self, name)
            if adapter_name in params and params[adapter_name].device.type != "meta":
                params[adapter_name] = params[adapter_name].to(target)

    # ------------------------------------------------------------------ the adapted weight
    def adapted_weight(self, adapters: list[str]) -> torch.Tensor:
        """``W0`` with the adapters applied in order, every expert at once, in the parameter's layout and dtype.

        The same composition the Linear layer's forward and merging give: pre-side transforms multiply on the
        left in order (``I_2 I_1 W0``), post-side ones on the right (``W0 I_1 I_2``).
        """
        param = self.get_param()
        dtype = self.lorma_A[adapters[0]].dtype
        weight = self.weight_linear().to(dtype)
        for adapter in adapters:
            weight = weight + self.lorma_variant[adapter].delta_weight(self, adapter, weight)
        return self._to_param_layout(weight).to(param.dtype)

    @torch.no_grad()
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``W - W0`` that merging ``adapter`` adds to the current parameter, in ``nn.Linear`` layout, float32."""
        weight = self.weight_linear().detach().float()
        return self.lorma_variant[adapter].delta_weight(self, adapter, weight)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if adapter_names is not None:  # a mixed batch whose adapters do not adapt this parameter: the base for all
            if any(name in self.lorma_A for name in adapter_names):
                raise ValueError(
                    f"parameter {self.module_name!r}: mixed-adapter batches do not reach adapted expert parameters "
                    "(the experts see routed tokens, not rows); activate one adapter instead"
                )
            return self.base_layer(*args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lorma_A]
        if self.merged or not active:
            return self.base_layer(*args, **kwargs)
        weight = self.adapted_weight(active)
        return functional_call(self.base_layer, {self._param_path(): weight}, args, kwargs, strict=False)

    # ------------------------------------------------------------------ merge / unmerge
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``I(B_e A_e) W_e`` (or ``W_e I(B_e A_e)``) into the parameter, for each adapter in order."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lorma_A]
        param = self.get_param()
        if adapter_names:
            refuse_sharded_write(param, self.module_name)
        for adapter in adapter_names:
            work = self.weight_linear().detach()
            work = work.float() if work.dtype in (torch.float16, torch.bfloat16) else work
            merged = work + self.lorma_variant[adapter].delta_weight(self, adapter, work)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"parameter {self.module_name!r}: merging adapter {adapter!r} gives non-finite weights; "
                    "the adapter seems broken (nothing was changed)"
                )
            if param.dtype in (torch.float16, torch.bfloat16) or not self._unmerges_exactly(adapter):
                self._weights_before_merge[adapter] = param.data.clone()
            param.data = self._to_param_layout(merged).to(param.dtype).contiguous()
            self.merged_adapters.append(adapter)

    def _pairs_per_expert(self, adapter: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        A, B = self.lorma_A[adapter].detach(), self.lorma_B[adapter].detach()
        return list(zip(A, B)) if A.dim() == 3 else [(A, B)]

    def _unmerges_exactly(self, adapter: str) -> bool:
        inflation, s = self.lorma_variant[adapter].inflation, self.scaling[adapter]
        return all(inflation.unmerges_exactly(a, b, s) for a, b in self._pairs_per_expert(adapter))

    def unmerge(self) -> None:
        """Undo the merges, last first: the kept copy where there is one, else the inverse expert by expert."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        param = self.get_param()
        refuse_sharded_write(param, self.module_name)
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lorma_A:
                continue
            saved = self._weights_before_merge.pop(adapter, None)
            if saved is not None:
                param.data = saved
                continue
            inflation, s, side = self.lorma_variant[adapter].inflation, self.scaling[adapter], self.side[adapter]
            weight = self.weight_linear().detach()
            experts = weight if weight.dim() == 3 else weight[None]
            restored = torch.stack([
                inflation.unmerge(w, a.to(w.dtype), b.to(w.dtype), s, side)
                for w, (a, b) in zip(experts, self._pairs_per_expert(adapter))
            ])
            restored = restored if weight.dim() == 3 else restored[0]
            param.data = self._to_param_layout(restored).to(param.dtype).contiguous()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The module without wrappers (peft's unload / merge_and_unload), merging this and the nested ones first."""
        module: nn.Module = self
        while isinstance(module, LormaExperts):
            if merge:
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            module = module.base_layer
        return module

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}"


# ---------------------------------------------------------------------------------------------- injection
def _unwrapped_name(name: str) -> str:
    """A module path with the ``.base_layer`` steps of tuner wrappers removed (peft's names for targets)."""
    return re.sub(r"\.base_layer(?=\.|$)", "", name)


def _matches(key: str, targets: list[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def inject_parameters(
    model: nn.Module, config: LormaConfig, adapter_name: str, other_configs: dict[str, Any], active: list[str]
) -> list[str]:
    """Wrap every parameter ``config.target_parameters`` names with a :class:`LormaExperts` (or add the adapter to
    the wrapper there), and return their full names. Called by ``LormaModel._inject_parameters``.

    Everything is checked first: the same parameters as the model's other adapters that target parameters,
    parameters that exist, are 2-D or 3-D, and are not the weight of a module adapted through ``target_modules``.
    """
    targets = sorted(set(config.target_parameters or []))
    if not targets:
        return []
    for name, other in other_configs.items():
        theirs = getattr(other, "target_parameters", None)
        if other is not config and theirs and sorted(set(theirs)) != targets:
            raise ValueError(
                f"LoRMA target_parameters: adapter {adapter_name!r} targets {targets} but adapter {name!r} targets "
                f"{sorted(set(theirs))}; all adapters that target parameters must target the same ones (their "
                "wrappers nest in one order, which decides the saved keys)"
            )
    found: dict[str, list[str]] = {}  # unwrapped module path -> parameter names
    for path, module in model.named_modules():
        if isinstance(module, LormaExperts) or ".lorma_" in path or path.startswith("lorma_"):
            continue
        owner = _unwrapped_name(path)
        for pname, _ in module.named_parameters(recurse=False):
            if not _matches(f"{owner}.{pname}" if owner else pname, targets):
                continue
            if not path:
                raise ValueError(f"LoRMA target_parameters: {pname!r} belongs to the top-level module, which cannot "
                                 "be wrapped; target a parameter of a sub-module")
            outer = model.get_submodule(owner)
            if isinstance(outer, BaseTunerLayer) and not isinstance(outer, LormaExperts):
                raise ValueError(
                    f"LoRMA target_parameters: {owner}.{pname} belongs to {owner!r}, which target_modules adapts "
                    "already; target it one way only"
                )
            param = getattr(module, pname)
            shape = tuple(getattr(param, "ds_shape", param.shape))
            if len(shape) not in (2, 3) or not param.dtype.is_floating_point:
                raise ValueError(
                    f"LoRMA target_parameters: {owner}.{pname} has shape {shape} and dtype {param.dtype}; LoRMA "
                    "adapts 2-D or 3-D (num_experts, ., .) float parameters"
                )
            found.setdefault(owner, []).append(pname)
    keys = [f"{owner}.{p}" for owner, names in found.items() for p in names]
    unmatched = [t for t in targets if not any(_matches(key, [t]) for key in keys)]
    if unmatched:
        raise ValueError(f"LoRMA target_parameters: {unmatched} match no parameter of the model")

    created: list[str] = []
    for owner, names in found.items():
        parent_name, _, child_name = owner.rpartition(".")
        parent = model.get_submodule(parent_name)
        for pname in sorted(names):
            key = f"{owner}.{pname}"
            current = model.get_submodule(owner)
            existing = current
            while isinstance(existing, LormaExperts) and existing.parameter_name != pname:
                existing = existing.base_layer
            kwargs = _layer_kwargs(config, key, current, pname)
            if isinstance(existing, LormaExperts):
                existing.update_layer(adapter_name, **kwargs)
            else:
                wrapper = LormaExperts(current, adapter_name, parameter_name=pname, module_name=key, **kwargs)
                if adapter_name not in active:
                    wrapper.requires_grad_(False)  # an added, inactive adapter is not trained
                setattr(parent, child_name, wrapper)
            created.append(key)
    return created


def _layer_kwargs(config: LormaConfig, key: str, module: nn.Module, pname: str) -> dict[str, Any]:
    """``r``, ``alpha`` and side of the parameter ``key`` from the config's patterns (full parameter names)."""
    holder = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    shape = getattr(holder, pname).shape
    transposed = bool(getattr(holder, "is_transposed", False))
    d_out, d_in = (shape[-1], shape[-2]) if transposed else (shape[-2], shape[-1])
    r_key = get_pattern_key(config.rank_pattern.keys(), key)
    alpha_key = get_pattern_key(config.alpha_pattern.keys(), key)
    side = config.side_for(key, int(d_in), int(d_out))
    if config.side == "auto":
        config.side_pattern.setdefault(re.escape(key), side)
    return {
        "r": config.rank_pattern.get(r_key, config.r),
        "alpha": config.alpha_pattern.get(alpha_key, config.alpha),
        "inflation": config.inflation,
        "side": side,
        "init_weights": config.init_weights,
        "inference_mode": config.inference_mode,
        "max_dense_bytes": config.max_dense_bytes,
        "fft_chunk_bytes": config.fft_chunk_bytes,
    }
