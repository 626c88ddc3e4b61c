"""Adapters made by hand with peft's own idiom (``get_peft_model`` + ``save_pretrained``, no ``lorma train``) through
``lorma merge``, ``export`` and ``analyze`` in a fresh process.

The matrix: every ``task_type`` peft has, and none (peft then records the class in ``auto_mapping``), on an
encoder (BERT) and a causal LM (Llama); LoRMA and plain LoRA; an adapter named other than ``default`` and two
adapters in one folder. Each adapter's reference output is computed here, before anything is merged, by the
peft model that was saved: a merged model must reproduce it (and it differs from the base model's, so a merge that
changes nothing fails), an export must load with plain peft and reproduce it, and ``analyze``'s delta W must be the
merged weight minus the base weight. What cannot be rebuilt is refused with one line, and writes nothing.
``lorma evaluate`` reads prediction files, not adapters, so it has no place here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import fresh_python
from recipe_support import make_tiny_bert

TOL = 1e-5

LLAMA = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 120, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
#: the class a user trains with for each task_type (None: peft's default, no task type)
TRAINED_AS = {
    None: "AutoModelForSequenceClassification",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForCausalLM",  # peft needs generate(); no encoder-decoder here to train
}
#: the cases refused, with what their one line must say
REFUSED = {
    ("bert", "SEQ_2_SEQ_LM"): "as AutoModelForSeq2SeqLM",
    ("llama", "SEQ_2_SEQ_LM"): "as AutoModelForSeq2SeqLM",
    # transformers' LlamaForQuestionAnswering names its backbone ``transformer``: from a causal LM checkpoint every
    # backbone weight is random, so the adapter was trained on noise and cannot be rebuilt
    ("llama", "QUESTION_ANS"): "are not in the checkpoint",
}


@dataclass
class Case:
    """One hand-made adapter: where it is, the class it was trained as, its reference output, what is expected."""

    name: str
    base: str
    trained_as: str
    peft_type: str
    given: Path  # what the commands are given (the adapter, or the folder holding it)
    refused: str | None = None  # a fragment of the one-line refusal of merge / export / analyze
    export_refused: str | None = None
    head_saved: bool = True  # the logits are reproducible (head in the checkpoint or saved with the adapter)
    notes: dict[str, str] = field(default_factory=dict)  # command -> a fragment its stderr must show


def _inputs(base: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 17, 42, 8, 99, 3], [7, 11, 64, 2, 30, 12]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _outputs(model: Any, base: str) -> dict[str, torch.Tensor]:
    """The last hidden state and the head's outputs of ``model`` on the fixed inputs (float64, detached)."""
    with torch.no_grad():
        out = model(**_inputs(base), output_hidden_states=True)
    found = {"hidden": out.hidden_states[-1]}
    for key in ("logits", "start_logits", "end_logits"):
        if getattr(out, key, None) is not None:
            found[key] = getattr(out, key)
    return {k: v.detach().double() for k, v in found.items()}


def _load(trained_as: str, path: Path | str, **kwargs: Any) -> Any:
    import transformers

    return getattr(transformers, trained_as).from_pretrained(str(path), **kwargs).eval()


def _peft_config(peft_type: str, base: str, task_type: str | None) -> Any:
    if peft_type == "LORA":
        from peft import LoraConfig

        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[base], init_lora_weights=False,
                          task_type=task_type)
    from lorma import LormaConfig

    return LormaConfig(r=4, alpha=8, target_modules=TARGETS[base], init_weights=False, task_type=task_type)


def _head_size(trained_as: str) -> dict[str, Any]:
    return {"num_labels": 3} if "Classification" in trained_as else {}


