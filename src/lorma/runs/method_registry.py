"""The fine-tuning methods by name: one registry for ``lorma train`` / ``compare``, the benchmarks and the analysis.

A method is a name (``lorma-plus``, ``lora``, ``full``, ...) and its own options (LoRMA's ``side``). Each entry says
how to build it (the peft config of an adapter, or which parameters of the model train), whether it is an adapter
(saved as ``adapter/`` and mergeable) and how it is labelled.

One naming scheme: the name never carries an option; a *label* appends LoRMA's side to the name, as
``<name>-<side>`` (``lorma-plus-post``). Run summaries and the analysis append it only when it is not the default
(``pre``); the benchmark tables, which set the sides side by side, always do (``lorma-plus-pre``). :func:`parse_label`
reads a label back into a name and options, so the benchmarks' ``--methods lorma-plus-post`` and a run's
``method: lorma-plus`` + ``side: post`` are the same method.

Importing this module imports nothing heavy: peft and lorma's tuner are imported by the builders when they run.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorma.plumbing.errors import UnknownNameError
from lorma.plumbing.named_registry import Registry, module_names

__all__ = [
    "AdapterSettings",
    "Method",
    "adapter_method_names",
    "get_method",
    "label_of",
    "method_names",
    "method_of_adapter_config",
    "parse_label",
    "register_method",
    "trainable_method",
]


@dataclass(frozen=True)
class AdapterSettings:
    """What an adapter method's peft config is built from (the run's settings, or a benchmark's)."""

    r: int
    alpha: float
    target_modules: list[str]
    dropout: float = 0.0
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    #: the method's own options (LoRMA: ``side``), already checked against :attr:`Method.options`
    options: dict[str, Any] = field(default_factory=dict)
    #: LoRMA on fused projections: ``{module: {"num_parts", "parts"}}``; None: the model type's default, which the
    #: tuner applies (:data:`lorma.config.DEFAULT_FUSED_PARTS`, GPT-2's q and v parts of ``c_attn``)
    fused_parts: dict[str, dict[str, Any]] | None = None
    #: LoRA on transformers' ``Conv1D`` (GPT-2), whose weight is stored ``(d_in, d_out)``
    fan_in_fan_out: bool = False
    #: the run's number of optimizer steps: a rank budget (AdaLoRMA, AdaLoRA) falls on a schedule over them
    max_steps: int | None = None


