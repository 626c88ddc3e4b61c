"""Variant options (``LormaConfig.variant_options``) and the variants' model-level hooks (issue 23).

Each variant declares its options and what it does to the whole model on its class; ``LormaConfig`` and
``LormaModel`` ask the registry. Checked here: adapters saved with the older flat layout (``target_r``, ``min_rank``,
``final_ranks`` ... at the top level of ``adapter_config.json``) load into the same model; unknown options are refused
by name; a variant defined in a test, with options and per-step hooks, works without any change to the core; and
``lorma/model.py`` names no variant.
"""

from __future__ import annotations

import ast
import copy
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from lorma import LormaConfig
from lorma.layers.base import LormaLayer
from lorma.variants import LormaVariant, VariantOptions, register_variant, variant_names
from lorma.variants.registry import _VARIANTS
from test_adapter_formula import TwoLayer, rel_err
from test_variants import dense_out

SRC = Path(__file__).resolve().parents[2] / "src" / "lorma"

# what the release before variant_options wrote at the top level of every LoRMA adapter_config.json: each
# variant's options, at these defaults unless the adapter's variant set them
LEGACY_FLAT_DEFAULTS: dict[str, Any] = {
    "target_r": None, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5,
    "total_step": None, "final_ranks": None, "min_rank": 1, "inference_rank": None,
}


def to_legacy_layout(folder: Path) -> dict[str, Any]:
    """Rewrite ``folder``'s adapter_config.json as the older release wrote it: options flat, no variant_options."""
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    options = saved.pop("variant_options")
    saved.update({**LEGACY_FLAT_DEFAULTS, **options})
    path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    return saved


# ---------------------------------------------------------------------------------------------- the config
def test_the_flat_shorthand_and_variant_options_are_one_config() -> None:
    flat = LormaConfig(r=4, variant="adalorma", target_r=2, total_step=10, tinit=1)
    nested = LormaConfig(r=4, variant="adalorma", variant_options={"target_r": 2, "total_step": 10, "tinit": 1})
    assert flat == nested
    # completed with the variant's defaults, so the saved file says every value the adapter was trained with
    assert nested.variant_options == {"target_r": 2, "tinit": 1, "tfinal": 0, "deltaT": 1, "beta1": 0.85,
                                      "beta2": 0.85, "orth_reg_weight": 0.5, "total_step": 10, "final_ranks": None}
    assert LormaConfig(r=4, variant="dylorma", inference_rank=3).variant_options == {"min_rank": 1,
                                                                                      "inference_rank": 3}
    assert LormaConfig(r=4).variant_options == {} and LormaConfig(use_dora=True).variant_options == {}
    saved = flat.to_dict()
    assert saved["variant_options"]["target_r"] == 2 and "target_r" not in saved


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "adalorma", "variant_options": {"target_r": 2, "total_step": 10, "tagret_r": 3}},
         r"unknown option 'tagret_r' for variant='adalorma'; its options are \['target_r'"),
        ({"variant": "dylorma", "variant_options": {"target_r": 2}},
         r"unknown option 'target_r' for variant='dylorma' \(an option of variant='adalorma'\)"),
        ({"variant": "dorma", "variant_options": {"min_rank": 2}},
         r"unknown option 'min_rank' for variant='dorma' \(an option of variant='dylorma'\); its options are \[\]"),
        ({"variant_options": {"min_rank": 2}}, r"variant_options \['min_rank'\] given without a variant"),
        ({"variant": "dylorma", "min_rank": 2, "variant_options": {"min_rank": 2}},
         r"option 'min_rank' is given twice"),
        ({"variant": "dylorma", "variant_options": {"min_rank": 9}}, r"min_rank must be an integer in \[1, 4\]"),
        ({"variant": "no-such", "target_r": 2}, r"unknown variant 'no-such'"),
        ({"variant": "adalorma", "variant_options": "target_r=2"}, r"variant_options must be a dict"),
    ],
)
def test_bad_options_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LormaConfig(r=4, **kwargs)


def test_an_option_is_not_an_attribute_and_says_where_it_is() -> None:
    config = LormaConfig(r=4, variant="adalorma", target_r=2, total_step=10)
    with pytest.raises(AttributeError, match=r"read it as config.variant_options\['target_r'\]"):
        _ = config.target_r
    with pytest.raises(AttributeError, match=r"set config.variant_options\['final_ranks'\] instead"):
        config.final_ranks = {"a": 1}  # nothing would read or save it
    assert getattr(config, "min_rank", None) is None and not hasattr(config, "no_such_thing")
    assert copy.deepcopy(config) == config


