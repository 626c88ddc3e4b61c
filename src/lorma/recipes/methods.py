"""Building the model to train for a method name: LoRMA (plus / pi / none, pre / post), its variants (DoRMA,
AdaLoRMA, DyLoRMA: docs/variants.md), LoRA, DoRA, AdaLoRA, and the paper's non-adapter baselines (full
fine-tuning, BitFit, head only).

Adapters go through peft (``get_peft_model``), so saving, loading and merging are peft's; the head of the
task (e.g. a classifier) is trained in full and saved with the adapter through ``modules_to_save``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorma.plumbing.errors import InputError
from lorma.recipes.config import RunConfig
from lorma.runs.method_registry import AdapterSettings, get_method

# Training one float32 parameter with AdamW holds the weight, its gradient and AdamW's two moments (16 bytes),
# and AdamW's multi-tensor update allocates a working copy of the size of the parameters (4 more).
BYTES_PER_TRAINED_PARAMETER = 20


def default_target_modules(model: Any) -> list[str]:
    """The paper's adapted modules for the model's type (query and value for BERT / RoBERTa, ...)."""
    from lorma import DEFAULT_TARGET_MODULES

    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise InputError(
            f"no default target modules for model type '{model_type}'; name them with --target-modules"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def _check_targets(model: Any, targets: list[str]) -> None:
    """Every target name must match a module, or the adapter would silently adapt less than asked."""
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(_matches(name, [target]) for name in names):
            raise InputError(f"target module '{target}' matches no module of {type(model).__name__}")


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def adapter_parameter_count(model: Any, cfg: RunConfig) -> tuple[int, int]:
    """``(parameters, modules)`` the adapter of ``cfg.method`` would add to ``model``, from the target modules'
    shapes alone (before anything is allocated): ``2 r d`` per LoRMA transform (``d = d_out`` pre, ``d_in``
    post, one transform per adapted part of a fused projection), ``r (d_in + d_out)`` for LoRA (plus the
    ``d_out`` magnitudes of DoRA and DoRMA), at the initial ``1.5 r`` of a rank budget (AdaLoRMA, AdaLoRA).
    ``(0, 0)`` for the non-adapter methods. ``side="auto"`` is resolved per module as the layer will resolve it
    (:func:`lorma.config.cheaper_side`)."""
    method = get_method(cfg.method)
    if not method.adapter:
        return 0, 0
    from lorma.config import cheaper_side

    targets = cfg.target_modules or default_target_modules(model)
    r = cfg.r + cfg.r // 2 if method.rank_budget else cfg.r
    magnitudes = method.name == "dora" or method.variant == "dorma"
    fused: dict[str, Any] = {}
    # the tuner adapts parts of a fused projection by the model type's default (AdaLoRMA: whole layers)
    if method.inflation is not None and not method.rank_budget:
        from lorma import DEFAULT_FUSED_PARTS

        fused = DEFAULT_FUSED_PARTS.get(getattr(model.config, "model_type", ""), {})
    params = modules = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not _matches(name, targets) or getattr(weight, "ndim", 0) != 2:
            continue
        d_out, d_in = weight.shape
        if type(module).__name__ == "Conv1D":  # transformers' Conv1D stores (d_in, d_out)
            d_out, d_in = d_in, d_out
        modules += 1
        if method.inflation is not None:
            spec = next((v for k, v in fused.items() if _matches(name, [k])), None)
            num_parts = spec["num_parts"] if spec is not None else 1
            side = cheaper_side(d_in, d_out, num_parts) if cfg.side == "auto" else cfg.side
            # one transform per adapted part; on the pre side, of the part's size
            transforms = len(spec["parts"]) if spec is not None else 1
            d = d_out // num_parts if side == "pre" else d_in
            params += transforms * 2 * r * d
        else:
            params += r * (d_in + d_out)
        params += d_out if magnitudes else 0
    return params, modules


def available_memory(cfg: RunConfig) -> tuple[int, str]:
    """Bytes free where training will run, and what that memory is (GPU memory, or the machine's RAM)."""
    import torch

    if torch.cuda.is_available() and not cfg.training.get("use_cpu"):
        free, _ = torch.cuda.mem_get_info()
        return int(free), "free GPU memory"
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available memory"
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available memory"


def check_adapter_fits(model: Any, cfg: RunConfig) -> None:
    """Refuse an adapter whose training state cannot fit in memory (``--r 100000``), naming its size, before it
    is built: otherwise it dies of an out-of-memory error in the middle of a step."""
    params, modules = adapter_parameter_count(model, cfg)
    if not params:
        return
    need = params * BYTES_PER_TRAINED_PARAMETER
    free, what = available_memory(cfg)
    if need > free:
        raise InputError(
            f"the {cfg.method} adapter at r={cfg.r} would have {params:,} trainable parameters in {modules} modules: "
            f"about {need / 1e9:.1f} GB to train in float32 (weights, gradients, AdamW state), more than the "
            f"{free / 1e9:.1f} GB of {what}; lower --r"
        )


def build_method_model(model: Any, cfg: RunConfig, head_modules: list[str], peft_task_type: str | None) -> Any:
    """Wrap or freeze ``model`` for ``cfg.method``; returns the model to train (a PeftModel for adapters).

    LoRMA on a fused projection (GPT-2's ``c_attn``) adapts the parts the tuner's default names for the model type
    (:data:`lorma.config.DEFAULT_FUSED_PARTS`): it is stated there only.
    """
    method = get_method(cfg.method)
    modules_to_save = cfg.modules_to_save if cfg.modules_to_save is not None else list(head_modules)
    if method.peft_config is not None:
        from peft import get_peft_model

        from lorma.plumbing.quiet import known_warnings_ignored

        targets = cfg.target_modules or default_target_modules(model)
        _check_targets(model, targets)
        settings = AdapterSettings(r=cfg.r, alpha=cfg.alpha, target_modules=targets, dropout=cfg.dropout,
                                   modules_to_save=modules_to_save or None, task_type=peft_task_type,
                                   options={"side": cfg.side} if "side" in method.options else {},
                                   max_steps=int(cfg.training_arguments().get("max_steps", -1) or -1))
        try:
            with known_warnings_ignored():  # peft's deprecated transformers call, not the user's (plumbing.quiet)
                return get_peft_model(model, method.peft_config(settings))
        except ValueError as err:
            raise InputError(f"cannot build the {method.name} adapter: {err}") from None
    assert method.trains is not None  # a method is an adapter or says which parameters train
    for name, param in model.named_parameters():
        param.requires_grad_(bool(method.trains(name, modules_to_save)))
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError(f"method {method.name} leaves no trainable parameter (head modules: {modules_to_save})")
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (peft's own count for adapters, so both agree)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return int(trainable), int(total)
