"""Generation pipeline on tiny GPT-2 and Llama models: masked pairs, batched decoding, merge, lorma train."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

import lorma  # noqa: E402,F401  (registers LORMA with peft)
from lorma.cli import main  # noqa: E402
from lorma.tasks.data_to_text import build_data_to_text_prompt, clean_generation, encode_pair  # noqa: E402
from lorma.tasks.decoding import DecodingConfig, generate_texts, merged_copy, write_lines_atomic  # noqa: E402

NAMES = ["Aromi", "Cotto", "Zizzi", "Alimentum", "Blue Spice", "Wildwood", "Strada", "Giraffe"]
FOODS = ["Chinese", "French", "Italian", "Indian"]
AREAS = ["riverside", "city centre"]


def _e2e_rows() -> list[tuple[str, str]]:
    rows = []
    for i, name in enumerate(NAMES):
        food, area = FOODS[i % 4], AREAS[i % 2]
        mr = f"name[{name}], food[{food}], area[{area}]"
        rows.append((mr, f"{name} serves {food} food in the {area}."))
        rows.append((mr, f"In the {area} there is a {food} place called {name}."))
    return rows


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer trained here on the test's own text (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"Data: {mr}\nText: {ref}" for mr, ref in _e2e_rows()]
    corpus += ["Question: What is 2 plus 3?\n\nStep-by-step answer:\n2 + 3 = 5.\nThe answer is: 5"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer_dir, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tokenizer_dir, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path), _tokenizer(path)


def _with_adapter(model, **kwargs):
    """A LoRMA+ adapter whose B is non-zero, so the adapted model differs from the base one."""
    import peft

    pm = peft.get_peft_model(model, lorma.LormaConfig(r=4, alpha=8, task_type="CAUSAL_LM", **kwargs))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if "lorma_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return pm


# ---------------------------------------------------------------------------------------------- pairs


def test_encode_pair_puts_the_loss_on_the_reference_only(gpt2_dir) -> None:
    model, tok = _load(gpt2_dir)
    prompt = build_data_to_text_prompt("name[Aromi], food[Chinese]")
    enc = encode_pair(tok, prompt, " Aromi serves Chinese food.", max_length=64)
    n_prompt = len(tok(prompt)["input_ids"])
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(enc["input_ids"][n_prompt:-1]) == " Aromi serves Chinese food."
    # the model's loss equals cross-entropy over the reference tokens alone, computed independently
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=torch.tensor([enc["labels"]]))
        logits = model(input_ids=ids).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    targets = range(n_prompt, len(enc["input_ids"]))
    manual = -sum(log_probs[t - 1, enc["input_ids"][t]] for t in targets) / len(targets)
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_encode_pair_truncates_the_target_first(gpt2_dir) -> None:
    _, tok = _load(gpt2_dir)
    prompt = build_data_to_text_prompt("name[Aromi]")
    n_prompt = len(tok(prompt)["input_ids"])
    enc = encode_pair(tok, prompt, " a long reference " * 20, max_length=n_prompt + 3)
    assert len(enc["input_ids"]) == n_prompt + 3 and enc["labels"].count(-100) == n_prompt
    enc = encode_pair(tok, prompt, " x", max_length=4)  # the prompt is cut; one target token survives
    assert len(enc["input_ids"]) == 4 and enc["labels"][:3] == [-100] * 3 and enc["labels"][3] != -100


def test_clean_generation() -> None:
    assert clean_generation("  Aromi is  nice.\nData: name[x]") == "Aromi is nice."


# ------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_batched_left_padded_decoding_matches_one_at_a_time(which, gpt2_dir, llama_dir) -> None:
    model, tok = _load(gpt2_dir if which == "gpt2" else llama_dir)
    model = _with_adapter(model)
    prompts = [build_data_to_text_prompt(mr) for mr, _ in _e2e_rows()[::3]]  # prompts of different lengths
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1
    for cfg in (DecodingConfig(num_beams=1, no_repeat_ngram_size=0, max_new_tokens=6, batch_size=4),
                DecodingConfig(num_beams=3, length_penalty=0.9, no_repeat_ngram_size=4, max_new_tokens=6,
                               batch_size=4)):
        batched = generate_texts(model, tok, prompts, cfg, progress=False)
        single = generate_texts(model, tok, prompts, cfg.with_overrides(batch_size=1), progress=False)
        assert batched == single
        assert any(batched)
    assert tok.padding_side == "right" and tok.pad_token is None  # restored


def test_merged_copy_equals_the_adapter_and_leaves_it_alone(gpt2_dir) -> None:
    from peft import PeftModel

    model, tok = _load(gpt2_dir)
    pm = _with_adapter(model)
    ids = torch.tensor([tok("Data: name[Aromi]\nText:")["input_ids"]])
    with torch.no_grad():
        adapted = pm(input_ids=ids).logits
        merged = merged_copy(pm)
        assert not isinstance(merged, PeftModel)
        merged_logits = merged(input_ids=ids).logits
        base_logits = pm.get_base_model()(input_ids=ids).logits  # still routed through the adapter
    assert torch.allclose(adapted, merged_logits, atol=1e-5)
    assert torch.allclose(adapted, base_logits, atol=1e-5)
    with pm.disable_adapter(), torch.no_grad():
        plain = pm(input_ids=ids).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)  # the adapter does something, and is still there


def test_generation_needs_sane_settings(gpt2_dir) -> None:
    model, tok = _load(gpt2_dir)
    with pytest.raises(ValueError, match="must be >= 1"):
        generate_texts(model, tok, ["x"], DecodingConfig(batch_size=0))
    assert generate_texts(model, tok, [], DecodingConfig()) == []


def test_write_lines_atomic(tmp_path) -> None:
    target = tmp_path / "preds.txt"
    write_lines_atomic(target, ["a", "b"])
    assert target.read_text() == "a\nb\n"
    with pytest.raises(FileExistsError):
        write_lines_atomic(target, ["c"])
    with pytest.raises(ValueError, match="line 2 .* contains a newline"):
        write_lines_atomic(tmp_path / "x.txt", ["a", "b\nc"])
    assert not (tmp_path / "x.txt").exists()
    write_lines_atomic(target, ["c"], overwrite=True)
    assert target.read_text() == "c\n"
    assert [p.name for p in tmp_path.iterdir()] == ["preds.txt"]  # no temp files left behind


# ------------------------------------------------------------------------------------- lorma train


def _write_e2e(tmp_path):
    rows = _e2e_rows()
    train = tmp_path / "train.txt"
    train.write_text("".join(f"{mr}||{ref}\n" for mr, ref in rows[:12]))
    dev = tmp_path / "dev.csv"
    dev.write_text("mr,ref\n" + "".join(f'"{mr}","{ref}"\n' for mr, ref in rows[12:]))
    return train, dev


def test_lorma_train_e2e_gpt2_end_to_end(gpt2_dir, tmp_path, capsys) -> None:
    train, dev = _write_e2e(tmp_path)
    out = tmp_path / "run"
    code = main([
        "train", "--task", "e2e", "--model", str(gpt2_dir), "--train-file", str(train), "--eval-file", str(dev),
        "--output-dir", str(out), "--method", "lorma-plus", "--r", "4", "--alpha", "32", "--max-seq-length", "64",
        "--max-steps", "4", "--learning-rate", "1e-2", "--per-device-train-batch-size", "4",
        "--training-arg", "label_smoothing_factor=0.1",
        "--task-option", "num_beams=2", "--task-option", "max_new_tokens=8",
    ])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    ev = metrics["eval"]
    assert {"eval_loss", "eval_bleu", "eval_nist", "eval_meteor", "eval_rouge_l", "eval_cider"} <= set(ev)
    assert metrics["data"]["eval_records"] == 2 and metrics["data"]["generated_inputs"] == 2
    assert metrics["data"]["scorer"].startswith("official E2E")  # the default: the paper's scorer
    saved = json.loads((out / "e2e_eval.metrics.json").read_text())
    assert saved["scorer"] == metrics["data"]["scorer"] and saved["scores"]["bleu"] == ev["eval_bleu"]
    preds = out / "e2e_eval.predictions.txt"
    refs = out / "e2e_eval.references.txt"
    assert len(preds.read_text().splitlines()) == 2
    assert refs.read_text().split("\n\n")[0].splitlines() == [r for _, r in _e2e_rows()[12:14]]
    # the written files score the same through `lorma evaluate` (a round trip of what was measured)
    scores_file = tmp_path / "scores.json"
    assert main(["evaluate", "--task", "e2e", "--predictions", str(preds), "--references", str(refs),
                 "--output", str(scores_file)]) == 0
    again = json.loads(scores_file.read_text())["scores"]
    assert again == pytest.approx({k[len("eval_"):]: v for k, v in ev.items() if k[len("eval_"):] in again})
    # the adapter targets GPT-2's fused c_attn (q and v parts) and loads back with peft
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORMA" and set(cfg["target_modules"]) == {"c_attn"}
    assert cfg["fused_parts"] == {"c_attn": {"num_parts": 3, "parts": [0, 2]}}
    # `lorma merge` rebuilds the causal LM (the task's load_model_for_merge) and folds the adapter in: the
    # merged model gives the adapted model's logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir), out / "adapter")
    ids = torch.tensor([_tokenizer(gpt2_dir)("Data: name[Aromi]\nText:")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
        base_logits = AutoModelForCausalLM.from_pretrained(gpt2_dir)(input_ids=ids).logits
        assert not torch.equal(merged(input_ids=ids).logits, base_logits)  # training moved the adapter


def test_lorma_train_e2e_refuses_a_bad_line_before_loading(gpt2_dir, tmp_path, capsys) -> None:
    train = tmp_path / "train.txt"
    train.write_text("name[A]||A is good.\nname[B] no separator\n")
    out = tmp_path / "run"
    code = main(["train", "--task", "e2e", "--model", str(gpt2_dir), "--train-file", str(train),
                 "--output-dir", str(out)])
    assert code == 2
    assert "train.txt:2: expected one 'MR||reference' separator" in capsys.readouterr().err
    assert not out.exists()


def test_lorma_train_math_llama_end_to_end(llama_dir, tmp_path, capsys) -> None:
    meta = tmp_path / "metamath.json"
    meta.write_text(json.dumps([
        {"query": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}.\nThe answer is: {a + b}",
         "type": "GSM_AnsAug"}
        for a in range(1, 5) for b in range(1, 4)
    ]))
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {a} plus 1?", "answer": f"{a}+1\n#### {a + 1}"}) + "\n"
                           for a in (2, 3)) + '{"question": "broken"}\n')
    out = tmp_path / "run"
    args = ["train", "--task", "gsm8k", "--model", str(llama_dir), "--train-file", str(meta),
            "--eval-file", str(gsm), "--output-dir", str(out), "--r", "4", "--max-steps", "2",
            "--task-option", "max_new_tokens=6"]
    assert main(args) == 2
    assert "gsm8k.jsonl:3: a GSM8K record needs string fields" in capsys.readouterr().err
    assert main([*args, "--task-option", "skip_bad=true"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 malformed record(s) (lines 3)" in captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert "eval_accuracy" in metrics["eval"] and "eval_loss" in metrics["eval"]
    assert metrics["data"]["eval_skipped"] == 1
    assert len((out / "gsm8k_eval.predictions.txt").read_text().splitlines()) == 2
    # Table 17's LLaMA targets by default: up, down, o, gate
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"up_proj", "down_proj", "o_proj", "gate_proj"}


def test_label_smoothing_is_on_shifted_reference_tokens(gpt2_dir, tmp_path) -> None:
    """Trainer's smoothed loss (label_smoothing_factor, Table 16) equals the formula on the shifted targets."""
    from transformers import Trainer, TrainingArguments

    from lorma.recipes.config import build_config
    from lorma.tasks.data_to_text import DataToTextTask

    model, tok = _load(gpt2_dir)
    tok.pad_token = tok.eos_token  # as the task's load_tokenizer does
    pm = _with_adapter(model)
    pm.eval()  # no dropout: the two computations must see the same network
    task = DataToTextTask("e2e", build_config(flag_values={"task": "e2e"}))
    collator = task.data_collator(tok)
    prompt = build_data_to_text_prompt("name[Aromi], food[Chinese]")
    batch = collator([encode_pair(tok, prompt, " Aromi serves Chinese food.", 64),
                      encode_pair(tok, build_data_to_text_prompt("name[Cotto]"), " Cotto.", 64)])
    assert (batch["labels"] == -100).sum() > 0 and batch["input_ids"].shape == batch["labels"].shape
    eps = 0.1
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=eps, report_to="none", use_cpu=True)
    trainer = Trainer(model=pm, args=args, data_collator=collator)
    with torch.no_grad():
        loss = trainer.compute_loss(pm, dict(batch)).item()
        logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    nll = -log_probs[mask].gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    smooth = -log_probs[mask].mean(-1)
    assert loss == pytest.approx(((1 - eps) * nll.mean() + eps * smooth.mean()).item(), rel=1e-5)


