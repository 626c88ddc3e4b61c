"""``LormaModel``: the peft tuner that swaps target modules for LoRMA layers."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DEFAULT_FUSED_PARTS, DEFAULT_TARGET_MODULES, LormaConfig
from .layer import Linear, LormaLayer


class LormaModel(BaseTuner):
    """Low-Rank Multiplicative Adaptation of a transformers (or any torch) model.

    Use it through peft: ``get_peft_model(model, LormaConfig(...))``. Each target ``nn.Linear`` / ``Conv1D``
    becomes a :class:`lorma.layer.Linear` computing ``I(BA) W0 x + b`` (pre) or ``W0 I(BA) x + b`` (post).
    """

    prefix: str = "lorma_"
    tuner_layer_cls = LormaLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config: LormaConfig, model_config: dict) -> LormaConfig:
        model_type = model_config.get("model_type")
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
        r_key = get_pattern_key(lorma_config.rank_pattern.keys(), current_key)
        alpha_key = get_pattern_key(lorma_config.alpha_pattern.keys(), current_key)
        kwargs = {
            "r": lorma_config.rank_pattern.get(r_key, lorma_config.r),
            "alpha": lorma_config.alpha_pattern.get(alpha_key, lorma_config.alpha),
            "inflation": lorma_config.inflation,
            "side": lorma_config.side,
            "dropout": lorma_config.dropout,
            "init_weights": lorma_config.init_weights,
            "fused": lorma_config.fused_spec_for(current_key),
            "inference_mode": lorma_config.inference_mode,
        }
        if isinstance(target, LormaLayer):
            target.update_layer(adapter_name, **kwargs)
            return
        new_module = self._create_new_module(lorma_config, adapter_name, target, current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trained
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        lorma_config: LormaConfig, adapter_name: str, target: nn.Module, module_name: str, **kwargs: Any
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        from .bnb import QuantLinear, quantized_kind

        if quantized_kind(base) is not None:  # bitsandbytes Linear4bit / Linear8bitLt (subclasses of nn.Linear)
            return QuantLinear(target, adapter_name, module_name=module_name, **kwargs)
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
                f"module {module_name!r} is a {type(base).__name__}: LoRMA adapts torch.nn.Linear and "
                "transformers Conv1D layers only; remove it from target_modules"
            )
        return Linear(target, adapter_name, module_name=module_name, fan_in_fan_out=fan_in_fan_out, **kwargs)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        from .bnb import keep_autograd_path

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
            from .bnb import QuantLinear

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
        expected = {
            name: param
            for name, param in model.state_dict().items()
            if any(f".{p}.{adapter_name}" in name for p in LormaLayer.adapter_layer_names)
        }
        loaded = {
            k: v
            for k, v in remapped.items()
            if any(f".{p}." in k or k.endswith(f".{p}") for p in LormaLayer.adapter_layer_names)
        }
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
