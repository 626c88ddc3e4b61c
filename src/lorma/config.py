"""``LormaConfig``: the peft configuration of a LoRMA adapter."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from .functional import SIDES
from .inflations import DEFAULT_FFT_CHUNK_BYTES, DEFAULT_MAX_DENSE_BYTES, get_inflation
from .peft_method.peft_type import lorma_peft_type
from .variants import get_variant
from .variants.options import fold_flat_options, option_owners, validate_variant_options

# "auto": per module, the side whose square transform is smaller (resolved when the layer is made, recorded in
# side_pattern). Not one of functional.SIDES: a layer always acts on a definite side.
SIDE_CHOICES: tuple[str, ...] = (*SIDES, "auto")

# Default target modules per transformers model_type: the paper's set-ups.
# RoBERTa / BERT: query and value (Table 14). GPT-2: the fused c_attn, q and v parts only (Table 16).
# Gemma-2B: q, k, v, o, up, down, gate; LLaMA-3-8B: up, down, o, gate (Table 17).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["up_proj", "down_proj", "o_proj", "gate_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"],
}

# GPT-2's c_attn outputs [q | k | v]; the paper adapts q and v, each with its own transform.
DEFAULT_FUSED_PARTS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {"c_attn": {"num_parts": 3, "parts": [0, 2]}},
}


@dataclass
class LormaConfig(PeftConfig):
    """Configuration of a LoRMA adapter: ``W = I(BA) W0`` (``side="pre"``) or ``W0 I(BA)`` (``"post"``).

    Args:
        r: rank of ``A`` (``r x d``) and ``B`` (``d x r``).
        alpha: the scaling is ``s = alpha / r``.
        inflation: ``"plus"`` (``I + sBA``, LoRMA+), ``"pi"`` (``s pi(BA)``, LoRMA_pi) or ``"none"``
            (``s BA``, the rank-limited ablation); or the name of an inflation registered with
            :func:`lorma.inflations.register_inflation`.
        side: ``"pre"`` (paper default, ``d = d_out``), ``"post"`` (``d = d_in``) or ``"auto"``: per module the
            side with the smaller transform (:func:`cheaper_side`), for speed on expanding / contracting layers
            (an LLM's MLP). Pre and post are different parameterizations (the paper's Table 7 compares them), so
            ``"auto"`` is a setting of its own, never a silent switch; each module's resolved side is recorded in
            ``side_pattern`` when the adapter is made and saved with it.
        side_pattern: per-module side (``"pre"`` / ``"post"``), keys as in ``rank_pattern``; overrides ``side``.
            With ``side="auto"`` lorma fills it with every adapted module's resolved side.
        dropout: dropout on the adapter path only; the frozen path ``W0 x`` never sees it.
        target_modules / exclude_modules / layers_to_transform / layers_pattern: as in peft's LoRA.
        target_parameters: parameters adapted directly, as peft's LoRA ``target_parameters`` (peft >= 0.17): names
            or dotted suffixes of 2-D or 3-D ``nn.Parameter``s, such as the fused expert weights of a transformers
            MoE block (``"mlp.experts.gate_up_proj"``, shape ``(num_experts, ., .)``). Each expert ``e`` gets its
            own ``A_e``, ``B_e`` and weight ``I(B_e A_e) W0_e`` (pre) or ``W0_e I(B_e A_e)`` (post), folded once
            per forward (docs/moe.md). Plain LoRMA only (no variant), no dropout; ``rank_pattern``,
            ``alpha_pattern`` and ``side_pattern`` keys match the full parameter name.
        init_weights: ``True`` for the paper's identity initialisation; ``False`` for random ``A`` and
            ``B`` (tests).
        rank_pattern / alpha_pattern: per-module ``r`` and ``alpha`` (regex on the module name's end).
        modules_to_save: extra modules trained in full and saved (e.g. a classification head).
        fan_in_fan_out: the base weight is stored ``(d_in, d_out)`` (transformers' ``Conv1D``); set
            automatically for ``Conv1D``.
        fused_parts: adapt only some equal parts of a fused projection's output, each with its own
            transform: ``{"c_attn": {"num_parts": 3, "parts": [0, 2]}}`` (GPT-2's q and v). Keys match
            module names like ``target_modules`` entries (name or dotted suffix, or a regex).
        max_dense_bytes: the largest dense ``d x d`` float32 transform a forward may build per module (``None``:
            no bound). Above it ``pi`` takes its bounded FFT path; an inflation with no such path is refused.
        fft_chunk_bytes: working memory per module of the bounded FFT path, per chunk of tokens.
        variant: ``None`` for plain LoRMA, or the name of a variant registered with
            :func:`lorma.variants.register_variant` (it takes over how each adapted module's adapter is
            initialised, applied, merged and unmerged). Built in: ``"dorma"``, ``"adalorma"``, ``"dylorma"``
            (docs/variants.md).
        use_dora: DoRMA (peft's name for the option): the same as ``variant="dorma"``,
            ``W = diag(m / ||V||_r) V`` with ``V = I(BA) W0`` (pre) or ``W0 I(BA)`` (post).
        variant_options: the chosen variant's own options, as its class declares them (the dataclass
            :attr:`lorma.variants.LormaVariant.options`): checked here, completed with their defaults, saved with
            the adapter. AdaLoRMA's are ``target_r``, ``total_step``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``,
            ``beta2``, ``orth_reg_weight`` (peft's AdaLoRA names) and ``final_ranks`` (written in training);
            DyLoRMA's ``min_rank`` and ``inference_rank`` (docs/variants.md). An unknown key, or options without a
            variant, is a ``ValueError`` naming it. Shorthand: the options may be given as keywords,
            ``LormaConfig(variant="adalorma", target_r=4, total_step=100)``; they are moved into
            ``variant_options`` (so are the top-level keys of an ``adapter_config.json`` saved before this field
            existed) and are not attributes of the config.
        ensure_weight_tying: peft's option for LoRA: an ``nn.Linear`` that shares the weight of an adapted
            ``nn.Embedding`` (tied word embeddings) is adapted through the tie, with the embedding's transform
            transposed, so the merged model keeps one tied weight and computes what the unmerged one does. Found by
            the weight's identity, whatever the modules are named; ``False``: merging such a layer is refused
            (docs/conv-and-embeddings.md).
    """

    r: int = field(default=8, metadata={"help": "Rank of A (r x d) and B (d x r)."})
    alpha: float = field(default=8.0, metadata={"help": "Scaling numerator: s = alpha / r."})
    inflation: str = field(default="plus", metadata={"help": "Rank inflation: 'plus', 'pi' or 'none'."})
    side: str = field(
        default="pre",
        metadata={"help": "'pre': W = I(BA) W0; 'post': W = W0 I(BA); 'auto': per module the smaller transform."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter path."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (or suffixes, or one regex) to adapt."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (or suffixes, or one regex) never to adapt."}
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names (or dotted suffixes) of 2-D / 3-D nn.Parameters to adapt directly, per expert for a 3-D "
            "(num_experts, ., .) MoE weight, e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']."
        },
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Identity initialisation (the paper's); False: random A and B."}
    )
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Layer list name."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module r."})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Per-module alpha."})
    side_pattern: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Per-module side ('pre' / 'post'); filled by side='auto'."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter."}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Base weight stored (d_in, d_out), as in transformers' Conv1D."}
    )
    fused_parts: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Per fused module: {'num_parts': P, 'parts': [indices to adapt]}."},
    )
    max_dense_bytes: int | None = field(
        default=DEFAULT_MAX_DENSE_BYTES,
        metadata={"help": "Largest dense d x d float32 transform a forward may build per module; None: no bound."},
    )
    fft_chunk_bytes: int = field(
        default=DEFAULT_FFT_CHUNK_BYTES,
        metadata={"help": "Working memory per module of pi's bounded FFT path (used above max_dense_bytes)."},
    )
    variant: str | None = field(
        default=None, metadata={"help": "None (plain LoRMA) or the name of a registered LoRMA variant."}
    )

    use_dora: bool = field(default=False, metadata={"help": "DoRMA: the same as variant='dorma' (peft's name)."})
    variant_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "The variant's own options (declared by the variant class), e.g. {'target_r': 4}."},
    )
    ensure_weight_tying: bool = field(
        default=False,
        metadata={"help": "Adapt the output layer tied to an adapted embedding through the tie (peft's option)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_type is not None and str(getattr(self.peft_type, "value", self.peft_type)) != "LORMA":
            raise ValueError(f"LormaConfig: this is a {self.peft_type} adapter config, not a LORMA one")
        self.peft_type = lorma_peft_type()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LormaConfig: r must be a positive integer, got {self.r!r}")
        if not _positive_finite(self.alpha):
            raise ValueError(f"LormaConfig: alpha must be a positive finite number, got {self.alpha!r}")
        if self.use_dora:
            if self.variant not in (None, "dorma"):
                raise ValueError(
                    f"LormaConfig: use_dora=True is DoRMA; it cannot be combined with variant={self.variant!r}"
                )
            self.variant = "dorma"
        self.use_dora = self.variant == "dorma"
        try:
            get_inflation(self.inflation)
            get_variant(self.variant)
        except ValueError as err:
            raise ValueError(f"LormaConfig: {err}") from None
        self.variant_options = validate_variant_options(self)
        if self.side not in SIDE_CHOICES:
            raise ValueError(f"LormaConfig: unknown side {self.side!r}; expected one of {SIDE_CHOICES}")
        for name, value in self.side_pattern.items():
            if value not in SIDES:
                raise ValueError(f"LormaConfig: side_pattern[{name!r}] must be one of {SIDES}, got {value!r}")
        if self.max_dense_bytes is not None and not _positive_int(self.max_dense_bytes):
            raise ValueError(
                f"LormaConfig: max_dense_bytes must be a positive integer or None, got {self.max_dense_bytes!r}"
            )
        if not _positive_int(self.fft_chunk_bytes):
            raise ValueError(f"LormaConfig: fft_chunk_bytes must be a positive integer, got {self.fft_chunk_bytes!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LormaConfig: dropout must be in [0, 1), got {self.dropout!r}")
        for name, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LormaConfig: rank_pattern[{name!r}] must be a positive integer, got {value!r}")
        for name, value in self.alpha_pattern.items():
            if not _positive_finite(value):
                raise ValueError(
                    f"LormaConfig: alpha_pattern[{name!r}] must be a positive finite number, got {value!r}"
                )
        if self.fused_parts is not None:
            for name, spec in self.fused_parts.items():
                validate_fused_spec(name, spec)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(isinstance(t, str) for t in self.target_parameters):
                raise ValueError(
                    f"LormaConfig: target_parameters must be a list of parameter names, got {self.target_parameters!r}"
                )
            self.target_parameters = list(self.target_parameters)
            if self.target_parameters and self.variant is not None:
                raise ValueError(
                    f"LormaConfig: target_parameters adapts weights with plain LoRMA only; variant={self.variant!r} "
                    "is not supported there"
                )
            if self.target_parameters and float(self.dropout) > 0.0:
                raise ValueError(
                    "LormaConfig: target_parameters adapts a weight, folded before the module runs, where dropout on "
                    f"the adapter's inputs cannot act; use dropout=0.0 (got {self.dropout!r})"
                )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("LormaConfig: layers_to_transform cannot be used when target_modules is a str")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any) -> Any:
        """peft's loader, after checking a local adapter's weights file.

        ``PeftModel.from_pretrained`` reads the config (here) before the weights; a truncated, empty or corrupt
        ``adapter_model.safetensors`` would otherwise fail inside safetensors with an error that does not name
        the file. Here it is a ``ValueError`` (:class:`lorma.plumbing.errors.DataFormatError`) that does.
        """
        from lorma.plumbing.errors import DataFormatError
        from lorma.plumbing.fileio import safetensors_problem

        folder = Path(pretrained_model_name_or_path, subfolder or "")
        weights = folder / "adapter_model.safetensors"
        if weights.is_file():
            problem = safetensors_problem(weights)
            if problem:
                raise DataFormatError(weights, None, problem)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """Refuse another method's saved config instead of silently returning that method's config class; move
        top-level variant options (an older ``adapter_config.json``) into ``variant_options``."""
        peft_type = kwargs.get("peft_type")
        if peft_type is not None and str(getattr(peft_type, "value", peft_type)) != "LORMA":
            raise ValueError(f"LormaConfig: the saved adapter config is peft_type {peft_type!r}, not 'LORMA'")
        # an adapter_config.json saved before variant_options existed has the options at the top level; they are
        # folded here, before peft's from_peft_type, which drops (with a warning) every key the constructor's
        # signature lacks once any key is unknown to it: a newer peft's key would otherwise take the options along
        return super().from_peft_type(**fold_flat_options(kwargs, _init_field_names(cls)))

    def __getattr__(self, name: str) -> Any:
        """Only for attributes that do not exist: a variant's option read as ``config.target_r`` (before
        ``variant_options`` it was an attribute) says where it is now."""
        if not name.startswith("_") and name in option_owners():
            raise AttributeError(
                f"LormaConfig has no attribute {name!r}: it is an option of variant={option_owners()[name][0]!r}, "
                f"read it as config.variant_options[{name!r}]"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse ``config.final_ranks = ...`` (a variant's option set as an attribute), which nothing would read
        or save; config fields are set as usual."""
        if not name.startswith("_") and name not in _init_field_names(type(self)) and name in option_owners():
            raise AttributeError(
                f"LormaConfig: {name!r} is an option of variant={option_owners()[name][0]!r}; set "
                f"config.variant_options[{name!r}] instead"
            )
        super().__setattr__(name, value)

    def side_for(self, module_name: str, d_in: int, d_out: int, num_parts: int = 1) -> str:
        """The side module ``module_name`` (a ``d_out x d_in`` layer) is adapted on: ``side_pattern`` first, then
        ``side``; ``"auto"`` resolves by shape (:func:`cheaper_side`)."""
        key = get_pattern_key(self.side_pattern.keys(), module_name)
        if key in self.side_pattern:
            return self.side_pattern[key]
        if self.side != "auto":
            return self.side
        return cheaper_side(d_in, d_out, num_parts)

    def fused_spec_for(self, module_name: str) -> tuple[int, list[int]] | None:
        """``(num_parts, parts)`` for a module name, or ``None`` if it is adapted as a whole."""
        if not self.fused_parts:
            return None
        for key, spec in self.fused_parts.items():
            if module_name == key or module_name.endswith("." + key) or re.fullmatch(key, module_name):
                return int(spec["num_parts"]), sorted(int(p) for p in spec["parts"])
        return None


@functools.cache
def _init_field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls) if f.init)


def _accept_flat_variant_options(cls: type[LormaConfig]) -> None:
    """Let ``cls(...)`` take a variant's options as keywords (the shorthand of ``variant_options``, and what an
    older ``adapter_config.json`` holds): they are moved into ``variant_options`` before the dataclass's own
    ``__init__`` runs, so they never become fields. The signature shown stays the dataclass's."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self: LormaConfig, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **fold_flat_options(kwargs, _init_field_names(type(self))))

    cls.__init__ = __init__  # type: ignore[method-assign]


_accept_flat_variant_options(LormaConfig)


def cheaper_side(d_in: int, d_out: int, num_parts: int = 1) -> str:
    """The side whose square transform is smaller: ``"pre"`` when ``d_out / num_parts <= d_in``, else ``"post"``.

    A dense transform (pi, none) costs ``d^2`` per token and a rank-r one ``2 r d`` parameters, with ``d`` the
    transform size: ``d_out`` (per fused part) on the pre side, ``d_in`` on the post side. Ties go to ``"pre"``,
    the paper's default. On a LLaMA-style MLP this picks post for gate / up (d_in = hidden < intermediate) and
    pre for down; on square attention projections, pre.
    """
    return "pre" if d_out // num_parts <= d_in else "post"


def _positive_finite(value: Any) -> bool:
    """A real number > 0 and finite (``nan`` and ``inf`` pass a plain ``> 0`` test or slip past it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_fused_spec(name: str, spec: Any) -> None:
    """Raise a ValueError naming ``name`` unless ``spec`` is ``{"num_parts": P, "parts": [...]}``."""
    if not isinstance(spec, dict) or set(spec) != {"num_parts", "parts"}:
        raise ValueError(
            f"LormaConfig: fused_parts[{name!r}] must be a dict with keys 'num_parts' and 'parts', got {spec!r}"
        )
    num_parts, parts = spec["num_parts"], spec["parts"]
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"LormaConfig: fused_parts[{name!r}]['num_parts'] must be >= 1, got {num_parts!r}")
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ValueError(f"LormaConfig: fused_parts[{name!r}]['parts'] must be a non-empty list, got {parts!r}")
    if len(set(parts)) != len(parts) or any(
        isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < num_parts for p in parts
    ):
        raise ValueError(
            f"LormaConfig: fused_parts[{name!r}]['parts'] must be distinct indices in [0, {num_parts}), "
            f"got {list(parts)!r}"
        )