# ---------------------------------------------------------------------------------------------- the older layout
LEGACY_CASES = [
    (None, {}),
    ("dorma", {}),
    ("adalorma", {"target_r": 2, "total_step": 10, "tinit": 1, "orth_reg_weight": 0.3}),
    ("dylorma", {"min_rank": 2, "inference_rank": 3}),
]


@pytest.mark.parametrize(("variant", "options"), LEGACY_CASES, ids=[str(v) for v, _ in LEGACY_CASES])
def test_an_adapter_saved_with_flat_options_loads_into_the_same_model(tmp_path, variant, options) -> None:
    base = TwoLayer()
    config = LormaConfig(r=4, alpha=8, variant=variant, variant_options=options, target_modules=["proj"],
                         init_weights=False)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    if variant == "adalorma":  # written by the allocation in training, saved with the adapter
        config.variant_options["final_ranks"] = {"proj": 3}
    model.save_pretrained(tmp_path)
    legacy = to_legacy_layout(tmp_path)
    assert "variant_options" not in legacy and legacy["min_rank"] == options.get("min_rank", 1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key is dropped with peft's "unexpected keyword" warning
        loaded_config = LormaConfig.from_pretrained(str(tmp_path))
    assert loaded_config.variant == variant and loaded_config.variant_options == config.variant_options
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert loaded.peft_config["default"].variant_options == config.variant_options
    x = torch.randn(5, 12)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
        layer = loaded.base_model.model.proj
        rank = options.get("inference_rank")
        hidden = dense_out(layer, "default", x, rank=rank).tanh()
        assert rel_err(layer(x), dense_out(layer, "default", x, rank=rank)) < 1e-5
        assert rel_err(loaded(x), hidden @ base.head.weight.double().T + base.head.bias.double()) < 1e-5
    if variant == "dylorma":  # the option acts: 3 of the 4 ranks outside training
        assert layer.lorma_variant["default"].inference_rank == 3

    # a key a newer peft wrote: peft drops it with a warning, and the flat options are kept all the same
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "from_a_later_release": 1}))
    with pytest.warns(UserWarning, match="from_a_later_release"):
        assert LormaConfig.from_pretrained(str(tmp_path)).variant_options == config.variant_options


def test_a_flat_option_of_another_variant_still_refuses_to_load(tmp_path) -> None:
    model = get_peft_model(TwoLayer(), LormaConfig(r=4, variant="dorma", target_modules=["proj"]))
    model.save_pretrained(tmp_path)
    saved = to_legacy_layout(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "inference_rank": 2}))
    with pytest.raises(ValueError, match=r"inference_rank=2 is an option of variant='dylorma', but variant='dorma'"):
        LormaConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"inference_rank=2 is an option of variant='dylorma'"):
        PeftModel.from_pretrained(TwoLayer(), tmp_path)


def test_analysis_reads_final_ranks_of_both_layouts() -> None:
    from lorma.analysis.runs import final_ranks

    ranks = {"base_model.model.encoder.layer.0.attention.self.query": 3}
    expected = {"encoder.layer.0.attention.self.query": 3}
    assert final_ranks({"peft_type": "LORMA", "variant_options": {"final_ranks": ranks}}) == expected
    assert final_ranks({"peft_type": "LORMA", **LEGACY_FLAT_DEFAULTS, "final_ranks": ranks}) == expected
    assert final_ranks({"peft_type": "LORMA", "variant_options": {}, **LEGACY_FLAT_DEFAULTS}) is None


# ------------------------------------------------------------------------------------------ a variant of the test's own
@dataclass
class DecayOptions(VariantOptions):
    """A toy variant's options: a loss term on ``B`` and a step counter written in training."""

    decay: float = 0.0
    every: int = 1
    last_step: int | None = None  # written by the step updater, saved with the adapter

    def check(self, config: Any) -> None:
        if not self.decay >= 0:
            raise ValueError(f"LormaConfig (variant='test-decay'): decay must be >= 0, got {self.decay!r}")


CALLS: list[tuple[str, str]] = []


