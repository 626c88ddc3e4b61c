"""DoRMA, AdaLoRMA and DyLoRMA (docs/variants.md): each against its formula in float64, the base model at init,
merge / unmerge, save / load in a fresh process, several adapters, the rank budget, and bad input."""

from __future__ import annotations

import copy
import json
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import fresh_python
from conftest import reference_inflation
from lorma import LormaConfig
from lorma.layers.base import LormaLayer
from test_adapter_formula import SIDES, TwoLayer, linear_weight, rel_err

# (variant, inflation) pairs the variants take, and the options each needs
CASES = [("dorma", "plus"), ("dorma", "pi"), ("adalorma", "plus"), ("dylorma", "plus")]
OPTIONS = {"adalorma": {"target_r": 2, "total_step": 20}, "dylorma": {"min_rank": 1}, "dorma": {}}


def variant_config(variant: str, inflation: str = "plus", **kwargs) -> LormaConfig:
    options = {"r": 4, "alpha": 8, "inflation": inflation, "variant": variant, **OPTIONS[variant], **kwargs}
    return LormaConfig(**options)


def transform_of(
    layer: LormaLayer, adapter: str, A: torch.Tensor, B: torch.Tensor, rank: int | None = None
) -> torch.Tensor:
    """The dense I(...) of one part in float64, from the variant's definition (not from lorma's code)."""
    variant = layer.lorma_variant[adapter].name
    s = layer.scaling[adapter]
    if variant == "adalorma":  # I + s P diag(lambda) Q
        singular = layer.lorma_E[adapter].detach().double().view(-1)
        return torch.eye(B.shape[0], dtype=torch.float64) + s * (B.double() * singular) @ A.double()
    if variant == "dylorma":  # I + (alpha / b) B[:, :b] A[:b]
        b = rank or layer.r[adapter]
        s_b = layer.alpha[adapter] / b
        return torch.eye(B.shape[0], dtype=torch.float64) + s_b * B[:, :b].double() @ A[:b].double()
    return reference_inflation(A, B, layer.inflation[adapter], s)


