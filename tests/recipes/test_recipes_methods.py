"""Method names -> models: which parameters train, and that the head is trained with every adapter."""

from __future__ import annotations

import pytest
import torch

from lorma.plumbing.errors import InputError
from lorma.recipes.config import build_config
from lorma.recipes.methods import build_method_model, count_parameters


def _model(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        vocab_size=120, num_labels=num_labels)
    return BertForSequenceClassification(config)


HEAD = 32 * 3 + 3  # classifier Linear(32, 3)


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lorma-plus", "lorma-pi", "lorma-none", "lora"])
def test_adapter_methods_train_adapter_and_head_only(method: str) -> None:
    cfg = build_config({"method": method, "r": 4, "alpha": 8}, {})
    model = build_method_model(_model(), cfg, ["classifier"], "SEQ_CLS")
    trainable, total = count_parameters(model)
    # query and value in 2 layers, each A (r x 32) and B (32 x r): square, so LoRMA and LoRA agree
    assert trainable == 2 * 2 * (4 * 32 + 32 * 4) + HEAD
    names = _trainable_names(model)
    assert any("classifier" in n for n in names)
    assert all(("lora_" in n or "lorma_" in n or "classifier" in n) for n in names)
    assert not any("key" in n for n in names)  # only query and value are adapted


def test_lorma_layers_get_inflation_and_side() -> None:
    from lorma.layers.base import LormaLayer

    cfg = build_config({"method": "lorma-pi", "side": "post", "r": 2, "alpha": 4}, {})
    model = build_method_model(_model(), cfg, ["classifier"], "SEQ_CLS")
    layers = [m for m in model.modules() if isinstance(m, LormaLayer)]
    assert len(layers) == 4
    for layer in layers:
        assert layer.inflation["default"] == "pi" and layer.side["default"] == "post"
        assert layer.scaling["default"] == pytest.approx(2.0)


def test_lorma_starts_at_the_base_model() -> None:
    base = _model().eval()
    ids = torch.randint(0, 120, (2, 7))
    with torch.no_grad():
        expected = base(input_ids=ids).logits.clone()
    for method in ("lorma-plus", "lorma-pi"):
        cfg = build_config({"method": method}, {})
        model = build_method_model(_model(), cfg, ["classifier"], "SEQ_CLS").eval()
        with torch.no_grad():
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dora_adds_magnitudes() -> None:
    cfg = build_config({"method": "dora", "r": 4}, {})
    trainable, _ = count_parameters(build_method_model(_model(), cfg, ["classifier"], "SEQ_CLS"))
    assert trainable == 2 * 2 * (4 * 32 + 32 * 4 + 32) + HEAD


def test_full_bitfit_and_head_only() -> None:
    full = build_method_model(_model(), build_config({"method": "full"}, {}), ["classifier"], "SEQ_CLS")
    assert count_parameters(full)[0] == sum(p.numel() for p in _model().parameters())

    reference = _model()
    biases = sum(p.numel() for n, p in reference.named_parameters() if n.endswith(".bias"))
    bitfit = build_method_model(_model(), build_config({"method": "bitfit"}, {}), ["classifier"], "SEQ_CLS")
    assert count_parameters(bitfit)[0] == biases + 32 * 3  # every bias, plus the head's weight
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in _trainable_names(bitfit))

    head = build_method_model(_model(), build_config({"method": "head-only"}, {}), ["classifier"], "SEQ_CLS")
    assert _trainable_names(head) == {"classifier.weight", "classifier.bias"}


def test_bad_targets_and_unknown_model_types() -> None:
    cfg = build_config({"method": "lora", "target_modules": ["nosuch"]}, {})
    with pytest.raises(InputError, match="target module 'nosuch' matches no module"):
        build_method_model(_model(), cfg, ["classifier"], "SEQ_CLS")
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    distil = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=48,
                                                                  vocab_size=120))
    with pytest.raises(InputError, match="no default target modules for model type 'distilbert'"):
        build_method_model(distil, build_config({"method": "lorma-plus"}, {}), ["classifier"], "SEQ_CLS")
    ok = build_method_model(distil, build_config({"method": "lorma-plus", "target_modules": ["q_lin", "v_lin"]}, {}),
                            ["pre_classifier", "classifier"], "SEQ_CLS")
    assert any("pre_classifier" in n for n in _trainable_names(ok))