class DecayVariant(LormaVariant):
    """Plain LoRMA with the three model-level hooks, recording when they run."""

    name = "test-decay"
    options = DecayOptions

    @classmethod
    def before_training_forward(cls, model: nn.Module, adapter: str, config: Any) -> None:
        CALLS.append(("forward", adapter))

    @classmethod
    def training_loss(cls, model: nn.Module, adapter: str, config: Any) -> torch.Tensor | None:
        decay = cls.options_of(config).decay
        if decay == 0:
            return None
        return decay * sum(m.lorma_B[adapter].square().sum() for m in model.modules()
                           if isinstance(m, LormaLayer) and adapter in m.lorma_B)

    @classmethod
    def step_updater(cls, model: nn.Module, adapter: str, config: Any) -> Callable[[int], None]:
        CALLS.append(("made updater", adapter))
        every = cls.options_of(config).every

        def update(step: int) -> None:
            if step % every == 0:
                config.variant_options["last_step"] = step

        return update


class WithLoss(nn.Module):
    """A model that returns its loss, as a transformers model given labels does."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 20)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.proj(x).square().mean())


@pytest.fixture
def decay_variant() -> Iterator[type[DecayVariant]]:
    register_variant(DecayVariant)
    CALLS.clear()
    yield DecayVariant
    _VARIANTS.pop(DecayVariant.name, None)


def test_a_registered_variant_brings_its_options_and_hooks_to_the_model(decay_variant, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown option 'decy' for variant='test-decay'; its options are "
                                         r"\['decay', 'every', 'last_step'\]"):
        LormaConfig(variant="test-decay", variant_options={"decy": 0.1})
    with pytest.raises(ValueError, match=r"decay must be >= 0, got -1"):
        LormaConfig(variant="test-decay", decay=-1)  # the flat shorthand reaches the variant's check too
    config = LormaConfig(r=2, variant="test-decay", decay=0.25, every=2, target_modules=["proj"],
                         init_weights=False)
    model = get_peft_model(WithLoss(), config)
    x = torch.randn(3, 12)

    # before each training forward of the whole model (peft's forward hook), not in eval
    model.train()
    model(x)
    model.eval()
    model(x)
    assert CALLS == [("forward", "default")]

    # the loss term, in training only
    layer = model.base_model.model.proj
    term = 0.25 * layer.lorma_B["default"].square().sum()
    with torch.no_grad():
        plain = model.base_model.eval()(x).loss
        trained = model.base_model.train()(x).loss
    assert torch.allclose(trained, plain + term)

    # after each optimizer step: made once, then called with the step; what it writes is saved
    for step in range(4):
        model.base_model.update_and_allocate(step)
    assert CALLS.count(("made updater", "default")) == 1
    assert config.variant_options["last_step"] == 2
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["variant_options"] == {
        "decay": 0.25, "every": 2, "last_step": 2}
    loaded = PeftModel.from_pretrained(WithLoss(), tmp_path)
    assert loaded.peft_config["default"].variant_options["last_step"] == 2
    assert type(loaded.base_model.model.proj.lorma_variant["default"]) is DecayVariant


def test_update_and_allocate_names_the_variants_that_act_after_steps(decay_variant) -> None:
    model = get_peft_model(TwoLayer(), LormaConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"variants that do: \['adalorma', 'test-decay'\]; active: \['default'\]"):
        model.base_model.update_and_allocate(0)


# ---------------------------------------------------------------------------------------------- the core names none
VARIANT_MODULES = {"adalorma", "dylorma", "dorma"}


def _imports_and_strings(path: Path) -> tuple[list[tuple[str, list[str]]], set[str]]:
    """``(module, names)`` per ``from ... import`` (relative ones resolved inside ``lorma``), and every string."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ["lorma", *path.relative_to(SRC).parent.parts]
    imports, strings = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*parts, *(node.module.split(".") if node.module else [])])
            imports.append((module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            imports.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
    return imports, strings


@pytest.mark.parametrize("file", ["model.py", "config.py"])
def test_the_core_imports_no_variant_and_tests_no_variant_name(file: str) -> None:
    imports, strings = _imports_and_strings(SRC / file)
    assert any(module == "lorma.variants" for module, _ in imports)  # the registry: resolved the way it is used
    variant_classes = {cls.__name__ for name in variant_names() for cls in (_VARIANTS[name], _VARIANTS[name].options)}
    for module, names in imports:
        assert module.rsplit(".", 1)[-1] not in VARIANT_MODULES, (file, module)
        if module.startswith("lorma.variants"):
            assert not set(names) & variant_classes, (file, module, names)
    named = strings & set(variant_names())
    # config.py: "dorma" is peft's use_dora alias, the one name it keeps (an option of LormaConfig itself)
    assert named == (set() if file == "model.py" else {"dorma"}), named