def _build(root: Path) -> tuple[list[Case], dict[str, dict[str, torch.Tensor]], dict[str, Path]]:
    """Every hand-made adapter of the matrix, saved under ``root``, and each one's reference outputs."""
    from peft import TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    bases = {"bert": make_tiny_bert(root / "bert"), "llama": root / "llama"}
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(bases["llama"])  # no tokenizer: merge says so
    cases: list[Case] = []
    refs: dict[str, dict[str, torch.Tensor]] = {}

    def make(name: str, base: str, task_type: str | None, peft_type: str = "LORMA", adapter_name: str = "default",
             given: Path | None = None) -> tuple[Any, Path]:
        trained_as = TRAINED_AS[task_type] if base == "bert" or task_type is not None else "AutoModelForCausalLM"
        torch.manual_seed(len(cases) + 1)
        model = _load(trained_as, bases[base], **_head_size(trained_as))
        peft_model = get_peft_model(model, _peft_config(peft_type, base, task_type), adapter_name=adapter_name)
        folder = root / "adapters" / name
        refused = REFUSED.get((base, task_type))
        head_saved = not (trained_as == "AutoModelForSequenceClassification" and task_type is None) and not (
            base == "bert" and trained_as == "AutoModelForCausalLM")
        cases.append(Case(name, base, trained_as, peft_type, given or folder, refused=refused, head_saved=head_saved,
                          export_refused="not a LoRMA one" if peft_type == "LORA" else None))
        if refused is None:
            refs[name] = _outputs(peft_model.eval(), base)
            with peft_model.disable_adapter():
                base_out = _outputs(peft_model, base)["hidden"]
            # the adapter changes the output: a merge that did nothing could not pass
            assert (refs[name]["hidden"] - base_out).abs().max() > 1e3 * TOL
        peft_model.save_pretrained(folder)
        return peft_model, folder

    for base in ("bert", "llama"):
        for task_type in [None, *(t.value for t in TaskType)]:
            make(f"{base}-{task_type or 'none'}", base, task_type)
        make(f"{base}-lora-none", base, None, peft_type="LORA")  # the silently wrong merge of the issue
    cases[0].notes["merge"] = "classifier.bias, classifier.weight of the merged model"  # no head saved, said so
    cases[next(i for i, c in enumerate(cases) if c.name == "llama-none")].notes["merge"] = "no tokenizer copied"
    # an adapter not named "default": peft saves it in a folder of its name; the commands are given the folder
    _, folder = make("named", "llama", "CAUSAL_LM", adapter_name="task1")
    cases[-1].given, cases[-1].notes["merge"] = folder, "the one adapter in"
    # two adapters in one folder: "default" in the folder itself, "other" in other/
    peft_model, folder = make("two-default", "llama", None)
    torch.manual_seed(99)
    peft_model.add_adapter("other", _peft_config("LORMA", "llama", None))
    peft_model.set_adapter("other")
    refs["two-other"] = _outputs(peft_model, "llama")
    peft_model.save_pretrained(folder)  # both: default in folder, other in folder/other
    cases[-1].notes["merge"] = "also holds the adapters other"
    cases.append(Case("two-other", "llama", "AutoModelForCausalLM", "LORMA", folder / "other"))
    # a folder of two named adapters and none of its own: which one is meant cannot be guessed
    two_named = root / "adapters" / "two-named"
    for name in ("a", "b"):
        model = _load("AutoModelForCausalLM", bases["llama"])
        get_peft_model(model, _peft_config("LORMA", "llama", None), adapter_name=name).save_pretrained(two_named)
    cases.append(Case("two-named", "llama", "AutoModelForCausalLM", "LORMA", two_named, refused="holds 2 adapters",
                      export_refused="holds 2 adapters"))
    # a LoRA file missing a tensor: peft would load it with a warning and merge the rest
    from safetensors.torch import load_file, save_file

    broken = root / "adapters" / "lora-missing"
    src = root / "adapters" / "llama-lora-none"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    dropped = sorted(tensors)[-1]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(broken / "adapter_model.safetensors"))
    cases.append(Case("lora-missing", "llama", "AutoModelForCausalLM", "LORA", broken,
                      refused="1 adapter tensors of the model are not in the file",
                      export_refused="not a LoRMA one"))
    return cases, refs, bases


