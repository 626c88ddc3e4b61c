"""Building the model to train for a method name: LoRMA (plus / pi / none, pre / post), its variants (DoRMA,
AdaLoRMA, DyLoRMA: docs/variants.md), LoRA, DoRA, AdaLoRA, and the paper's non-adapter baselines (full
fine-tuning, BitFit, head only).

Adapters go through peft (``get_peft_model``), so saving, loading and merging are peft's; the head of the
task (e.g. a classifier) is trained in full and saved with the adapter through ``modules_to_save``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorma.recipes.config import ADAPTER_METHODS, RecipeError, RunConfig

LORMA_INFLATION = {"lorma-plus": "plus", "lorma-pi": "pi", "lorma-none": "none"}
# the LoRMA variants (docs/variants.md): method -> (inflation, LormaConfig.variant)
LORMA_VARIANTS = {
    "dorma-plus": ("plus", "dorma"),
    "dorma-pi": ("pi", "dorma"),
    "adalorma": ("plus", "adalorma"),
    "dylorma": ("plus", "dylorma"),
}
# methods with an AdaLoRA rank budget (they need lorma.callbacks.RankAllocationCallback in training)
RANK_BUDGET_METHODS = ("adalorma", "adalora")


def rank_budget(cfg: RunConfig) -> dict[str, int]:
    """AdaLoRA's budget and schedule for ``adalorma`` / ``adalora``, the same for both: start at ``1.5 r`` per
    module and prune to ``r`` on average (the final budget of a rank-``r`` LoRA, AdaLoRA's comparison), at full
    budget for the first 10% of the steps, at the final one for the last 20%, reallocating every step."""
    total = int(cfg.training_arguments().get("max_steps", -1) or -1)
    if total <= 0:
        raise RecipeError(f"method {cfg.method} needs --max-steps: its rank budget falls on a schedule over the steps")
    if cfg.r < 2:
        raise RecipeError(f"method {cfg.method} needs r >= 2 (it prunes from 1.5 r down to r), got {cfg.r}")
    return {
        "init_r": cfg.r + cfg.r // 2, "target_r": cfg.r, "tinit": total // 10, "tfinal": total // 5, "deltaT": 1,
        "total_step": total,
    }

# Training one float32 parameter with AdamW holds the weight, its gradient and AdamW's two moments (16 bytes),
# and AdamW's multi-tensor update allocates a working copy of the size of the parameters (4 more).
BYTES_PER_TRAINED_PARAMETER = 20


def default_target_modules(model: Any) -> list[str]:
    """The paper's adapted modules for the model's type (query and value for BERT / RoBERTa, ...)."""
    from lorma import DEFAULT_TARGET_MODULES

    model_type = getattr(model.config, "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise RecipeError(
            f"no default target modules for model type '{model_type}'; name them with --target-modules"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def _check_targets(model: Any, targets: list[str]) -> None:
    """Every target name must match a module, or the adapter would silently adapt less than asked."""
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(_matches(name, [target]) for name in names):
            raise RecipeError(f"target module '{target}' matches no module of {type(model).__name__}")


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def adapter_parameter_count(model: Any, cfg: RunConfig) -> tuple[int, int]:
    """``(parameters, modules)`` the adapter of ``cfg.method`` would add to ``model``, from the target modules'
    shapes alone (before anything is allocated): ``2 r d`` per LoRMA transform (``d = d_out`` pre, ``d_in``
    post, one transform per adapted part of a fused projection), ``r (d_in + d_out)`` for LoRA (plus the
    ``d_out`` magnitudes of DoRA). ``(0, 0)`` for the non-adapter methods. ``side="auto"`` is resolved per
    module as the layer will resolve it (:func:`lorma.config.cheaper_side`)."""
    if cfg.method not in ADAPTER_METHODS:
        return 0, 0
    from lorma.config import cheaper_side

    targets = cfg.target_modules or default_target_modules(model)
    fused: dict[str, Any] = {}
    if cfg.method in LORMA_INFLATION and cfg.target_modules is None:
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
        if cfg.method in LORMA_INFLATION:
            spec = next((v for k, v in fused.items() if _matches(name, [k])), None)
            num_parts = spec["num_parts"] if spec is not None else 1
            side = cheaper_side(d_in, d_out, num_parts) if cfg.side == "auto" else cfg.side
            # one transform per adapted part; on the pre side, of the part's size
            transforms = len(spec["parts"]) if spec is not None else 1
            d = d_out // num_parts if side == "pre" else d_in
            params += transforms * 2 * cfg.r * d
        else:
            params += cfg.r * (d_in + d_out) + (d_out if cfg.method == "dora" else 0)
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
        raise RecipeError(
            f"the {cfg.method} adapter at r={cfg.r} would have {params:,} trainable parameters in {modules} modules: "
            f"about {need / 1e9:.1f} GB to train in float32 (weights, gradients, AdamW state), more than the "
            f"{free / 1e9:.1f} GB of {what}; lower --r"
        )


def _freeze_all_but(model: Any, keep: Any) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(bool(keep(name)))


def _in_modules(name: str, modules: list[str]) -> bool:
    return any(name.startswith(m + ".") or f".{m}." in f".{name}" for m in modules)


def build_method_model(model: Any, cfg: RunConfig, head_modules: list[str], peft_task_type: str | None) -> Any:
    """Wrap or freeze ``model`` for ``cfg.method``; returns the model to train (a PeftModel for adapters)."""
    method = cfg.method
    modules_to_save = cfg.modules_to_save if cfg.modules_to_save is not None else list(head_modules)
    if method in ADAPTER_METHODS:
        from peft import get_peft_model

        targets = cfg.target_modules or default_target_modules(model)
        _check_targets(model, targets)
        fused = None
        if method in LORMA_INFLATION or method in LORMA_VARIANTS:
            from lorma import DEFAULT_FUSED_PARTS, LormaConfig

            inflation, variant = LORMA_VARIANTS.get(method, (LORMA_INFLATION.get(method), None))
            if cfg.target_modules is None:
                fused = DEFAULT_FUSED_PARTS.get(getattr(model.config, "model_type", ""))
            options: dict[str, Any] = {}
            r = cfg.r
            if method == "adalorma":
                budget = rank_budget(cfg)
                r = budget.pop("init_r")
                options, fused = budget, ({} if fused else None)  # AdaLoRMA adapts whole layers
            try:
                peft_config: Any = LormaConfig(
                    r=r,
                    alpha=cfg.alpha,
                    inflation=inflation,
                    side=cfg.side,
                    dropout=cfg.dropout,
                    target_modules=targets,
                    modules_to_save=modules_to_save or None,
                    fused_parts=fused,
                    task_type=peft_task_type,
                    variant=variant,
                    **options,
                )
            except ValueError as err:
                raise RecipeError(f"cannot build the {method} adapter: {err}") from None
        elif method == "adalora":
            from peft import AdaLoraConfig

            peft_config = AdaLoraConfig(
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=targets,
                modules_to_save=modules_to_save or None,
                task_type=peft_task_type,
                **rank_budget(cfg),
            )
        else:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=cfg.r,
                lora_alpha=cfg.alpha,
                lora_dropout=cfg.dropout,
                target_modules=targets,
                modules_to_save=modules_to_save or None,
                use_dora=method == "dora",
                task_type=peft_task_type,
            )
        try:
            return get_peft_model(model, peft_config)
        except ValueError as err:
            raise RecipeError(f"cannot build the {method} adapter: {err}") from None
    if method == "full":
        _freeze_all_but(model, lambda name: True)
    elif method == "bitfit":
        # BitFit (Ben Zaken et al., 2022): biases only, plus the task head
        _freeze_all_but(model, lambda name: name.endswith(".bias") or _in_modules(name, modules_to_save))
    elif method == "head-only":
        _freeze_all_but(model, lambda name: _in_modules(name, modules_to_save))
    else:  # pragma: no cover - validated in config
        raise RecipeError(f"unknown method '{method}'")
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError(f"method {method} leaves no trainable parameter (head modules: {modules_to_save})")
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (peft's own count for adapters, so both agree)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return int(trainable), int(total)
