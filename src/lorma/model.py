"""``LormaModel``: the peft tuner that swaps target modules for LoRMA layers."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper, _freeze_adapter, get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_FUSED_PARTS, DEFAULT_TARGET_MODULES, LormaConfig
from .functional import Pair
from .inflations import get_inflation, inflation_names
from .layers import tying
from .layers.base import LormaLayer
from .layers.bnb import QuantLinear, keep_autograd_path, quantized_kind
from .layers.conv import CONV_TYPES, Conv
from .layers.embedding import Embedding, TiedLinear
from .layers.experts import LormaExperts, inject_parameters
from .layers.linear import Linear
from .layers.mixed_batch import install_adapter_names
from .variants import LormaVariant, get_variant, variant_names

# peft LoRA's other add_weighted_adapter options, at their defaults (accepted at these values, refused otherwise)
LORA_ONLY_DEFAULTS: dict[str, Any] = {
    "svd_rank": None,
    "svd_clamp": None,
    "svd_full_matrices": True,
    "svd_driver": None,
    "density": None,
    "majority_sign_method": "total",
}


class LormaModel(BaseTuner):
    """Low-Rank Multiplicative Adaptation of a transformers (or any torch) model.

    Use it through peft: ``get_peft_model(model, LormaConfig(...))``. Each target ``nn.Linear`` / ``Conv1D``
    becomes a :class:`lorma.layers.linear.Linear` computing ``I(BA) W0 x + b`` (pre) or ``W0 I(BA) x + b`` (post); an
    ``nn.Conv1d/2d/3d`` a :class:`lorma.layers.conv.Conv` (the transform on the output or input channels), an
    ``nn.Embedding`` a :class:`lorma.layers.embedding.Embedding` (on the embedding dimension).
    """

    prefix: str = "lorma_"
    tuner_layer_cls = LormaLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: LormaConfig, model_config: dict) -> LormaConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None and peft_config.target_parameters:
            # parameters alone are a valid target (peft's LoRA: the model type's default modules join them if any)
            if model_type in self.target_module_mapping:
                peft_config.target_modules = set(self.target_module_mapping[model_type])
        else:
            peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if peft_config.fused_parts is None and model_type in DEFAULT_FUSED_PARTS:
            peft_config.fused_parts = {k: dict(v) for k, v in DEFAULT_FUSED_PARTS[model_type].items()}
        return peft_config

    def _create_and_replace(
        self,
        lorma_config: LormaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if lorma_config.ensure_weight_tying and not isinstance(target, (Embedding, nn.Embedding)):
            embeddings = tying.tied_embedding_names(self.model, target)
            if any(self._check_target_module_exists(lorma_config, name) for name in embeddings):
                return  # adapted through the tie to that embedding (inject_adapter), as peft ties LoRA's
        r_key = get_pattern_key(lorma_config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(lorma_config.alpha_pattern.keys(), current_key)
        fused = lorma_config.fused_spec_for(current_key)
        kwargs = {
            "r": lorma_config.rank_pattern.get(r_key, lorma_config.r),
            "alpha": lorma_config.alpha_pattern.get(alpha_key, lorma_config.alpha),
            "inflation": lorma_config.inflation,
            "side": _resolve_side(lorma_config, target, current_key, fused),
            "dropout": lorma_config.dropout,
            "init_weights": lorma_config.init_weights,
            "fused": fused,
            "inference_mode": lorma_config.inference_mode,
            "max_dense_bytes": lorma_config.max_dense_bytes,
            "fft_chunk_bytes": lorma_config.fft_chunk_bytes,
            "variant": lorma_config.variant,
        }
        if isinstance(target, LormaLayer):
            target.update_layer(adapter_name, **kwargs)
            target.lorma_variant[adapter_name].configure(lorma_config)
            return
        new_module = self._create_new_module(lorma_config, adapter_name, target, current_key, **kwargs)
        new_module.lorma_variant[adapter_name].configure(lorma_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        lorma_config: LormaConfig, adapter_name: str, target: nn.Module, module_name: str, **kwargs: Any
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if quantized_kind(base) is not None:  # bitsandbytes Linear4bit / Linear8bitLt (subclasses of nn.Linear)
            return QuantLinear(target, adapter_name, module_name=module_name, **kwargs)
        if isinstance(base, CONV_TYPES):
            return Conv(target, adapter_name, module_name=module_name, **kwargs)
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, module_name=module_name, **kwargs)
        fan_in_fan_out = lorma_config.fan_in_fan_out
        if isinstance(base, Conv1D):  # stores its weight (d_in, d_out): unambiguous, no warning needed
            fan_in_fan_out = True
        elif isinstance(base, nn.Linear):
            if fan_in_fan_out and type(base) is nn.Linear:
                warnings.warn(
                    f"module {module_name!r} is an nn.Linear: fan_in_fan_out=True does not apply, using False",
                    stacklevel=2,
                )
                fan_in_fan_out = lorma_config.fan_in_fan_out = False
        else:
            raise ValueError(
                f"module {module_name!r} is a {type(base).__name__}: LoRMA adapts torch.nn.Linear, transformers "
                "Conv1D, torch.nn.Conv1d/2d/3d and torch.nn.Embedding layers only; remove it from target_modules"
            )
        return Linear(target, adapter_name, module_name=module_name, fan_in_fan_out=fan_in_fan_out, **kwargs)

    # ------------------------------------------------------------------ injection: parameters, tied weights
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's injection, then the weight ties.

        With ``target_parameters``, peft's check of ``rank_pattern`` / ``alpha_pattern`` keys (which looks at
        targeted modules only, and so flags keys meant for parameters) is made against both. With
        ``ensure_weight_tying`` the output layers sharing an adapted embedding's weight follow its transform
        (:func:`lorma.layers.tying.tie_output_layers`); without it, a warning for each adapted layer whose weight
        another module holds (merging it will be refused)."""
        config = self.peft_config[adapter_name]
        if not getattr(config, "target_parameters", None):
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"The following (rank|alpha)_pattern keys did not match",
                                        RuntimeWarning)
                super().inject_adapter(model, adapter_name, *args, **kwargs)
            targeted = [*self.targeted_module_names, *self.targeted_parameter_names]
            for attr in ("rank_pattern", "alpha_pattern", "side_pattern"):
                patterns = getattr(config, attr)
                unmatched = [key for key in patterns if not any(get_pattern_key([key], n) == key for n in targeted)]
                if unmatched:
                    warnings.warn(f"LoRMA {attr} keys {unmatched} match no targeted module or parameter",
                                  RuntimeWarning, stacklevel=2)
        if config.ensure_weight_tying:
            if not tying.tie_output_layers(model, adapter_name, self._replace_module):
                warnings.warn(
                    f"LoRMA adapter {adapter_name!r}: ensure_weight_tying=True, but no adapted embedding shares its "
                    "weight with another module",
                    stacklevel=2,
                )
        else:
            tying.warn_shared(model, adapter_name)

    def _check_tied_modules(self, model: nn.Module, peft_config: LormaConfig) -> None:
        """Nothing here: peft's check goes by module names; LoRMA's by the weight's identity (``inject_adapter``)."""

    def _check_merge_allowed(self) -> None:
        """Refuse to merge a layer whose weight another module holds and does not follow (tied weights)."""
        tying.refuse_shared_merges(self.model)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for module in self.model.modules():
            if isinstance(module, TiedLinear):
                module.tied_adapters.pop(adapter_name, None)

    def _inject_parameters(
        self, peft_config: LormaConfig, model: nn.Module, adapter_name: str, low_cpu_mem_usage: bool
    ) -> list[str]:
        """``target_parameters``: LoRMA on 2-D / 3-D parameters such as MoE expert weights
        (:mod:`lorma.layers.experts`), in place of peft's LoRA-only ``ParamWrapper`` machinery."""
        return inject_parameters(model, peft_config, adapter_name, self.peft_config, self.active_adapters)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(child, LormaExperts):  # unloading: the module that held the parameters has no .weight to hand
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    # ------------------------------------------------------------------ variants that act on the whole model
    # Each adapter's variant class says what it does per forward, to the loss and per optimizer step
    # (lorma.variants.LormaVariant's model-level hooks); plain LoRMA does nothing in any of them.
    def _active_variants(self) -> Iterator[tuple[str, LormaConfig, type[LormaVariant]]]:
        """``(adapter, config, variant class)`` for each active adapter, in activation order."""
        for adapter in self.active_adapters:
            config = self.peft_config.get(adapter)
            if config is not None:
                yield adapter, config, get_variant(config.variant)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Per forward of the whole model (peft's ``PeftModel`` enters this around every forward and generate):
        in training, each active adapter's variant acts before the forward
        (:meth:`~lorma.variants.LormaVariant.before_training_forward`: DyLoRMA draws one rank for all its layers);
        ``adapter_names=[...]`` (one adapter per row, :mod:`lorma.layers.mixed_batch`) is checked and handed to every
        adapted layer for the call."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            handles = install_adapter_names(self.model, LormaLayer, self.peft_config, adapter_names, args, kwargs)
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()
            return
        if self.model.training:
            for adapter, config, variant in self._active_variants():
                variant.before_training_forward(self.model, adapter, config)
        yield

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward; in training, what each active adapter's variant adds to the returned loss
        (:meth:`~lorma.variants.LormaVariant.training_loss`: AdaLoRMA's orthogonality regulariser).

        As with peft's AdaLoRA, this is the path of a ``PeftModel`` with a ``task_type`` (what a ``Trainer`` run
        builds); peft's plain ``PeftModel`` calls the base model directly and leaves the loss alone. Training only
        here (peft adds AdaLoRA's in eval too), so that eval losses stay comparable with other methods.
        """
        outputs = self.model.forward(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if self.model.training and isinstance(loss, torch.Tensor):
            for adapter, config, variant in self._active_variants():
                term = variant.training_loss(self.model, adapter, config)
                if term is not None:
                    outputs.loss = outputs.loss + term
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """What the active adapters' variants do after an optimizer step (peft's AdaLoRA name and call: AdaLoRMA's
        rank allocation, which records the per-module ranks in ``variant_options["final_ranks"]``).

        Call it after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (it may read the gradients), with
        the 0-based step; :class:`lorma.plumbing.callbacks.RankAllocationCallback` does so in a ``Trainer``. Each
        adapter's :meth:`~lorma.variants.LormaVariant.step_updater` is made on the first call and kept.
        """
        updaters = self.__dict__.setdefault("_step_updaters", {})
        due = [(adapter, config, variant) for adapter, config, variant in self._active_variants()
               if variant.updates_after_steps()]
        if not due:
            having = [name for name in variant_names() if get_variant(name).updates_after_steps()]
            raise ValueError(
                f"update_and_allocate: no active adapter has a variant that acts after optimizer steps (variants "
                f"that do: {having}; active: {list(self.active_adapters)})"
            )
        for adapter, config, variant in due:
            if adapter not in updaters:
                updaters[adapter] = variant.step_updater(self.model, adapter, config)
            if updaters[adapter] is not None:
                updaters[adapter](global_step)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        keep_autograd_path(model)  # QLoRMA: no frozen 4-bit layer may cut the gradient on the CPU

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain model.

        On a bitsandbytes 4/8-bit base (QLoRMA) the merged weight is re-quantized by default, so the model
        stays quantized; ``dequantize=True`` first replaces every quantized adapted layer by an fp32
        ``nn.Linear`` holding the dequantized weight and merges into that, returning float layers there.
        """
        if dequantize:
            for module in self.model.modules():
                if isinstance(module, QuantLinear) and module.quant_kind is not None:
                    if module.merged:
                        module.unmerge()
                    module.dequantize_base()
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: LormaConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to the model's, and refuse a checkpoint that does not fit the model.

        peft would load a mismatched checkpoint with ``strict=False`` (warning about missing keys) or fail
        deep inside ``load_state_dict``; a LoRMA checkpoint either fits every adapted module exactly or is
        refused here, naming the first modules that differ.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # lorma_A, lorma_B, and what a variant added (LormaLayer.adapter_parameters)
        names = {p for m in model.modules() if isinstance(m, LormaLayer) for p in m.adapter_layer_names}
        expected = {
            name: param
            for name, param in model.state_dict().items()
            if any(f".{p}.{adapter_name}" in name for p in names)
        }
        loaded = {k: v for k, v in remapped.items() if any(f".{p}." in k or k.endswith(f".{p}") for p in names)}
        missing = sorted(set(expected) - set(loaded))
        unexpected = sorted(set(loaded) - set(expected))
        problems: list[str] = []
        if missing:
            problems.append(f"{len(missing)} adapter tensors missing from the checkpoint (first: {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint tensors match no adapted module (first: {unexpected[0]})")
        for name in sorted(set(expected) & set(loaded)):
            if tuple(expected[name].shape) != tuple(loaded[name].shape):
                problems.append(
                    f"{name} has shape {tuple(loaded[name].shape)} in the checkpoint but "
                    f"{tuple(expected[name].shape)} in the model"
                )
                break
        if problems:
            raise ValueError(
                "LoRMA checkpoint does not fit this model (made for another base model or config?): "
                + "; ".join(problems)
            )
        return remapped

    # ------------------------------------------------------------------ adapter dtypes
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Adapter dtypes as peft's LoRA has them: float32 by default, the base layer's dtype if asked.

        peft calls this after creating or loading an adapter (``get_peft_model``, ``add_adapter``,
        ``PeftModel.from_pretrained``, ``load_adapter``). LoRMA layers create their adapters in float32 (so that
        the identity initialisation is computed exactly); with ``autocast_adapter_dtype=False`` they are then
        rounded once to a float16 / bfloat16 base layer's dtype, as users of large models expect. Quantized
        (bitsandbytes) bases keep float32 adapters, as peft's LoRA does.
        """
        if autocast_adapter_dtype:
            super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=True)  # upcasts fp16 / bf16 to fp32
            return
        for module in self.model.modules():
            if not isinstance(module, LormaLayer) or adapter_name not in module.lorma_A:
                continue
            base = module.get_base_layer()
            weight = module.get_param() if isinstance(module, LormaExperts) else getattr(base, "weight", None)
            base_dtype = getattr(weight, "dtype", None)
            if base_dtype not in (torch.float16, torch.bfloat16):
                continue
            for params in (getattr(module, name) for name in module.adapter_layer_names):
                if adapter_name in params and params[adapter_name].dtype != base_dtype:
                    params[adapter_name] = params[adapter_name].to(base_dtype)

    # ------------------------------------------------------------------ adapter arithmetic
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        **lora_only_options: Any,
    ) -> None:
        """A new adapter ``adapter_name`` combining adapters exactly (peft's ``add_weighted_adapter``).

        The adapters' inflation does the algebra (:meth:`lorma.inflations.Inflation.combine`); LoRMA+ offers:

        - ``"linear"`` (default): ``I + sum_i w_i s_i B_i A_i``, rank ``sum_i r_i``. With weights 1 its weight
          update is the sum of the adapters' updates (task arithmetic, what LoRA's default computes).
        - ``"product"``: the composition ``prod_i (I + w_i s_i B_i A_i)`` that activating (or merging) the
          adapters in the given order computes; rank ``sum_i r_i``, exactly (:func:`lorma.functional.compose`).

        The new adapter has ``alpha = r`` per module (its scaling is 1, folded into ``B``); a module adapted by
        only some of the adapters combines those. It is added inactive, like peft's. Only adapters of one
        inflation, on one side, whose inflation keeps the combination exact, combine: ``pi`` and ``none``
        transforms are dense, and their products and sums are not transforms of the same kind (nor of low rank),
        so they are refused with a ``ValueError``, as are adapters with a variant. peft's LoRA-only options
        (``svd_rank``, ``density``, ...) are refused unless left at peft's defaults.
        """
        self._check_weighted_adapter_args(adapters, weights, adapter_name, combination_type, lora_only_options)
        configs = [self.peft_config[name] for name in adapters]

        # every module adapted by any of them: its new (B, A) and dtype, computed before anything is changed
        combined: dict[str, tuple[Pair, torch.dtype]] = {}
        fused_parts: dict[str, dict[str, Any]] = {}
        sides_of: dict[str, str] = {}
        for key, layer in self.model.named_modules():
            if not isinstance(layer, LormaLayer):
                continue
            present = [(name, float(w)) for name, w in zip(adapters, weights) if name in layer.lorma_A]
            if not present:
                continue
            specs = {name: layer.fused[name] for name, _ in present}
            if len({None if f is None else (f[0], tuple(f[1])) for f in specs.values()}) > 1:
                raise ValueError(
                    f"LoRMA add_weighted_adapter: module {key!r} has different fused parts in the adapters "
                    f"({specs}); only adapters that adapt the same parts combine"
                )
            module_sides = {name: layer.side[name] for name, _ in present}
            if len(set(module_sides.values())) > 1:  # possible with side="auto": compared per module
                raise ValueError(
                    f"LoRMA add_weighted_adapter: module {key!r} is adapted on different sides {module_sides} "
                    "(I1 W0 I2 is not one adapter); only adapters on the same side combine"
                )
            side = module_sides[present[0][0]]
            sides_of[key] = side
            fused = specs[present[0][0]]
            if fused is not None:
                fused_parts[re.escape(key)] = {"num_parts": fused[0], "parts": list(fused[1])}
            terms = [
                (layer.lorma_A[name].detach().double(), layer.lorma_B[name].detach().double(), layer.scaling[name], w)
                for name, w in present
            ]
            inflation = layer.lorma_variant[present[0][0]].inflation
            combined[key] = (inflation.combine(terms, combination_type, side), layer.lorma_A[present[0][0]].dtype)

        ranks = {key: pair[1].shape[-2] for key, (pair, _) in combined.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {re.escape(key): rank for key, rank in ranks.items() if rank != r}
        donors = [name for name in adapters if self._modules_to_save_of(name)]
        self.peft_config[adapter_name] = dataclasses.replace(
            configs[0],
            r=r,
            alpha=float(r),
            rank_pattern=pattern,
            alpha_pattern={key: float(rank) for key, rank in pattern.items()},
            target_modules=set(combined),
            exclude_modules=None,
            layers_to_transform=None,
            layers_pattern=None,
            fused_parts=fused_parts or None,
            # the combination acts on each module's side; with "auto" (or mixed settings) recorded per module
            side=configs[0].side if len({c.side for c in configs}) == 1 else "auto",
            side_pattern={re.escape(key): side for key, side in sides_of.items()}
            if any(c.side == "auto" for c in configs)
            else {},
            init_weights=True,
            modules_to_save=self.peft_config[donors[0]].modules_to_save if donors else None,
        )
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        _freeze_adapter(self.model, adapter_name)

        layers = dict(self.model.named_modules())
        with torch.no_grad():
            for key, ((x, y), dtype) in combined.items():
                layers[key].lorma_B[adapter_name].data = x.to(dtype).contiguous()
                layers[key].lorma_A[adapter_name].data = y.to(dtype).contiguous()
            if donors:  # the one adapter that trained a head (say) gives it to the combination
                for wrapper in self._modules_to_save_of(donors[0]):
                    wrapper.modules_to_save[adapter_name].load_state_dict(
                        wrapper.modules_to_save[donors[0]].state_dict()
                    )

    def _modules_to_save_of(self, adapter: str) -> list[ModulesToSaveWrapper]:
        return [
            m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save
        ]

    def _check_weighted_adapter_args(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str,
        lora_only_options: dict[str, Any],
    ) -> None:
        """Refuse, before anything is changed, whatever LoRMA cannot combine exactly, saying what is supported."""
        where = f"LoRMA add_weighted_adapter({list(adapters)!r} -> {adapter_name!r})"
        # what the registered inflations combine exactly (LoRMA+: 'linear' and 'product')
        combinable = {name: get_inflation(name).combination_types for name in inflation_names()}
        combinable = {name: types for name, types in combinable.items() if types}
        supported = "supported: " + "; ".join(
            f"combination_type {' or '.join(map(repr, types))} of inflation={name!r} adapters"
            for name, types in combinable.items()
        )
        supported += " without a variant, on the same side"
        if not any(combination_type in types for types in combinable.values()):
            raise ValueError(
                f"{where}: combination_type {combination_type!r} is not available for LoRMA; {supported} "
                "(all exact: peft's SVD, TIES, DARE and magnitude pruning act on LoRA's additive update)"
            )
        given = {
            k: v for k, v in lora_only_options.items() if k not in LORA_ONLY_DEFAULTS or v != LORA_ONLY_DEFAULTS[k]
        }
        if given:
            raise ValueError(f"{where}: options {sorted(given)} are LoRA-only and do not apply to LoRMA; {supported}")
        if not adapters:
            raise ValueError(f"{where}: no adapters given")
        missing = [name for name in adapters if name not in self.peft_config]
        if missing:
            raise ValueError(f"{where}: no adapter named {missing} (have {sorted(self.peft_config)})")
        on_parameters = [name for name in adapters if getattr(self.peft_config[name], "target_parameters", None)]
        if on_parameters:
            raise ValueError(f"{where}: adapters {on_parameters} adapt target_parameters (expert weights), which "
                             "add_weighted_adapter does not combine (as peft's LoRA)")
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"{where}: an adapter is named twice")
        if adapter_name in self.peft_config:
            raise ValueError(f"{where}: an adapter named {adapter_name!r} already exists")
        if len(weights) != len(adapters) or not all(
            isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise ValueError(f"{where}: weights must be {len(adapters)} finite numbers, got {weights!r}")
        inflations = {name: self.peft_config[name].inflation for name in adapters}
        refused = {
            name: inflation
            for name, inflation in inflations.items()
            if combination_type not in get_inflation(inflation).combination_types
        }
        if refused:
            raise ValueError(
                f"{where}: adapters with inflation {refused} cannot be combined: their transforms' "
                f"{'products' if combination_type == 'product' else 'sums'} are no longer adapters of that kind "
                f"(pi and none transforms are dense d x d maps); {supported}"
            )
        if len(set(inflations.values())) > 1:
            raise ValueError(f"{where}: adapters have different inflations {inflations}; {supported}")
        variants = {name: self.peft_config[name].variant for name in adapters if self.peft_config[name].variant}
        if variants:
            raise ValueError(f"{where}: adapters with a variant {variants} cannot be combined; {supported}")
        sides = {name: self.peft_config[name].side for name in adapters}
        if len(set(sides.values())) > 1 and "auto" not in sides.values():  # with "auto": checked per module
            raise ValueError(
                f"{where}: adapters act on different sides {sides} (I1 W0 I2 is not one adapter); {supported}"
            )
        donors = [name for name in adapters if self._modules_to_save_of(name)]
        if len(donors) > 1:
            raise ValueError(
                f"{where}: adapters {donors} each train their own modules_to_save, which cannot be combined; "
                "at most one of the combined adapters may have modules_to_save"
            )


def _resolve_side(config: LormaConfig, target: nn.Module, module_name: str, fused: tuple[int, list[int]] | None) -> str:
    """The side of one module; with ``side="auto"`` resolved from its shape and recorded in ``side_pattern``.

    Recording the full module name makes the choice part of the saved adapter config, so a reloaded adapter gets
    the sides it was trained with whatever the resolution rule (or the model's shapes) later say.
    """
    if config.side != "auto" and not config.side_pattern:
        return config.side
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, Conv1D):  # stores its weight (d_in, d_out)
        d_in, d_out = base.weight.shape
    elif isinstance(base, nn.Linear):
        d_in, d_out = base.in_features, base.out_features
    elif isinstance(base, CONV_TYPES):  # the transforms act on the channels
        d_in, d_out = base.in_channels, base.out_channels
    elif isinstance(base, nn.Embedding):  # adapted on the embedding dimension only: "auto" is the pre side
        key = get_pattern_key(config.side_pattern.keys(), module_name)
        side = config.side_pattern.get(key, "pre" if config.side == "auto" else config.side)
        if config.side == "auto":
            config.side_pattern.setdefault(re.escape(module_name), side)
        return side
    else:  # _create_new_module refuses it with a clear error
        return config.side
    side = config.side_for(module_name, int(d_in), int(d_out), fused[0] if fused is not None else 1)
    if config.side == "auto":
        config.side_pattern.setdefault(re.escape(module_name), side)
    return side
