"""``lorma export --serving vllm|llamacpp``: adapters that vLLM's LoRA loader and llama.cpp's converter accept.

Neither loader runs here (vLLM needs a GPU build; llama.cpp's ``convert_lora_to_gguf.py`` is not on PyPI: the
``gguf`` package ships its gguf-py library, not the converter scripts). So each rule they apply to an adapter is
written out below as a checker, with the file it comes from, and the exports are run through the checkers; the
checkers are shown to catch each violation on purpose-broken adapters. Where llama.cpp's converter maps a tensor
name it uses gguf-py's tensor table, and so does the checker (the installed ``gguf`` package). Numbers: the
export loaded with peft's ``LoraModel`` gives the LoRMA+ model's logits in float64, and so does the update each
loader computes from the files (its own scaling rule).

Sources (read for these rules): vLLM ``vllm/lora/peft_helper.py``, ``vllm/lora/utils.py``,
``vllm/lora/lora_model.py``, ``vllm/config/lora.py``, ``vllm/model_executor/models/llama.py``; llama.cpp
``convert_lora_to_gguf.py``, ``conversion/llama.py`` (``convert_hf_to_gguf.py``), ``src/llama-adapter.h`` /
``src/llama-adapter.cpp``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from peft import LoraConfig, LoraModel, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lorma import LormaConfig
from lorma.cli import main
from lorma.commands.export import MODULES_TO_SAVE_CHOICES as CLI_MODULES_TO_SAVE
from lorma.commands.export import SERVING_CHOICES
from lorma.export.lora import (
    EXPORT_REPORT_FILE,
    MODULES_TO_SAVE_CHOICES,
    MODULES_TO_SAVE_FILE,
    MODULES_TO_SAVE_NOTE,
    SERVING_LOADERS,
    ExportError,
    lora_export,
)
from recipe_support import snapshot
from test_adapter_formula import rel_err
from test_export import IDS, adapted_layers, dense_update, far_from_identity

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]

# ------------------------------------------------------------------ vLLM's rules, as a checker

# vllm/config/lora.py: MaxLoRARanks, the values --max-lora-rank takes
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vllm/model_executor/models/llama.py: LlamaForCausalLM.packed_modules_mapping and embedding_modules; every other
# LinearBase module (o_proj, down_proj) is supported as it is (utils.py get_supported_lora_modules). The worker
# expands a packed name into its parts, which are the names an adapter's keys may end with.
VLLM_LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
VLLM_LLAMA_EXPECTED = {m for parts in VLLM_LLAMA_PACKED.values() for m in parts} | {
    "o_proj", "down_proj", "embed_tokens", "lm_head"}
# peft_helper.py _init_is_supported: string inits that only set the initial weights
VLLM_STRING_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}


def vllm_parse_name(key: str) -> tuple[str, bool]:
    """vllm/lora/utils.py parse_fine_tuned_lora_name: ``(module, is_lora_a)`` or ValueError."""
    start = 2 if key.startswith("base_model.model.") else 0
    parts = key.split(".")
    if parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[start:-2]), parts[-2] == "lora_A"
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[start:-1]), parts[-1] == "lora_embedding_A"
    raise ValueError(f"{key} is unsupported LoRA weight")


def vllm_problems(adapter: Path, base: torch.nn.Module, max_lora_rank: int = 512) -> list[str]:
    """What vLLM's LoRA loader would refuse in ``adapter`` (a directory) for Llama ``base``; [] if nothing."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    problems = []
    # peft_helper.py from_dict: required fields (no default in PEFTHelper)
    problems += [f"missing required field {f}" for f in ("r", "lora_alpha", "target_modules") if f not in config]
    r = config.get("r", 0)
    if not isinstance(r, int) or r <= 0:  # peft_helper.py __post_init__
        problems.append(f"r must be a positive integer, got {r!r}")
    # peft_helper.py _validate_features (the oldest versions accept modules_to_save None only)
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save must be None, got {config['modules_to_save']}")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora)")
    if config.get("lora_bias"):
        problems.append("lora_bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_STRING_INITS:
        problems.append(f"init_lora_weights={init!r}")
    for name in ("alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora"):
        if config.get(name):
            problems.append(f"{name} is set")
    # peft_helper.py validate_legal: rank bound and bias
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        problems.append(f"--max-lora-rank {max_lora_rank} is not one vLLM takes")
    ranks = [r, *(config.get("rank_pattern") or {}).values()]
    if isinstance(r, int) and max(ranks) > max_lora_rank:
        problems.append(f"LoRA rank {max(ranks)} is greater than max_lora_rank {max_lora_rank}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: adapter bias is not supported")
    # versions before rank_pattern / alpha_pattern support scale every module by lora_alpha / r: an adapter is
    # read the same way by all of them only without patterns (and our exports fold the scale into B: scaling 1)
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern / alpha_pattern (ignored by older vLLM: wrong scaling)")
    scaling = config.get("lora_alpha", 0) / (math.sqrt(r) if config.get("use_rslora") else r) if r else 0
    if scaling != 1:
        problems.append(f"scaling lora_alpha / r = {scaling} (the export folds it into lora_B: 1 expected)")

    # lora_model.py from_local_checkpoint: every key parsed, every module name's end expected by the model
    tensors = load_file(adapter / "adapter_model.safetensors")
    pairs: dict[str, dict[bool, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            continue  # utils.py is_base_embedding_weights: skipped
        try:
            module, is_a = vllm_parse_name(key)
        except ValueError as err:
            problems.append(str(err))
            continue
        if module.rsplit(".", 1)[-1] not in VLLM_LLAMA_EXPECTED:
            problems.append(f"expected target modules in {sorted(VLLM_LLAMA_EXPECTED)} but received {module}")
            continue
        if not tensor.is_floating_point():
            problems.append(f"{key}: not a float tensor ({tensor.dtype})")
        pairs.setdefault(module, {})[is_a] = tensor
    # layers.py set_lora: A (rank, in) and B (out, rank) copied into buffers of max_lora_rank rows
    for module, pair in pairs.items():
        if set(pair) != {True, False}:
            problems.append(f"{module}: lora_A or lora_B missing")
            continue
        weight = base.get_submodule(module).weight
        a, b = pair[True], pair[False]
        if a.shape != (a.shape[0], weight.shape[1]) or b.shape != (weight.shape[0], a.shape[0]):
            problems.append(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                            f"{tuple(weight.shape)}")
        elif a.shape[0] > max_lora_rank:
            problems.append(f"{module}: rank {a.shape[0]} above max_lora_rank")
    return problems


# ------------------------------------------------------------------ llama.cpp's rules, as a checker

# conversion/llama.py: the architectures registered to LlamaModel (gguf MODEL_ARCH.LLAMA)
LLAMACPP_LLAMA_ARCHITECTURES = {"LLaMAForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
                                "VLlama3ForCausalLM", "LlavaForConditionalGeneration",
                                "VoxtralForConditionalGeneration", "IQuestCoderForCausalLM", "LlamaModel"}


def llamacpp_base_name(key: str) -> str:
    """convert_lora_to_gguf.py get_base_tensor_name."""
    name = key.replace("base_model.model.", "")
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
        name = name.replace(suffix, ".weight")
    return name


def llamacpp_problems(adapter: Path, base_config: dict[str, Any], base: torch.nn.Module) -> list[str]:
    """What convert_lora_to_gguf.py (and llama.cpp's adapter loader) would refuse in ``adapter``; [] if nothing."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    problems = []
    if "lora_alpha" not in config:  # alpha: float = lparams["lora_alpha"]
        problems.append("adapter_config.json has no lora_alpha")
    architecture = (base_config.get("architectures") or [None])[0]
    if architecture not in LLAMACPP_LLAMA_ARCHITECTURES:  # ModelBase.from_model_architecture (Llama family here)
        return [*problems, f"Model {architecture} is not supported (as a Llama-family model)"]
    # get_tensors: each tensor is lora_A / lora_B (base_layer weights skipped, norms kept), else exit 1
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter / "adapter_model.safetensors").items():
        is_a = ".lora_A.weight" in key or ".lora_embedding_A" in key
        is_b = ".lora_B.weight" in key or ".lora_embedding_B" in key
        if not (is_a or is_b):
            if ".base_layer.weight" in key or "_layernorm" in key or ".norm" in key:
                continue
            problems.append(f"Unexpected name '{key}': Not a lora_A or lora_B tensor")
            continue
        pairs.setdefault(llamacpp_base_name(key), {})["A" if is_a else "B"] = tensor
    # the map gguf-py gives convert_hf_to_gguf's map_tensor_name, for the base model's number of blocks
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base_config["num_hidden_layers"])
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:  # assert tensor.A is not None / assert tensor.B is not None
            problems.append(f"{name}: lora_A or lora_B missing")
            continue
        a, b = pair["A"], pair["B"]
        if a.shape[-2] != b.shape[-1]:  # LoraTorchTensor: assert A.shape[-2] == B.shape[-1]
            problems.append(f"{name}: lora_A / lora_B ranks differ")
            continue
        if name == "lm_head.weight" and base_config.get("tie_word_embeddings"):
            problems.append("lm_head is present in adapter, but is ignored in base model (tied embeddings)")
            continue
        if tensor_map.get_name(name, try_suffixes=(".weight", ".bias")) is None:
            problems.append(f"Can not map tensor {name!r}")
            continue
        # llama-adapter.cpp: lora_a ne[0] == the model tensor's ne[0] (inputs), lora_b ne[1] == its ne[1] (outputs)
        weight = base.get_submodule(name.removesuffix(".weight")).weight
        if a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
            problems.append(f"tensor '{name}' has incorrect shape")
    # llama-adapter.h get_scale: the adapter's one alpha over each tensor's own rank (b->ne[0]); peft scales a
    # module by its alpha (alpha_pattern) over its rank, or over sqrt(rank) with use_rslora: the same only without
    # per-module alphas and rsLoRA
    if config.get("alpha_pattern"):
        problems.append("alpha_pattern: llama.cpp scales every tensor by the one lora_alpha")
    if config.get("use_rslora"):
        problems.append("use_rslora: llama.cpp scales by alpha / rank, not alpha / sqrt(rank)")
    return problems


# ------------------------------------------------------------------ what each loader computes from the files


def served_logits(base: torch.nn.Module, adapter: Path, loader: str) -> torch.Tensor:
    """float64 logits of ``base`` with each module's weight updated as ``loader`` computes it from the files.

    vLLM (the versions before per-module patterns): ``lora_alpha / r`` from the config for every module
    (peft_helper.py ``vllm_lora_scaling_factor``, folded into ``lora_b`` by lora_weights.py ``optimize``).
    llama.cpp: the one ``alpha`` over each tensor's own rank (llama-adapter.h ``get_scale``, ``rank = b->ne[0]``).
    """
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    model = copy.deepcopy(base).double().eval()
    with torch.no_grad():
        for key in tensors:
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = tensors[key].double(), tensors[key.replace(".lora_A.", ".lora_B.")].double()
            scale = config["lora_alpha"] / (config["r"] if loader == "vllm" else a.shape[0])
            model.get_submodule(module).weight += scale * (b @ a)
        return model(input_ids=IDS).logits


# ------------------------------------------------------------------ the exports


@pytest.fixture
def llama_base(tiny_llama, tmp_path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The tiny Llama and its ``config.json`` as saved (``architectures`` set, as for a real checkpoint)."""
    tiny_llama.save_pretrained(tmp_path / "base")
    return tiny_llama, json.loads((tmp_path / "base" / "config.json").read_text())


@pytest.mark.parametrize("side", ["pre", "post"])
def test_serving_export_is_exact_and_passes_both_loaders(llama_base, tmp_path: Path, side: str) -> None:
    """Uniform r (v_proj / down_proj zero-padded from ranks 2 / 3), alpha = r, standard keys, float32; peft's
    LoraModel on the base gives the LoRMA+ logits in float64, and so do vLLM's and llama.cpp's arithmetic."""
    base, base_config = llama_base
    lorma = LormaConfig(r=4, alpha=8, side=side, target_modules=TARGETS, rank_pattern={"v_proj": 2, "down_proj": 3})
    model = far_from_identity(get_peft_model(copy.deepcopy(base), lorma))
    exported = lora_export(model, serving="vllm")
    out = exported.save(tmp_path / "vllm")
    assert lora_export(model, serving="llamacpp").state_dict.keys() == exported.state_dict.keys()

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert not config["rank_pattern"] and not config["alpha_pattern"] and config["modules_to_save"] is None
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    state = load_file(out / "adapter_model.safetensors")
    layers = adapted_layers(model)
    assert set(state) == {f"base_model.model.{k}.lora_{ab}.weight" for k in layers for ab in "AB"}
    for key, layer in layers.items():
        a, b = state[f"base_model.model.{key}.lora_A.weight"], state[f"base_model.model.{key}.lora_B.weight"]
        own = layer.lorma_A["default"].shape[-2]
        assert own == {"v_proj": 2, "down_proj": 3}.get(key.rsplit(".", 1)[-1], 4)
        assert a.dtype == b.dtype == torch.float32
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
        assert torch.count_nonzero(a[own:]) == 0 and torch.count_nonzero(b[:, own:]) == 0  # the padding
        assert rel_err(b.double() @ a.double(), dense_update(layer, "default")) < 1e-6, key

    assert vllm_problems(out, base, max_lora_rank=8) == []
    assert llamacpp_problems(out, base_config, base) == []
    report = json.loads((out / EXPORT_REPORT_FILE).read_text())
    assert report["serving"] == "vllm" and report["vllm_max_lora_rank"] == 8 and report["exact"]

    with torch.no_grad():
        reference = copy.deepcopy(model).double()(input_ids=IDS).logits
        assert rel_err(reference, base.double()(input_ids=IDS).logits) > 1e-2  # the adapter does something
        loaded = PeftModel.from_pretrained(copy.deepcopy(base).double(), out).eval()
        assert isinstance(loaded.base_model, LoraModel)
        got = loaded(input_ids=IDS).logits
    assert got.dtype == torch.float64 and rel_err(got, reference) < 1e-6
    for loader in SERVING_LOADERS:
        assert rel_err(served_logits(base, out, loader), reference) < 1e-6, loader


def test_pi_serving_export_pads_svd_ranks(llama_base, tmp_path: Path) -> None:
    """A lossy pi export at --max-error: one r (the largest module rank), smaller ones zero-padded, loaders agree."""
    base, base_config = llama_base
    model = get_peft_model(copy.deepcopy(base), LormaConfig(r=4, inflation="pi", target_modules=["q_proj", "up_proj"],
                                                            init_weights=False)).eval()
    exported = lora_export(model, max_error=0.3, allow_approximate=True, serving="llamacpp")
    ranks = {m.module: m.rank for m in exported.modules}
    assert len(set(ranks.values())) > 1 and exported.config.r == max(ranks.values())  # padding exercised
    out = exported.save(tmp_path / "pi")
    assert vllm_problems(out, base) == [] and llamacpp_problems(out, base_config, base) == []
    lora = PeftModel.from_pretrained(copy.deepcopy(base).double(), out).eval()
    with torch.no_grad():
        expected = lora(input_ids=IDS).logits
    for loader in SERVING_LOADERS:
        assert rel_err(served_logits(base, out, loader), expected) < 1e-9, loader


def test_modules_to_save_refused_or_written_apart(llama_base, tmp_path: Path) -> None:
    base, base_config = llama_base
    lorma = LormaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    model = far_from_identity(get_peft_model(copy.deepcopy(base), lorma))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # a "trained" head
    for serving in SERVING_LOADERS:
        with pytest.raises(ExportError, match=r"would be dropped: lm_head \(3,840 parameters\).*"
                                              r"--modules-to-save separate"):
            lora_export(model, serving=serving)

    exported = lora_export(model, serving="vllm", modules_to_save="separate")
    out = exported.save(tmp_path / "separate")
    assert vllm_problems(out, base) == [] and llamacpp_problems(out, base_config, base) == []
    apart = load_file(out / MODULES_TO_SAVE_FILE)
    assert set(apart) == {"lm_head.weight"}
    torch.testing.assert_close(apart["lm_head.weight"], base.lm_head.weight.detach() * 1.5)
    note = (out / MODULES_TO_SAVE_NOTE).read_text()
    assert "`lm_head`: 3,840 parameters" in note and "from transformers import LlamaForCausalLM" in note
    assert json.loads((out / EXPORT_REPORT_FILE).read_text())["modules_to_save"] == {"lm_head": 3840}

    merged = copy.deepcopy(base)  # what the note says to do: the trained head into the base model
    result = merged.load_state_dict(apart, strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        got = PeftModel.from_pretrained(merged, out).eval()(input_ids=IDS).logits
    assert rel_err(got, expected) < 1e-6


def test_tied_weights_refused(tmp_path: Path) -> None:
    """An adapted lm_head tied to the embeddings (llama.cpp only), a saved head tied to them (both, even apart)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=120,
                                        tie_word_embeddings=True)).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    head = get_peft_model(copy.deepcopy(tied), LormaConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ExportError, match="lm_head is adapted but tied to the token embeddings"):
        lora_export(head, serving="llamacpp")
    exported = lora_export(head, serving="vllm")  # vLLM adapts lm_head through its logits processor
    assert not exported.separate and all(".lora_" in k for k in exported.state_dict)  # no base_layer copy
    saved = get_peft_model(copy.deepcopy(tied),
                           LormaConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ExportError, match=r"lm_head shares its weight with model\.embed_tokens\.weight"):
        lora_export(saved, serving="vllm", modules_to_save="separate")


def test_layers_and_ranks_the_loaders_cannot_take(tiny_gpt2, llama_base) -> None:
    base, _ = llama_base
    gpt2 = get_peft_model(copy.deepcopy(tiny_gpt2), LormaConfig(r=4, target_modules=["c_attn", "c_fc"]))
    with pytest.raises(ExportError, match=r"--serving vllm: 4 adapted module\(s\) are transformers Conv1D .*"
                                          r"transformer\.h\.0\.attn\.c_attn"):
        lora_export(gpt2, serving="vllm")
    with pytest.raises(ExportError, match=r"the base model is a GPT2LMHeadModel; llama.cpp"):
        lora_export(gpt2, serving="llamacpp")
    pi = get_peft_model(copy.deepcopy(base), LormaConfig(r=4, inflation="pi", init_weights=False))
    with pytest.raises(ExportError, match=r"rank 600 is above the largest --max-lora-rank vLLM takes \(512"):
        lora_export(pi, rank=600, allow_approximate=True, serving="vllm")
    plus = get_peft_model(copy.deepcopy(base), LormaConfig(r=4))
    with pytest.raises(ExportError, match="--serving must be one of"):
        lora_export(plus, serving="tgi")
    with pytest.raises(ExportError, match="--modules-to-save must be one of"):
        lora_export(plus, serving="vllm", modules_to_save="drop")


# ------------------------------------------------------------------ the checkers catch what they are for


def _mutated(good: Path, tmp_path: Path, config: dict | None = None, tensors=None) -> Path:
    out = tmp_path / "mutated"
    out.mkdir()
    cfg = {**json.loads((good / "adapter_config.json").read_text()), **(config or {})}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    state = load_file(good / "adapter_model.safetensors")
    save_file(tensors(state) if tensors else state, str(out / "adapter_model.safetensors"))
    return out


Q = "base_model.model.model.layers.0.self_attn.q_proj"
MUTATIONS = {
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save", None),
    "dora": ({"use_dora": True}, None, "DoRA", None),
    "bias": ({"bias": "all"}, None, "adapter bias is not supported", None),
    "rank": ({"r": 1024, "lora_alpha": 1024}, None, "greater than max_lora_rank", None),
    "rank pattern": ({"rank_pattern": {"v_proj": 2}}, None, "rank_pattern", None),
    "alpha pattern": ({"alpha_pattern": {"v_proj": 8}}, None, "alpha_pattern", "alpha_pattern"),
    "scaling": ({"lora_alpha": 8}, None, "scaling lora_alpha / r = 2.0", None),
    "rslora": ({"use_rslora": True}, None, "scaling lora_alpha / r = 2.0", "use_rslora"),
    "pissa": ({"init_lora_weights": "pissa"}, None, "init_lora_weights='pissa'", None),
    "adapter name": (None, lambda s: {k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in s.items()},
                     "unsupported LoRA weight", "Not a lora_A or lora_B tensor"),
    "head tensor": (None, lambda s: {**s, "base_model.model.lm_head.weight": torch.zeros(120, 32)},
                    "unsupported LoRA weight", "Not a lora_A or lora_B tensor"),
    "unknown module": (None, lambda s: {**s, "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight":
                                       torch.zeros(4, 32), "base_model.model.model.layers.0.self_attn.rotary"
                                       ".lora_B.weight": torch.zeros(32, 4)},
                       "expected target modules", "Can not map tensor"),
    "half pair": (None, lambda s: {k: v for k, v in s.items() if k != f"{Q}.lora_B.weight"},
                  "lora_A or lora_B missing", "lora_A or lora_B missing"),
    "shape": (None, lambda s: {**s, f"{Q}.lora_A.weight": torch.zeros(4, 31)}, "do not fit", "incorrect shape"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_the_checkers_catch_each_rule(llama_base, tmp_path: Path, case: str) -> None:
    base, base_config = llama_base
    model = far_from_identity(get_peft_model(copy.deepcopy(base), LormaConfig(r=4, target_modules=TARGETS)))
    good = lora_export(model, serving="vllm").save(tmp_path / "good")
    config, tensors, vllm_says, llamacpp_says = MUTATIONS[case]
    bad = _mutated(good, tmp_path, config, tensors)
    vllm, llamacpp = vllm_problems(bad, base), llamacpp_problems(bad, base_config, base)
    assert (vllm_says is None) == (vllm == []) and (llamacpp_says is None) == (llamacpp == [])
    assert vllm_says is None or any(vllm_says in p for p in vllm), vllm
    assert llamacpp_says is None or any(llamacpp_says in p for p in llamacpp), llamacpp


def test_a_peft_adapter_with_patterns_is_served_wrong_and_flagged(llama_base, tmp_path: Path) -> None:
    """Why one r and alpha = r: a peft adapter with rank_pattern / alpha_pattern loads in peft, but vLLM's one
    scaling (before patterns) and llama.cpp's one alpha change its update, and the checkers say so."""
    base, base_config = llama_base
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                        alpha_pattern={"q_proj": 16}, init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(base), config)
    lora.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = copy.deepcopy(lora).double()(input_ids=IDS).logits
    for loader in SERVING_LOADERS:
        assert rel_err(served_logits(base, tmp_path / "peft", loader), expected) > 1e-3, loader
    assert any("rank_pattern" in p for p in vllm_problems(tmp_path / "peft", base))
    assert any("alpha_pattern" in p for p in llamacpp_problems(tmp_path / "peft", base_config, base))
    assert any("GPT2LMHeadModel" in p for p in llamacpp_problems(tmp_path / "peft", {"architectures":
                                                                                     ["GPT2LMHeadModel"]}, base))


# ------------------------------------------------------------------ the command


@pytest.fixture
def llama_adapter(tiny_llama, tmp_path: Path) -> tuple[Path, PeftModel]:
    """A LoRMA+ adapter directory (q, v and a trained lm_head) on a tiny Llama saved beside it."""
    from transformers import AutoModelForCausalLM

    tiny_llama.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = get_peft_model(base, LormaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                             modules_to_save=["lm_head"]))
    far_from_identity(model)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model


def test_cli_choices_are_the_library_ones() -> None:
    assert set(SERVING_CHOICES) == set(SERVING_LOADERS) and CLI_MODULES_TO_SAVE == MODULES_TO_SAVE_CHOICES


def test_cli_refuses_modules_to_save_before_loading(llama_adapter, tmp_path: Path, capsys, monkeypatch) -> None:
    import lorma.runs.adapters

    adapter, _ = llama_adapter

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    # export loads through lorma.runs.adapters (imported at call time, so the patched name is the one called)
    monkeypatch.setattr(lorma.runs.adapters, "load_adapter_model", no_loading)
    out = tmp_path / "out"
    for serving in SERVING_CHOICES:
        assert main(["export", str(adapter), str(out), "--serving", serving]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "lm_head (3,840 parameters)" in err
        assert "--modules-to-save separate" in err
        assert not out.exists()
    assert main(["export", str(adapter), str(out), "--modules-to-save", "separate"]) == 2
    assert "--modules-to-save applies to --serving exports" in capsys.readouterr().err


def test_cli_writes_a_served_adapter_apart_from_its_head(llama_adapter, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    adapter, model = llama_adapter
    out = tmp_path / "out"
    assert main(["export", str(adapter), str(out), "--serving", "vllm", "--modules-to-save", "separate"]) == 0
    printed = capsys.readouterr().out
    assert "--max-lora-rank 8" in printed and f"NAME={out}" in printed and MODULES_TO_SAVE_NOTE in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter_config.json", "adapter_model.safetensors",
                                                            EXPORT_REPORT_FILE, MODULES_TO_SAVE_FILE,
                                                            MODULES_TO_SAVE_NOTE])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    base_config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert vllm_problems(out, base) == [] and llamacpp_problems(out, base_config, base) == []
    assert not base.load_state_dict(load_file(out / MODULES_TO_SAVE_FILE), strict=False).unexpected_keys
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        got = PeftModel.from_pretrained(base, out).eval()(input_ids=IDS).logits
    assert rel_err(got, expected) < 1e-6

    existing = snapshot(out)
    assert main(["export", str(adapter), str(out), "--serving", "llamacpp", "--modules-to-save", "separate"]) == 2
    assert "exists and is not empty; give --overwrite" in capsys.readouterr().err
    assert snapshot(out) == existing
    assert main(["export", str(adapter), str(out), "--serving", "llamacpp", "--modules-to-save", "separate",
                 "--overwrite"]) == 0
    assert re.search(r"convert_lora_to_gguf\.py \S+ --base \S+", capsys.readouterr().out)
    assert json.loads((out / EXPORT_REPORT_FILE).read_text())["serving"] == "llamacpp"


def test_cli_refuses_a_base_llamacpp_cannot_convert_before_loading(tiny_gpt2, tmp_path: Path, capsys,
                                                                    monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    import lorma.runs.adapters

    tiny_gpt2.save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           LormaConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(lorma.runs.adapters, "load_adapter_model", lambda *a, **k: pytest.fail("loaded"))
        assert main(["export", str(tmp_path / "adapter"), str(out), "--serving", "llamacpp"]) == 2
    assert "the base model is a GPT2LMHeadModel" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "adapter"), str(out), "--serving", "vllm"]) == 2  # known once loaded
    assert "Conv1D" in capsys.readouterr().err and not out.exists()