def dense_weight(layer: LormaLayer, adapter: str, rank: int | None = None) -> torch.Tensor:
    """The adapted weight (nn.Linear layout) in float64, fused parts part by part; DoRMA's rescaling after."""
    W0 = linear_weight(layer).double()
    A, B = layer.lorma_A[adapter].detach(), layer.lorma_B[adapter].detach()
    side, fused = layer.side[adapter], layer.fused[adapter]
    V = W0.clone()
    parts = [(slice(None), A, B)] if fused is None else [
        (slice(p * (W0.shape[0] // fused[0]), (p + 1) * (W0.shape[0] // fused[0])), A[i], B[i])
        for i, p in enumerate(fused[1])
    ]
    for rows, a, b in parts:
        M = transform_of(layer, adapter, a, b, rank)
        V[rows] = M @ W0[rows] if side == "pre" else W0[rows] @ M
    if layer.lorma_variant[adapter].name == "dorma":  # W = diag(m / ||V||_r) V
        m = layer.lorma_magnitude[adapter].detach().double()
        return (m / V.norm(dim=1))[:, None] * V
    return V


def dense_out(layer: LormaLayer, adapter: str, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    bias = layer.get_base_layer().bias
    out = x.double() @ dense_weight(layer, adapter, rank).T
    return out if bias is None else out + bias.detach().double()


# ---------------------------------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("variant", "inflation"), CASES)
def test_forward_equals_the_dense_formula(variant: str, inflation: str, side: str, conv1d: bool) -> None:
    config = variant_config(variant, inflation, side=side, target_modules=["proj"], init_weights=False)
    model = get_peft_model(TwoLayer(conv1d=conv1d), config).eval()
    layer = model.base_model.model.proj
    x = torch.randn(4, 5, 12)
    with torch.no_grad():
        assert rel_err(layer(x), dense_out(layer, "default", x)) < 1e-5
        # many tokens: pi folds its transform into the weight, built from the variant's delta_weight
        tokens = torch.randn(300, 12)
        assert rel_err(layer(tokens), dense_out(layer, "default", tokens)) < 1e-5


def test_dylorma_trains_the_drawn_truncation_and_infers_at_inference_rank() -> None:
    config = variant_config("dylorma", r=6, min_rank=2, target_modules=["proj"], init_weights=False)
    model = get_peft_model(TwoLayer(), config)
    layer = model.base_model.model.proj
    x = torch.randn(3, 12)
    drawn = set()
    model.train()
    for _ in range(40):
        model(x)  # LormaModel.forward draws b for the whole model
        b = layer.lorma_variant["default"].training_rank
        drawn.add(b)
        with torch.no_grad():
            assert rel_err(layer(x), dense_out(layer, "default", x, rank=b)) < 1e-5
    assert drawn == set(range(2, 7))  # uniform on [min_rank, r]: all of them within 40 draws
    # the gradient reaches the first b components only
    layer.lorma_variant["default"].training_rank = 3
    layer(x).square().sum().backward()
    grad_a = layer.lorma_A["default"].grad
    assert grad_a[:3].abs().sum() > 0 and torch.equal(grad_a[3:], torch.zeros_like(grad_a[3:]))
    model.eval()
    with torch.no_grad():
        assert rel_err(layer(x), dense_out(layer, "default", x, rank=6)) < 1e-5
    layer.lorma_variant["default"].inference_rank = 2
    with torch.no_grad():
        assert rel_err(layer(x), dense_out(layer, "default", x, rank=2)) < 1e-5


def test_dorma_gradient_is_the_formulas_with_the_norm_held_constant() -> None:
    """DoRA's Section 4.3 (and peft): the forward is exact, the norm is a constant for the backward."""
    config = variant_config("dorma", target_modules=["proj"], init_weights=False)
    model = get_peft_model(TwoLayer(), config)
    layer = model.base_model.model.proj
    x = torch.randn(6, 12)
    layer(x).square().sum().backward()
    A = layer.lorma_A["default"].detach().double().requires_grad_()
    B = layer.lorma_B["default"].detach().double().requires_grad_()
    m = layer.lorma_magnitude["default"].detach().double().requires_grad_()
    W0 = linear_weight(layer).double()
    V = (torch.eye(20, dtype=torch.float64) + layer.scaling["default"] * B @ A) @ W0
    W = (m / V.norm(dim=1).detach())[:, None] * V
    (x.double() @ W.T + layer.get_base_layer().bias.double()).square().sum().backward()
    for ours, reference in ((layer.lorma_A, A), (layer.lorma_B, B), (layer.lorma_magnitude, m)):
        assert rel_err(ours["default"].grad, reference.grad) < 1e-5


def test_dorma_thin_norm_matches_the_rows_of_v() -> None:
    """The norm from thin products (plus) against ||V||_r of the dense V, on a wide layer."""
    model = get_peft_model(TwoLayer(d_in=64, d_hidden=48), variant_config("dorma", side="post", target_modules=["proj"],
                                                                          init_weights=False))
    layer = model.base_model.model.proj
    W0 = linear_weight(layer).double()
    M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(), "plus",
                            layer.scaling["default"])
    norms = layer.lorma_variant["default"].row_norms(layer, "default", linear_weight(layer).float())
    assert rel_err(norms, (W0 @ M).norm(dim=1)) < 1e-6


# ---------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize(("variant", "inflation"), CASES)
def test_the_base_model_at_init(tiny_bert, tiny_gpt2, tiny_llama, variant: str, inflation: str) -> None:
    ids = torch.randint(0, 120, (2, 9))
    for base in (tiny_bert, tiny_gpt2, tiny_llama):
        with torch.no_grad():
            ref = base(ids)[0]
        for side in SIDES:
            extra = {"fused_parts": {}} if variant == "adalorma" else {}  # AdaLoRMA: whole layers (GPT-2's c_attn)
            model = get_peft_model(copy.deepcopy(base), variant_config(variant, inflation, side=side, **extra))
            with torch.no_grad():
                out = model(input_ids=ids)[0]
            tolerance = 0.0 if inflation == "plus" and variant != "dorma" else 1e-5
            assert (out - ref).abs().max() <= tolerance * max(1.0, ref.abs().max().item()), (variant, side)


# ---------------------------------------------------------------------------------------------- merge / unmerge
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("variant", "inflation"), CASES)
def test_merge_and_unmerge(tiny_gpt2, variant: str, inflation: str, side: str) -> None:
    extra = {"fused_parts": {}} if variant == "adalorma" else {}
    originals = {name: p.detach().clone() for name, p in tiny_gpt2.state_dict().items()}
    model = get_peft_model(tiny_gpt2, variant_config(variant, inflation, side=side, init_weights=False, **extra)).eval()
    ids = torch.randint(0, 120, (2, 7))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        model.merge_adapter()
        assert rel_err(model(input_ids=ids).logits, unmerged) < 1e-5
        layer = next(m for m in model.modules() if isinstance(m, LormaLayer))
        merged_weight = linear_weight(layer).double()
        assert rel_err(merged_weight, dense_weight_of_unmerged(layer)) < 1e-5
        model.unmerge_adapter()
    state = model.get_base_model().state_dict()
    restored = {name.replace(".base_layer", ""): p for name, p in state.items() if "lorma_" not in name}
    assert restored.keys() == originals.keys()
    for name, before in originals.items():
        after = restored[name]
        if variant == "adalorma":  # LoRMA+'s Woodbury inverse: exact to rounding, no copy kept
            assert rel_err(after, before) < 1e-6
        else:  # a copy kept at merge time
            assert torch.equal(after, before)


def dense_weight_of_unmerged(layer: LormaLayer) -> torch.Tensor:
    """The formula's weight from W0 (the kept copy, or the Woodbury inverse: the layer's own unmerge)."""
    saved = layer._weights_before_merge.get("default")
    merged = layer.get_base_layer().weight.data.clone()
    if saved is None:
        layer.unmerge()
    else:
        layer.get_base_layer().weight.data = saved.clone()
    expected = dense_weight(layer, "default")
    if saved is None:
        layer.merge()
    layer.get_base_layer().weight.data = merged
    return expected


@pytest.mark.parametrize(("variant", "inflation"), CASES)
def test_merge_and_unload_gives_the_plain_model(tiny_bert, variant: str, inflation: str) -> None:
    ids = torch.randint(0, 120, (2, 8))
    model = get_peft_model(tiny_bert, variant_config(variant, inflation, side="post", init_weights=False)).eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).last_hidden_state
    merged = model.merge_and_unload()
    assert type(merged.encoder.layer[0].attention.self.query) is nn.Linear
    with torch.no_grad():
        assert rel_err(merged(input_ids=ids).last_hidden_state, adapted) < 1e-5


# ---------------------------------------------------------------------------------------------- save / load
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import lorma  # noqa: F401  (registers LORMA with peft)
    from peft import PeftModel
    from transformers import AutoModel

    base_dir, adapter_dir, ids_path, out_path = sys.argv[1:]
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(ids_path)).last_hidden_state, out_path)
    """
)


@pytest.mark.parametrize(("variant", "inflation"), CASES)
def test_save_and_load_in_a_fresh_process(tiny_bert, tmp_path, variant: str, inflation: str) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_bert.save_pretrained(base_dir)
    extra = {"inference_rank": 3} if variant == "dylorma" else {}
    model = get_peft_model(tiny_bert, variant_config(variant, inflation, init_weights=False, **extra)).eval()
    model.save_pretrained(adapter_dir)
    from safetensors.torch import load_file

    keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    own = {"dorma": ".lorma_magnitude", "adalorma": ".lorma_E"}.get(variant)
    if own is not None:  # the variant's own tensors are saved with A and B
        assert len([k for k in keys if own in k]) == 4
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["variant"] == variant and saved["use_dora"] == (variant == "dorma")
    ids = torch.randint(0, 120, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    done = fresh_python.run([sys.executable, str(script), base_dir, adapter_dir, tmp_path / "ids.pt",
                             tmp_path / "o.pt"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "o.pt"), expected)


# ---------------------------------------------------------------------------------------------- several adapters
def test_several_adapters_switch_merge_and_delete(tiny_bert) -> None:
    ids = torch.randint(0, 120, (2, 8))
    model = get_peft_model(tiny_bert, variant_config("dorma", init_weights=False), adapter_name="dorma").eval()
    model.add_adapter("ada", variant_config("adalorma", side="post", init_weights=False))
    model.add_adapter("dy", variant_config("dylorma", init_weights=False))
    model.add_adapter("plain", LormaConfig(r=2, init_weights=False))
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    assert set(layer.lorma_magnitude) == {"dorma"} and set(layer.lorma_E) == {"ada"}
    x = torch.randn(3, 32)
    outputs = {}
    for adapter in ("dorma", "ada", "dy", "plain"):
        model.set_adapter(adapter)
        assert layer.lorma_A[adapter].requires_grad
        with torch.no_grad():
            if adapter != "plain":
                assert rel_err(layer(x), dense_out(layer, adapter, x)) < 1e-5
            outputs[adapter] = model(input_ids=ids).last_hidden_state
    # AdaLoRMA and DyLoRMA are LoRMA+ products: they compose with others as merging in order does
    model.base_model.set_adapter(["ada", "plain"])
    with torch.no_grad():
        both = model(input_ids=ids).last_hidden_state
        model.base_model.merge_adapter(["ada", "plain"])
        assert rel_err(model(input_ids=ids).last_hidden_state, both) < 1e-5
        model.base_model.unmerge_adapter()
    # a DoRMA adapter's norm is of the weight it transforms: active with another is refused, by name
    model.base_model.set_adapter(["dorma", "plain"])
    with pytest.raises(ValueError, match=r"query.*DoRMA adapter 'dorma' cannot be active together with \['plain'\]"):
        model(input_ids=ids)
    model.delete_adapter("dorma")
    assert "dorma" not in layer.lorma_magnitude and "dorma" not in layer.lorma_variant
    model.set_adapter("ada")
    with torch.no_grad():  # W0 went through a Woodbury unmerge above: back to rounding
        assert rel_err(model(input_ids=ids).last_hidden_state, outputs["ada"]) < 1e-6


# ---------------------------------------------------------------------------------------------- AdaLoRMA's budget
def cubic_budget(step: int, init: int, target: int, tinit: int, tfinal: int, total: int) -> int:
    """AdaLoRA's schedule (Zhang et al. 2023, eq. 11), written here from the paper."""
    if step <= tinit:
        return init
    if step > total - tfinal:
        return target
    return int((init - target) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + target)