#: runs every command line through the entry point of the ``lorma`` script, in one fresh process (the imports paid
#: once); each command's exit code and stderr are kept apart
DRIVER = """
import contextlib, io, json, sys, time
from lorma.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    started = time.process_time()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"argv": argv, "code": code, "stderr": err.getvalue(), "cpu": time.process_time() - started})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import lorma  # noqa: F401

    root = tmp_path_factory.mktemp("handmade")
    cases, refs, bases = _build(root)
    argvs = []
    for case in cases:
        out = root / "out" / case.name
        # the base model as peft recorded it, except once as the issue typed it (--base-model)
        base = ["--base-model", str(bases[case.base])] if case.name == "bert-none" else []
        argvs += [["merge", str(case.given), str(out / "merged"), *base],
                  ["export", str(case.given), str(out / "lora")],
                  ["analyze", str(case.given), "--no-plots"]]
    proc = fresh_python.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    by_case = {case.name: dict(zip(("merge", "export", "analyze"), results[3 * i: 3 * i + 3], strict=True))
               for i, case in enumerate(cases)}
    return {"root": root, "cases": {c.name: c for c in cases}, "refs": refs, "bases": bases, "results": by_case}


def _case_names() -> list[str]:
    names = [f"{base}-{t}" for base in ("bert", "llama") for t in ("none", *TRAINED_AS.keys() - {None})]
    return sorted(names) + ["bert-lora-none", "llama-lora-none", "named", "two-default", "two-other", "two-named",
                            "lora-missing"]


def _one_line_refusal(result: dict[str, Any], fragment: str) -> None:
    lines = [ln for ln in result["stderr"].splitlines() if ln.strip()]
    assert result["code"] == 2, result
    assert len(lines) == 1 and lines[0].startswith(f"lorma {result['argv'][0]}: error: "), result["stderr"]
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("name", _case_names())
def test_merge(matrix: dict[str, Any], name: str) -> None:
    case, result = matrix["cases"][name], matrix["results"][name]["merge"]
    out = matrix["root"] / "out" / name / "merged"
    if case.refused:
        _one_line_refusal(result, case.refused)
        assert not out.exists()
        return
    assert result["code"] == 0, result["stderr"]
    if "merge" in case.notes:
        assert case.notes["merge"] in result["stderr"], result["stderr"]
    merged = _load(case.trained_as, out)  # the head size the merged model's config records
    assert not any("lorma_" in k or "lora_" in k for k in merged.state_dict())  # a plain transformers model
    ref, got = matrix["refs"][name], _outputs(merged, case.base)
    keys = sorted(ref) if case.head_saved else ["hidden"]
    for key in keys:
        torch.testing.assert_close(got[key], ref[key], atol=TOL, rtol=TOL, msg=f"{name}: {key}")
    assert (out / "tokenizer_config.json").is_file() == (case.base == "bert")


@pytest.mark.parametrize("name", _case_names())
def test_export(matrix: dict[str, Any], name: str) -> None:
    from peft import PeftModel

    case, result = matrix["cases"][name], matrix["results"][name]["export"]
    out = matrix["root"] / "out" / name / "lora"
    refusal = case.export_refused or case.refused
    if refusal:
        _one_line_refusal(result, refusal)
        assert not out.exists()
        return
    assert result["code"] == 0, result["stderr"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = _load(case.trained_as, matrix["bases"][case.base], **_head_size(case.trained_as))
    exported = PeftModel.from_pretrained(base, str(out)).eval()  # plain peft LoRA: LoRMA+ exports exactly
    ref, got = matrix["refs"][name], _outputs(exported, case.base)
    for key in sorted(ref) if case.head_saved else ["hidden"]:
        torch.testing.assert_close(got[key], ref[key], atol=TOL, rtol=TOL, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", _case_names())
def test_analyze(matrix: dict[str, Any], name: str) -> None:
    case, result = matrix["cases"][name], matrix["results"][name]["analyze"]
    if case.refused:
        _one_line_refusal(result, case.refused)
        return
    assert result["code"] == 0, result["stderr"]
    given = case.given
    # a saved adapter directory is never written into: the default report goes beside it
    out = given.parent / f"{given.name}-analysis" if (given / "adapter_config.json").is_file() else given / "analysis"
    report = json.loads((out / "analysis.json").read_text())
    merged = _load(case.trained_as, matrix["root"] / "out" / name / "merged")
    base = _load(case.trained_as, matrix["bases"][case.base], **_head_size(case.trained_as))
    merged_sd, base_sd = merged.state_dict(), base.state_dict()
    modules = report["modules"]
    assert len(modules) == 4  # 2 layers x 2 targets
    for module, entry in modules.items():
        delta = merged_sd[f"{module}.weight"].double() - base_sd[f"{module}.weight"].double()
        assert entry["delta_norm"] == pytest.approx(delta.norm().item(), rel=1e-4), module
        assert entry["delta_norm"] > 1e-3


def test_model_class_flag(matrix: dict[str, Any], tmp_path: Path) -> None:
    """An adapter that records no class is refused, naming the flag; the flag then rebuilds it (in-process)."""
    from lorma.cli import main

    src = matrix["cases"]["llama-lora-none"].given
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    del config["auto_mapping"]
    (bare / "adapter_config.json").write_text(json.dumps(config))
    (bare / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    assert main(["merge", str(bare), str(tmp_path / "m1")]) == 2
    assert not (tmp_path / "m1").exists()
    assert main(["merge", str(bare), str(tmp_path / "m1"), "--model-class", "NoSuchModel"]) == 2
    # the wrong class: its module names do not fit the adapter's keys, refused before any weight is read
    assert main(["merge", str(bare), str(tmp_path / "m1"), "--model-class", "AutoModel"]) == 2
    assert main(["merge", str(bare), str(tmp_path / "m1"), "--model-class", "AutoModelForCausalLM"]) == 0
    merged = _load("AutoModelForCausalLM", tmp_path / "m1")
    torch.testing.assert_close(_outputs(merged, "llama")["logits"], matrix["refs"]["llama-lora-none"]["logits"],
                               atol=TOL, rtol=TOL)
