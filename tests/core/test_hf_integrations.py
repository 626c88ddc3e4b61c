"""LoRMA through transformers' own adapter API and trl's SFTTrainer (the pinned versions work together)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import reference_inflation
from lorma import LormaConfig
from lorma.layers.base import LormaLayer

IDS = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def dense_merged(base: torch.nn.Module, adapted: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """A copy of ``base`` whose adapted weights are ``I(BA) W0`` / ``W0 I(BA)`` from the paper's formula."""
    merged = copy.deepcopy(base)
    for name, layer in adapted.named_modules():
        if not isinstance(layer, LormaLayer) or adapter not in layer.lorma_A:
            continue
        target = merged.get_submodule(name)
        M = reference_inflation(
            layer.lorma_A[adapter].detach(), layer.lorma_B[adapter].detach(), layer.inflation[adapter],
            layer.scaling[adapter],
        )
        w0 = target.weight.detach().double()
        with torch.no_grad():
            target.weight.copy_(M @ w0 if layer.side[adapter] == "pre" else w0 @ M)
    return merged


def lorma_param_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if "lorma_" in n}


def test_transformers_adapter_api_with_lorma(tiny_llama, tmp_path: Path) -> None:
    base = copy.deepcopy(tiny_llama)
    reference = logits(base)
    model = tiny_llama

    model.add_adapter(LormaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False),
                      adapter_name="first")
    first = logits(model)
    assert (first - reference).abs().max() > 1e-3
    torch.testing.assert_close(first, logits(dense_merged(base, model, "first")), atol=1e-5, rtol=1e-5)

    model.add_adapter(LormaConfig(r=2, alpha=4, inflation="pi", side="post", target_modules=["o_proj"],
                                  init_weights=False), adapter_name="second")
    assert model.active_adapters() == ["second"]  # transformers activates an added adapter
    torch.testing.assert_close(logits(model), logits(dense_merged(base, model, "second")), atol=1e-5, rtol=1e-5)

    model.set_adapter("first")
    assert model.active_adapters() == ["first"]
    torch.testing.assert_close(logits(model), first, atol=0, rtol=0)
    model.disable_adapters()
    torch.testing.assert_close(logits(model), reference, atol=0, rtol=0)
    model.enable_adapters()
    torch.testing.assert_close(logits(model), first, atol=0, rtol=0)

    # transformers' save_pretrained writes the active adapter; load_adapter puts it on a fresh base
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORMA" and config["inflation"] == "plus"
    fresh = copy.deepcopy(base)
    fresh.load_adapter(str(tmp_path / "saved"), adapter_name="reloaded")
    torch.testing.assert_close(logits(fresh), first, atol=1e-6, rtol=1e-6)

    # an adapter saved by peft (PeftModel.save_pretrained) loads the same way
    peft_model = get_peft_model(copy.deepcopy(base), LormaConfig(r=3, alpha=3, side="post", init_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    fresh.load_adapter(str(tmp_path / "peft"), adapter_name="from_peft")
    fresh.set_adapter("from_peft")
    torch.testing.assert_close(logits(fresh), logits(peft_model), atol=1e-6, rtol=1e-6)

    # delete_adapter removes exactly that adapter's tensors; with none left the model is the base again
    model.delete_adapter("second")
    names = lorma_param_names(model)
    assert names and not any(".second" in n for n in names)
    torch.testing.assert_close(logits(model), first, atol=0, rtol=0)
    model.delete_adapter("first")
    assert not lorma_param_names(model)
    torch.testing.assert_close(logits(model), reference, atol=0, rtol=0)


@pytest.fixture(scope="module")
def tiny_causal_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama and a byte-level BPE tokenizer trained here on the test's own text (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(sft_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-causal-lm")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sft_texts() -> list[str]:
    colours = ["red", "green", "blue", "yellow"]
    things = ["apple", "leaf", "sky", "sun"]
    return [f"The {t} is {c}." for c, t in zip(colours, things)] * 4


def test_trl_sft_trainer_with_a_lorma_peft_config(tiny_causal_lm_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True, max_length=32,
        dataloader_num_workers=0, seed=0,
    )
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_dict({"text": sft_texts()}),
        processing_class=tokenizer,
        peft_config=LormaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"),
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_type.value == "LORMA"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lorma_" in n for n in trainable)
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert result.global_step == 4

    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lorma_B["default"].abs().max() > 0  # B started at 0 (identity): training moved it
    for name, param in model.get_base_model().named_parameters():  # the base weights did not move
        key = name.replace(".base_layer", "")
        if "lorma_" not in name:
            assert torch.equal(param.detach(), frozen[key]), name

    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORMA" and saved["r"] == 4
    model.eval()
    batch = tokenizer(["The sky is blue."], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir),
                                         str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-6, rtol=1e-6)


def test_trl_sft_config_trains_in_bf16_autocast_on_cpu_by_default(tiny_causal_lm_dir: Path, tmp_path: Path) -> None:
    """trl's SFTConfig sets ``bf16=True`` unless fp16 is asked for, also on a CPU: the forward runs under CPU bf16
    autocast (an un-adapted projection's output is bf16; LoRMA_pi computes its transform in the adapters' float32)
    while the adapter weights stay float32. Pass ``bf16=False`` (as the test above does) for float32 training.
    Conversational data (``messages``) goes through the tokenizer's chat template."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, max_length=48,
                     dataloader_num_workers=0, seed=0)
    assert args.bf16 is True and not args.fp16  # trl's default, whatever the device
    conversations = [{"messages": [{"role": "user", "content": f"Colour of the {t}?"},
                                   {"role": "assistant", "content": s}]} for t, s in zip("abcd", sft_texts())]
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), args=args,
        train_dataset=Dataset.from_list(conversations), processing_class=tokenizer,
        peft_config=LormaConfig(r=4, alpha=8, inflation="pi", target_modules=["q_proj", "v_proj"],
                                task_type="CAUSAL_LM"),
    )
    attention = trainer.model.base_model.model.model.layers[0].self_attn
    layer = attention.q_proj
    seen: list[tuple[bool, torch.dtype]] = []
    plain: list[torch.dtype] = []
    handles = [
        layer.register_forward_hook(lambda module, inputs, output: seen.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))),
        attention.k_proj.register_forward_hook(lambda module, inputs, output: plain.append(output.dtype)),
    ]
    try:
        trainer.train()
    finally:
        for handle in handles:
            handle.remove()
    assert seen and set(seen) == {(True, torch.bfloat16)}
    assert plain and set(plain) == {torch.bfloat16}
    assert layer.lorma_A["default"].dtype == layer.lorma_B["default"].dtype == torch.float32
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