def test_adalorma_prunes_to_the_cubic_budget_and_records_the_final_ranks(tiny_bert, tmp_path) -> None:
    total, tinit, tfinal, r, target = 30, 4, 8, 6, 3
    config = LormaConfig(r=r, alpha=6, variant="adalorma", target_r=target, tinit=tinit, tfinal=tfinal,
                         total_step=total, target_modules=["query", "key", "value"])
    model = get_peft_model(tiny_bert, config)
    layers = [m for m in model.modules() if isinstance(m, LormaLayer)]
    n_modules = len(layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, target_states = torch.randint(0, 120, (4, 10)), torch.randn(4, 10, 32)
    for step in range(total):
        loss = (model(input_ids=ids).last_hidden_state - target_states).square().mean()
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        nonzero = sum(int(torch.count_nonzero(m.lorma_E["default"])) for m in layers)
        budget = cubic_budget(step, r * n_modules, target * n_modules, tinit, tfinal, total)
        if step > tinit:  # pruned to the budget every step (deltaT = 1) from then on
            assert nonzero == budget, step
    assert nonzero == target * n_modules
    ranks = model.peft_config["default"].variant_options["final_ranks"]
    assert sum(ranks.values()) == target * n_modules and len(ranks) == n_modules
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, LormaLayer):
            assert ranks[name] == int(torch.count_nonzero(module.lorma_E["default"]))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["variant_options"]["final_ranks"] == ranks and "final_ranks" not in saved


