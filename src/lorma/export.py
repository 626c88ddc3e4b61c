"""A LoRMA adapter as a standard peft LoRA adapter, for the serving stacks that load LoRA adapters only.

vLLM, TGI, llama.cpp and multi-adapter servers load peft LoRA adapters (``adapter_config.json`` with
``peft_type: LORA``, ``lora_A`` / ``lora_B`` tensors), and a LoRA update is ``W - W0 = s_L B_L A_L``. For every
adapted module this writes factors with ``B_L A_L = W - W0`` of the LoRMA adapter (at ``lora_alpha = r``, so
``s_L = 1``):

- ``plus`` (LoRMA+): exact, rank ``r`` (:func:`lorma.functional.plus_weight_update`): pre side
  ``B_L = s B``, ``A_L = A W0``; post side ``B_L = s W0 B``, ``A_L = A``. A fused projection (GPT-2's
  ``c_attn``) gets one block per adapted part, zero rows for the parts that are not adapted: rank
  ``r x parts``.
- ``pi`` / ``none``: ``W - W0`` is full rank in general (paper Table 15), so the factors are its truncated SVD
  at a rank the user gives, or the smallest rank per module whose relative error
  ``||dW - B_L A_L||_F / ||dW||_F`` stays within a bound the user gives. Lossy, so refused unless asked for.

All modules share one rank (the largest; smaller ones are padded with zeros, which changes nothing) and no
``rank_pattern`` / ``alpha_pattern`` is written: the plainest form of a LoRA adapter, so that loaders which read
only ``r`` and ``lora_alpha`` load it too. ``modules_to_save`` (a classification head, say) are
copied as they are. The result loads with plain peft, without ``lorma`` installed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.other import AuxiliaryTrainingWrapper
from transformers.pytorch_utils import Conv1D

from .inflations import get_inflation
from .layer import LormaLayer
from .variants import DyLormaVariant, LormaVariant, get_variant

EXPORT_REPORT_FILE = "lorma_export.json"
# a truncation whose relative error is at most this is exact to float32 rounding (the factors are stored in fp32)
EXACT_RELATIVE_ERROR = 1e-6


@dataclass
class ModuleExport:
    """How one adapted module was exported."""

    module: str
    rank: int  # rank of its LoRA factors (before the zero padding to the adapter's common rank)
    relative_error: float  # ||dW - B_L A_L||_F / ||dW||_F, dW = W - W0 of the LoRMA adapter
    method: str  # "exact" (plus) or "svd" (pi / none)


class ExportError(ValueError):
    """The adapter cannot be exported as asked (the message says why and what to give instead).

    ``modules``: for a refused lossy export, what each module's export would have been.
    """

    def __init__(self, message: str, modules: list[ModuleExport] | None = None) -> None:
        super().__init__(message)
        self.modules = modules or []


@dataclass
class LoraExport:
    """An exported LoRA adapter: its peft config, its tensors (peft's saved key names), and the per-module report."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    modules: list[ModuleExport]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    @property
    def exact(self) -> bool:
        """Every module's update reproduced to float32 rounding."""
        return self.max_relative_error <= EXACT_RELATIVE_ERROR

    def report(self) -> dict[str, Any]:
        """What ``lorma_export.json`` holds."""
        return {
            "format": "lora",
            "source": self.source,
            "r": self.config.r,
            "exact": self.exact,
            "max_relative_error": self.max_relative_error,
            "modules": [asdict(m) for m in self.modules],
        }

    def table(self) -> str:
        """The per-module rank and relative error, as printed by ``lorma export``."""
        return format_table(self.modules)

    def save(self, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and ``lorma_export.json`` atomically."""
        from safetensors.torch import save_file

        from .fileio import atomic_write_json, staged_directory

        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise ExportError(f"output directory {out} exists and is not empty; give --overwrite")
        with staged_directory(out) as tmp:  # an existing directory is replaced only once the new one is complete
            self.config.save_pretrained(str(tmp))
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict.items()}
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            atomic_write_json(tmp / EXPORT_REPORT_FILE, self.report())
        return out


def format_table(modules: list[ModuleExport]) -> str:
    """One line per module: name, rank, relative error of its update, how it was exported."""
    width = max([len("module")] + [len(m.module) for m in modules])
    lines = [f"{'module':<{width}}  rank  relative error  method"]
    lines += [f"{m.module:<{width}}  {m.rank:>4}  {m.relative_error:>14.3e}  {m.method}" for m in modules]
    return "\n".join(lines)


def _truncated_svd(
    delta: torch.Tensor, rank: int | None, max_error: float | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(U, V, relative error)`` with ``U V`` the best approximation of ``delta`` (Eckart-Young) at the chosen rank.

    The rank is ``rank`` (capped at the matrix's size) or the smallest whose relative Frobenius error is at most
    ``max_error``. The singular values are split evenly between the factors (``U sqrt(S)``, ``sqrt(S) V^T``), as a
    LoRA trained from there would want them balanced.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    energy = s.square()
    total = energy.sum()
    if total == 0:
        return delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0, delta.shape[1]), 0.0
    # tail[k] = energy left out when keeping k singular values (k = 0 .. n)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    errors = (tail / total).clamp_min(0).sqrt()
    if rank is not None:
        k = min(rank, s.numel())
    else:
        k = int(torch.nonzero(errors <= max_error)[0].item())
    root = s[:k].sqrt()
    return u[:, :k] * root, root.unsqueeze(1) * vh[:k], float(errors[k])


def _module_factors(
    key: str, layer: LormaLayer, adapter: str, rank: int | None, max_error: float | None
) -> tuple[torch.Tensor, torch.Tensor, ModuleExport]:
    """LoRA factors ``(B_L, A_L)`` (``nn.Linear`` layout, float64) of one module's update, and its report line."""
    weight = layer.weight_linear().detach().double()
    variant = layer.lorma_variant[adapter]
    factors = variant.lora_factors(layer, adapter, weight)  # the inflation's exact factors, when it has them
    if factors is not None:
        b_lora, a_lora = factors
        return b_lora, a_lora, ModuleExport(key, a_lora.shape[0], 0.0, "exact")
    delta = variant.delta_weight(layer, adapter, weight)  # (I(BA) - I) W0 or W0 (I(BA) - I), zero rows elsewhere
    b_lora, a_lora, error = _truncated_svd(delta, rank, max_error)
    return b_lora, a_lora, ModuleExport(key, a_lora.shape[0], error, "svd")


def lora_export(
    model: Any,
    adapter_name: str = "default",
    rank: int | None = None,
    max_error: float | None = None,
    allow_approximate: bool = False,
) -> LoraExport:
    """The LoRA adapter equivalent to LoRMA adapter ``adapter_name`` of ``model`` (a peft model with LoRMA).

    ``plus`` adapters are exported exactly (``rank`` / ``max_error`` do not apply to them). ``pi`` / ``none``
    need ``rank`` or ``max_error`` (one of them) and, when the truncation loses more than float32 rounding,
    ``allow_approximate=True``; otherwise an :class:`ExportError` says how far from exact each module would be.
    """
    peft_model = model if isinstance(model, PeftModel) else None
    tuner = model.base_model if peft_model is not None else model
    configs = getattr(tuner, "peft_config", {})
    if adapter_name not in configs:
        raise ExportError(f"no adapter named {adapter_name!r} (have {sorted(configs)})")
    config = configs[adapter_name]
    inflation = getattr(config, "inflation", None)
    if inflation is None:
        raise ExportError(f"adapter {adapter_name!r} is a {config.peft_type} adapter, not a LoRMA one")
    if getattr(config, "target_parameters", None):
        raise ExportError(
            f"adapter {adapter_name!r} adapts expert parameters (target_parameters), which lorma export does not "
            "write as LoRA; merge it (lorma merge) to serve it"
        )
    variant = getattr(config, "variant", None)
    check_options(adapter_name, inflation, rank, max_error, variant)

    layers = [
        (key, m) for key, m in tuner.model.named_modules() if isinstance(m, LormaLayer) and adapter_name in m.lorma_A
    ]
    if not layers:
        raise ExportError(f"adapter {adapter_name!r} adapts no module of this model")
    if any(m.merged for _, m in layers):
        raise ExportError("the adapter is merged into the base weights (W0 is not available): unmerge it first")
    nested = [layer.lorma_variant[adapter_name] for _, layer in layers if variant == DyLormaVariant.name]
    if nested and rank is not None and rank > config.r:  # DyLoRMA: the rank-b truncation, exact up to r
        raise ExportError(f"adapter {adapter_name!r}: --rank {rank} is above the DyLoRMA adapter's r={config.r}")
    previous = [v.inference_rank for v in nested]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: list[ModuleExport] = []
    conv1d = False
    try:
        for v in nested:
            v.inference_rank = rank if rank is not None else v.inference_rank
        with torch.no_grad():
            for key, layer in layers:
                b_lora, a_lora, line = _module_factors(key, layer, adapter_name, None if nested else rank, max_error)
                factors[key] = (b_lora, a_lora)
                modules.append(line)
                conv1d = conv1d or isinstance(layer.get_base_layer(), Conv1D)
    finally:
        for v, before in zip(nested, previous):
            v.inference_rank = before

    lossy = [m for m in modules if m.relative_error > EXACT_RELATIVE_ERROR]
    if lossy and not allow_approximate:
        worst = max(lossy, key=lambda m: m.relative_error)
        raise ExportError(
            f"this export is lossy: {len(lossy)} of {len(modules)} modules lose more than float32 rounding "
            f"(worst {worst.module}: relative error {worst.relative_error:.3g} at rank {worst.rank}), because a "
            f"{inflation!r} adapter's update is full rank and LoRA keeps only the top singular directions; give "
            "--allow-approximate to write it anyway, or a larger --rank / smaller --max-error",
            modules,
        )

    common_rank = max(1, max(m.rank for m in modules))
    state: dict[str, torch.Tensor] = {}
    for key, (b_lora, a_lora) in factors.items():
        pad = common_rank - a_lora.shape[0]
        b_full = torch.cat([b_lora, b_lora.new_zeros(b_lora.shape[0], pad)], dim=1)
        a_full = torch.cat([a_lora, a_lora.new_zeros(pad, a_lora.shape[1])], dim=0)
        state[f"base_model.model.{key}.lora_A.weight"] = a_full.float().contiguous()
        state[f"base_model.model.{key}.lora_B.weight"] = b_full.float().contiguous()
    if peft_model is not None:  # modules_to_save (a trained head), under the key names peft saves them with
        adapter_tensors = {p for _, m in layers for p in m.adapter_layer_names}
        for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items():
            if not any(f".{p}" in key for p in adapter_tensors):
                state[key] = value.detach().clone()

    lora_config = LoraConfig(
        r=common_rank,
        lora_alpha=common_rank,
        target_modules=_lora_targets(config, tuner.model, set(factors)),
        lora_dropout=float(config.dropout),
        fan_in_fan_out=conv1d,
        bias="none",
        modules_to_save=list(dict.fromkeys(config.modules_to_save)) if config.modules_to_save else None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    source = {"inflation": inflation, "side": config.side, "r": config.r, "alpha": config.alpha}
    return LoraExport(config=lora_config, state_dict=state, modules=modules, source=source)


def check_options(
    adapter_name: str, inflation: str, rank: int | None, max_error: float | None, variant: str | None = None
) -> None:
    """Refuse options that do not fit the adapter's inflation (and variant), before any work.

    A DyLoRMA adapter (nested ranks) takes ``--rank b`` as the truncation to export, exactly; a variant that merges
    its own way (DoRMA's per-row rescaling) has a full-rank update whatever the inflation.
    """
    if rank is not None and max_error is not None:
        raise ExportError("give --rank or --max-error, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ExportError(f"--rank must be a positive integer, got {rank!r}")
    if max_error is not None and not (isinstance(max_error, (int, float)) and 0 <= max_error < 1):
        raise ExportError(f"--max-error must be a relative error in [0, 1), got {max_error!r}")
    try:
        exact_kind = get_inflation(inflation).exact_lora_export
        variant_cls = get_variant(variant)
    except ValueError as err:
        raise ExportError(f"adapter {adapter_name!r}: {err}") from None
    if variant_cls is DyLormaVariant:
        if max_error is not None:
            raise ExportError(f"adapter {adapter_name!r} is DyLoRMA (nested ranks): --rank b picks the rank to "
                              "export exactly; --max-error does not apply")
        return
    kind = f"inflation {inflation!r}"
    own_merge = variant_cls.delta_weight is not LormaVariant.delta_weight
    if own_merge and variant_cls.lora_factors is LormaVariant.lora_factors:
        exact_kind, kind = False, f"{kind} with variant {variant!r}"
    if exact_kind and (rank is not None or max_error is not None):
        raise ExportError(
            f"adapter {adapter_name!r} has {kind} (LoRMA+): its update is exactly a rank-r LoRA "
            "update and is exported as such; --rank / --max-error apply to adapters with a full-rank update "
            "(pi, none)"
        )
    if not exact_kind and rank is None and max_error is None:
        raise ExportError(
            f"adapter {adapter_name!r} has {kind}: its update W - W0 is full rank, so a LoRA "
            "adapter can only approximate it (a truncated SVD per module); give --rank K or --max-error E, "
            "and --allow-approximate"
        )


def _lora_targets(config: Any, model: torch.nn.Module, adapted: set[str]) -> list[str] | str:
    """The LoRMA config's target spec if, under LoRA's matching, it selects exactly the adapted modules; else names.

    The short spec (``["q_proj", "v_proj"]``) is what serving stacks expect; the full module names are the
    fallback when a spec (a regex, say) would select other modules of the base model under LoRA.
    """
    spec = config.target_modules
    if spec is None:
        return sorted(adapted)
    probe = LoraConfig(
        target_modules=spec if isinstance(spec, str) else sorted(spec),
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )
    # module names as the plain base model has them: skip what peft's wrappers hold inside
    wrappers = [key for key, m in model.named_modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    names = [key for key, _ in model.named_modules() if key and not any(key.startswith(w + ".") for w in wrappers)]
    matched = {key for key in names if check_target_module_exists(probe, key)}
    if matched != adapted:
        return sorted(adapted)
    return probe.target_modules if isinstance(probe.target_modules, str) else sorted(probe.target_modules)
