"""The paper's presets (Tables 16 and 17) load as run configs and say what the tables say."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorma.recipes.config import build_config, load_yaml
from lorma.tasks.decoding import PAPER_DECODING
from lorma.tasks.generation import decoding_from_options

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Table 16, per task: weight decay, adapter dropout, label smoothing, length penalty
TABLE16 = {"e2e": (0.01, 0.1, 0.1, 0.9), "webnlg": (0.01, 0.1, 0.1, 0.8), "dart": (0.0, 0.0, 0.0, 0.8)}
# Table 16, per inflation: learning rate, alpha
TABLE16_METHOD = {"plus": ("lorma-plus", 2e-4, 32.0), "pi": ("lorma-pi", 1e-4, 8.0)}


def _load(path: Path):
    return build_config(load_yaml(path), source=str(path))


@pytest.mark.parametrize("task", sorted(TABLE16))
@pytest.mark.parametrize("variant", sorted(TABLE16_METHOD))
def test_table16_presets(task: str, variant: str) -> None:
    cfg = _load(CONFIGS / "nlg" / f"gpt2-medium-{task}-{variant}.yaml")
    wd, dropout, smoothing, length_penalty = TABLE16[task]
    method, lr, alpha = TABLE16_METHOD[variant]
    assert (cfg.task, cfg.method, cfg.r, cfg.alpha, cfg.side, cfg.dropout) == (task, method, 4, alpha, "pre", dropout)
    t = cfg.training
    assert t["learning_rate"] == pytest.approx(lr) and t["weight_decay"] == wd
    assert t["label_smoothing_factor"] == smoothing and t["lr_scheduler_type"] == "linear"
    assert (t["warmup_steps"], t["num_train_epochs"], t["per_device_train_batch_size"]) == (500, 5, 8)
    decoding = decoding_from_options(task, cfg.task_options)
    assert (decoding.num_beams, decoding.length_penalty, decoding.no_repeat_ngram_size) == (10, length_penalty, 4)
    assert decoding == PAPER_DECODING[task].with_overrides(batch_size=decoding.batch_size)
    assert cfg.target_modules is None  # GPT-2's default: c_attn, q and v parts


@pytest.mark.parametrize("task", ["gsm8k", "math"])
@pytest.mark.parametrize(
    ("model", "r", "targets"),
    [
        ("gemma-2b", 4, {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"}),
        ("llama-3-8b", 8, {"up_proj", "down_proj", "o_proj", "gate_proj"}),
    ],
)
def test_table17_presets(task: str, model: str, r: int, targets: set[str]) -> None:
    cfg = _load(CONFIGS / "math" / f"{model}-{task}.yaml")
    assert (cfg.task, cfg.method, cfg.r, cfg.side, cfg.max_seq_length) == (task, "lorma-plus", r, "pre", 512)
    assert set(cfg.target_modules or []) == targets
    t = cfg.training
    assert t["learning_rate"] == pytest.approx(5e-4) and t["lr_scheduler_type"] == "cosine"
    assert t["warmup_steps"] == 0.1 and t["num_train_epochs"] == 2  # transformers 5: a float < 1 is a ratio
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] == 64
    decoding = decoding_from_options(task, cfg.task_options)
    assert decoding.num_beams == 1  # greedy


def test_every_preset_is_covered() -> None:
    found = sorted(p.name for p in (CONFIGS / "nlg").glob("*.yaml")) + sorted(
        p.name for p in (CONFIGS / "math").glob("*.yaml"))
    assert len(found) == 6 + 4