def test_adalorma_adds_the_orthogonality_penalty_in_training_only() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=48, vocab_size=120, num_labels=2))
    config = LormaConfig(r=4, variant="adalorma", target_r=2, total_step=10, orth_reg_weight=0.3,
                         task_type="SEQ_CLS", target_modules=["query", "value"])
    model = get_peft_model(base, config)
    for module in model.modules():  # no dropout: training and eval then differ by the penalty alone
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ids, labels = torch.randint(0, 120, (2, 6)), torch.tensor([0, 1])
    with torch.no_grad():
        trained = model.train()(input_ids=ids, labels=labels).loss
        plain = model.eval()(input_ids=ids, labels=labels).loss
    eye = torch.eye(4, dtype=torch.float64)
    penalty = []
    for module in model.modules():
        if isinstance(module, LormaLayer):
            P, Q = module.lorma_B["default"].detach().double(), module.lorma_A["default"].detach().double()
            penalty += [(P.T @ P - eye).norm(), (Q @ Q.T - eye).norm()]
    assert len(penalty) == 4 and trained.item() > plain.item()
    assert trained.item() == pytest.approx(plain.item() + 0.3 * torch.stack(penalty).mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "adalorma", "inflation": "pi", "target_r": 2, "total_step": 10},
         r"AdaLoRMA needs inflation='plus', got 'pi'.*rotates the rows"),
        ({"variant": "adalorma", "target_r": 2}, r"total_step .* must be a positive integer, got None"),
        ({"variant": "adalorma", "total_step": 10}, r"target_r .* \[1, 3\], got None"),
        ({"variant": "adalorma", "target_r": 4, "total_step": 10}, r"target_r .* got 4"),
        ({"variant": "adalorma", "target_r": 2, "total_step": 10, "tinit": 6, "tfinal": 4}, r"no budget phase"),
        ({"variant": "adalorma", "target_r": 2, "total_step": 10, "beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
        ({"variant": "dylorma", "inflation": "pi"}, r"DyLoRMA needs inflation='plus', got 'pi'"),
        ({"variant": "dylorma", "min_rank": 5}, r"min_rank must be an integer in \[1, 4\]"),
        ({"variant": "dylorma", "inference_rank": 0}, r"inference_rank must be None or an integer in \[1, r=4\]"),
        ({"target_r": 2}, r"target_r=2 is an option of variant='adalorma', but variant=None"),
        ({"variant": "dorma", "inference_rank": 2}, r"inference_rank=2 is an option of variant='dylorma'"),
        ({"use_dora": True, "variant": "dylorma"}, r"use_dora=True is DoRMA; it cannot be combined with variant='dyl"),
    ],
)
def test_bad_variant_options_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LormaConfig(r=4, **kwargs)