@dataclass(frozen=True)
class Method:
    """One fine-tuning method. An adapter has :attr:`peft_config`; any other method has :attr:`trains`."""

    name: str
    #: what it is, in a few words (``--help``, docs)
    description: str
    #: builds the peft config from :class:`AdapterSettings` (adapters only)
    peft_config: Callable[[AdapterSettings], Any] | None = None
    #: non-adapters: whether the parameter called ``name`` trains, given the task's head modules
    trains: Callable[[str, Sequence[str]], bool] | None = None
    #: the method's own options and their allowed values, the default first
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: LoRMA's inflation (the rank tracker and the parameter estimate need it); None for other methods
    inflation: str | None = None
    #: a LoRMA variant (``LormaConfig.variant``: ``dorma``, ``adalorma``, ``dylorma``; docs/variants.md)
    variant: str | None = None
    #: prunes to a rank budget while it trains (AdaLoRMA, AdaLoRA): training adds
    #: :class:`lorma.plumbing.callbacks.RankAllocationCallback`
    rank_budget: bool = False
    #: offered by ``lorma train`` / ``compare`` (False: a peer the benchmarks measure against only)
    trainable_by_recipes: bool = True
    #: how large a learning rate it wants, which sets the recipes' defaults: ``adapter`` (few parameters, starting
    #: at the base model), ``full`` (every weight moves) or ``partial`` (BitFit, a head alone: larger still)
    family: str = "adapter"

    @property
    def adapter(self) -> bool:
        """Whether the method is a peft adapter: saved as an adapter, mergeable, analysable as delta W."""
        return self.peft_config is not None

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` with the defaults filled in; ValueError for an option the method does not have or a value
        it does not take."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"method {self.name} has no option {unknown[0]!r}"
                             + (f" (its options: {', '.join(self.options)})" if self.options else ""))
        out = {}
        for key, allowed in self.options.items():
            value = options.get(key, allowed[0])
            if value not in allowed:
                raise ValueError(f"method {self.name}: {key} {value!r} is not one of {', '.join(allowed)}")
            out[key] = value
        return out


_REGISTRY: Registry[Method] = Registry(Method, "method", instances=True)
_METHODS = _REGISTRY.entries  # name -> Method, in registration order


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new)."""
    if method.name in _METHODS:
        raise ValueError(f"method name {method.name!r} is already registered")
    if (method.peft_config is None) == (method.trains is None):
        raise ValueError(f"method {method.name!r}: give exactly one of peft_config (an adapter) and trains")
    return _REGISTRY.register(method)


#: the order of the paper's inflations in the method lists (display only: lorma.inflations' own `first`, which this
#: module cannot import without torch)
PAPER_INFLATIONS = ("plus", "pi", "none")


def _offer_inflations() -> None:
    """``lorma-<x>`` for every inflation ``x``: the built-ins found on disk (``lorma/inflations/x.py``, without
    importing torch, so that ``--help`` stays fast), and a user's registered ones once :mod:`lorma.inflations` is
    imported. A new inflation reaches ``lorma train`` with no edit here."""
    names = list(module_names("lorma.inflations", skip=("base",), first=PAPER_INFLATIONS))
    inflations = sys.modules.get("lorma.inflations.base")
    if inflations is not None:
        names += [n for n in inflations.inflation_names() if n not in names]
    for inflation in names:
        name = f"lorma-{inflation}"
        if name not in _METHODS:
            register_method(Method(name, f"LoRMA with the {inflation!r} rank inflation (lorma.inflations)",
                                   peft_config=_lorma_builder(name, inflation), options={"side": LORMA_SIDES},
                                   inflation=inflation))


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError listing the known names otherwise."""
    _offer_inflations()
    try:
        return _METHODS[name]
    except KeyError:
        raise _unknown_method(name) from None


def _unknown_method(name: str) -> UnknownNameError:
    """Bad input naming ``name`` and the methods ``lorma train`` offers."""
    return UnknownNameError(f"unknown method '{name}'; expected one of: {', '.join(method_names())}")


def trainable_method(name: str) -> Method:
    """The method ``lorma train`` / ``compare`` trains as ``name``: an :class:`UnknownNameError` (bad input, exit
    code 2) listing those methods otherwise, a benchmark-only peer included."""
    if name not in method_names():
        raise _unknown_method(name)
    return _METHODS[name]


def method_names(recipes_only: bool = True) -> tuple[str, ...]:
    """The registered names, in registration order (by default those ``lorma train`` offers)."""
    _offer_inflations()
    return tuple(n for n, m in _METHODS.items() if m.trainable_by_recipes or not recipes_only)


def adapter_method_names() -> tuple[str, ...]:
    """The names of the methods ``lorma train`` saves as an adapter."""
    return tuple(n for n in method_names() if _METHODS[n].adapter)


def label_of(name: str, options: dict[str, Any] | None = None, always_side: bool = False) -> str:
    """The label of a method with options: the name, with LoRMA's side appended when it is not the default (or
    always, with ``always_side``)."""
    method = get_method(name)
    side = (options or {}).get("side")
    if "side" not in method.options or side is None:
        return name
    return f"{name}-{side}" if always_side or side != method.options["side"][0] else name


def parse_label(label: str) -> tuple[str, dict[str, Any]]:
    """A label back into ``(name, options)``: ``lorma-plus-post`` -> ``("lorma-plus", {"side": "post"})``."""
    _offer_inflations()
    if label in _METHODS:
        return label, {}
    name, _, side = label.rpartition("-")
    method = _METHODS.get(name)
    if method is None or side not in method.options.get("side", ()):
        raise ValueError(f"unknown method '{label}'; expected one of: {', '.join(method_names(False))} (LoRMA's "
                         f"with a side appended: lorma-plus-{LORMA_SIDES[1]})")
    return name, {"side": side}


def method_of_adapter_config(adapter_config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` of the method that saved a peft ``adapter_config.json`` (None: not one of these); also
    takes a config's ``to_dict()``, whose ``peft_type`` is peft's enum."""
    peft_type = adapter_config.get("peft_type", "")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()
    if peft_type == "LORMA":
        variant, inflation = adapter_config.get("variant"), adapter_config.get("inflation", "plus")
        name = variant if variant in ("adalorma", "dylorma") else f"{variant or 'lorma'}-{inflation}"
        return name, {"side": adapter_config.get("side", "pre")}
    if peft_type == "LORA":
        return ("dora" if adapter_config.get("use_dora") else "lora"), {}
    name = peft_type.lower()
    return (name, {}) if name in method_names(recipes_only=False) else None


# --------------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------------

#: LoRMA's sides: ``pre`` (W = I(BA) W0, the paper's default), ``post`` (W = W0 I(BA)), and ``auto`` (per module,
#: the side with the smaller transform: :func:`lorma.config.cheaper_side`). Stated literally so that this module
#: imports no torch; tests/recipes/test_recipes_methods.py keeps it equal to :data:`lorma.config.SIDE_CHOICES`.
LORMA_SIDES = ("pre", "post", "auto")


def rank_budget(name: str, r: int, max_steps: int | None) -> dict[str, int]:
    """AdaLoRA's budget and schedule for ``adalorma`` / ``adalora``, the same for both: start at ``1.5 r`` per
    module and prune to ``r`` on average (the final budget of a rank-``r`` LoRA, AdaLoRA's comparison), at full
    budget for the first 10% of the steps, at the final one for the last 20%, reallocating every step."""
    if not max_steps or max_steps <= 0:
        raise ValueError(f"method {name} needs --max-steps: its rank budget falls on a schedule over the steps")
    if r < 2:
        raise ValueError(f"method {name} needs r >= 2 (it prunes from 1.5 r down to r), got {r}")
    return {"init_r": r + r // 2, "target_r": r, "tinit": max_steps // 10, "tfinal": max_steps // 5, "deltaT": 1,
            "total_step": max_steps}


def _lorma_builder(name: str, inflation: str, variant: str | None = None) -> Callable[[AdapterSettings], Any]:
    def build(s: AdapterSettings) -> Any:
        from lorma.config import LormaConfig

        r, fused, budget = s.r, s.fused_parts, {}
        if variant == "adalorma":  # AdaLoRMA adapts whole layers, from the budget's initial rank
            budget = rank_budget(name, s.r, s.max_steps)
            r, fused = budget.pop("init_r"), {}
        return LormaConfig(r=r, alpha=s.alpha, inflation=inflation, side=s.options.get("side", "pre"),
                           dropout=s.dropout, target_modules=s.target_modules, modules_to_save=s.modules_to_save,
                           fused_parts=fused, task_type=s.task_type, variant=variant, variant_options=budget)

    return build


def _lora_builder(dora: bool) -> Callable[[AdapterSettings], Any]:
    def build(s: AdapterSettings) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                          modules_to_save=s.modules_to_save, use_dora=dora, task_type=s.task_type,
                          fan_in_fan_out=s.fan_in_fan_out)

    return build


def _adalora(s: AdapterSettings) -> Any:
    from peft import AdaLoraConfig

    return AdaLoraConfig(lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                         modules_to_save=s.modules_to_save, task_type=s.task_type,
                         **rank_budget("adalora", s.r, s.max_steps))


def _oft(s: AdapterSettings) -> Any:
    from peft import OFTConfig

    return OFTConfig(r=0, oft_block_size=32, target_modules=s.target_modules, task_type=s.task_type)


def _boft(s: AdapterSettings) -> Any:
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2, target_modules=s.target_modules,
                      task_type=s.task_type)


def _hra(s: AdapterSettings) -> Any:
    from peft import HRAConfig

    return HRAConfig(r=s.r, target_modules=s.target_modules, task_type=s.task_type)


def in_modules(name: str, modules: Sequence[str]) -> bool:
    """Whether parameter ``name`` belongs to one of ``modules`` (dotted module names, matched on whole parts)."""
    return any(name.startswith(m + ".") or f".{m}." in f".{name}" for m in modules)


_offer_inflations()  # lorma-plus, lorma-pi, lorma-none: one per module of lorma/inflations/
register_method(Method("lora", "LoRA (W0 + s BA)", peft_config=_lora_builder(dora=False)))
register_method(Method("dora", "DoRA (LoRA with a learned magnitude per output)", peft_config=_lora_builder(dora=True)))
# the LoRMA variants (docs/variants.md) and the additive baseline of AdaLoRMA
for _name, _inflation, _variant, _what in (
    ("dorma-plus", "plus", "dorma", "DoRMA+ (LoRMA+ with DoRA's learned magnitude per output)"),
    ("dorma-pi", "pi", "dorma", "DoRMA_pi (LoRMA_pi with DoRA's learned magnitude per output)"),
    ("adalorma", "plus", "adalorma", "AdaLoRMA (LoRMA+ in SVD form, pruned to a rank budget as AdaLoRA)"),
    ("dylorma", "plus", "dylorma", "DyLoRMA (LoRMA+ trained at sampled nested ranks, as DyLoRA)"),
):
    register_method(Method(_name, _what, peft_config=_lorma_builder(_name, _inflation, _variant),
                           options={"side": LORMA_SIDES}, inflation=_inflation, variant=_variant,
                           rank_budget=_variant == "adalorma"))
register_method(Method("adalora", "AdaLoRA (LoRA in SVD form, pruned to a rank budget)", peft_config=_adalora,
                       rank_budget=True))
register_method(Method("full", "full fine-tuning (every parameter)", trains=lambda name, head: True, family="full"))
# BitFit (Ben Zaken et al., 2022): biases only, plus the task head
register_method(Method("bitfit", "BitFit (the biases and the task head)",
                       trains=lambda name, head: name.endswith(".bias") or in_modules(name, head), family="partial"))
register_method(Method("head-only", "the task head only", trains=lambda name, head: in_modules(name, head),
                       family="partial"))
# the peers of the benchmarks (BENCHMARKS.md), at the settings measured there
register_method(Method("oft", "OFT (orthogonal blocks of 32)", peft_config=_oft, trainable_by_recipes=False))
register_method(Method("boft", "BOFT (butterfly blocks of 8, 2 factors)", peft_config=_boft,
                       trainable_by_recipes=False))
register_method(Method("hra", "HRA (Householder reflections)", peft_config=_hra, trainable_by_recipes=False))
