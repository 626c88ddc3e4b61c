"""``lorma.runs.method_registry``: one registry of methods, one naming scheme (name + options; labels append
LoRMA's side), read back by :func:`parse_label`."""

from __future__ import annotations

import pytest

from lorma.runs import method_registry as registry


def test_names_and_kinds() -> None:
    variants = ("dorma-plus", "dorma-pi", "adalorma", "dylorma", "adalora")
    assert registry.method_names() == ("lorma-plus", "lorma-pi", "lorma-none", "lora", "dora", *variants, "full",
                                       "bitfit", "head-only")
    assert registry.adapter_method_names() == ("lorma-plus", "lorma-pi", "lorma-none", "lora", "dora", *variants)
    # the benchmarks' peers are registered, but lorma train does not offer them
    assert set(registry.method_names(recipes_only=False)) - set(registry.method_names()) == {"oft", "boft", "hra"}
    assert [registry.get_method(n).inflation for n in ("lorma-plus", "lorma-pi", "lorma-none", "lora")] == \
        ["plus", "pi", "none", None]
    with pytest.raises(ValueError, match="unknown method 'lorma-plux'; expected one of: lorma-plus"):
        registry.get_method("lorma-plux")


def test_labels_round_trip() -> None:
    assert registry.label_of("lorma-plus", {"side": "pre"}) == "lorma-plus"
    assert registry.label_of("lorma-plus", {"side": "pre"}, always_side=True) == "lorma-plus-pre"
    assert registry.label_of("lorma-pi", {"side": "post"}) == "lorma-pi-post"
    assert registry.label_of("lora", {"side": "post"}) == "lora"  # a run config's side means nothing to LoRA
    for name in registry.method_names(recipes_only=False):
        method = registry.get_method(name)
        for side in method.options.get("side", (None,)):
            label = registry.label_of(name, {"side": side}, always_side=True)
            assert registry.parse_label(label) == ((name, {"side": side}) if side else (name, {}))
    with pytest.raises(ValueError, match="unknown method 'lora-post'"):
        registry.parse_label("lora-post")


def test_options_are_checked() -> None:
    lorma_plus = registry.get_method("lorma-plus")
    assert lorma_plus.check_options({}) == {"side": "pre"}
    with pytest.raises(ValueError, match="side 'middle' is not one of pre, post, auto"):
        lorma_plus.check_options({"side": "middle"})
    with pytest.raises(ValueError, match="method lora has no option 'side'"):
        registry.get_method("lora").check_options({"side": "pre"})


def test_adapter_builders_and_trainable_rules() -> None:
    settings = registry.AdapterSettings(r=4, alpha=8.0, target_modules=["query"], dropout=0.1,
                                        modules_to_save=["classifier"], task_type="SEQ_CLS", options={"side": "post"})
    cfg = registry.get_method("lorma-pi").peft_config(settings)
    assert (type(cfg).__name__, cfg.r, cfg.alpha, cfg.inflation, cfg.side, cfg.dropout, cfg.task_type) == \
        ("LormaConfig", 4, 8.0, "pi", "post", 0.1, "SEQ_CLS")
    dora = registry.get_method("dora").peft_config(settings)
    assert (type(dora).__name__, dora.use_dora, dora.lora_alpha, dora.modules_to_save) == \
        ("LoraConfig", True, 8.0, ["classifier"])
    assert not registry.get_method("full").adapter and registry.get_method("lora").adapter
    bitfit = registry.get_method("bitfit").trains
    assert bitfit("encoder.layer.0.output.dense.bias", ["classifier"])
    assert not bitfit("encoder.layer.0.output.dense.weight", ["classifier"])
    assert bitfit("classifier.weight", ["classifier"]) and not bitfit("my_classifier.weight", ["classifier"])
    head = registry.get_method("head-only").trains
    assert head("roberta.classifier.dense.weight", ["classifier"]) and not head("roberta.pooler.bias", ["classifier"])


def test_registration_refuses_a_second_name_and_a_method_with_no_rule() -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method(registry.Method("lora", "again", trains=lambda name, head: True))
    with pytest.raises(ValueError, match="exactly one of"):
        registry.register_method(registry.Method("nothing", "no rule"))


def test_sides_are_the_tuners() -> None:
    """The registry states LoRMA's sides without importing the tuner; they must be the tuner's."""
    from lorma.config import SIDE_CHOICES

    assert registry.LORMA_SIDES == SIDE_CHOICES


def test_variant_builders_and_rank_budgets() -> None:
    settings = registry.AdapterSettings(r=8, alpha=8.0, target_modules=["query"], options={"side": "pre"},
                                        max_steps=100)
    dorma = registry.get_method("dorma-pi").peft_config(settings)
    assert (dorma.variant, dorma.inflation, dorma.r) == ("dorma", "pi", 8)
    ada = registry.get_method("adalorma").peft_config(settings)
    # AdaLoRMA starts at 1.5 r and prunes to r; whole layers (no fused parts); schedule from max_steps
    budget = {k: ada.variant_options[k] for k in ("target_r", "tinit", "tfinal", "total_step")}
    assert (ada.variant, ada.inflation, ada.r, budget, ada.fused_parts) == \
        ("adalorma", "plus", 12, {"target_r": 8, "tinit": 10, "tfinal": 20, "total_step": 100}, {})
    adalora = registry.get_method("adalora").peft_config(settings)
    assert (type(adalora).__name__, adalora.init_r, adalora.target_r, adalora.total_step) == \
        ("AdaLoraConfig", 12, 8, 100)
    assert [registry.get_method(n).rank_budget for n in ("adalorma", "adalora", "dylorma", "lora")] == \
        [True, True, False, False]
    for name in ("adalorma", "adalora"):
        with pytest.raises(ValueError, match=f"method {name} needs --max-steps"):
            registry.get_method(name).peft_config(registry.AdapterSettings(r=8, alpha=8.0, target_modules=["q"]))


@pytest.mark.parametrize("name", ["lorma-plus", "lorma-pi", "dorma-plus", "dorma-pi", "adalorma", "dylorma"])
def test_a_saved_lorma_adapter_config_names_its_method(name: str) -> None:
    """analysis labels a run from its adapter_config.json alone: every LoRMA method is read back by name."""
    settings = registry.AdapterSettings(r=4, alpha=8.0, target_modules=["query"], options={"side": "post"},
                                        max_steps=50)
    saved = registry.get_method(name).peft_config(settings).to_dict()
    assert registry.method_of_adapter_config(saved) == (name, {"side": "post"})


def test_every_inflation_is_a_lorma_method_in_the_inflations_order() -> None:
    """lorma-<x> for each inflation, found without torch, in the order the inflation registry lists them."""
    from lorma.inflations import base, inflation_names

    assert base._REGISTRY.first == registry.PAPER_INFLATIONS
    methods = [registry.get_method(n) for n in registry.method_names()]
    lorma = [m.name for m in methods if m.inflation and not m.variant]
    assert lorma == [f"lorma-{x}" for x in inflation_names()]