def test_use_dora_is_dorma_and_adalorma_refuses_fused_parts_by_module(tiny_gpt2) -> None:
    assert LormaConfig(use_dora=True).variant == "dorma"
    assert LormaConfig(variant="dorma").use_dora
    with pytest.raises(ValueError, match=r"module 'transformer.h.0.attn.c_attn': AdaLoRMA adapts whole layers"):
        get_peft_model(tiny_gpt2, variant_config("adalorma"))


def test_update_and_allocate_without_an_adalorma_adapter_is_an_error() -> None:
    model = get_peft_model(TwoLayer(), variant_config("dorma", target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"no active adapter has a variant that acts after optimizer steps "
                                         r"\(variants that do: \['adalorma'\]; active: \['default'\]\)"):
        model.base_model.update_and_allocate(0)


def test_peft_model_loads_the_variants_by_name(tmp_path) -> None:
    """A saved DoRMA adapter loads through peft's own entry point (the variant comes from the config)."""
    base = TwoLayer()
    model = get_peft_model(copy.deepcopy(base), variant_config("dorma", target_modules=["proj"], init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    layer = loaded.base_model.model.proj
    assert type(layer.lorma_variant["default"]).__name__ == "DormaVariant"
    x = torch.randn(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------- recipes, Trainer
def _classifier(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        vocab_size=120, num_labels=num_labels)
    return BertForSequenceClassification(config)


@pytest.mark.parametrize(
    ("method", "variant", "inflation"),
    [("dorma-plus", "dorma", "plus"), ("dorma-pi", "dorma", "pi"), ("adalorma", "adalorma", "plus"),
     ("dylorma", "dylorma", "plus")],
)
def test_methods_build_the_variants(method: str, variant: str, inflation: str) -> None:
    from lorma.recipes.config import build_config
    from lorma.recipes.methods import build_method_model

    cfg = build_config({"method": method, "r": 4, "alpha": 8, "max_steps": 50}, {})
    model = build_method_model(_classifier(), cfg, ["classifier"], "SEQ_CLS")
    config = model.peft_config["default"]
    assert (config.variant, config.inflation) == (variant, inflation)
    if method == "adalorma":  # AdaLoRA's comparison: from 1.5 r down to r on average, over the run's steps
        options = config.variant_options
        assert (config.r, options["target_r"], options["total_step"], options["tinit"], options["tfinal"]) == \
            (6, 4, 50, 5, 10)
    layers = [m for m in model.modules() if isinstance(m, LormaLayer)]
    assert len(layers) == 4 and all(type(m.lorma_variant["default"]).name == variant for m in layers)


def test_adalora_baseline_and_the_budget_methods_need_max_steps() -> None:
    from peft.tuners.adalora import AdaLoraModel

    from lorma.plumbing.errors import InputError
    from lorma.recipes.config import build_config
    from lorma.recipes.methods import build_method_model

    cfg = build_config({"method": "adalora", "r": 4, "max_steps": 50}, {})
    model = build_method_model(_classifier(), cfg, ["classifier"], "SEQ_CLS")
    assert isinstance(model.base_model, AdaLoraModel)
    assert (model.peft_config["default"].init_r, model.peft_config["default"].target_r) == (6, 4)
    for method in ("adalora", "adalorma"):
        with pytest.raises(InputError, match=f"method {method} needs --max-steps"):
            build_method_model(_classifier(), build_config({"method": method}, {}), ["classifier"], "SEQ_CLS")


def test_rank_allocation_callback_prunes_inside_a_trainer(tmp_path) -> None:
    """The callback runs the budget after every optimizer step of a real Trainer; the saved ranks add up."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from lorma.plumbing.callbacks import RankAllocationCallback

    total, r, target = 12, 4, 2
    config = LormaConfig(r=r, alpha=4, variant="adalorma", target_r=target, tinit=2, tfinal=3, total_step=total,
                         task_type="SEQ_CLS", target_modules=["query", "value"])
    model = get_peft_model(_classifier(), config)
    data = Dataset.from_dict({"input_ids": torch.randint(1, 120, (64, 8)).tolist(),
                              "labels": torch.randint(0, 3, (64,)).tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=total, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[RankAllocationCallback()]).train()
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LormaLayer)}
    ranks = {n: int(torch.count_nonzero(m.lorma_E["default"])) for n, m in layers.items()}
    assert sum(ranks.values()) == target * len(layers)
    assert model.peft_config["default"].variant_options["final_ranks"] == ranks


def test_rank_allocation_callback_refuses_a_model_without_a_budget() -> None:
    from lorma.plumbing.callbacks import RankAllocationCallback

    with pytest.raises(ValueError, match=r"RankAllocationCallback: the trained model has no update_and_allocate"):
        RankAllocationCallback().on_optimizer_step(None, None, None, model=nn.Linear(2, 2))


def test_analyze_reads_the_final_ranks_of_both_budgets(tiny_bert, tmp_path) -> None:
    """``lorma analyze``: AdaLoRMA's final_ranks and peft AdaLoRA's rank_pattern, by module name, side by side."""
    from peft import AdaLoraConfig

    from lorma.analysis.report import analyze
    from lorma.analysis.runs import final_ranks

    base_dir = tmp_path / "base"
    tiny_bert.save_pretrained(base_dir)
    config = LormaConfig(r=4, variant="adalorma", target_r=2, total_step=10, target_modules=["query"])
    ours = get_peft_model(copy.deepcopy(tiny_bert), config)
    ranks = {"encoder.layer.0.attention.self.query": 3, "encoder.layer.1.attention.self.query": 1}
    config.variant_options["final_ranks"] = dict(ranks)
    ours.save_pretrained(tmp_path / "adalorma")
    theirs = get_peft_model(copy.deepcopy(tiny_bert), AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                                    target_modules=["query"]))
    theirs.peft_config["default"].rank_pattern = {
        "encoder.layer.0.attention.self.query.lora_E.default": [True, False, False, False],
        "encoder.layer.1.attention.self.query.lora_E.default": [True, True, True, False],
    }
    theirs.save_pretrained(tmp_path / "adalora")
    read = json.loads((tmp_path / "adalora" / "adapter_config.json").read_text())
    assert final_ranks(read) == {"encoder.layer.0.attention.self.query": 1, "encoder.layer.1.attention.self.query": 3}
    result = analyze(tmp_path / "adalorma", against=tmp_path / "adalora", base_model=str(base_dir),
                     out_dir=tmp_path / "out")
    assert result["final_ranks"] == {"run": ranks, "against": final_ranks(read)}
    text = (tmp_path / "out" / "analysis.txt").read_text()
    assert "the rank the rank budget left" in text and (tmp_path / "out" / "final_ranks.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- export
def test_export_of_dylorma_at_rank_b_is_the_exact_truncation(tiny_bert, tmp_path) -> None:
    from lorma.export.lora import lora_export

    base = copy.deepcopy(tiny_bert)
    model = get_peft_model(tiny_bert, variant_config("dylorma", r=4, init_weights=False)).eval()
    exported = lora_export(model, "default", rank=2)
    assert exported.exact and exported.config.r == 2
    assert all(m.lorma_variant["default"].inference_rank is None for m in model.modules() if isinstance(m, LormaLayer))
    exported.save(tmp_path / "lora")
    lora = PeftModel.from_pretrained(base, tmp_path / "lora").eval()  # plain peft LoRA
    for module in model.modules():
        if isinstance(module, LormaLayer):
            module.lorma_variant["default"].inference_rank = 2
    ids = torch.randint(0, 120, (2, 7))
    with torch.no_grad():
        assert rel_err(lora(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state) < 1e-5


def test_export_of_dorma_is_full_rank_and_needs_a_rank() -> None:
    from lorma.export.lora import ExportError, lora_export

    model = get_peft_model(TwoLayer(), variant_config("dorma", target_modules=["proj"], init_weights=False))
    with pytest.raises(ExportError, match=r"inflation 'plus' with variant 'dorma': its update W - W0 is full rank"):
        lora_export(model, "default")
    with pytest.raises(ExportError, match=r"DyLoRMA .* --max-error does not apply"):
        lora_export(get_peft_model(TwoLayer(), variant_config("dylorma", target_modules=["proj"])), max_error=0.1)


def test_dorma_dropout_acts_on_the_adapter_path_only() -> None:
    """``(m / ||V||_r) * (W0 x + (I(BA) - I) drop(W0 x)) + b``: the frozen path and the norm never see dropout."""
    config = variant_config("dorma", dropout=0.5, target_modules=["proj"], init_weights=False)
    layer = get_peft_model(TwoLayer(), config).base_model.model.proj
    layer.train()
    x = torch.randn(64, 12)
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    W0, bias = linear_weight(layer).double(), layer.get_base_layer().bias.detach().double()
    h = x.double() @ W0.T
    dropped = torch.nn.functional.dropout(h.float(), 0.5, training=True).double()
    M = reference_inflation(layer.lorma_A["default"].detach(), layer.lorma_B["default"].detach(), "plus",
                            layer.scaling["default"])
    scale = layer.lorma_magnitude["default"].detach().double() / (M @ W0).norm(dim=1)
    expected = scale * (h + dropped @ (M - torch.eye(20, dtype=torch.float64)).T) + bias
    assert rel_err(out, expected) < 1e-5
