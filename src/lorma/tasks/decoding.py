"""Batched generation on a merged copy of the adapted model, and predictions files one per line.

The paper decodes E2E / WebNLG / DART with beam search (beam 10, length penalty 0.9 for E2E, 0.8
otherwise, no_repeat_ngram_size 4) and math with greedy decoding. Generation runs on a *merged* copy:
``merge_and_unload`` folds I(BA) into W0 once, so beam search pays nothing for the adapter (the authors'
code rebuilt the adapted weight at every decoding step), and the training model is left untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "DecodingConfig",
    "PAPER_DECODING",
    "generate_texts",
    "merged_copy",
    "one_line",
    "write_lines_atomic",
]


@dataclass(frozen=True)
class DecodingConfig:
    """How to decode. ``num_beams=1`` and ``do_sample=False`` is greedy decoding."""

    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 8

    def with_overrides(self, **changes: Any) -> DecodingConfig:
        """A copy with the given fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


#: the paper's settings (Table 16; Table 4 for math, greedy)
PAPER_DECODING: dict[str, DecodingConfig] = {
    "e2e": DecodingConfig(num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4, max_new_tokens=64),
    "webnlg": DecodingConfig(num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=64),
    "dart": DecodingConfig(num_beams=10, length_penalty=0.8, no_repeat_ngram_size=4, max_new_tokens=64),
    "gsm8k": DecodingConfig(num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=512),
    "math": DecodingConfig(num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=512),
}


def merged_copy(model: Any) -> Any:
    """A plain transformers model with every adapter merged in; ``model`` itself is not changed.

    A model that is not a peft model is returned as it is.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    return copy.deepcopy(model).merge_and_unload()


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    config: DecodingConfig,
    progress: bool = True,
    description: str = "generating",
    add_special_tokens: bool = True,
) -> list[str]:
    """Continuations of ``prompts`` (the new tokens only, decoded), in the order of ``prompts``.

    Batches are left-padded (a decoder-only model continues from the last position) and formed from
    prompts of similar length, to waste less compute on padding. The tokenizer's padding side and pad
    token are restored afterwards. ``add_special_tokens=False`` for prompts that already hold them (text
    rendered by a chat template, which writes its own BOS).
    """
    import torch
    from tqdm.auto import tqdm

    if config.batch_size < 1 or config.num_beams < 1 or config.max_new_tokens < 1:
        raise ValueError(f"batch_size, num_beams and max_new_tokens must be >= 1, got {config}")
    if not prompts:
        return []
    saved_side, saved_pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    outputs: list[str] = [""] * len(prompts)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "num_beams": config.num_beams,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if config.num_beams > 1:
        gen_kwargs.update(length_penalty=config.length_penalty, early_stopping=True)
    if config.no_repeat_ngram_size > 0:
        gen_kwargs["no_repeat_ngram_size"] = config.no_repeat_ngram_size
    try:
        bar = tqdm(total=len(prompts), desc=description, disable=not progress, unit="input")
        with torch.inference_mode():
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                add_special_tokens=add_special_tokens).to(device)
                out = model.generate(**enc, **gen_kwargs)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[i] = text
                bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved_side, saved_pad
        model.train(was_training)
    return outputs


def one_line(text: str) -> str:
    """Whitespace (newlines included) collapsed, so that a prediction fits on one line."""
    return " ".join(text.split())


def write_lines_atomic(path: str | Path, lines: Sequence[str], overwrite: bool = False) -> Path:
    """Write ``lines`` one per line, atomically (:func:`lorma.plumbing.fileio.atomic_write_text`).

    Refuses to replace an existing file unless ``overwrite``; refuses a line with a newline in it,
    which would shift every later prediction against its reference.
    """
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists (pass overwrite to replace it)")
    for i, line in enumerate(lines):
        if "\n" in line or "\r" in line:
            raise ValueError(f"line {i + 1} for {p} contains a newline; use one_line() first")
    from lorma.plumbing.fileio import atomic_write_text

    return atomic_write_text(p, "".join(line + "\n" for line in lines))