def test_held_out_split_keeps_whole_inputs_apart(gpt2_dir, tmp_path) -> None:
    from lorma.recipes.config import build_config
    from lorma.tasks.base import get_task

    train, _ = _write_e2e(tmp_path)  # 6 MRs with 2 references each
    cfg = build_config(flag_values={"task": "e2e", "model": str(gpt2_dir), "train_file": str(train),
                                    "eval_split": 0.34, "max_seq_length": 64})
    task = get_task(cfg)
    task.check_inputs()
    tok = task.load_tokenizer()
    train_ds, eval_ds = task.build_datasets(tok)
    assert (len(train_ds), len(eval_ds)) == (8, 4)  # 4 MRs train, 2 MRs held out, 2 references each

    def prompts(ds) -> set[str]:
        return {tok.decode([t for t, lab in zip(ids, labels) if lab == -100])
                for ids, labels in zip(ds["input_ids"], ds["labels"])}

    assert len(prompts(eval_ds)) == 2 and not prompts(train_ds) & prompts(eval_ds)
    assert {ex.source for ex in task._generation_items} == {p[len("Data: "):-len("\nText:")] for p in prompts(eval_ds)}


def test_lorma_train_dart_json_with_skip_bad(gpt2_dir, tmp_path, capsys) -> None:
    records = [{"tripleset": [[name, "food", food]], "annotations": [{"text": f"{name} serves {food} food."}]}
               for name in NAMES[:6] for food in FOODS[:2]]
    records.insert(3, {"tripleset": [["broken"]], "annotations": []})
    train = tmp_path / "train.json"
    train.write_text(json.dumps(records, indent=1))
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps([{"tripleset": [["Zizzi", "area", "riverside"]],
                                "annotations": [{"text": "Zizzi is by the river."}, {"text": "Zizzi: riverside."}]}]))
    out = tmp_path / "run"
    args = ["train", "--task", "dart", "--model", str(gpt2_dir), "--train-file", str(train), "--eval-file", str(dev),
            "--output-dir", str(out), "--max-steps", "2", "--max-seq-length", "48",
            "--task-option", "num_beams=2", "--task-option", "max_new_tokens=6"]
    assert main(args) == 2
    assert "train.json:" in capsys.readouterr().err
    assert main([*args, "--task-option", "skip_bad=true"]) == 0
    assert "skipped 1 malformed record(s)" in capsys.readouterr().out
    ev = json.loads((out / "metrics.json").read_text())["eval"]
    assert {"eval_loss", "eval_bleu", "eval_meteor", "eval_ter"} <= set(ev) and "eval_cider" not in ev
    assert (out / "dart_eval.references.txt").read_text() == "Zizzi is by the river.\nZizzi: riverside.\n"
