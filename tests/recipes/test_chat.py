"""The chat task: loss masks on every assistant turn (token by token), the chat template, held-out loss and
perplexity before / after training, packing, and ``lorma train`` / ``lorma compare --task chat``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fresh_python
from lorma.plumbing.errors import DataFormatError, InputError
from lorma.tasks.chat import heldout_nll
from lorma.tasks.chat_template import chat_segments, encode_conversation, resolve_chat_template
from lorma.tasks.readers.chat import read_chat

LORMA = str(Path(sys.executable).parent / "lorma")

# ChatML, written here (the layout SmolLM2 and Qwen use): <|im_start|>role\ncontent<|im_end|>\n
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

THREE_TURNS = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And the sun?"},
    {"role": "assistant", "content": "The sun is yellow."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


def conversations() -> list[list[dict[str, str]]]:
    colours = {"sky": "blue", "sun": "yellow", "leaf": "green", "apple": "red", "snow": "white", "coal": "black"}
    out = []
    for thing, colour in colours.items():
        out.append([{"role": "user", "content": f"What colour is the {thing}?"},
                    {"role": "assistant", "content": f"The {thing} is {colour}."}])
        out.append([{"role": "user", "content": f"Name the {thing}'s colour."},
                    {"role": "assistant", "content": f"{colour.capitalize()}."},
                    {"role": "user", "content": "Sure?"},
                    {"role": "assistant", "content": f"Yes, the {thing} is {colour}."}])
    return out


def make_tiny_chat_model(path: Path, template: str | None = CHATML) -> Path:
    """A 2-layer Llama and a byte-level BPE tokenizer trained on the test's own text, with ChatML's special
    tokens and (unless None) the template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [m["content"] for c in conversations() + [THREE_TURNS] for m in c] + ["system user assistant"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    if template is not None:
        tokenizer.chat_template = template
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_masks_every_assistant_turn_token_by_token(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    enc = encode_conversation(tokenizer, THREE_TURNS, max_length=512)
    # independently: render the whole conversation, find each assistant reply (with its end-of-turn marker) by
    # string search, tokenize the whole text with offsets; a token is a target iff its characters lie in a reply
    text = tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)
    spans, pos = [], 0
    for message in THREE_TURNS:
        if message["role"] == "assistant":
            start = text.index("<|im_start|>assistant\n" + message["content"], pos) + len("<|im_start|>assistant\n")
            end = start + len(message["content"] + "<|im_end|>\n")
            spans.append((start, end))
            pos = end
    joint = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == joint["input_ids"]
    expected = [tid if any(s <= a and b <= e for s, e in spans) else -100
                for tid, (a, b) in zip(joint["input_ids"], joint["offset_mapping"])]
    assert len(enc["labels"]) == len(expected)
    for k, (got, want) in enumerate(zip(enc["labels"], expected)):
        assert got == want, f"token {k} ({tokenizer.decode([joint['input_ids'][k]])!r}): label {got}, want {want}"
    # the targets are exactly the three replies with their end markers, and nothing of the system or user turns
    targets = [t for t in enc["labels"] if t != -100]
    replies = "".join(m["content"] + "<|im_end|>\n" for m in THREE_TURNS if m["role"] == "assistant")
    assert tokenizer.decode(targets) == replies
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    # truncation keeps the alignment of ids and labels
    cut = encode_conversation(tokenizer, THREE_TURNS, max_length=20)
    assert cut["input_ids"] == enc["input_ids"][:20] and cut["labels"] == enc["labels"][:20]


def test_template_that_rewrites_earlier_turns_is_refused(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    # a template that prints the number of messages first: a longer conversation does not extend a shorter one
    tokenizer.chat_template = "{{ messages|length }}" + CHATML
    with pytest.raises(ValueError, match="does not extend the rendering"):
        chat_segments(tokenizer, THREE_TURNS)


def test_model_without_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = make_tiny_chat_model(tmp_path / "plain", template=None)
    tokenizer = AutoTokenizer.from_pretrained(model)
    with pytest.raises(InputError, match="has no chat template; give one with --task-option chat_template"):
        resolve_chat_template(tokenizer, None, str(model))
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML, encoding="utf-8")
    resolve_chat_template(tokenizer, str(template_file), str(model))
    assert tokenizer.chat_template == CHATML
    # through the command: exit code 2, one line, and no run directory left behind
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in conversations()])
    out = tmp_path / "run"
    result = fresh_python.run([LORMA, "train", "--task", "chat", "--model", str(model), "--train-file", str(data),
                               "--output-dir", str(out), "--max-steps", "1"],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "has no chat template" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_reader_formats_and_errors(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [
        {"messages": THREE_TURNS},
        {"instruction": "Say hi.", "output": "Hi.", "system": "Be kind."},
    ])
    read = read_chat(good, prompt_column="instruction", response_column="output")
    assert [len(x.messages) for x in read.items] == [7, 3]
    assert read.items[1].messages == ({"role": "system", "content": "Be kind."},
                                      {"role": "user", "content": "Say hi."},
                                      {"role": "assistant", "content": "Hi."})
    bad_role = write_jsonl(tmp_path / "role.jsonl", [{"messages": THREE_TURNS},
                                                     {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataFormatError, match=r"role\.jsonl:2: .*role 'bot'") as bad:
        read_chat(bad_role)
    assert (bad.value.path, bad.value.line) == (str(bad_role), 2)
    no_reply = write_jsonl(tmp_path / "noreply.jsonl", [{"messages": [{"role": "user", "content": "Hello"}]}])
    with pytest.raises(DataFormatError, match=r"noreply\.jsonl:1: .*no non-empty assistant turn") as bad:
        read_chat(no_reply)
    assert (bad.value.path, bad.value.line) == (str(no_reply), 1)
    assert len(read_chat(bad_role, skip_bad=True).items) == 1


def test_heldout_nll_is_the_per_token_mean_and_packing_gives_the_same(chat_model: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    encoded = [encode_conversation(tokenizer, c, 256) for c in conversations()[:5]]
    dataset = Dataset.from_list(encoded)
    padded = heldout_nll(model, dataset, DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                         batch_size=3, description="padded")
    packed = heldout_nll(model, dataset, DataCollatorWithFlattening(return_position_ids=True, separator_id=-100),
                         batch_size=3, description="packed")
    # independently: each conversation alone, log-softmax of the next token summed over the targets
    total, count = 0.0, 0
    with torch.no_grad():
        for enc in encoded:
            logp = torch.log_softmax(model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].double(), -1)
            for t in range(1, len(enc["labels"])):
                if enc["labels"][t] != -100:
                    total -= float(logp[t - 1, enc["labels"][t]])
                    count += 1
    assert padded["tokens"] == packed["tokens"] == count
    assert padded["loss"] == pytest.approx(total / count, rel=1e-5)
    assert packed["loss"] == pytest.approx(total / count, rel=1e-5)
    assert padded["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def _train(model: Path, tmp_path: Path, out: Path, *extra: str,
           command: str = "train") -> subprocess.CompletedProcess[str]:
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in conversations() * 3])
    held = write_jsonl(tmp_path / "test.jsonl", [{"messages": c} for c in conversations()[:4]] + [
        {"messages": THREE_TURNS}])
    cmd = [LORMA, command, "--task", "chat", "--model", str(model), "--train-file", str(train), "--eval-file",
           str(held), "--output-dir", str(out), "--learning-rate", "2e-2", "--per-device-train-batch-size", "4",
           "--r", "4", "--max-seq-length", "96", "--task-option", "max_new_tokens=8", "--report-to", "none", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    return fresh_python.run(cmd, env=env, timeout=600)


def test_lorma_train_task_chat_reports_loss_before_and_after(chat_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    out = tmp_path / "run"
    result = _train(chat_model, tmp_path, out, "--method", "lorma-pi", "--max-steps", "12",
                    "--task-option", "packing=true")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    ev = metrics["eval"]
    for when in ("", "_before_training"):
        assert ev[f"eval_perplexity{when}"] == pytest.approx(math.exp(ev[f"eval_loss{when}"]), rel=1e-9)
    # step 0 of LoRMA_pi is the base model (s pi(BA) = I): the "before" number is the base model's, computed here
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    held = [encode_conversation(tokenizer, list(x.messages), 96) for x in read_chat(tmp_path / "test.jsonl").items]
    from datasets import Dataset

    base = heldout_nll(AutoModelForCausalLM.from_pretrained(chat_model), Dataset.from_list(held),
                       DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), 8, "base")
    assert ev["eval_loss_before_training"] == pytest.approx(base["loss"], rel=1e-4)
    assert ev["eval_tokens"] == ev["eval_tokens_before_training"] == base["tokens"]
    assert ev["eval_loss"] < ev["eval_loss_before_training"] - 0.2  # it learned the replies
    samples = [json.loads(x) for x in (out / "chat_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["messages"][-1]["role"] == "user" and "generated" in s for s in samples)
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_lorma_compare_task_chat(chat_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = _train(chat_model, tmp_path, out, "--methods", "lora,lorma-plus", "--seeds", "1", "--max-steps", "4",
                    command="compare")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    text = json.dumps(results)
    assert "eval_perplexity" in text and "eval_loss_before_training" in text
    for method in ("lora", "lorma-plus"):
        metrics = json.loads((out / method / "seed-42" / "metrics.json").read_text())
        assert metrics["task"] == "chat" and metrics["eval"]["eval_loss"] > 0


def test_chatterbot_corpus_conversations_are_real_distinct_and_alternating(tmp_path: Path) -> None:
    from lorma.tasks.readers.chat import chatterbot_conversations, write_chatterbot_jsonl

    conversations = chatterbot_conversations()
    assert len(conversations) > 800  # 899 distinct English conversations in chatterbot-corpus 1.3.3
    assert len({tuple(m["content"] for m in c) for c in conversations}) == len(conversations)
    for c in conversations:
        assert [m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2) and all(m["content"] for m in c)
    assert sum(len(c) > 2 for c in conversations) >= 50  # multi-turn ones
    train, test = write_chatterbot_jsonl(tmp_path, test_fraction=0.1, seed=0)
    n_train, n_test = len(read_chat(train).items), len(read_chat(test).items)
    assert n_train + n_test == len(conversations) and n_test == round(len(conversations) * 0.1)
